r"""Layerwise train steps: each block is updated as soon as its gradient exists.

A jitted ``value_and_grad`` + ``tx.update`` step holds the gradient of every
param at once, and for a model whose blocks are stacked into ``(L, ...)``
leaves and run with ``lax.scan``, XLA keeps the scan's stacked gradients in
one buffer until the update. This module's step never does. For a model

.. math::
  x_0 = \mathrm{embed}(\theta_o, b), \qquad
  x_{l+1} = \mathrm{block}(\theta_l, x_l), \qquad
  \ell = \mathrm{head}(\theta_o, x_L, b),

it runs the forward over the stacked blocks keeping only each block's input
:math:`x_l` (as rematerialization does), then a reverse loop over the layers:
recompute block :math:`l`, take its VJP, update :math:`\theta_l` and its
optimizer state right away and write them back in place, and pass the input
cotangent down. The outer params :math:`\theta_o` (embeddings, final norm,
head) are updated last, from the head's and the embedding's gradients.

Any ``optax.GradientTransformation`` works for the blocks: its state is
created per layer by ``jax.vmap(tx.init)`` (every leaf gains a leading layer
axis) and each layer's slice is updated by ``tx.update`` inside the loop.
With the same transform, the params after a step equal those of the plain
step up to float rounding (the order of sums changes). Elementwise states
(Adam, AdamW, Lion, schedules, ``inject_hyperparams``) and GaLore's per-matrix
projectors split per layer exactly; 8-bit Adam applies its blocking and
``min_8bit_size`` to each layer's slice, which matches the stacked leaf when
every layer's size is a multiple of the block size and at least
``min_8bit_size``.

Gradient accumulation: ``batch`` carries a leading micro-batch axis ``K``.
The forward stashes each block's input for every micro-batch, and the
backward loop runs the micro-batches *inside* each layer, so the gradient
accumulated for layer :math:`l` is the exact mean over the ``K`` micro-batches
(``optax.MultiSteps``'s running mean) while only one layer's gradient is ever
held. A GaLore refresh therefore sees the same accumulated gradient as under
``optax.MultiSteps``: no sketch, no approximation. The stash costs ``K L``
activations of one block's input, ``(B, S, D)`` each.

Clipping (``max_grad_norm``):

- ``clip="global"`` (exact ``optax.clip_by_global_norm`` of the accumulated
  gradient): a first backward pass computes every layer's gradient and
  keeps only its squared norm (and the outer gradient), then the fused pass
  recomputes and updates with the clipped gradients. One more backward.
- ``clip="per_layer"`` (one pass): each of the ``L + 1`` pieces (every
  block, and the outer params) is clipped to ``max_grad_norm / sqrt(L + 1)``
  on its own, so the applied gradient's global norm is at most
  ``max_grad_norm``; it is not the global clip's direction.

A clip inside ``tx`` (``optax.clip_by_global_norm``) would see one layer's
gradient: use ``max_grad_norm`` instead. Transforms whose state shows they
need every leaf at once (``optax.MultiSteps``, ``optax.apply_if_finite``)
are refused with a clear error.

INT8 weights: block leaves may be
:class:`~galore_jax.quantization.QuantizedArray`\ s quantized per layer
(:func:`quantize_blocks`); each layer is dequantized inside the loops only,
and its update is applied with
:func:`~galore_jax.q_galore.apply_updates_stochastic` under the key
``fold_in(fold_in(fold_in(key(seed), count), 1), l)`` (the outer params use
``fold_in(..., 0)``), so a step's randomness is a function of the seed and the
step count, and a resumed run repeats it.

The step reports the mean loss over the micro-batches and the global norm of
the accumulated gradient before clipping (per-layer squared norms summed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from galore_jax import _inplace
from galore_jax import _validation
from galore_jax import q_galore
from galore_jax import quantization
from galore_jax import sharding

__all__ = ["Layerwise", "LayerwiseState", "dequantize_blocks", "layerwise_step",
           "num_layers", "quantize_blocks", "remat_scan"]

CLIP_MODES = ("global", "per_layer")
# States of transforms that need every leaf of the step at once.
_WHOLE_TREE_STATES = {
    optax.MultiStepsState: "accumulates whole gradients: give `batch` a"
                           " leading micro-batch axis instead",
    optax.ApplyIfFiniteState: "checks the whole gradient: check the step's"
                              " reported loss and grad_norm instead",
}


class LayerwiseState(NamedTuple):
  """State of a :func:`layerwise_step`.

  Attributes:
    count: int32 number of steps taken (keys the stochastic rounding).
    outer: the outer transform's state for the outer params.
    blocks: the block transform's state, one per layer: every leaf has a
      leading layer axis (``jax.vmap(tx.init)`` of the blocks).
  """

  count: jax.Array
  outer: optax.OptState
  blocks: optax.OptState


class Layerwise(NamedTuple):
  """A layerwise train step: ``init`` and ``step``, both pure and jittable.

  Attributes:
    init: ``(outer, blocks) -> LayerwiseState``.
    step: ``(outer, blocks, state, batch) -> (outer, blocks, state,
      metrics)``; ``metrics`` has the scalars ``loss`` and ``grad_norm``.
      Donate ``outer``, ``blocks`` and ``state`` when jitting, so each
      layer's update is written in place.
    loss: ``(outer, blocks, batch) -> loss``, the mean loss over the
      micro-batch axis, forward only, one layer dequantized at a time.
    state_sharding: ``(outer, blocks, outer_shardings, block_shardings) ->``
      a ``LayerwiseState`` of ``NamedSharding``: the outer state by
      :func:`galore_jax.state_sharding`, each layer's state by the same
      rules applied to one layer's params, with the layer axis unsplit.
      The shardings are those of the float params (a ``QuantizedArray``
      leaf's float view).
  """

  init: Callable[[Any, Any], LayerwiseState]
  step: Callable[..., tuple[Any, Any, LayerwiseState, dict]]
  loss: Callable[[Any, Any, Any], jax.Array]
  state_sharding: Callable[..., LayerwiseState]


# ---------------------------------------------------------------------------
# Per-layer slices of stacked trees.


def _leaves(tree: Any) -> list:
  return jax.tree.leaves(tree, is_leaf=quantization.is_quantized)


def num_layers(blocks: Any) -> int:
  """The shared leading axis of every leaf of ``blocks``, checked.

  A :class:`~galore_jax.quantization.QuantizedArray` leaf must be quantized
  per layer (:func:`quantize_blocks`): its codes are ``(L, codes)``.
  """
  flat = jax.tree_util.tree_flatten_with_path(
      blocks, is_leaf=quantization.is_quantized)[0]
  if not flat:
    raise ValueError("layerwise: `blocks` has no leaves; pass the stacked"
                     " block params, every leaf of shape (layers, ...)")
  sizes = {}
  for path, x in flat:
    name = jax.tree_util.keystr(path) or "<root>"
    if quantization.is_quantized(x):
      if x.codes.ndim != 2:
        raise ValueError(
            f"layerwise: block leaf {name} is a QuantizedArray of shape"
            f" {x.shape} quantized as one array; quantize the stacked blocks"
            " per layer with galore_jax.layerwise.quantize_blocks")
      sizes[name] = x.codes.shape[0]
    elif not hasattr(x, "shape") or len(x.shape) < 1:
      raise ValueError(
          f"layerwise: block leaf {name} is not stacked (shape"
          f" {getattr(x, 'shape', None)}); every block leaf needs a leading"
          " layer axis, as nnx.vmap / scanned layers create")
    else:
      sizes[name] = x.shape[0]
  if len(set(sizes.values())) != 1:
    raise ValueError(
        "layerwise: the block leaves do not share one leading layer axis:"
        + ", ".join(f" {k}: {v}" for k, v in sizes.items()))
  return next(iter(sizes.values()))


def _layer(tree: Any, l: jax.Array) -> Any:
  return jax.tree.map(
      lambda a: jax.lax.dynamic_index_in_dim(a, l, 0, keepdims=False), tree)


def _set_layer(tree: Any, value: Any, l: jax.Array) -> Any:
  return jax.tree.map(
      lambda a, v: jax.lax.dynamic_update_index_in_dim(
          a, v.astype(a.dtype), l, 0), tree, value)


def quantize_blocks(blocks: Any, bits: int = 8, group_size: int = 256, *,
                    mask: Any = None, zero_point: str = "float") -> Any:
  """:func:`~galore_jax.q_galore.quantize_params` of each layer of ``blocks``.

  Every selected leaf becomes a ``QuantizedArray`` of one layer's shape whose
  codes, scales and zero points carry a leading layer axis, so the layerwise
  step slices one layer's codes at a time.

  Args:
    blocks: stacked block params, every leaf ``(L, ...)``.
    bits, group_size, zero_point: as in
      :func:`~galore_jax.q_galore.quantize_params`.
    mask: a pytree of bools like ``blocks`` (or a callable of one layer's
      params); default: float leaves with ndim >= 2 per layer.

  Returns:
    ``blocks`` with the selected leaves quantized layer by layer.

  Examples:
    >>> import jax.numpy as jnp
    >>> from galore_jax import layerwise
    >>> blocks = {"w": jnp.ones((3, 64, 32)), "norm": jnp.ones((3, 32))}
    >>> q = layerwise.quantize_blocks(blocks)
    >>> q["w"].shape, q["w"].codes.shape, q["norm"].shape
    ((64, 32), (3, 2048), (3, 32))
  """
  num_layers(blocks)
  if mask is not None and not callable(mask):
    fixed = mask
    mask = lambda _: fixed
  return jax.vmap(lambda b: q_galore.quantize_params(
      b, bits, group_size, mask=mask, zero_point=zero_point))(blocks)


def dequantize_blocks(blocks: Any) -> Any:
  """The float blocks of :func:`quantize_blocks`'s output, ``(L, ...)``."""
  num_layers(blocks)
  return jax.vmap(q_galore.dequantize_params)(blocks)


# ---------------------------------------------------------------------------
# Validation.


def _check_state(state: Any, what: str) -> None:
  nodes = jax.tree.leaves(
      state, is_leaf=lambda x: type(x) in _WHOLE_TREE_STATES)
  for node in nodes:
    why = _WHOLE_TREE_STATES.get(type(node))
    if why is not None:
      raise ValueError(
          f"layerwise: {what} holds a {type(node).__name__}, which {why}. A"
          " layerwise step runs the transform on one layer at a time")


def _check_callable(name: str, fn: Any) -> None:
  if not callable(fn):
    raise TypeError(f"`{name}` must be a callable, got {fn!r}")


def _check_tx(name: str, tx: Any) -> None:
  if isinstance(tx, optax.MultiSteps):
    raise ValueError(
        f"layerwise: `{name}` is an optax.MultiSteps, which"
        f" {_WHOLE_TREE_STATES[optax.MultiStepsState]}")
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(f"`{name}` must be an optax.GradientTransformation, got"
                    f" {tx!r}")


def _check_model(embed, block, head, outer, layer, batch) -> None:
  """Shapes of the three pieces, checked once at trace time."""
  micro = _layer(batch, 0)
  x0 = jax.eval_shape(embed, outer, micro)
  if not isinstance(x0, jax.ShapeDtypeStruct):
    raise ValueError(f"layerwise: `embed` must return one array (the first"
                     f" block's input), got {x0}")
  x1 = jax.eval_shape(block, layer, x0)
  if not isinstance(x1, jax.ShapeDtypeStruct) or (
      x1.shape, x1.dtype) != (x0.shape, x0.dtype):
    raise ValueError(
        "layerwise: `block` must map its input to an array of the same shape"
        f" and dtype (the next block's input): {x0.shape} {x0.dtype} ->"
        f" {getattr(x1, 'shape', x1)} {getattr(x1, 'dtype', '')}. A model"
        " for a layerwise step is embed -> L identical blocks -> head")
  loss = jax.eval_shape(head, outer, x0, micro)
  if not isinstance(loss, jax.ShapeDtypeStruct) or loss.shape != ():
    raise ValueError(f"layerwise: `head` must return a scalar loss, got"
                     f" {loss}")


def _check_batch(batch: Any) -> None:
  leaves = jax.tree.leaves(batch)
  if not leaves or any(jnp.ndim(x) < 1 for x in leaves):
    raise ValueError("layerwise: every `batch` leaf needs a leading"
                     " micro-batch axis (size 1 without accumulation)")
  sizes = {x.shape[0] for x in leaves}
  if len(sizes) != 1:
    raise ValueError(f"layerwise: the `batch` leaves disagree on the"
                     f" micro-batch axis: {sorted(sizes)}")


# ---------------------------------------------------------------------------
# The step's pieces.


def _float_view(tree: Any) -> Any:
  return q_galore.dequantize_params(tree)


def _has_quantized(tree: Any) -> bool:
  return any(map(quantization.is_quantized, _leaves(tree)))


def _apply(params: Any, updates: Any, key: jax.Array) -> Any:
  if _has_quantized(params):
    return q_galore.apply_updates_stochastic(params, updates, key)
  return optax.apply_updates(params, updates)


def _sq_norm(tree: Any) -> jax.Array:
  return sum((jnp.sum(jnp.square(x.astype(jnp.float32)))
              for x in jax.tree.leaves(tree)), jnp.zeros([], jnp.float32))


def _micro_mean(fn: Callable[..., Any], xs: Any) -> tuple[Any, Any]:
  """``fn`` on each micro-batch ``xs[j]``, returning ``(g_j, out_j)``: the
  mean of the ``g_j`` and the stacked ``out_j``.

  The mean is ``optax.MultiSteps``'s running mean ``acc + (g - acc) / (j +
  1)`` in ``g``'s dtype (MultiSteps accumulates in the params' dtype); one
  micro-batch is returned as it is.
  """
  k = jax.tree.leaves(xs)[0].shape[0]
  if k == 1:
    g, out = fn(jax.tree.map(lambda x: x[0], xs))
    return g, jax.tree.map(lambda x: x[None], out)

  def micro(acc, args):
    j, x = args
    g, out = fn(x)
    acc = jax.tree.map(
        lambda a, v: a + (v - a) / (j + 1).astype(a.dtype), acc, g)
    return acc, out

  first, _ = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], xs))
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), first)
  return jax.lax.scan(micro, zeros, (jnp.arange(k), xs))


