r"""8-bit Adam: blockwise dynamic quantization of the moments (bitsandbytes).

Each step dequantizes the moments of a leaf, updates them in float32,
computes the Adam update from the float32 moments, and stores them back as
8-bit codes: the first moment with the signed dynamic map, the second with the
unsigned one, each block of ``block_size`` elements scaled by its absmax
(:func:`galore_jax.quantization.quantize_blockwise`). As in bitsandbytes,
leaves smaller than ``min_8bit_size`` (biases, norms) keep float32 moments.

A moment that is not zero is never stored as zero: it takes the smallest
non-zero code of its sign (bitsandbytes keeps the first moment's sign the same
way). For the second moment this matters: an element whose ``v`` is below
the map's resolution in its block (about 1.6e-7 of the block's absmax) while
its ``m`` survives would otherwise get the update ``m / eps`` (thousands of
times the learning rate) as soon as its gradient is zero.

Memory: 2 bytes per element plus 8 bytes per block of each moment (and a
byte per row that records the leaf's shape), against 8 bytes for float32 Adam
(0.254x at the default block of 256).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from galore_jax import _inplace
from galore_jax import _pytrees
from galore_jax import _validation
from galore_jax import layout
from galore_jax import quantization


class BlockwiseCodes(NamedTuple):
  """One 8-bit moment of a leaf: uint8 codes and their per-block absmax.

  Attributes:
    codes: uint8 indices into the dynamic code map, ``(blocks, block_size)``.
    absmax: float32 scale of each block, ``(blocks,)``.
    rows: uint8 zeros of the leaf's shape without its last axis (one byte
      per row). With the number of blocks it fixes the leaf's shape, so a
      state initialised for other params (a transposed kernel, whose codes
      have the same shape) is refused.
  """

  codes: jax.Array
  absmax: jax.Array
  rows: jax.Array


class ScaleByAdam8bitState(NamedTuple):
  """State of :func:`scale_by_adam_8bit`.

  Attributes:
    count: int32 step counter.
    mu: first moments, a tree like the params: :class:`BlockwiseCodes` for
      leaves with at least ``min_8bit_size`` elements, float32 arrays for the
      others.
    nu: second moments, likewise.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates

  def layout(self, views, recurse):
    """Where each array lies along its param's axes (see
    :mod:`galore_jax.layout`): ``mu`` and ``nu`` are trees like the params;
    a float moment is laid out as its param, 8-bit codes as blocks of it."""
    del recurse
    moment = lambda path, x: _moment_layout(views.get(path), x)
    is_codes = lambda x: isinstance(x, BlockwiseCodes)
    return ScaleByAdam8bitState(
        count=layout.replicated_tree(self.count),
        mu=layout.by_path(self.mu, moment, is_leaf=is_codes),
        nu=layout.by_path(self.nu, moment, is_leaf=is_codes))


def _moment_layout(view, x):
  if isinstance(x, BlockwiseCodes):
    codes = tuple(np.shape(x.codes))
    if view is None:
      return layout.replicated_tree(x)
    rows = tuple(np.shape(x.rows))
    return BlockwiseCodes(
        codes=layout.Blocks(view, codes, "codes"),
        absmax=layout.Blocks(view, codes, "absmax"),
        # Laid out as the leaf's leading axes.
        rows=view.derive(rows, view.axes[:-1]) if rows == view.shape[:-1]
        else layout.replicated(rows))
  shape = tuple(np.shape(x))
  if view is not None and layout.matches(view, shape):
    return view.derive(shape, view.axes)
  return layout.replicated(shape)


def _moment_shapes(entry: Any) -> tuple:
  if hasattr(entry, "shape"):  # a float32 moment
    return (tuple(entry.shape),)
  try:
    return tuple(tuple(np.shape(a)) for a in _codes(entry))
  except ValueError:  # not a BlockwiseCodes record
    return tuple(tuple(np.shape(a)) for a in jax.tree.leaves(entry))


