r"""Q-GaLore: quantized projectors, layer-adaptive lazy refresh, INT8 weights.

Q-GaLore (Zhang et al., 2024) keeps GaLore's update and changes its storage
and schedule:

* **Quantized projectors.** Each projector is stored as group-wise
  asymmetric codes of ``proj_bits`` bits (default 4, packed two per byte)
  over its row-major flattening, in the official layout
  (:mod:`galore_jax.quantization`), and dequantized when used.
* **Layer-adaptive lazy refresh.** Every layer has its own ``gap`` and
  refreshes when ``count % gap == 0``. At each refresh after the first, the
  cosine similarity between the first singular vector of the new and of the
  previous projector is pushed into a FIFO of ``queue_size``; once the queue
  is full and its mean is at least ``cos_threshold``, the layer's gap is
  multiplied by ``gamma_proj``. The queue is never cleared. All of it is
  array state, updated inside the refresh ``lax.cond``.
* **8-bit moments** (:func:`~galore_jax.scale_by_adam_8bit`) and **INT8
  weights** updated with stochastic rounding (:func:`apply_updates_stochastic`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from galore_jax import _inplace
from galore_jax import _pytrees
from galore_jax import _validation
from galore_jax import galore
from galore_jax import layout
from galore_jax import projection
from galore_jax import quantization

_MAX_GAP = 2**30  # gaps saturate here instead of overflowing int32


class QGaLoreState(NamedTuple):
  """State of :func:`scale_by_q_galore`.

  Attributes:
    count: int32 step counter.
    projector: a tree like the params: :class:`QuantizedProjector` for
      projected leaves, ``optax.MaskedNode()`` for the others.
    base_state: state of the ``base`` transform.
  """

  count: jax.Array
  projector: optax.Params
  base_state: optax.OptState

  def layout(self, views, recurse):
    """Where each array lies along its param's axes (see
    :mod:`galore_jax.layout`): a stacked leaf's per-layer codes, vector and
    schedule follow its layer axes; the base state is laid out along the
    low-rank gradients it was made for."""
    return galore.subspace_layout(self, views, recurse, QuantizedProjector,
                                  _projector_layout)


class QuantizedProjector(NamedTuple):
  """One leaf's quantized projector and its adaptive schedule.

  Leading ``batch`` axes (stacked layers) give every layer its own projector,
  gap and queue. ``P`` is the size of one layer's projector (``r * rows`` for
  a row projector, ``cols * r`` for a column one), ``L`` the length of its
  singular vectors (``rows`` or ``cols``).

  Attributes:
    codes: uint8 ``batch + (bytes,)``, packed codes of the row-major
      flattened projector.
    scales: float32 ``batch + (groups,)``.
    zeros: ``batch + (groups,)``, zero points: float32 offsets
      (``proj_zero_point="float"``) or uint8 (``"official"``).
    vector: float32 ``batch + (L,)``, first singular vector at the last
      refresh (unquantized, as official).
    gap: int32 ``batch``, this layer's current refresh gap.
    queue: float32 ``batch + (queue_size,)``, the last cosine similarities,
      oldest first.
    queue_count: int32 ``batch``, entries in the queue (saturates).
  """

  codes: jax.Array
  scales: jax.Array
  zeros: jax.Array
  vector: jax.Array
  gap: jax.Array
  queue: jax.Array
  queue_count: jax.Array

  side = None  # "row" or "col": set by the two kinds below


class RowQuantizedProjector(QuantizedProjector):
  """A :class:`QuantizedProjector` of a left (``row``) projector ``(r,
  rows)``: the low-rank gradient is ``(r, cols)``."""
  __slots__ = ()
  side = "row"


class ColQuantizedProjector(QuantizedProjector):
  """A :class:`QuantizedProjector` of a right (``col``) projector ``(cols,
  r)``: the low-rank gradient is ``(rows, r)``."""
  __slots__ = ()
  side = "col"


def _kind(spec: projection.LeafSpec) -> type:
  return RowQuantizedProjector if spec.use_row else ColQuantizedProjector


def _projector_layout(view, st):
  """One leaf's per-layer arrays: the layer axes follow the param's, the
  rest are replicated (the codes hold the rank axis in their flattened
  rows; at an eighth of a float32 projector they are the smallest part)."""
  side = getattr(type(st), "side", None)
  if view is not None and len(view.shape) >= 2 and side is not None and (
      np.shape(st.vector)[-1] != view.shape[-2 if side == "row" else -1]):
    view = None  # custom dim_numbers: the matrix is not the last two axes
  each = lambda x: (layout.per_layer(view, np.shape(x))
                    if view is not None and len(view.shape) >= 2
                    and np.shape(x)[:len(view.shape) - 2] == view.shape[:-2]
                    else layout.replicated(np.shape(x)))
  low = (None if side is None or view is None or len(view.shape) < 2
         else layout.low_rank(view, side == "row", side == "col"))
  return jax.tree.map(each, st), low


def _check_settings(proj_bits, proj_group_size, cos_threshold, gamma_proj,
                    queue_size, proj_type, proj_zero_point):
  quantization.check_bits(proj_bits, "proj_bits")
  quantization.check_zero_point(proj_zero_point, "proj_zero_point")
  _validation.positive_int("proj_group_size", proj_group_size)
  _validation.concrete_number("cos_threshold", cos_threshold, low=-1, high=1)
  _validation.concrete_number("gamma_proj", gamma_proj, low=1)
  _validation.positive_int("queue_size", queue_size)
  projection.check_proj_type(proj_type)
  if proj_type == "full":
    raise ValueError(
        "Q-GaLore projects one side of each matrix: `proj_type` must be one of"
        " 'std' (official), 'reverse_std', 'left', 'right'; got 'full'"
    )


def _gap_sequence(update_proj_gap, gamma_proj) -> Optional[np.ndarray]:
  """Every gap a layer can reach, by the official ``int(gap * gamma)``.

  Gaps only change by growth, so for concrete arguments the sequence is
  static; reading the next gap from it reproduces Python's float64 product
  exactly (float32 would give e.g. 115 for ``int(100 * 1.15) == 114``).
  None when an argument is traced (``inject_hyperparams``).
  """
  if _validation.is_tracer(update_proj_gap) or _validation.is_tracer(
      gamma_proj):
    return None
  gap, gamma = int(update_proj_gap), float(gamma_proj)
  seq = [min(gap, _MAX_GAP)]
  while len(seq) < 100_000:
    nxt = min(int(seq[-1] * gamma), _MAX_GAP)
    if nxt <= seq[-1]:
      break
    seq.append(nxt)
  return np.asarray(seq, np.int32)


def _grow(gap: jax.Array, gamma_proj, sequence) -> jax.Array:
  """``int(gap * gamma_proj)`` as official, saturating at ``_MAX_GAP``."""
  new = jnp.minimum(jnp.floor(gap.astype(jnp.float32) * gamma_proj),
                    _MAX_GAP).astype(jnp.int32)
  if sequence is None:
    return new  # traced hyperparameters: float32 product
  table = jnp.asarray(sequence)
  i = jnp.clip(jnp.searchsorted(table, gap), 0, len(sequence) - 1)
  following = table[jnp.minimum(i + 1, len(sequence) - 1)]
  return jnp.where(table[i] == gap, following, new)


def scale_by_q_galore(
    rank: galore.Rank = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    base: Optional[optax.GradientTransformation] = None,
    *,
    proj_bits: int = 4,
    proj_group_size: int = 256,
    cos_threshold: float = 0.4,
    gamma_proj: float = 2,
    queue_size: int = 5,
    mask: Any = None,
    dim_numbers: Any = None,
    proj_type: str = "std",
    proj_zero_point: str = "float",
    svd: str = "exact",
    power_iters: Optional[int] = None,
    oversample: int = 8,
    seed: int = 0,
    stagger: bool = False,
    on_refresh: str = "keep",
) -> optax.GradientTransformation:
  r"""GaLore with quantized projectors and a layer-adaptive refresh (Q-GaLore).

  As :func:`~galore_jax.scale_by_galore` (same ``rank``, ``mask``,
  ``dim_numbers`` and stacked-leaf rules), with each projector stored as
  ``proj_bits``-bit group-wise codes and dequantized when used,

  .. math::
    \hat P = s\,(q - z), \quad R_t = \mathrm{proj}_{\hat P}(G_t), \quad
    u_t = \mathrm{scale}\cdot\mathrm{proj}^{-1}_{\hat P}(\mathrm{base}(R_t)),

  and refreshed per layer when ``count % gap == 0``, ``gap`` starting at
  ``update_proj_gap`` and multiplied by ``gamma_proj`` whenever the last
  ``queue_size`` cosine similarities between consecutive first singular
  vectors average at least ``cos_threshold``.

  The refresh test of a stacked leaf is one ``lax.cond`` on "any layer due",
  inside which due layers refresh one by one (a loop over the stack with
  a per-layer ``lax.cond``): no SVD runs on a step where no layer is due.
  Singular vectors have canonical signs (see
  :func:`galore_jax.projection.canonical_signs`), so the signed cosine does
  not depend on the SVD backend. A projector size that ``proj_group_size``
  does not divide gets a shorter last group.

  Args:
    rank: projection rank, int or callable (see ``scale_by_galore``).
    update_proj_gap: initial refresh gap of every layer.
    scale: factor applied to the back-projected updates.
    base: gradient-only transform run in the subspace. Default
      ``optax.scale_by_adam()``.
    proj_bits: projector code width, 2..8 (static).
    proj_group_size: elements per quantization group (static).
    proj_zero_point: ``"float"`` (float32 offsets: every group of a
      projector represented within half a code step) or ``"official"``
      (the official clipped uint8 zero points, bit-exact parity; a
      same-sign group, such as the top singular vector of a gradient with a
      common-sign component, collapses), static; see
      :mod:`galore_jax.quantization`.
    cos_threshold: mean cosine similarity, in [-1, 1], at which a layer's gap
      grows.
    gamma_proj: gap growth factor, >= 1 (``int(gap * gamma_proj)``).
    queue_size: number of cosine similarities averaged (static).
    mask, dim_numbers: see ``scale_by_galore``.
    proj_type: ``"std"`` (official), ``"reverse_std"``, ``"left"`` or
      ``"right"``.
    svd, power_iters, oversample, seed: how a refresh finds the singular
      vectors, see ``scale_by_galore``; ``"subspace_iteration"`` starts from
      the dequantized current projector.
    stagger: the ``i``-th of ``n`` projected leaves refreshes when
      ``(count - i * update_proj_gap // n) % gap == 0`` (and at step 0),
      instead of ``count % gap == 0``: each layer keeps its adaptive gap, at
      its own phase, so no step recomputes every projector at once.
    on_refresh: ``"keep"`` (official), ``"reset"`` or ``"transport"`` the
      moments of a refreshed layer, see ``scale_by_galore``; the INT4
      projectors are dequantized for it, and ``base`` needs float moments.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`QGaLoreState`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from galore_jax import scale_by_q_galore
    >>> params = {"w": jnp.ones((512, 256))}
    >>> tx = scale_by_q_galore(rank=32, update_proj_gap=50)
    >>> state = tx.init(params)
    >>> p = state.projector["w"]
    >>> p.codes.shape, p.codes.dtype, p.scales.shape  # 256*32 int4 codes
    ((4096,), dtype('uint8'), (32,))
    >>> updates, state = tx.update({"w": jnp.ones((512, 256))}, state)
    >>> int(state.projector["w"].gap)
    50

  References:
    Zhang et al., `Q-GaLore: Quantized GaLore with INT4 Projection and
    Layer-Adaptive Low-Rank Gradients <https://arxiv.org/abs/2407.08296>`_,
    2024.
  """
  projection.check_rank(rank)
  _validation.concrete_number(
      "update_proj_gap", update_proj_gap, low=1, high=_MAX_GAP, integer=True)
  _check_settings(proj_bits, proj_group_size, cos_threshold, gamma_proj,
                  queue_size, proj_type, proj_zero_point)
  find = projection.finder(svd, power_iters, oversample, seed)
  _validation.boolean("stagger", stagger)
  code = _Code(int(proj_bits), int(proj_group_size), proj_zero_point)
  schedule = _Schedule(update_proj_gap, cos_threshold, gamma_proj,
                       int(queue_size), _gap_sequence(update_proj_gap,
                                                      gamma_proj))
  rule = galore.ProjectorRule(
      init=functools.partial(_init_projector, code, schedule),
      update=functools.partial(_update_projector, code, schedule, find,
                               stagger),
      dtype=lambda leaf_dtype: leaf_dtype,
      read=functools.partial(_read_projector, code, schedule))
  return galore.scale_by_subspace(
      rule, rank=rank, scale=scale, proj_type=proj_type, base=base, mask=mask,
      dim_numbers=dim_numbers, state_type=QGaLoreState, on_refresh=on_refresh)


class _Code(NamedTuple):
  """How a projector is stored: code width, group size, zero points."""
  bits: int
  group_size: int
  zero_point: str


class _Schedule(NamedTuple):
  """The adaptive refresh schedule's settings (``gaps``: every reachable
  gap, see :func:`_gap_sequence`; None for traced hyperparameters)."""
  update_proj_gap: Any
  cos_threshold: Any
  gamma_proj: Any
  queue_size: int
  gaps: Optional[np.ndarray]


def push_similarity(queue: jax.Array, queue_count: jax.Array,
                    cos: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Pushes ``cos`` into one layer's FIFO of cosine similarities.

  ``queue`` (``(queue_size,)``, oldest first) holds ``queue_count`` entries:
  while it is not full, ``cos`` fills the next slot; once full, the oldest
  entry drops out. As the official ``collections.deque(maxlen=queue_size)``,
  the queue is never cleared.

  Returns:
    The new ``(queue, queue_count)``.
  """
  size = queue.shape[-1]
  pushed = jnp.where(
      queue_count < size,
      queue.at[jnp.minimum(queue_count, size - 1)].set(cos),
      jnp.append(queue[1:], cos))
  return pushed, jnp.minimum(queue_count + 1, size).astype(jnp.int32)


