"""Shardings for optimizer states that follow the params' shardings.

With the params sharded over a device mesh (``NamedSharding``), an optimizer
state should be sharded along the same axes, or every device holds all of
it. For ``optax.adamw`` that is easy: the moments have the params' shapes.
GaLore's state is not param-shaped. A kernel ``W`` of shape ``(in, out)``
projected on its rows has a projector ``(r, in)`` and moments ``(r, out)``.
:func:`state_sharding` gives each state array the sharding of the param axis
it follows and never splits a rank axis, whose length ``r`` need not divide
the mesh.

Every state leaf is matched to its param by path: per-param states mirror the
params' tree (optax's convention, kept by every transform here), so the
param's path is a run of keys inside the leaf's path (``[0].base_state.mu``
then the param's path; ``[0].projector``, the param's path, then ``.row``).
The longest such param path wins. With ``P`` the param's shape and ``p`` its
``PartitionSpec`` (``b`` = the specs of its leading batch axes, all but the
last two), the leaf of shape ``S`` gets:

* ``S == P``: ``p`` (Adam moments, ``MultiSteps`` accumulators, ...).
* a :class:`~galore_jax.Projectors` ``row`` of shape ``P[:-2] + (r, in)``:
  ``b + (None, p[-2]')``; a ``col`` of shape ``P[:-2] + (out, r)``:
  ``b + (p[-1]', None)``.
* ``S`` of ``P``'s rank with ``P``'s batch axes, else (low-rank moments):
  ``b + (None, p[-1]')`` if ``S[-1] == P[-1]`` (``(r, out)``), else
  ``b + (p[-2]', None)`` if ``S[-2] == P[-2]`` (``(in, r)``), else
  ``b + (None, None)`` (``(r, r)``).

  ``p[i]'`` is ``p[i]``, or, when the param is not split along that axis,
  the spec of its other matrix axis if that divides the state's axis: an
  FSDP kernel split along ``in`` and projected on its rows still gets its
  ``(r, out)`` moments split along ``out``, so the state shrinks as 1/devices.
* ``S`` starting with ``P``'s batch axes and shorter (per-layer state of a
  stacked leaf: Q-GaLore's codes, gap, queue): ``b`` then ``None``.
* 8-bit moments (:class:`~galore_jax.adam_8bit.BlockwiseCodes`, codes
  ``(blocks, block_size)``), over the mesh axes of ``p``: the blocks for a
  param-shaped moment of a param split along its leading axis (blocks are
  runs of its rows); otherwise the codes within each block, ``absmax``
  whole (a low-rank moment's row-major blocks cannot follow a column split,
  and XLA would gather the gradient to match); else whatever divides.
* Q-GaLore's INT4 projector codes are replicated along every axis but the
  stacked-layer ones: they hold the rank axis in their flattened rows, and
  at an eighth of a float32 projector they are the smallest part.
* anything else (step counts, hyperparameters, PRNG keys): replicated.

A leaf that matches no rule is replicated: always correct, never a gather
of anything but itself. Projected leaves with custom ``dim_numbers`` whose
matrix view merges axes fall under the last rule.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from galore_jax import adam_8bit
from galore_jax import projection

__all__ = ("state_sharding",)

_KeyPath = tuple


def _is_node(x: Any) -> bool:
  return isinstance(x, (projection.Projectors, adam_8bit.BlockwiseCodes))


def _full_spec(spec: PartitionSpec, ndim: int) -> tuple:
  """The spec as a tuple of one entry per axis (``None`` padded)."""
  spec = tuple(spec)
  return spec + (None,) * (ndim - len(spec))


def _mesh_axes(entry: Any) -> tuple:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _param_table(params: Any, param_shardings: Any):
  """``{param path: (shape, per-axis spec, sharding)}`` and the mesh."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  try:
    shardings = treedef.flatten_up_to(param_shardings)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "`param_shardings` must be a tree like `params` with one"
        f" NamedSharding per array: {e}") from None
  table, mesh = {}, None
  for (path, x), sh in zip(with_path, shardings):
    if not isinstance(sh, NamedSharding):
      raise TypeError(
          "`param_shardings` must hold a jax.sharding.NamedSharding per"
          f" param, got {sh!r} at {jax.tree_util.keystr(path) or '<root>'}")
    if mesh is None:
      mesh = sh.mesh
    elif sh.mesh != mesh:
      raise ValueError("every param sharding must use the same mesh")
    shape = tuple(np.shape(x))
    table[projection.normalize_path(path)] = (
        shape, _full_spec(sh.spec, len(shape)), sh)
  if mesh is None:
    raise ValueError("`params` has no arrays to take shardings from")
  return table, mesh