def _clip(tree: Any, norm: jax.Array, max_norm: float) -> Any:
  """``optax.clip_by_global_norm``'s formula given the norm."""
  trigger = norm < max_norm
  return jax.tree.map(
      lambda t: jax.lax.select(trigger, t,
                               (t / norm.astype(t.dtype)) * max_norm), tree)


def _float_layer(blocks, l):
  return _float_view(_layer(blocks, l))


def _forward(block, blocks, x0_K, n_layers, keep=True, layer=_float_layer):
  """Each block's input for every micro-batch, ``(L, K, ...)`` (None
  without ``keep``), and the last block's output ``(K, ...)``; block ``l``
  gets ``layer(blocks, l)``.

  The stacked params go through the loop's carry, so each layer's slice
  (and any conversion of it) is computed inside the loop, not hoisted out
  of it as a copy of the whole stack.
  """
  stash = jnp.zeros((n_layers,) + x0_K.shape, x0_K.dtype) if keep else None

  def body(l, carry):
    blocks, x_K, stash = carry
    blocks = jax.lax.optimization_barrier(blocks)
    if keep:
      stash = jax.lax.dynamic_update_index_in_dim(stash, x_K, l, 0)
    p = layer(blocks, l)
    x_K = jax.lax.map(lambda x: block(p, x), x_K)
    return blocks, x_K, stash

  _, x_K, stash = jax.lax.fori_loop(0, n_layers, body, (blocks, x0_K, stash))
  return stash, x_K