def next_gap(gap: jax.Array, queue: jax.Array, queue_count: jax.Array,
             cos_threshold: Any, gamma_proj: Any,
             sequence: Optional[np.ndarray] = None) -> jax.Array:
  """One layer's refresh gap after a refresh.

  It grows to ``int(gap * gamma_proj)`` once the queue is full and the mean
  of its similarities is at least ``cos_threshold`` (the official test);
  otherwise it stays. ``sequence`` (:func:`_gap_sequence`) makes the growth
  exact in float64, as official.
  """
  size = queue.shape[-1]
  grow = (queue_count == size) & (jnp.sum(queue) / size >= cos_threshold)
  return jnp.where(grow, _grow(gap, gamma_proj, sequence), gap)


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """The signed cosine similarity of two vectors (0 when one is zero)."""
  return jnp.vdot(a, b) / jnp.maximum(
      jnp.linalg.norm(a) * jnp.linalg.norm(b), 1e-8)


def _layer_shape(spec: projection.LeafSpec) -> tuple[int, ...]:
  """One layer's projector shape: ``(r, rows)`` or ``(cols, r)``."""
  shapes = spec.projector_shapes
  return (shapes.row if spec.use_row else shapes.col)[len(spec.batch_shape):]


def _init_projector(code: _Code, schedule: _Schedule, x, spec):
  del x
  groups = quantization.num_groups(math.prod(_layer_shape(spec)),
                                   code.group_size)
  b = spec.batch_shape
  return _kind(spec)(
      codes=jnp.zeros(
          b + (quantization.packed_size(groups * code.group_size,
                                        code.bits),), jnp.uint8),
      scales=jnp.zeros(b + (groups,), jnp.float32),
      zeros=jnp.zeros(b + (groups,),
                      quantization.zero_point_dtype(code.zero_point)),
      vector=jnp.zeros(b + (spec.rows if spec.use_row else spec.cols,),
                       jnp.float32),
      gap=jnp.full(b, schedule.update_proj_gap, jnp.int32),
      queue=jnp.zeros(b + (schedule.queue_size,), jnp.float32),
      queue_count=jnp.zeros(b, jnp.int32),
  )