def _owner(path: _KeyPath, table: dict):
  """The param whose path is the longest run of keys inside ``path``."""
  best = None
  for i in range(len(path) + 1):
    for j in range(len(path), i - 1, -1):
      if best is not None and j - i <= best[0]:
        break
      if path[i:j] in table:
        best = (j - i, table[path[i:j]])
        break
  return None if best is None else best[1]


def _follow(p: tuple, axis: int, size: int, mesh) -> Any:
  """The spec of a state axis of ``size`` that keeps param axis ``axis``.

  The param's own entry for that axis; if that is unsharded, the entry of
  the other matrix axis (the one projected away) when it divides ``size``,
  so the low-rank state still splits over the devices that split the param.
  """
  entry = p[axis]
  if entry is None:
    other = p[-1] if axis == -2 else p[-2]
    n = math.prod(mesh.shape[a] for a in _mesh_axes(other))
    if other is not None and size % n == 0:
      entry = other
  return entry


def _leaf_spec(shape: tuple, param: tuple, side: str | None, mesh) -> tuple:
  """Per-axis spec of a state array of ``shape`` that belongs to ``param``."""
  p_shape, p, _ = param
  none = (None,) * len(shape)
  if shape == p_shape:
    return p
  nb = len(p_shape) - 2
  if nb < 0 or shape[:nb] != p_shape[:nb]:
    return none
  batch = p[:nb]
  if side == "row":  # batch + (r, in)
    if len(shape) == nb + 2 and shape[-1] == p_shape[-2]:
      return batch + (None, _follow(p, -2, shape[-1], mesh))
    return none
  if side == "col":  # batch + (out, r)
    if len(shape) == nb + 2 and shape[-2] == p_shape[-1]:
      return batch + (_follow(p, -1, shape[-2], mesh), None)
    return none
  if len(shape) == len(p_shape):
    if shape[-1] == p_shape[-1]:  # (r, out)
      return batch + (None, _follow(p, -1, shape[-1], mesh))
    if shape[-2] == p_shape[-2]:  # (in, r)
      return batch + (_follow(p, -2, shape[-2], mesh), None)
    return batch + (None, None)  # (r, r)
  if nb and len(shape) >= nb:  # per-layer state of a stacked leaf
    return batch + (None,) * (len(shape) - nb)
  return none