def _check_moments(path: str, g: jax.Array, moments, min_8bit_size: int,
                   block_size: int) -> None:
  """The moments of leaf ``path`` fit its update ``g``, or a clear error."""
  if _is_8bit(g, min_8bit_size):
    blocks = quantization.num_groups(math.prod(g.shape), block_size)
    want = ((blocks, block_size), (blocks,), tuple(g.shape[:-1]))
  else:
    want = (tuple(g.shape),)
  for m in moments:
    got = _moment_shapes(m)
    if got != want:
      raise _validation.state_for_other_params(
          "scale_by_adam_8bit", f"the moments of parameter {path} have"
          f" arrays of shapes {list(got)}, its update of shape"
          f" {tuple(g.shape)} needs {list(want)}")


# Elements updated at once per 8-bit leaf: bounds the step's temporaries.
_CHUNK_ELEMENTS = 2**20


def _is_8bit(x: Any, min_8bit_size: int) -> bool:
  return math.prod(x.shape) >= min_8bit_size


def _codes(entry: Any) -> BlockwiseCodes:
  # nnx.Optimizer may hand the entry back as a tuple or a mapping by name.
  return _pytrees.as_record(BlockwiseCodes, entry)


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    block_size: int = 256,
    min_8bit_size: int = 4096,
) -> optax.GradientTransformation:
  r"""Adam with blockwise 8-bit moments (bitsandbytes' ``Adam8bit``).

  .. math::
    m_t = \beta_1 \tilde m_{t-1} + (1-\beta_1) g_t, \quad
    v_t = \beta_2 \tilde v_{t-1} + (1-\beta_2) g_t^2, \quad
    u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon},

  where :math:`\tilde m, \tilde v` are the dequantized stored moments; the
  new :math:`m_t, v_t` are stored as 8-bit codes after the update is
  computed from them. ``eps`` sits where ``optax.scale_by_adam`` puts it
  (and where bitsandbytes effectively does).

  Args:
    b1, b2: moment decay rates.
    eps: added to the bias-corrected :math:`\sqrt{\hat v_t}`.
    block_size: elements per absmax block (static).
    min_8bit_size: leaves with fewer elements keep float32 moments (static;
      bitsandbytes' default, 4096).

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`ScaleByAdam8bitState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from galore_jax import scale_by_adam_8bit
    >>> tx = scale_by_adam_8bit(min_8bit_size=16)
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros((8,))}
    >>> state = tx.init(params)
    >>> state.mu["w"].codes.dtype, state.mu["w"].codes.shape, state.mu["b"].dtype
    (dtype('uint8'), (8, 256), dtype('float32'))
    >>> updates, state = tx.update({"w": jnp.full((64, 32), 0.1),
    ...                             "b": jnp.full((8,), 0.1)}, state)
    >>> round(float(updates["w"][0, 0]), 4)  # first step: ~sign(g)
    1.0

  References:
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.
  """
  _validation.adam(b1, b2, eps)
  _validation.positive_int("block_size", block_size)
  _validation.static("min_8bit_size", min_8bit_size, "a non-negative int")
  if isinstance(min_8bit_size, bool) or not isinstance(
      min_8bit_size, int) or min_8bit_size < 0:
    raise ValueError(
        f"`min_8bit_size` must be a non-negative int, got {min_8bit_size!r}")

  def zeros(x, signed):
    if not _is_8bit(x, min_8bit_size):
      return jnp.zeros(x.shape, jnp.float32)
    blocks = quantization.num_groups(math.prod(x.shape), block_size)
    # Code of 0.0 in the map, so that a fresh state dequantizes to zeros.
    zero = int(np.argmin(np.abs(quantization.dynamic_code_map(signed))))
    return BlockwiseCodes(
        codes=jnp.full((blocks, block_size), zero, jnp.uint8),
        absmax=jnp.zeros((blocks,), jnp.float32),
        rows=jnp.zeros(x.shape[:-1], jnp.uint8))

  def init_fn(params):
    _validation.floating_tree(params)
    return ScaleByAdam8bitState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(lambda x: zeros(x, True), params),
        nu=jax.tree.map(lambda x: zeros(x, False), params),
    )

  def float_leaf(g, m, v, c1, c2):
    g32 = g.astype(jnp.float32)
    m = b1 * m + (1 - b1) * g32
    v = b2 * v + (1 - b2) * g32 * g32
    return ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype), m, v

  def chunk_update(g_b, mc, ma, vc, va, c1, c2):
    """Dequantize, update and requantize ``(n, block_size)`` blocks."""
    m = quantization.dequantize_blockwise(mc, ma, True, mc.shape)
    v = quantization.dequantize_blockwise(vc, va, False, vc.shape)
    u, m, v = float_leaf(g_b, m, v, c1, c2)
    mc, ma = quantization.quantize_blockwise(m, True, block_size,
                                             keep_nonzero=True)
    vc, va = quantization.quantize_blockwise(v, False, block_size,
                                             keep_nonzero=True)
    return u, mc, ma, vc, va

  def int8_leaf(g, mu, nu, c1, c2):
    # Chunks of blocks in a loop: dequantize, update and requantize chunk by
    # chunk, writing the codes back in place, so the float32 moments, the
    # code search and new code buffers never exist for a whole leaf.
    mu, nu = _codes(mu), _codes(nu)
    # Chunk c of the update overwrites chunk c of the gradient, which
    # nothing reads again: the update needs no buffer of its own.
    blocks = (quantization.pad_to_groups(g, block_size), mu.codes, mu.absmax,
              nu.codes, nu.absmax)
    per = max(1, _CHUNK_ELEMENTS // block_size)
    update = lambda *chunk: chunk_update(*chunk, c1, c2)
    if mu.codes.shape[0] <= per:  # one chunk: no loop
      u, mc, ma, vc, va = update(*blocks)
    else:
      u, mc, ma, vc, va = _inplace.update_chunks(update, blocks, per)
    u = quantization.from_groups(u, g.shape)
    return u, BlockwiseCodes(mc, ma, mu.rows), BlockwiseCodes(vc, va, nu.rows)

  def update_fn(updates, state, params=None):
    del params
    _validation.floating_tree(updates)
    leaves, treedef = jax.tree.flatten(updates)
    mus = treedef.flatten_up_to(state.mu)
    nus = treedef.flatten_up_to(state.nu)
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(updates)[0]]
    for path, g, mu, nu in zip(paths, leaves, mus, nus):
      _check_moments(path, g, (mu, nu), min_8bit_size, block_size)
    count = optax.safe_int32_increment(state.count)
    t = count.astype(jnp.float32)
    c1, c2 = 1 - b1**t, 1 - b2**t
    out, new_mu, new_nu = [], [], []
    for g, mu, nu in zip(leaves, mus, nus):
      leaf = int8_leaf if _is_8bit(g, min_8bit_size) else float_leaf
      u, m, v = leaf(g, mu, nu, c1, c2)
      out.append(u)
      new_mu.append(m)
      new_nu.append(v)
    return treedef.unflatten(out), ScaleByAdam8bitState(
        count=count, mu=treedef.unflatten(new_mu),
        nu=treedef.unflatten(new_nu))

  return optax.GradientTransformation(init_fn, update_fn)