def _as_state(code: _Code, schedule: _Schedule, entry, spec):
  """The leaf's :class:`QuantizedProjector`, its shapes checked."""
  # nnx.Optimizer may hand back a tuple or a mapping by field name.
  kind = _kind(spec)
  if isinstance(entry, QuantizedProjector) and entry.side not in (
      None, kind.side):
    raise ValueError(
        f"Q-GaLore projector state of a {entry.side} projector does not"
        f" match a leaf of shape {spec.shape}, projected on its {kind.side}"
        " side: was the state initialised for other params (a transposed"
        " kernel?) or settings?")
  st = kind(*_pytrees.as_record(QuantizedProjector, entry))
  expected = jax.eval_shape(
      lambda: _init_projector(code, schedule, None, spec))
  shapes = lambda t: [tuple(getattr(a, "shape", ())) for a in t]
  if shapes(st) != shapes(expected):
    raise ValueError(
        f"Q-GaLore projector state with shapes {shapes(st)} does not match"
        f" a leaf of shape {spec.shape}, which needs {shapes(expected)}:"
        " was the state initialised for other params or settings?")
  return st


def _dequantize_layer(code: _Code, codes, scales, zeros, spec, dtype):
  return quantization.QuantizedArray(
      codes, scales, zeros, shape=_layer_shape(spec), dtype=jnp.dtype(dtype),
      bits=code.bits, group_size=code.group_size).dequantize()