def _layer_grad(block, p, x_K, dx_K):
  """The micro-batch mean of block ``l``'s param gradient, and the
  cotangents of its inputs."""
  def micro(args):
    x, dx = args
    _, vjp = jax.vjp(block, p, x)
    return vjp(dx)

  return _micro_mean(micro, (x_K, dx_K))


def remat_scan(block: Callable[[Any, jax.Array], jax.Array], blocks: Any,
               x: jax.Array) -> jax.Array:
  r"""``x`` through the stacked ``blocks`` in turn, each block recomputed in
  the backward pass: a rematerialized ``lax.scan`` that holds one layer's
  converted weights at a time.

  The value and the gradients equal those of

  .. code-block:: python

    jax.lax.scan(lambda x, p: (jax.checkpoint(block)(p, x), None), x,
                 blocks)[0]

  (up to float rounding), and are that when no leaf of ``blocks`` is a bf16
  (or other sub-32-bit) float. With such leaves, a ``jax.custom_vjp`` runs
  loops of its own: the forward loop keeps each block's input; the backward
  loop recomputes block :math:`l` from it, takes its VJP and writes the
  layer's gradient into the stacked gradient in place. Both loops carry the
  bf16 leaves (as :func:`layerwise_step`'s loops carry the params), so no
  conversion of a whole stack is hoisted out of them: XLA:CPU, which
  computes bf16 matmuls in float32, otherwise keeps a float32 copy of every
  layer's weights through a scanned step (24 GiB at LLaMA-7B). Only the
  leaves being differentiated get a gradient buffer (a LoRA's frozen
  kernels, INT8 codes and the like get none), and what ``block`` closes
  over gets its gradient too. That path is reverse-mode only, as any
  ``jax.custom_vjp`` (``jax.jvp`` of it raises).

  Args:
    block: ``(layer_params, x) -> x``, one block; ``layer_params`` is one
      layer's slice of ``blocks``, as ``lax.scan`` passes it.
    blocks: the stacked block params, every leaf ``(L, ...)``
      (:class:`~galore_jax.quantization.QuantizedArray` leaves quantized per
      layer, as :func:`quantize_blocks` makes them).
    x: the first block's input.

  Returns:
    The last block's output, shaped like ``x``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from galore_jax import layerwise
    >>> block = lambda p, x: x + jnp.tanh(x @ p["w"])
    >>> blocks = {"w": 0.1 * jax.random.normal(jax.random.key(0), (3, 8, 8))}
    >>> x = jnp.ones((5, 8))
    >>> scan = lambda b: jax.lax.scan(
    ...     lambda x, p: (jax.checkpoint(block)(p, x), None), x, b)[0].sum()
    >>> ours = lambda b: layerwise.remat_scan(block, b, x).sum()
    >>> bool(jnp.allclose(jax.grad(ours)(blocks)["w"],
    ...                   jax.grad(scan)(blocks)["w"], rtol=1e-6))
    True
  """
  _check_callable("block", block)
  n_layers = num_layers(blocks)
  leaves, treedef = jax.tree.flatten(blocks)
  carried = _carried_leaves(blocks)
  if not any(carried):
    # Nothing XLA:CPU would convert: JAX's own rematerialized scan.
    body = jax.checkpoint(block)
    return jax.lax.scan(lambda x, p: (body(p, x), None), x, blocks)[0]
  # What `block` closes over becomes explicit arguments, so that the custom
  # VJP returns their gradients too (tied or shared params, say).
  fn, consts = jax.closure_convert(
      block, treedef.unflatten(_layer(leaves, 0)), x)
  return _remat_scan(fn, treedef, n_layers, carried)(leaves, consts, x)


