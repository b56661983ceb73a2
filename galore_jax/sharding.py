"""Shardings for optimizer states that follow the params' shardings.

With the params sharded over a device mesh (``NamedSharding``), an optimizer
state should be sharded along the same axes, or every device holds all of
it. For ``optax.adamw`` that is easy: the moments have the params' shapes.
GaLore's state is not param-shaped. A kernel ``W`` of shape ``(in, out)``
projected on its rows has a projector ``(r, in)`` and moments ``(r, out)``.
:func:`state_sharding` gives each state array the sharding of the param axis
it follows and never splits a rank axis, whose length ``r`` need not divide
the mesh.

Which param axis each state axis follows is declared by the transform that
owns the state (:mod:`galore_jax.layout`): GaLore's and Q-GaLore's states
and 8-bit Adam's state say where their projectors, low-rank moments,
per-layer schedules and blockwise codes lie. From a declared
:class:`~galore_jax.layout.View`, a state axis takes the spec of the first
param axis it follows that is split over the mesh and whose devices divide
it: an FSDP kernel split along ``in`` and projected on its rows still gets
its ``(r, out)`` moments split along ``out`` (borrowing ``in``'s devices),
so the state shrinks as 1/devices. A mesh axis is used once per array.

8-bit moments (:class:`~galore_jax.adam_8bit.BlockwiseCodes`, codes
``(blocks, block_size)``) split over the mesh axes of their param: the
blocks for a moment laid out as a param split along its leading axis only
(blocks are runs of its rows); otherwise the codes within each block,
``absmax`` whole (a low-rank moment's row-major blocks cannot follow a
column split, and XLA would gather the gradient to match); else whatever
divides.

States that declare nothing (optax's own: ``ScaleByAdamState``,
``MultiSteps`` accumulators, ...) follow optax's convention that per-param
states mirror the params' tree: an array at a param's path (the param's
keys as a run inside the array's path; the longest run wins) with the
param's shape takes the param's sharding. Everything else (step counts,
hyperparameters, PRNG keys) is replicated: always correct, never a gather
of anything but itself.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from galore_jax import layout

__all__ = ("state_sharding",)

_KeyPath = tuple


def _full_spec(spec: PartitionSpec, ndim: int) -> tuple:
  """The spec as a tuple of one entry per axis (``None`` padded)."""
  spec = tuple(spec)
  return spec + (None,) * (ndim - len(spec))


def _mesh_axes(entry: Any) -> tuple:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _param_table(params: Any, param_shardings: Any):
  """``{param path: the param's own View}`` and the mesh; each view's
  ``param`` is ``(shape, per-axis spec, sharding)``."""
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
    table[layout.normalize_path(path)] = layout.own_view(
        shape, (shape, _full_spec(sh.spec, len(shape)), sh))
  if mesh is None:
    raise ValueError("`params` has no arrays to take shardings from")
  return table, mesh


def _owner(path: _KeyPath, table: dict):
  """The view of the param whose path is the longest run of keys inside
  ``path`` (None if none)."""
  best = None
  for i in range(len(path) + 1):
    for j in range(len(path), i - 1, -1):
      if best is not None and j - i <= best[0]:
        break
      if path[i:j] in table:
        best = (j - i, table[path[i:j]])
        break
  return None if best is None else best[1]


def _generic(path: _KeyPath, x: Any, views: dict) -> layout.View:
  """optax's convention: an array at a param's path with its shape."""
  shape = tuple(np.shape(x))
  view = _owner(path, views)
  if view is not None and layout.matches(view, shape):
    return view.derive(shape, view.axes)
  return layout.replicated(shape)


def _layouts(node: Any, views: dict) -> Any:
  """A tree like ``node`` of :class:`~galore_jax.layout.View` and
  :class:`~galore_jax.layout.Blocks`: declared where a state type declares
  its layout, optax's convention elsewhere."""
  if layout.declares(node):
    return node.layout(views, _layouts)
  return layout.by_path(
      node, lambda path, x: (_layouts(x, views) if layout.declares(x)
                             else _generic(path, x, views)),
      is_leaf=layout.declares)


def _spec(view: layout.View, mesh) -> tuple:
  """Per-axis spec of an array laid out as ``view``."""
  if view.param is None:
    return (None,) * len(view.shape)
  _, p, _ = view.param
  used, out = set(), []
  for size, follows in zip(view.shape, view.axes):
    entry = None
    for axis in follows:
      candidate = p[axis]
      axes = _mesh_axes(candidate)
      n = math.prod(mesh.shape[a] for a in axes)
      if candidate is not None and size % n == 0 and not used & set(axes):
        entry = candidate
        used |= set(axes)
        break
    out.append(entry)
  return tuple(out)


def _is_own(view: layout.View) -> bool:
  """Whether ``view`` is its param's own (the param's sharding applies)."""
  p_shape = view.param[0]
  return view.shape == p_shape and view.axes == layout.own_view(
      p_shape).axes


def _block_specs(blocks: layout.Blocks, mesh) -> tuple:
  """Specs of 8-bit ``codes`` ``(blocks, block_size)`` and ``absmax``
  ``(blocks,)`` over the mesh axes of the owning param.

  A moment laid out as its param, the param split along its leading axis
  only: the blocks, contiguous runs of those rows. Otherwise (a low-rank
  moment, whose row-major blocks cannot follow a split of its columns): the
  codes within each block, absmax whole, so XLA need not gather the gradient
  to match. Then the blocks if that is all that divides; else replicated.
  """
  view = blocks.of
  none = ((None,) * len(blocks.codes_shape), (None,))
  if view.param is None or len(blocks.codes_shape) != 2:
    return none
  _, p, _ = view.param
  axes = tuple(a for entry in p for a in _mesh_axes(entry))
  if not axes:
    return none
  size = math.prod(mesh.shape[a] for a in axes)
  entry = axes if len(axes) > 1 else axes[0]
  n_blocks, block = blocks.codes_shape
  lead_only = bool(p) and p[0] is not None and all(e is None for e in p[1:])
  by_blocks = ((entry, None), (entry,))
  if _is_own(view) and lead_only and n_blocks % size == 0:
    return by_blocks
  if block % size == 0:
    return (None, entry), (None,)
  if n_blocks % size == 0:
    return by_blocks
  return (None, None), (None,)


def _sharding(leaf: Any, mesh) -> NamedSharding:
  if isinstance(leaf, layout.Blocks):
    codes, absmax = _block_specs(leaf, mesh)
    return NamedSharding(mesh, PartitionSpec(
        *(codes if leaf.part == "codes" else absmax)))
  if leaf.param is not None and _is_own(leaf):
    return leaf.param[2]  # param-shaped: the param's own sharding
  return NamedSharding(mesh, PartitionSpec(*_spec(leaf, mesh)))


def state_sharding(tx: optax.GradientTransformation, params: Any,
                   param_shardings: Any, *, state: Any = None) -> Any:
  r"""Shardings for ``tx.init(params)`` that follow the params' shardings.

  See the module docstring for the rules. In short: each state array takes
  the sharding of the param axes its transform declares it follows
  (:mod:`galore_jax.layout`): GaLore's projectors and low-rank moments
  follow the param axis they keep, their rank axis replicated; Q-GaLore's
  per-layer state follows the stacked-layer axes; 8-bit moments split their
  blocks over the param's mesh axes; optax's param-shaped states take the
  param's sharding; the rest is replicated.

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
  return jax.tree.map(lambda leaf: _sharding(leaf, mesh),
                      _layouts(abstract, table), is_leaf=layout.is_layout)