def _as_projectors(mat: jax.Array, spec) -> projection.Projectors:
  return projection.Projectors(
      row=mat if spec.use_row else optax.MaskedNode(),
      col=mat if spec.use_col else optax.MaskedNode())


def _refresh_layer(code: _Code, schedule: _Schedule, find, g, st, count,
                   spec) -> QuantizedProjector:
  """One layer's new projector (unbatched ``g``) and schedule."""
  current = lambda: projection.current_basis(_as_projectors(
      _dequantize_layer(code, st.codes, st.scales, st.zeros, spec,
                        jnp.float32), spec), spec)
  proj = find.find(g, spec, jnp.float32, count, start=current)
  mat = proj.row if spec.use_row else proj.col
  vector = mat[0] if spec.use_row else mat[:, 0]
  has_past = count > 0  # step 0 is every layer's first refresh
  pushed, pushed_count = push_similarity(st.queue, st.queue_count,
                                         cosine(st.vector, vector))
  queue = jnp.where(has_past, pushed, st.queue)
  queue_count = jnp.where(has_past, pushed_count, st.queue_count)
  gap = jnp.where(has_past, next_gap(st.gap, queue, queue_count,
                                     schedule.cos_threshold,
                                     schedule.gamma_proj, schedule.gaps),
                  st.gap)
  q = quantization.quantize_array(mat, code.bits, code.group_size,
                                  zero_point=code.zero_point)
  return _kind(spec)(
      codes=q.codes, scales=q.scales, zeros=q.zeros, vector=vector,
      gap=gap, queue=queue, queue_count=queue_count)