def _carried_leaves(blocks: Any) -> list[bool]:
  """Which leaves of ``blocks`` (in ``jax.tree.leaves`` order)
  :func:`remat_scan`'s loops carry: bf16 / f16 weights, which XLA:CPU
  converts to float32. The others stay loop-invariant, so a broadcast is
  sliced without being materialized: the zero offsets of
  :func:`galore_jax.q_galore.value_and_grad`'s ``WithGradient`` leaves,
  whatever their dtype, are never carried."""
  with_grad = lambda n: isinstance(n, quantization.WithGradient)
  out = []
  for node in jax.tree.leaves(blocks, is_leaf=with_grad):
    if with_grad(node):
      out += [False] * len(jax.tree.leaves(node))
    else:
      out.append(jnp.issubdtype(node.dtype, jnp.floating)
                 and node.dtype.itemsize < 4)
  return out


def _remat_scan(block, treedef, n_layers, carried_mask):
  """:func:`remat_scan` of the flat block leaves, a ``jax.custom_vjp`` of
  ``(leaves, consts, x)``; ``block(layer, x, *consts)``."""

  def split(leaves):
    carried = [x if c else None for x, c in zip(leaves, carried_mask)]
    fixed = [None if c else x for x, c in zip(leaves, carried_mask)]
    return carried, fixed

  def layer_leaves(carried, fixed, l):
    """Layer ``l``'s leaves, the carried ones sliced from ``carried``."""
    return [a if a is not None else b for a, b in
            zip(_layer(carried, l), _layer(fixed, l))]

  def forward(leaves, consts, x, keep):
    # The layerwise step's forward loop, with one micro-batch: stash
    # (L, 1, ...), output (1, ...).
    carried, fixed = split(leaves)
    stash, y = _forward(
        lambda p, x: block(p, x, *consts), carried, x[None], n_layers, keep,
        layer=lambda c, l: treedef.unflatten(layer_leaves(c, fixed, l)))
    return y[0], stash

  @jax.custom_vjp
  def run(leaves, consts, x):
    return forward(leaves, consts, x, keep=False)[0]

  def fwd(leaves, consts, x):
    # Which inputs are differentiated: the residuals' tree structure carries
    # it, () for yes and None for no.
    mark = lambda p: () if p.perturbed else None
    marks = ([mark(p) for p in leaves], [mark(p) for p in consts], mark(x))
    leaves, consts = [p.value for p in leaves], [p.value for p in consts]
    y, stash = forward(leaves, consts, x.value, keep=True)
    return y, (leaves, consts, stash, marks)

  def bwd(res, dy):
    leaves, consts, stash, (leaf_marks, const_marks, x_mark) = res
    diff = [i for i, m in enumerate(leaf_marks) if m is not None]
    cdiff = [i for i, m in enumerate(const_marks) if m is not None]
    if isinstance(dy, jax.custom_derivatives.SymbolicZero):
      dy = jnp.zeros(stash.shape[2:], stash.dtype)
    carried, fixed = split(leaves)

    def body(i, carry):
      carried, grads, cgrads, dx = carry
      carried = jax.lax.optimization_barrier(carried)
      l = n_layers - 1 - i
      layer = layer_leaves(carried, fixed, l)

      def f(d, c, x):
        full, cs = list(layer), list(consts)
        for j, v in zip(diff, d):
          full[j] = v
        for j, v in zip(cdiff, c):
          cs[j] = v
        return block(treedef.unflatten(full), x, *cs)

      _, vjp = jax.vjp(f, [layer[j] for j in diff],
                       [consts[j] for j in cdiff], stash[l, 0])
      g, gc, dx = vjp(dx)
      cgrads = [a + b.astype(a.dtype) for a, b in zip(cgrads, gc)]
      return carried, _set_layer(grads, g, l), cgrads, dx

    grads = [jnp.zeros_like(leaves[j]) for j in diff]
    cgrads = [jnp.zeros_like(consts[j]) for j in cdiff]
    _, grads, cgrads, dx = jax.lax.fori_loop(
        0, n_layers, body, (carried, grads, cgrads, dy))
    out, cout = [None] * len(leaves), [None] * len(consts)
    for j, g in zip(diff, grads):
      out[j] = g
    for j, g in zip(cdiff, cgrads):
      cout[j] = g
    return out, cout, dx if x_mark is not None else None

  run.defvjp(fwd, bwd, symbolic_zeros=True)
  return run