def _block_specs(codes_shape: tuple, param: tuple, mesh) -> tuple:
  """Specs of 8-bit ``codes`` ``(blocks, block_size)`` and ``absmax``
  ``(blocks,)`` over the mesh axes of the owning param.

  A param-shaped moment of a param split along its leading axis only: the
  blocks, contiguous runs of those rows. Otherwise (a low-rank moment, whose
  row-major blocks cannot follow a split of its columns): the codes within
  each block, absmax whole, so XLA need not gather the gradient to match.
  Then the blocks if that is all that divides; else replicated.
  """
  p_shape, p, _ = param
  axes = tuple(a for entry in p for a in _mesh_axes(entry))
  if not axes or len(codes_shape) != 2:
    return (None,) * len(codes_shape), (None,)
  size = math.prod(mesh.shape[a] for a in axes)
  entry = axes if len(axes) > 1 else axes[0]
  blocks, block = codes_shape
  param_shaped = blocks == -(-math.prod(p_shape) // block)
  lead_only = bool(p) and p[0] is not None and all(e is None for e in p[1:])
  by_blocks = ((entry, None), (entry,))
  if param_shaped and lead_only and blocks % size == 0:
    return by_blocks
  if block % size == 0:
    return (None, entry), (None,)
  if blocks % size == 0:
    return by_blocks
  return (None, None), (None,)


def state_sharding(tx: optax.GradientTransformation, params: Any,
                   param_shardings: Any, *, state: Any = None) -> Any:
  r"""Shardings for ``tx.init(params)`` that follow the params' shardings.

  See the module docstring for the rules. In short: state arrays shaped like
  a param take its sharding; GaLore's projectors and low-rank moments take
  the sharding of the param axis they follow, their rank axis replicated;
  Q-GaLore's per-layer state follows the stacked-layer axes; 8-bit moments
  split their blocks over the param's mesh axes; the rest is replicated.

  Args:
    tx: the optimizer, any ``optax.GradientTransformation`` (chains,
      ``inject_hyperparams``, ``MultiSteps`` and ``masked`` included).
    params: the params (arrays or ``jax.ShapeDtypeStruct``), as given to
      ``tx.init``.
    param_shardings: a tree like ``params`` of ``NamedSharding``, all over
      one mesh (``nnx.get_named_sharding(params, mesh)`` for Flax NNX).
    state: an existing state to take the structure from instead of
      ``tx.init(params)``, e.g. ``nnx.Optimizer``'s ``opt_state``, whose
      leaves sit in ``OptVariable`` nodes. ``nnx.Optimizer`` copies each
      param's sharding onto its whole per-param state, which splits the
      wrong axis of a low-rank one; reshard it with this.

  Returns:
    A tree like ``jax.eval_shape(tx.init, params)`` (or ``state``) of
    ``NamedSharding``, for ``jax.jit(tx.init, out_shardings=...)``,
    ``jax.device_put`` and a train step's in and out shardings.

  Examples:
    >>> import jax, numpy as np
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> from galore_jax import galore_adamw, state_sharding
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    >>> params = {"w": jax.numpy.ones((64, 32))}
    >>> tx = galore_adamw(1e-3, rank=8)
    >>> sh = state_sharding(tx, params, {"w": NamedSharding(mesh, P("fsdp"))})
    >>> sh[0].base_state.mu["w"].spec  # (in, r): follows `w`'s axis 0
    P('fsdp', None)
  """
  table, mesh = _param_table(params, param_shardings)
  abstract = jax.eval_shape(tx.init, params) if state is None else state
  with_path, treedef = jax.tree_util.tree_flatten_with_path(
      abstract, is_leaf=_is_node)
  out = []
  for path, leaf in with_path:
    path = projection.normalize_path(path)
    param = _owner(path, table)
    if isinstance(leaf, projection.Projectors):
      out.append(projection.Projectors(*[
          x if isinstance(x, optax.MaskedNode) else NamedSharding(
              mesh, PartitionSpec(*(
                  _leaf_spec(tuple(np.shape(x)), param, side, mesh) if param
                  else (None,) * np.ndim(x))))
          for side, x in zip(("row", "col"), leaf)]))
    elif isinstance(leaf, adam_8bit.BlockwiseCodes):
      codes = tuple(np.shape(leaf.codes))
      specs = (_block_specs(codes, param, mesh) if param
               else ((None,) * len(codes), (None,)))
      out.append(adam_8bit.BlockwiseCodes(
          codes=NamedSharding(mesh, PartitionSpec(*specs[0])),
          absmax=NamedSharding(mesh, PartitionSpec(*specs[1]))))
    elif param and tuple(np.shape(leaf)) == param[0]:
      out.append(param[2])  # param-shaped: the param's own sharding
    else:
      shape = tuple(np.shape(leaf))
      spec = (_leaf_spec(shape, param, None, mesh) if param
              else (None,) * len(shape))
      out.append(NamedSharding(mesh, PartitionSpec(*spec)))
  return treedef.unflatten(out)