def _dequantized(code: _Code, st: QuantizedProjector, spec, dtype):
  """Every layer's float projector, ``batch + layer shape``."""
  one = lambda c, s, z: _dequantize_layer(code, c, s, z, spec, dtype)
  for _ in spec.batch_shape:
    one = jax.vmap(one)
  return one(st.codes, st.scales, st.zeros)


def _update_projector(code: _Code, schedule: _Schedule, find, stagger, g2,
                      entry, spec, count, position):
  """Q-GaLore's rule: each layer refreshes when its own gap is due.

  A stacked leaf runs one ``lax.cond`` on "any layer due", inside which the
  due layers refresh one by one (a loop with a per-layer ``lax.cond``).
  """
  st = _as_state(code, schedule, entry, spec)
  due = galore.refresh_due(count, st.gap, galore.stagger_phase(
      position, schedule.update_proj_gap, stagger))
  refresh = lambda g, s, d: jax.lax.cond(
      d, lambda: _refresh_layer(code, schedule, find, g, s, count, spec),
      lambda: s)
  nb = len(spec.batch_shape)
  if nb == 0:
    st = refresh(g2, st, due)
  else:
    flat = lambda x: x.reshape((-1,) + x.shape[nb:])
    g_f, st_f, due_f = flat(g2), jax.tree.map(flat, st), due.reshape(-1)
    st_f = jax.lax.cond(
        jnp.any(due_f),
        lambda: _inplace.map_slices(refresh, g_f, st_f, due_f),
        lambda: st_f)
    st = jax.tree.map(lambda x, y: x.reshape(y.shape), st_f, st)
  return _as_projectors(_dequantized(code, st, spec, g2.dtype), spec), st