def layerwise_step(
    embed: Callable[[Any, Any], jax.Array],
    block: Callable[[Any, jax.Array], jax.Array],
    head: Callable[[Any, jax.Array, Any], jax.Array],
    tx: optax.GradientTransformation,
    *,
    outer_tx: Optional[optax.GradientTransformation] = None,
    max_grad_norm: Optional[float] = None,
    clip: str = "global",
    seed: int = 0,
) -> Layerwise:
  r"""A train step that updates each block as soon as its gradient exists.

  See the module docstring for the algorithm, accumulation and clipping.

  Args:
    embed: ``(outer, micro_batch) -> x``, the first block's input.
    block: ``(layer_params, x) -> x``, one block; ``layer_params`` is one
      layer's slice of ``blocks`` (INT8 leaves dequantized).
    head: ``(outer, x, micro_batch) -> loss``, a scalar (the micro-batch's
      mean loss).
    tx: the blocks' transform; its state is created and updated per layer.
    outer_tx: the outer params' transform; default ``tx``.
    max_grad_norm: clip the accumulated gradient's global norm to this
      value (None: no clipping).
    clip: ``"global"`` (exact, one extra backward pass) or ``"per_layer"``
      (one pass; every block and the outer params clipped to
      ``max_grad_norm / sqrt(L + 1)``).
    seed: seed of the stochastic rounding of INT8 weights.

  Returns:
    A :class:`Layerwise` ``(init, step, loss, state_sharding)``.
    ``step(outer, blocks, state, batch)`` takes ``batch`` with a leading
    micro-batch axis ``K`` on every leaf and returns the new ``outer``,
    ``blocks``, state and ``{"loss", "grad_norm"}``.

  Raises:
    TypeError, ValueError: a piece that is not callable, a transform that is
      not an ``optax.GradientTransformation`` (or is ``optax.MultiSteps``), a
      bad ``clip`` or ``max_grad_norm``; at ``init`` / ``step``: blocks that
      are not stacked, a transform whose state cannot be split per layer or
      needs the whole tree, a model that is not embed -> blocks -> head.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from galore_jax import layerwise
    >>> embed = lambda o, b: b["x"] @ o["w_in"]
    >>> block = lambda p, x: x + jnp.tanh(x @ p["w"])
    >>> head = lambda o, x, b: jnp.mean((x @ o["w_out"] - b["y"]) ** 2)
    >>> k = jax.random.split(jax.random.key(0), 3)
    >>> outer = {"w_in": jax.random.normal(k[0], (4, 8)) / 2,
    ...          "w_out": jax.random.normal(k[1], (8, 1)) / 3}
    >>> blocks = {"w": 0.1 * jax.random.normal(k[2], (3, 8, 8))}  # 3 layers
    >>> lw = layerwise.layerwise_step(embed, block, head, optax.adamw(1e-2))
    >>> state = lw.init(outer, blocks)
    >>> state.blocks[0].mu["w"].shape  # one Adam state per layer
    (3, 8, 8)
    >>> batch = {"x": jnp.ones((2, 5, 4)), "y": jnp.zeros((2, 5, 1))}  # K=2
    >>> step = jax.jit(lw.step, donate_argnums=(0, 1, 2))
    >>> outer, blocks, state, m = step(outer, blocks, state, batch)
    >>> sorted(m), int(state.count)
    (['grad_norm', 'loss'], 1)
  """
  for name, fn in (("embed", embed), ("block", block), ("head", head)):
    _check_callable(name, fn)
  _check_tx("tx", tx)
  outer_tx = tx if outer_tx is None else outer_tx
  _check_tx("outer_tx", outer_tx)
  if clip not in CLIP_MODES:
    modes = ", ".join(map(repr, CLIP_MODES))
    raise ValueError(f"`clip` must be one of {modes}, got {clip!r}")
  if max_grad_norm is not None:
    _validation.static("max_grad_norm", max_grad_norm, "a positive float")
    _validation.concrete_number("max_grad_norm", max_grad_norm, low=0,
                                low_open=True)
  _validation.concrete_number("seed", seed, integer=True)

  def init(outer, blocks):
    num_layers(blocks)
    try:
      block_state = jax.vmap(lambda b: tx.init(_float_view(b)))(blocks)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          "layerwise: `tx.init` cannot run on one layer's params under"
          " jax.vmap over the layer axis, so its state cannot be split per"
          f" layer ({type(e).__name__}: {e})") from e
    outer_state = outer_tx.init(_float_view(outer))
    _check_state(block_state, "`tx`'s state")
    _check_state(outer_state, "`outer_tx`'s state")
    return LayerwiseState(count=jnp.zeros([], jnp.int32), outer=outer_state,
                          blocks=block_state)

  def step(outer, blocks, state, batch):
    n_layers = num_layers(blocks)
    _check_batch(batch)
    _check_state(state.blocks, "`tx`'s state")
    expected = jax.eval_shape(init, outer, blocks)
    _validation.shaped_like("LayerwiseState.blocks", state.blocks,
                            expected.blocks)
    _validation.shaped_like("LayerwiseState.outer", state.outer,
                            expected.outer)
    outer_f = _float_view(outer)
    _check_model(embed, block, head, outer_f,
                 _float_view(_layer(blocks, 0)), batch)
    key = jax.random.fold_in(jax.random.key(seed), state.count)
    outer_key, blocks_key = (jax.random.fold_in(key, i) for i in (0, 1))

    # Forward: every block's input, for every micro-batch.
    x0_K, embed_vjps = _embed_forward(embed, outer_f, batch)
    # The embedding's gradient in a branch of its own: its buffers (a
    # scatter-add's zeros of the table's shape) are then made when it runs,
    # not scheduled at the start of the step and kept through the loops.
    embed_grad = lambda dx0_K: _inplace.unfused(state.count >= 0, embed_vjps,
                                                dx0_K)
    stash, xL_K = _forward(block, blocks, x0_K, n_layers)

    # Head: the mean loss, its outer gradient, the last block's cotangents.
    loss, g_outer, dx_K = _head_backward(head, outer_f, xL_K, batch,
                                         state.count)

    if max_grad_norm is not None and clip == "global":
      # First pass: the exact norm, keeping no layer's gradient.
      sq_blocks, dx0_K = _blocks_backward(block, tx, blocks, state.blocks,
                                          stash, dx_K, blocks_key, None)
      g_outer = _add(g_outer, embed_grad(dx0_K))
      norm = jnp.sqrt(sq_blocks + _sq_norm(g_outer))
      scale = lambda g: _clip(g, norm, max_grad_norm)
      blocks, block_state, _ = _blocks_backward(
          block, tx, blocks, state.blocks, stash, dx_K, blocks_key, scale,
          update=True)
      g_outer_applied = scale(g_outer)
    else:
      scale = None
      if max_grad_norm is not None:  # per layer
        c = max_grad_norm / math.sqrt(n_layers + 1)
        scale = lambda g: _clip(g, jnp.sqrt(_sq_norm(g)), c)
      blocks, block_state, (sq_blocks, dx0_K) = _blocks_backward(
          block, tx, blocks, state.blocks, stash, dx_K, blocks_key, scale,
          update=True)
      g_outer = _add(g_outer, embed_grad(dx0_K))
      norm = jnp.sqrt(sq_blocks + _sq_norm(g_outer))
      g_outer_applied = g_outer if scale is None else scale(g_outer)

    g_outer_applied = jax.tree.map(lambda g, p: g.astype(p.dtype),
                                   g_outer_applied, outer_f)
    updates, outer_state = outer_tx.update(g_outer_applied, state.outer,
                                           outer_f)
    outer = _apply(outer, updates, outer_key)
    state = LayerwiseState(count=optax.safe_int32_increment(state.count),
                           outer=outer_state, blocks=block_state)
    return outer, blocks, state, {"loss": loss, "grad_norm": norm}

  def loss(outer, blocks, batch):
    n_layers = num_layers(blocks)
    _check_batch(batch)
    outer_f = _float_view(outer)
    x0_K = jax.lax.map(lambda b: embed(outer_f, b), batch)
    _, xL_K = _forward(block, blocks, x0_K, n_layers, keep=False)
    losses = jax.lax.map(lambda a: head(outer_f, *a), (xL_K, batch))
    return jnp.mean(losses.astype(jnp.float32))

  def state_shardings(outer, blocks, outer_shardings, block_shardings):
    num_layers(blocks)
    layer = jax.eval_shape(lambda b: _float_view(_layer(b, 0)), blocks)
    layer_shardings = jax.tree.map(_drop_layer_axis, block_shardings)
    per_layer = sharding.state_sharding(tx, layer, layer_shardings)
    outer_f = jax.eval_shape(_float_view, outer)
    mesh = jax.tree.leaves(block_shardings)[0].mesh
    return LayerwiseState(
        count=NamedSharding(mesh, PartitionSpec()),
        outer=sharding.state_sharding(outer_tx, outer_f, outer_shardings),
        blocks=jax.tree.map(_add_layer_axis, per_layer))

  return Layerwise(init, step, loss, state_shardings)