def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: Any = None,
    *,
    block_size: int = 256,
    min_8bit_size: int = 4096,
) -> optax.GradientTransformation:
  r"""AdamW with blockwise 8-bit moments (bitsandbytes' ``AdamW8bit``).

  ``scale_by_adam_8bit``, then decoupled weight decay, then the learning
  rate: ``optax.adamw`` with the moments stored in 8 bits.

  Args:
    learning_rate: a scalar or an optax schedule.
    b1, b2, eps: see :func:`scale_by_adam_8bit`.
    weight_decay: decoupled weight decay (``optax.adamw``'s default).
    mask: weight-decay mask, as in ``optax.adamw``.
    block_size, min_8bit_size: see :func:`scale_by_adam_8bit`.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from galore_jax import adamw_8bit
    >>> params = {"w": jnp.ones((128, 64))}
    >>> opt = adamw_8bit(1e-2)
    >>> state = opt.init(params)
    >>> loss = lambda p: jnp.sum(p["w"] ** 2)
    >>> updates, state = opt.update(jax.grad(loss)(params), state, params)
    >>> bool(loss(optax.apply_updates(params, updates)) < loss(params))
    True

  References:
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.
  """
  _validation.learning_rate(learning_rate)
  _validation.concrete_number("weight_decay", weight_decay, low=0)
  return optax.chain(
      scale_by_adam_8bit(b1, b2, eps, block_size=block_size,
                         min_8bit_size=min_8bit_size),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