def _read_projector(code: _Code, schedule: _Schedule, entry, spec, dtype):
  return _as_projectors(
      _dequantized(code, _as_state(code, schedule, entry, spec), spec, dtype),
      spec)


# ---------------------------------------------------------------------------
# INT8 weights.


def quantize_params(
    params: Any,
    bits: int = 8,
    group_size: int = 256,
    *,
    mask: Any = None,
    zero_point: str = "float",
) -> Any:
  """Replaces float leaves by :class:`~galore_jax.quantization.QuantizedArray`.

  Args:
    params: a pytree (a dict of arrays, an ``nnx.State``, ...).
    bits: code width, 2..8 (Q-GaLore's weights: 8).
    group_size: elements per group (Q-GaLore: 256).
    mask: which leaves to quantize: a pytree of bools like ``params``, or a
      callable ``params -> pytree``. Default: every float leaf with ndim >= 2
      (the matmul weights; biases and norms stay float).
    zero_point: ``"float"`` (float32 offsets, every group represented) or
      ``"official"`` (Q-GaLore's clipped uint8 zero points: a group of
      same-sign values, such as norm scales near 1, is not represented).

  Returns:
    ``params`` with the selected leaves quantized (round to nearest).

  Examples:
    >>> import jax.numpy as jnp
    >>> from galore_jax import quantize_params, dequantize_params
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros((32,))}
    >>> q = quantize_params(params)
    >>> type(q["w"]).__name__, q["b"].dtype
    ('QuantizedArray', dtype('float32'))
    >>> dequantize_params(q)["w"].shape
    (64, 32)
  """
  quantization.check_bits(bits)
  _validation.positive_int("group_size", group_size)
  quantization.check_zero_point(zero_point)
  if mask is None:
    mask = jax.tree.map(
        lambda x: jnp.ndim(x) >= 2 and jnp.issubdtype(x.dtype, jnp.floating),
        params)
  elif callable(mask):
    mask = mask(params)
  return jax.tree.map(
      lambda m, x: quantization.quantize_array(
          x, bits, group_size, zero_point=zero_point) if m else x,
      mask, params)


def dequantize_params(params: Any) -> Any:
  """Replaces every ``QuantizedArray`` (or ``WithGradient``) leaf by its
  float array."""
  return jax.tree.map(quantization.dequantize, params,
                      is_leaf=quantization.is_dequantizable)