def _drop_layer_axis(s: NamedSharding) -> NamedSharding:
  spec = tuple(s.spec)
  if spec and spec[0] is not None:
    raise ValueError(f"layerwise: a block param is split along its layer"
                     f" axis ({s.spec}); split the axes of one layer instead")
  return NamedSharding(s.mesh, PartitionSpec(*spec[1:]))


def _add_layer_axis(s: NamedSharding) -> NamedSharding:
  return NamedSharding(s.mesh, PartitionSpec(None, *s.spec))


def _add(a: Any, b: Any) -> Any:
  return jax.tree.map(lambda x, y: x + y.astype(x.dtype), a, b)


def _embed_forward(embed, outer_f, batch):
  """``embed`` on every micro-batch, and the mean of its outer VJPs as a
  function of the cotangents ``(K, ...)``."""
  x0_K = jax.lax.map(lambda b: embed(outer_f, b), batch)

  def vjps(dx0_K):
    def micro(args):
      b, dx = args
      _, vjp = jax.vjp(lambda o: embed(o, b), outer_f)
      return vjp(dx)[0], ()

    return _micro_mean(micro, (batch, dx0_K))[0]

  return x0_K, vjps


def _reads(fn: Callable[..., Any], tree: Any, *args: Any) -> list[bool]:
  """Whether ``fn(tree, *args)`` reads each leaf of ``tree`` (from its
  jaxpr); a leaf it does not read has a zero gradient."""
  jaxpr = jax.make_jaxpr(fn)(tree, *args).jaxpr
  read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
  read |= {id(v) for v in jaxpr.outvars}
  return [id(v) in read for v in jaxpr.invars[:len(jax.tree.leaves(tree))]]