def value_and_grad(fn: Callable[..., jax.Array]) -> Callable[..., Any]:
  """``jax.value_and_grad`` w.r.t. the float weights that quantized leaves
  stand for, without a float copy of them.

  ``fn(params, *args)`` receives ``params`` with every ``QuantizedArray``
  leaf wrapped as a :class:`~galore_jax.quantization.WithGradient` (with a
  zero ``delta``) and must dequantize each where it uses it
  (:func:`~galore_jax.quantization.dequantize`, or
  :func:`dequantize_params` of the slice a scanned layer receives). The
  gradient of a quantized leaf is taken w.r.t. its ``delta``, which is the
  gradient w.r.t. the dequantized weight: a model that dequantizes one
  scanned layer at a time never holds the whole model in float.

  Args:
    fn: a scalar loss ``fn(params, *args)``.

  Returns:
    ``g(params, *args) -> (value, grads)``: ``grads`` is a float tree like
    :func:`dequantize_params` of ``params`` (each quantized leaf's gradient
    in its dtype, of shape ``batch_shape + shape``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from galore_jax import quantize_params, dequantize_params, q_galore
    >>> from galore_jax import quantization
    >>> params = quantize_params({"w": jnp.ones((64, 32))})
    >>> x = jnp.ones((4, 64))
    >>> loss = lambda p: jnp.sum(x @ quantization.dequantize(p["w"]))
    >>> value, grads = q_galore.value_and_grad(loss)(params)
    >>> ref = jax.grad(lambda p: loss(p))(dequantize_params(params))
    >>> grads["w"].shape, bool(jnp.array_equal(grads["w"], ref["w"]))
    ((64, 32), True)
  """

  def wrapped(params, *args):
    leaves, treedef = jax.tree.flatten(params,
                                       is_leaf=quantization.is_quantized)
    probe = [jnp.zeros(x.batch_shape + x.shape, x.dtype)
             if quantization.is_quantized(x) else x for x in leaves]

    def loss(probe):
      merged = [quantization.WithGradient(x, d)
                if quantization.is_quantized(x) else d
                for x, d in zip(leaves, probe)]
      return fn(treedef.unflatten(merged), *args)

    value, grads = jax.value_and_grad(loss)(probe)
    return value, treedef.unflatten(grads)

  return wrapped


def apply_updates_stochastic(
    params: Any, updates: Any, key: Optional[jax.Array]
) -> Any:
  r"""``optax.apply_updates`` for trees holding quantized weights.

  A :class:`~galore_jax.quantization.QuantizedArray` leaf is dequantized, the
  update added in float32, and the sum requantized with fresh per-group
  scales (same bits, group size and zero-point scheme) and *stochastic
  rounding*:

  .. math::
    q' = \mathrm{SR}\!\left(\frac{\hat w + u - m'}{s'}\right), \qquad
    \mathbb{E}[s' q' + m'] = \hat w + u.

  Round-to-nearest would drop every update smaller than half a code step,
  which late in training is most of them. A large leaf is requantized
  :data:`~galore_jax.quantization.SR_CHUNK_ELEMENTS` values at a time, each
  chunk written back into the codes in place: its float32 copy and random
  bits (two bytes a value) exist one chunk at a time. Float leaves get plain
  addition, as in ``optax.apply_updates``.

  Args:
    params: a pytree, some leaves ``QuantizedArray``.
    updates: a pytree like ``params`` with float arrays of the full shapes
      (the gradients were taken w.r.t. :func:`dequantize_params` of
      ``params``).
    key: a PRNG key, required (use a new one every step).

  Returns:
    The updated params, quantized leaves requantized.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from galore_jax import quantize_params, apply_updates_stochastic
    >>> from galore_jax import dequantize_params
    >>> w = 0.05 * jax.random.normal(jax.random.key(0), (64, 64))
    >>> params = quantize_params({"w": w})  # code step ~1e-3
    >>> tiny = {"w": jnp.full((64, 64), 1e-4)}
    >>> new = apply_updates_stochastic(params, tiny, jax.random.key(1))
    >>> moved = dequantize_params(new)["w"] - dequantize_params(params)["w"]
    >>> bool(abs(float(moved.mean()) - 1e-4) < 3e-5)  # unbiased on average
    True
  """
  quantization.check_key(key, "apply_updates_stochastic")
  leaves, treedef = jax.tree.flatten(
      params, is_leaf=quantization.is_quantized)
  ups = treedef.flatten_up_to(updates)
  n_quantized = sum(map(quantization.is_quantized, leaves))
  keys = iter(jax.random.split(key, max(n_quantized, 1)))
  out = []
  for p, u in zip(leaves, ups):
    if u is None or isinstance(u, optax.MaskedNode):
      out.append(p)
    elif quantization.is_quantized(p):
      if tuple(u.shape) != p.batch_shape + p.shape:
        raise ValueError(
            f"update of shape {u.shape} for a quantized weight of shape"
            f" {p.batch_shape + p.shape}")
      out.append(add_stochastic(p, u, next(keys)))
    else:
      out.append(jnp.asarray(p + u).astype(jnp.asarray(p).dtype))
  return treedef.unflatten(out)


def _requantize(p, codes, scales, zeros, u_flat, key):
  """Packed codes, scales and zero points of ``dequantize + u``, rounded
  stochastically, for a run of ``p``'s groups (``u_flat`` their values)."""
  groups = scales.shape[0]
  q = quantization.unpack(codes, p.bits, groups * p.group_size)
  # In float32: rounding to a bf16 `p.dtype` first would add an error that
  # stochastic rounding turns into a drift of the codes.
  w = quantization.dequantize_groupwise(q, scales, zeros, u_flat.shape)
  c, s, z = quantization.quantize_groupwise(
      w + u_flat.astype(jnp.float32), p.bits, p.group_size, key=key,
      zero_point=p.zero_point)
  return quantization.pack(c, p.bits), s, z


def add_stochastic(p: quantization.QuantizedArray, u: jax.Array,
                   key: jax.Array) -> quantization.QuantizedArray:
  """One leaf of :func:`apply_updates_stochastic`: ``p + u`` requantized.

  Chunks of whole groups (about ``SR_CHUNK_ELEMENTS`` values, a multiple of
  the codes per byte) are requantized in place by
  :func:`galore_jax._inplace.update_chunks`: chunk ``c`` rounds with
  ``fold_in(key, c)``, and the rest (the last chunk, short or ragged) with
  ``fold_in(key, chunks)``. A leaf quantized per slice (leading
  ``batch_shape``, e.g. stacked layers) is requantized slice after slice in
  place, slice ``l`` of the flattened batch with ``fold_in(key, l)``.
  """
  if p.batch_shape:
    return _add_stochastic_per_slice(p, u, key)
  g, k = p.group_size, quantization.codes_per_byte(p.bits)
  per = max(k, quantization.SR_CHUNK_ELEMENTS // g // k * k)  # groups
  codes, scales, zeros = _inplace.update_chunks(
      lambda *chunk: _requantize(p, *chunk),
      (p.codes, p.scales, p.zeros, jnp.ravel(u)),
      (per * g // k, per, per, per * g), key=key)
  return dataclasses.replace(p, codes=codes, scales=scales, zeros=zeros)


def _add_stochastic_per_slice(p, u, key):
  """:func:`add_stochastic` of each slice of a batched ``p``, in place."""
  n = math.prod(p.batch_shape)
  flat = lambda a: a.reshape((n,) + a.shape[len(p.batch_shape):])
  arrays = tuple(map(flat, (p.codes, p.scales, p.zeros)))
  u = u.reshape((n,) + p.shape)
  one = lambda c, s, z: dataclasses.replace(p, codes=c, scales=s, zeros=z)

  def compute(l, codes, scales, zeros, u):
    take = lambda a: jax.lax.dynamic_index_in_dim(a, l, keepdims=False)
    new = add_stochastic(one(*map(take, (codes, scales, zeros))), take(u),
                         jax.random.fold_in(key, l))
    return new.codes, new.scales, new.zeros

  def body(l, carry):
    new = _inplace.unfused(l >= 0, compute, l, *carry, u)
    return tuple(jax.lax.dynamic_update_index_in_dim(a, x, l, 0)
                 for a, x in zip(carry, new))

  codes, scales, zeros = jax.lax.fori_loop(0, n, body, arrays)
  shaped = lambda a, like: a.reshape(like.shape)
  return dataclasses.replace(p, codes=shaped(codes, p.codes),
                             scales=shaped(scales, p.scales),
                             zeros=shaped(zeros, p.zeros))