def _head_backward(head, outer_f, xL_K, batch, count):
  """The mean loss, the mean outer gradient of ``head``, and the
  cotangents of each micro-batch's loss for the last block's outputs.

  Differentiated only for the outer leaves ``head`` reads (the others get
  zeros), in a branch of its own: the gradient held through the loops is
  then the head's own, in the params' dtype, not a wider intermediate nor a
  table of zeros for the embedding.
  """
  leaves, treedef = jax.tree.flatten(outer_f)
  reads = _reads(lambda o, x, b: head(o, x, b), outer_f, xL_K[0],
                 jax.tree.map(lambda a: a[0], batch))

  def backward(read, xL_K, batch):
    def with_read(read, x, b):
      it = iter(read)
      full = [next(it) if r else c for r, c in zip(reads, leaves)]
      return head(treedef.unflatten(full), x, b)

    def micro(args):
      x, b = args
      value, vjp = jax.vjp(lambda o, x: with_read(o, x, b), read, x)
      g, dx = vjp(jnp.ones_like(value))
      return (g, value.astype(jnp.float32)), dx

    (g, loss), dx_K = _micro_mean(micro, (xL_K, batch))
    return loss, g, dx_K

  read = [x for r, x in zip(reads, leaves) if r]
  loss, g, dx_K = _inplace.unfused(count >= 0, backward, read, xL_K, batch)
  it = iter(g)
  g = [next(it) if r else jnp.zeros_like(x) for r, x in zip(reads, leaves)]
  return loss, treedef.unflatten(g), dx_K


def _blocks_backward(block, tx, blocks, block_state, stash, dx_K, key, scale,
                     update=False):
  """The reverse loop over layers.

  Without ``update``: returns the sum of the layers' squared gradient norms
  and the first block's input cotangents. With it: also updates each layer
  (its gradient passed through ``scale`` if given) and returns ``(blocks,
  block_state, (squared norm, cotangents))``. Each layer's gradient is the
  micro-batch mean of its VJPs, as ``optax.MultiSteps`` accumulates it.
  """
  n_layers = stash.shape[0]

  def grad_at(blocks, l, dx_K):
    p = _float_view(_layer(blocks, l))
    return _layer_grad(block, p, _layer(stash, l), dx_K)

  if not update:
    def body(i, carry):
      blocks, dx_K, sq = carry
      blocks = jax.lax.optimization_barrier(blocks)
      g, dx_K = grad_at(blocks, n_layers - 1 - i, dx_K)
      return blocks, dx_K, sq + _sq_norm(g)

    _, dx_K, sq = jax.lax.fori_loop(
        0, n_layers, body, (blocks, dx_K, jnp.zeros([], jnp.float32)))
    return sq, dx_K

  def layer_update(l, blocks, block_state, dx_K):
    g, dx_K = grad_at(blocks, l, dx_K)
    # The params the update reads are sliced again, after the gradient, so
    # the slices the recompute read are not kept alive through the update.
    g, dx_K, blocks = jax.lax.optimization_barrier((g, dx_K, blocks))
    stored, s = _layer(blocks, l), _layer(block_state, l)
    p = _float_view(stored)
    sq = _sq_norm(g)
    if scale is not None:
      g = scale(g)
    u, s = tx.update(g, s, p)
    return _apply(stored, u, jax.random.fold_in(key, l)), s, dx_K, sq

  def body(i, carry):
    blocks, block_state, dx_K, sq = carry
    l = n_layers - 1 - i
    # The layer's new params and state are computed in a branch of their
    # own and written back in place (see galore_jax._inplace).
    new, s, dx_K, sq_l = _inplace.unfused(l >= 0, layer_update, l, blocks,
                                  block_state, dx_K)
    return (_set_layer(blocks, new, l), _set_layer(block_state, s, l), dx_K,
            sq + sq_l)

  blocks, block_state, dx_K, sq = jax.lax.fori_loop(
      0, n_layers, body,
      (blocks, block_state, dx_K, jnp.zeros([], jnp.float32)))
  return blocks, block_state, (sq, dx_K)
