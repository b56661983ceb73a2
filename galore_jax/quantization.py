r"""Quantization primitives: group-wise codes, packing, stochastic rounding.

Two schemes, each the one the official method uses:

* **Group-wise asymmetric (Q-GaLore's projectors and INT8 weights).** The
  array is flattened row-major and cut into groups of ``group_size``
  consecutive elements; each group gets a float32 ``scale`` and a zero
  point. Two zero points (``b`` bits, ``Q = 2^b - 1``):

  - ``zero_point="float"`` (the default): a float32 offset, the group's
    minimum ``m``,

    .. math::
      s = \max\!\left(\frac{\max w - m}{Q},\ s_{\min}\right), \quad
      q = \mathrm{clip}(\mathrm{round}((w - m) / s), 0, Q), \quad
      \hat w = s\,q + m,

    with ``s_min`` float32's smallest normal number. Every group whose span
    ``max w - min w`` is a finite float32 (every group of values below
    ``1.7e38`` in magnitude), whatever its signs and range (same sign,
    constant, tiny span), dequantizes within half a code step ``s`` (one
    step with stochastic rounding).
  - ``zero_point="official"``: the official Q-GaLore formulas, an integer
    zero point clipped to the code range,

    .. math::
      s = \frac{\max(\max w - \min w,\ 10^{-5})}{Q}, \quad
      z = \mathrm{clip}(-\mathrm{round}(\min w / s), 0, Q), \quad
      q = \mathrm{clip}(\mathrm{round}(w / s) + z, 0, Q), \quad
      \hat w = s\,(q - z).

    A group that does not straddle zero is clipped, not shifted: values of
    one sign spanning less than a factor 2 (the top singular vector of a
    gradient with a common-sign component, norm scales near 1) collapse to
    about ``s``. Kept for bit-exact parity with the official code.

  A size that ``group_size`` does not divide gets a shorter last group (the
  array is padded with its last element, which changes no group's min or
  max). Codes of 4 bits or fewer are packed several to a byte.
* **Blockwise dynamic (bitsandbytes' 8-bit optimizer states).** Blocks of
  ``block_size`` elements are divided by their absmax and each value is
  mapped to the nearest of 256 entries of a non-linear "dynamic" code map
  (:func:`dynamic_code_map`), signed for Adam's first moment, unsigned for
  the second.
* **Blockwise absmax to a fixed code (QLoRA's frozen base weights).** Blocks
  of ``block_size`` (default 64) elements are divided by their absmax and
  each value takes the nearest entry of a 16-value 4-bit NormalFloat code
  (:func:`nf4_code_map`, packed two per byte) or of the 255 symmetric int8
  levels ``k / 127``; see :func:`quantize_absmax`.

Rounding is to nearest (ties to even, as ``torch.round``) unless a PRNG key
is given, which selects unbiased stochastic rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from galore_jax import _inplace
from galore_jax import _validation


def check_bits(bits: Any, name: str = "bits") -> int:
  """Returns ``bits`` if it is an int in 2..8, else raises a clear error."""
  _validation.static(name, bits, "an int in 2..8")
  if isinstance(bits, (bool, np.bool_)) or not isinstance(
      bits, (int, np.integer)) or not 2 <= bits <= 8:
    raise ValueError(f"`{name}` must be an int in 2..8, got {bits!r}")
  return int(bits)


def num_groups(size: int, group_size: int) -> int:
  """Number of groups of ``group_size`` covering ``size`` elements."""
  return -(-size // group_size)


def pad_to_groups(x: jax.Array, group_size: int,
                  mode: str = "constant") -> jax.Array:
  """``x`` flattened row-major as ``(num_groups, group_size)``.

  Every quantizer here groups its input this way; :func:`from_groups` is the
  inverse.

  Args:
    x: array of any shape.
    group_size: elements per group (row).
    mode: how the last group is filled out: ``"constant"`` with zeros
      (changes no block's absmax) or ``"edge"`` with the last element
      (changes no group's min or max).

  Returns:
    ``(num_groups(x.size, group_size), group_size)``, ``x``'s dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> from galore_jax.quantization import pad_to_groups
    >>> pad_to_groups(jnp.arange(1, 6), 4, "edge").tolist()
    [[1, 2, 3, 4], [5, 5, 5, 5]]
  """
  flat = jnp.ravel(x)
  pad = num_groups(flat.size, group_size) * group_size - flat.size
  if pad:
    flat = jnp.pad(flat, (0, pad), mode=mode)
  return flat.reshape(-1, group_size)


def from_groups(groups: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`pad_to_groups`: the first ``prod(shape)`` elements,
  as ``shape``."""
  return groups.reshape(-1)[:math.prod(shape)].reshape(shape)


# ---------------------------------------------------------------------------
# Rounding.


# Random bits per value of stochastic rounding: the fractional part is
# compared on a grid of 2^-16.
SR_BITS = 16


def round_up(frac: jax.Array, bits: jax.Array) -> jax.Array:
  """Whether stochastic rounding rounds up, from uniform ``uint16`` bits.

  ``frac`` in ``[0, 1)`` is compared as ``bits + 1/2 < frac * 2^16``: of the
  2^16 equally likely ``bits``, exactly ``frac * 2^16`` round up when that is
  an integer, otherwise the nearest integer count does. Stochastic rounding
  is therefore exactly unbiased for every fractional part on the 2^-16 grid
  (every float32 quotient of magnitude >= 128, so every upper-half code of
  an 8-bit quantizer) and within 2^-17 of a code step for any other: below
  the float32 resolution of a quotient near the code range's top, at 2 bytes
  of random bits per value instead of 4.
  """
  return bits.astype(jnp.float32) + 0.5 < frac * float(2**SR_BITS)


def stochastic_round(x: jax.Array, key: jax.Array) -> jax.Array:
  """Rounds up with probability equal to the fractional part (unbiased).

  ``E[stochastic_round(x)] = x`` (to 2^-17, see :func:`round_up`), so
  increments far below one code step still move the expected value, where
  round-to-nearest would drop them.

  Args:
    x: float array.
    key: a PRNG key (required: there is no default key).

  Returns:
    ``floor(x) + round_up(x - floor(x), bits)``, float32, with ``bits``
    uniform ``uint16`` (two bytes of random bits per value).
  """
  check_key(key, "stochastic_round")
  bits = jax.random.bits(key, jnp.shape(x), jnp.uint16)
  x = x.astype(jnp.float32)
  lo = jnp.floor(x)
  return lo + round_up(x - lo, bits).astype(jnp.float32)


def check_key(key: Any, what: str) -> None:
  if key is None:
    raise TypeError(
        f"{what} needs an explicit PRNG key (e.g. jax.random.key(0), split"
        " per step); there is no default key, because a fixed one would"
        " round every step the same way"
    )
  if not ((jax.dtypes.issubdtype(getattr(key, "dtype", None),
                                 jax.dtypes.prng_key)
           and getattr(key, "shape", None) == ())
          or (getattr(key, "dtype", None) == jnp.uint32
              and getattr(key, "shape", None) == (2,))):
    raise TypeError(
        f"{what}: `key` must be a single PRNG key (jax.random.key or"
        f" jax.random.PRNGKey), got {key!r}"
    )


# ---------------------------------------------------------------------------
# Group-wise asymmetric quantization.


def _true_divide(x: jax.Array, d: Any) -> jax.Array:
  """``x / d`` rounded as IEEE division (torch's result, bit for bit).

  XLA rewrites division by a constant or by a broadcast operand into
  multiplication by a rounded reciprocal, which is one ulp off for about
  half the inputs (and then a code off at near-ties); dividing by a full
  array that is not a compile-time constant keeps the true division.
  """
  return x / (d + jnp.zeros_like(x) * x)


ZERO_POINTS = ("float", "official")


def check_zero_point(zero_point: Any, name: str = "zero_point") -> str:
  """Returns ``zero_point`` if it is one of :data:`ZERO_POINTS`."""
  _validation.static(name, zero_point, f"one of {ZERO_POINTS}")
  if not isinstance(zero_point, str) or zero_point not in ZERO_POINTS:
    raise ValueError(
        f"`{name}` must be one of {ZERO_POINTS}, got {zero_point!r}")
  return zero_point


def zero_point_dtype(zero_point: str) -> Any:
  """Dtype of the stored zero points: float32 offsets or uint8 integers."""
  return jnp.float32 if check_zero_point(zero_point) == "float" else jnp.uint8


def quantize_groupwise(
    x: jax.Array,
    bits: int = 8,
    group_size: int = 256,
    *,
    key: Optional[jax.Array] = None,
    zero_point: str = "float",
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Group-wise asymmetric min-max quantization (see the module docstring).

  Args:
    x: array of any shape; quantized over its row-major flattening.
    bits: code width, 2..8.
    group_size: elements per group (the last group may be shorter).
    key: optional PRNG key: stochastic rounding instead of nearest.
    zero_point: ``"float"`` (float32 offsets: every group represented) or
      ``"official"`` (Q-GaLore's clipped uint8 zero points, bit for bit).

  Returns:
    ``(codes, scales, zeros)``: uint8 codes of shape ``(groups, group_size)``
    (unpacked, values in ``[0, 2^bits)``), float32 scales of shape
    ``(groups,)`` and zero points of shape ``(groups,)``: float32 offsets
    (``"float"``) or uint8 (``"official"``).

  Examples:
    >>> import jax.numpy as jnp
    >>> from galore_jax import quantization as q
    >>> codes, scales, zeros = q.quantize_groupwise(
    ...     jnp.linspace(-1, 1, 8), bits=4, group_size=8,
    ...     zero_point="official")
    >>> codes.tolist(), scales.tolist(), zeros.tolist()  # s = 2/15, z = 7
    ([[0, 2, 4, 6, 8, 10, 12, 14]], [0.13333334028720856], [7])
    >>> w = q.dequantize_groupwise(codes, scales, zeros, (8,))
    >>> [round(float(v), 4) for v in w[:3]]  # s * (q - z)
    [-0.9333, -0.6667, -0.4]
    >>> same_sign = jnp.array([0.7069, 0.7073])
    >>> codes, scales, zeros = q.quantize_groupwise(same_sign, 4, 256)
    >>> w = q.dequantize_groupwise(codes, scales, zeros, (2,))  # s q + min
    >>> bool(jnp.abs(w - same_sign).max() <= scales[0] / 2)
    True
  """
  bits = check_bits(bits)
  _validation.positive_int("group_size", group_size)
  check_zero_point(zero_point)
  max_int = 2**bits - 1
  w = pad_to_groups(x.astype(jnp.float32), group_size, "edge")
  lo = jnp.min(w, axis=1, keepdims=True)
  hi = jnp.max(w, axis=1, keepdims=True)
  if zero_point == "float":
    scales, zeros, y = _float_zero_point(w, lo, hi, max_int)
  else:
    scales = _true_divide(jnp.maximum(hi - lo, 1e-5), jnp.float32(max_int))
    zeros = jnp.clip(-jnp.round(_true_divide(lo, scales)), 0, max_int)
    y = _true_divide(w, scales)
  if key is None:
    codes = jnp.clip(jnp.round(y) + _int_zeros(zeros, zero_point), 0,
                     max_int)
  else:
    codes = _stochastic_codes(y, _int_zeros(zeros, zero_point), max_int, key)
  zeros = zeros[:, 0].astype(zero_point_dtype(zero_point))
  return codes.astype(jnp.uint8), scales[:, 0], zeros


def _float_zero_point(w, lo, hi, max_int):
  """Scales, float offsets and ``(w - m) / s`` of the ``"float"`` scheme."""
  scales = jnp.maximum(_true_divide(hi - lo, jnp.float32(max_int)),
                       jnp.finfo(jnp.float32).tiny)
  return scales, lo, _true_divide(w - lo, scales)


def _int_zeros(zeros, zero_point):
  """What is added to the rounded quotient: the integer zero point, or 0."""
  return zeros if zero_point == "official" else 0.0


# Values rounded at once by stochastic quantization (and requantized at once
# by `q_galore.apply_updates_stochastic`): each chunk draws its own random
# bits, so a large leaf never holds them all.
SR_CHUNK_ELEMENTS = 2**20


def _stochastic_codes(y, zeros, max_int, key):
  """``clip(SR(y) + z)`` per group, float32, ``SR_CHUNK_ELEMENTS`` at a time,
  in place over ``y``: chunk ``c`` rounds with ``fold_in(key, c)``, a ``y``
  of one chunk or less with ``key``, without a loop."""
  groups, group_size = y.shape
  zeros = jnp.broadcast_to(jnp.asarray(zeros, jnp.float32), (groups, 1))

  def codes(y, zeros, key):
    return (jnp.clip(stochastic_round(y, key) + zeros, 0, max_int),)

  per_chunk = max(1, SR_CHUNK_ELEMENTS // group_size)
  if groups <= per_chunk:
    return codes(y, zeros, key)[0]
  return _inplace.update_chunks(codes, (y, zeros), per_chunk, key=key)[0]


def dequantize_groupwise(
    codes: jax.Array,
    scales: jax.Array,
    zeros: jax.Array,
    shape: tuple[int, ...],
    dtype: Any = jnp.float32,
) -> jax.Array:
  """Inverse of :func:`quantize_groupwise`: ``s q + m`` for float offsets
  ``m``, ``s (q - z)`` for uint8 zero points ``z``."""
  q = codes.reshape(scales.shape[0], -1).astype(jnp.float32)
  if jnp.issubdtype(zeros.dtype, jnp.floating):
    w = scales[:, None] * q + zeros[:, None]
  else:
    w = scales[:, None] * (q - zeros[:, None].astype(jnp.float32))
  return from_groups(w, shape).astype(dtype)


# ---------------------------------------------------------------------------
# Packing codes of <= 4 bits several to a byte.


def codes_per_byte(bits: int) -> int:
  """4 codes per byte for 2 bits, 2 for 3-4 bits, 1 for 5-8 bits."""
  bits = check_bits(bits)
  return 4 if bits == 2 else 2 if bits <= 4 else 1


def packed_size(size: int, bits: int) -> int:
  """Bytes that :func:`pack` uses for ``size`` codes of ``bits`` bits."""
  return num_groups(size, codes_per_byte(bits))


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """Packs uint8 codes (values < ``2^bits``) into a flat uint8 array.

  Code ``i`` of each byte sits at bit offset ``i * 8 // codes_per_byte``, low
  bits first; a ragged tail is padded with zero codes.

  Examples:
    >>> import jax.numpy as jnp
    >>> from galore_jax import quantization as q
    >>> packed = q.pack(jnp.array([1, 2, 15], jnp.uint8), bits=4)
    >>> packed.tolist()  # 0x21, then 0x0f
    [33, 15]
    >>> q.unpack(packed, bits=4, size=3).tolist()
    [1, 2, 15]
  """
  k = codes_per_byte(bits)
  flat = jnp.ravel(codes).astype(jnp.uint8)
  if k == 1:
    return flat
  slots = pad_to_groups(flat, k).astype(jnp.uint32)
  shifts = jnp.arange(k, dtype=jnp.uint32) * (8 // k)
  return jnp.sum(slots << shifts, axis=1).astype(jnp.uint8)


def unpack(packed: jax.Array, bits: int, size: int) -> jax.Array:
  """Inverse of :func:`pack`: the first ``size`` codes, flat uint8."""
  k = codes_per_byte(bits)
  if k == 1:
    return packed[:size]
  width = 8 // k
  shifts = jnp.arange(k, dtype=jnp.uint8) * width
  codes = (packed[:, None] >> shifts) & jnp.uint8(2**width - 1)
  return codes.reshape(-1)[:size]


# ---------------------------------------------------------------------------
# Quantized arrays (INT8 weights).


class _Stored:
  """``size`` and ``ndim`` of the float array a quantized array stands for."""

  shape: tuple[int, ...]

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray(_Stored):
  """A float array stored as group-wise codes; a pytree of three arrays.

  Hold it wherever an array goes: in a params dict, or as the value of a
  Flax NNX ``Param`` (``nnx.Param(quantize_array(w))``), and call
  :func:`dequantize` (a no-op on ordinary arrays) where the layer uses it.
  Shape, dtype, bits and group size are static pytree metadata, so a
  checkpoint restores exactly this layout.

  Attributes:
    codes: packed uint8 codes, flat (see :func:`pack`).
    scales: float32 per-group scales, ``(groups,)``.
    zeros: per-group zero points, ``(groups,)``: float32 offsets
      (``zero_point="float"``) or uint8 (``"official"``).
    shape: shape of the float array.
    dtype: dtype :func:`dequantize` returns.
    bits: code width, 2..8.
    group_size: elements per group.
  """

  codes: jax.Array
  scales: jax.Array
  zeros: jax.Array
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  dtype: Any = dataclasses.field(metadata=dict(static=True))
  bits: int = dataclasses.field(default=8, metadata=dict(static=True))
  group_size: int = dataclasses.field(
      default=256, metadata=dict(static=True))

  @property
  def nbytes(self) -> int:
    """Bytes actually stored: codes, scales and zero points."""
    return sum(a.size * a.dtype.itemsize
               for a in (self.codes, self.scales, self.zeros))

  @property
  def zero_point(self) -> str:
    """``"float"`` (float offsets) or ``"official"`` (uint8 zero points)."""
    return ("float" if jnp.issubdtype(self.zeros.dtype, jnp.floating)
            else "official")

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """The float array, ``scale * (code - zero)``, in ``dtype``.

    Args:
      dtype: result dtype; default :attr:`dtype`. Pass ``jnp.float32`` to
        skip the rounding to a low-precision :attr:`dtype`.
    """
    dtype = self.dtype if dtype is None else dtype
    size = num_groups(self.size, self.group_size) * self.group_size

    def one(codes, scales, zeros):
      return dequantize_groupwise(unpack(codes, self.bits, size), scales,
                                  zeros, self.shape, dtype)

    for _ in self.batch_shape:  # quantized per layer: one matrix each
      one = jax.vmap(one)
    return one(self.codes, self.scales, self.zeros)

  @property
  def batch_shape(self) -> tuple[int, ...]:
    """Leading axes of arrays quantized one slice at a time (e.g. ``(L,)``
    for stacked layers, see ``galore_jax.layerwise.quantize_blocks``);
    :attr:`shape` is then one slice's shape."""
    return tuple(self.scales.shape[:-1])


def quantize_array(
    x: jax.Array,
    bits: int = 8,
    group_size: int = 256,
    *,
    key: Optional[jax.Array] = None,
    zero_point: str = "float",
) -> QuantizedArray:
  """Quantizes ``x`` group-wise into a :class:`QuantizedArray`.

  Args:
    x: a floating-point array.
    bits: code width, 2..8 (codes of <= 4 bits are packed).
    group_size: elements per group of the row-major flattening.
    key: optional PRNG key: stochastic rounding instead of nearest.
    zero_point: ``"float"`` (float32 offsets, the default) or
      ``"official"`` (Q-GaLore's clipped uint8 zero points).

  Returns:
    A :class:`QuantizedArray`. With ``zero_point="float"`` every group of
    finite values dequantizes within half a code step of ``x`` (one step
    with stochastic rounding). With ``"official"`` that holds only for
    groups that straddle zero: a group of same-sign values (e.g. norm scales
    near 1) is clipped.

  Examples:
    >>> import jax.numpy as jnp
    >>> from galore_jax.quantization import quantize_array
    >>> w = jnp.linspace(-1.0, 1.0, 512).reshape(16, 32)
    >>> qw = quantize_array(w)
    >>> qw.codes.dtype, qw.nbytes  # 512 codes + 2 groups of 2 float32
    (dtype('uint8'), 528)
    >>> bool(jnp.abs(qw.dequantize() - w).max() <= 2 / 255 / 2 + 1e-6)
    True
    >>> near_one = jnp.array([[0.7069], [0.7073]])
    >>> [round(float(v), 4) for v in quantize_array(near_one, 4).dequantize()[:, 0]]
    [0.7069, 0.7073]
    >>> official = quantize_array(near_one, 4, zero_point="official")
    >>> [round(float(v), 4) for v in official.dequantize()[:, 0]]  # clipped
    [0.0004, 0.0004]
  """
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"quantize_array needs a float array, got {x.dtype}")
  bits = check_bits(bits)
  _validation.positive_int("group_size", group_size)
  codes, scales, zeros = quantize_groupwise(x, bits, group_size, key=key,
                                            zero_point=zero_point)
  return QuantizedArray(
      codes=pack(codes, bits), scales=scales, zeros=zeros,
      shape=tuple(x.shape), dtype=jnp.dtype(x.dtype), bits=bits,
      group_size=int(group_size))


def dequantize(x: Any, dtype: Any = None) -> Any:
  """``x.dequantize(dtype)`` for a quantized array, else ``x`` (cast to
  ``dtype`` if given).

  Either quantized type works: :class:`QuantizedArray` and
  :class:`AbsmaxQuantizedArray`.
  """
  if isinstance(x, (QuantizedArray, AbsmaxQuantizedArray, WithGradient)):
    return x.dequantize(dtype)
  return x if dtype is None else x.astype(dtype)


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedArray)


def is_dequantizable(x: Any) -> bool:
  """A :class:`QuantizedArray` or a :class:`WithGradient`: a leaf that
  :func:`dequantize` turns into one float array."""
  return isinstance(x, (QuantizedArray, WithGradient))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WithGradient:
  """A :class:`QuantizedArray` plus a float ``delta`` of its full shape.

  It dequantizes to ``quantized.dequantize() + delta``. With ``delta = 0``
  that is the quantized weight itself, and the gradient with respect to
  ``delta`` is the gradient with respect to the dequantized weight: the
  codes need no float copy for it to exist. Use it through
  :func:`galore_jax.q_galore.value_and_grad`; a scan over stacked layers
  slices both parts, so each layer is dequantized where it is used.

  Attributes:
    quantized: the weight's codes.
    delta: float array of ``quantized.batch_shape + quantized.shape``.
  """

  quantized: QuantizedArray
  delta: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return self.quantized.shape

  @property
  def dtype(self) -> Any:
    return self.quantized.dtype

  def dequantize(self, dtype: Any = None) -> jax.Array:
    dtype = self.quantized.dtype if dtype is None else dtype
    return self.quantized.dequantize(dtype) + self.delta.astype(dtype)


# ---------------------------------------------------------------------------
# Blockwise dynamic 8-bit quantization (bitsandbytes' optimizer states).


@functools.cache
def _dynamic_code_map(signed: bool) -> np.ndarray:
  # bitsandbytes.functional.create_dynamic_map(signed, 7, 8): for each decade
  # 10^-6 .. 10^0, the midpoints of an even split of [0.1, 1]; 7 "non-sign"
  # bits for both kinds (an unsigned map spends the sign bit on resolution).
  data = []
  for i in range(7):
    n = 2**i + 1 if signed else 2**(i + 1) + 1
    edges = np.linspace(0.1, 1, n, dtype=np.float32)
    means = (edges[:-1] + edges[1:]) / 2.0
    data += list(10.0 ** (-6 + i) * means)
    if signed:
      data += list(-(10.0 ** (-6 + i)) * means)
  data += [0.0, 1.0]
  assert len(data) == 256
  return np.sort(np.asarray(data, np.float32))


def dynamic_code_map(signed: bool) -> np.ndarray:
  """The 256 values of bitsandbytes' dynamic (non-linear) 8-bit code map.

  Sorted float32 values in ``[-1, 1]`` (signed) or ``[0, 1]`` (unsigned),
  dense near zero: about 7 decades with a few significant bits each, which
  keeps Adam's moments, spread over orders of magnitude, accurate in
  relative terms.

  Examples:
    >>> from galore_jax.quantization import dynamic_code_map
    >>> m = dynamic_code_map(signed=True)
    >>> m.shape, float(m.min()), float(m.max())
    ((256,), -0.99296..., 1.0)
  """
  return _dynamic_code_map(bool(signed)).copy()


def quantize_blockwise(
    x: jax.Array, signed: bool, block_size: int = 256, *,
    keep_nonzero: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Blockwise absmax quantization to the nearest dynamic-map entry.

  Args:
    x: float array, quantized over its row-major flattening.
    signed: use the signed map (else the unsigned one: ``x >= 0``).
    block_size: elements per absmax block (the tail block is zero-padded).
    keep_nonzero: a non-zero value never takes the code of 0: it gets the
      nearest non-zero code of its sign instead. 8-bit Adam needs this for
      its second moment: a tiny ``v`` stored as 0 beside a surviving ``m``
      would make the next update ``m / eps``.

  Returns:
    ``(codes, absmax)``: uint8 indices into :func:`dynamic_code_map` of shape
    ``(blocks, block_size)`` and float32 absmax of shape ``(blocks,)``.
  """
  _validation.positive_int("block_size", block_size)
  table = _dynamic_code_map(bool(signed))
  code_map = jnp.asarray(table)
  blocks = pad_to_groups(jnp.asarray(x, jnp.float32), block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  safe = jnp.where(absmax > 0, absmax, 1.0)
  normed = blocks / safe[:, None]
  midpoints = (code_map[1:] + code_map[:-1]) / 2
  codes = jnp.searchsorted(midpoints, normed)
  if keep_nonzero:
    zero = int(np.flatnonzero(table == 0)[0])
    nudged = jnp.where(blocks > 0, zero + 1, zero - 1 if signed else zero)
    codes = jnp.where((codes == zero) & (blocks != 0), nudged, codes)
  return codes.astype(jnp.uint8), absmax


def dequantize_blockwise(
    codes: jax.Array,
    absmax: jax.Array,
    signed: bool,
    shape: tuple[int, ...],
) -> jax.Array:
  """Inverse of :func:`quantize_blockwise`, float32 of ``shape``."""
  code_map = jnp.asarray(_dynamic_code_map(bool(signed)))
  return from_groups(code_map[codes.astype(jnp.int32)] * absmax[:, None],
                     shape)


# ---------------------------------------------------------------------------
# Blockwise absmax to a fixed code: NF4 / int8 frozen weights (QLoRA).

# bitsandbytes' NF4 (QLoRA, Dettmers et al. 2023, appendix E): quantiles of
# N(0, 1), 8 positive and 7 negative plus an exact zero, scaled to [-1, 1]:
# create_normal_map(offset=0.9677083), as float32 in bitsandbytes.
_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
_INT8 = (np.arange(-127, 128) / 127).astype(np.float32)
ABSMAX_CODES = ("nf4", "int8")


def nf4_code_map() -> np.ndarray:
  """The 16 values of the 4-bit NormalFloat (NF4) code, sorted, in [-1, 1].

  Examples:
    >>> from galore_jax.quantization import nf4_code_map
    >>> m = nf4_code_map()
    >>> m.shape, float(m[0]), float(m[7]), float(m[-1])
    ((16,), -1.0, 0.0, 1.0)
  """
  return _NF4.copy()


def _absmax_table(code: str) -> np.ndarray:
  if code not in ABSMAX_CODES:
    raise ValueError(
        f"`code` must be one of {ABSMAX_CODES}, got {code!r}")
  return _NF4 if code == "nf4" else _INT8


def _absmax_bits(code: str) -> int:
  return 4 if code == "nf4" else 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AbsmaxQuantizedArray(_Stored):
  """A float array stored as blockwise-absmax codes (a QLoRA frozen weight).

  ``x ≈ table[code] * absmax[block]``: ``table`` is :func:`nf4_code_map`
  (``code="nf4"``, two codes per byte) or the int8 levels ``k / 127``,
  ``k = -127..127`` (``code="int8"``, one byte each). Shape, dtype, code and
  block size are static pytree metadata; an ``nnx.Variable`` can hold one.

  Attributes:
    codes: packed uint8 code indices, flat.
    absmax: float32 absmax per block, ``(blocks,)``.
    shape: shape of the float array.
    dtype: dtype :meth:`dequantize` returns.
    code: ``"nf4"`` or ``"int8"``.
    block_size: elements per block of the row-major flattening.
  """

  codes: jax.Array
  absmax: jax.Array
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  dtype: Any = dataclasses.field(metadata=dict(static=True))
  code: str = dataclasses.field(default="nf4", metadata=dict(static=True))
  block_size: int = dataclasses.field(default=64, metadata=dict(static=True))

  @property
  def nbytes(self) -> int:
    """Bytes actually stored: codes and absmax."""
    return self.codes.size + self.absmax.size * self.absmax.dtype.itemsize

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """``table[code] * absmax`` in ``dtype`` (default :attr:`dtype`); codes
    quantized with ``batch_dims`` give the whole stacked array, each slice
    dequantized on its own."""
    if self.codes.ndim > 1:  # leading batch axes (quantize_absmax's)
      fn = lambda codes, absmax: dataclasses.replace(
          self, codes=codes, absmax=absmax).dequantize(dtype)
      for _ in range(self.codes.ndim - 1):
        fn = jax.vmap(fn)
      return fn(self.codes, self.absmax)
    padded = num_groups(self.size, self.block_size) * self.block_size
    idx = unpack(self.codes, _absmax_bits(self.code), padded)
    table = jnp.asarray(_absmax_table(self.code))
    x = table[idx.astype(jnp.int32)].reshape(-1, self.block_size)
    x = from_groups(x * self.absmax[:, None], self.shape)
    return x.astype(self.dtype if dtype is None else dtype)


def quantize_absmax(
    x: jax.Array, code: str = "nf4", block_size: int = 64, *,
    batch_dims: int = 0,
) -> AbsmaxQuantizedArray:
  """Blockwise absmax quantization of ``x`` to the NF4 or int8 code.

  Each block of ``block_size`` consecutive elements (row-major; the last
  block zero-padded) is divided by its absmax and every value takes the
  nearest code value: the information-theoretically optimal code for
  normally distributed weights (NF4) or 255 even levels (int8). No double
  quantization of the absmax: it stays float32 (4 bytes per block).

  Args:
    x: a floating-point array.
    code: ``"nf4"`` (QLoRA's 4-bit NormalFloat) or ``"int8"``.
    block_size: elements per absmax block (QLoRA: 64).
    batch_dims: quantize each slice ``x[i, j, ...]`` over the first
      ``batch_dims`` axes on its own, as ``jax.vmap`` would: the result's
      arrays get these leading axes and its ``shape`` is a slice's, so a
      stacked ``(L, in, out)`` kernel indexed or scanned over ``L`` gives
      quantized ``(in, out)`` matrices.

  Returns:
    An :class:`AbsmaxQuantizedArray`; its ``dequantize()`` is within half the
    widest code gap times the block's absmax of ``x`` (NF4: 0.16, int8:
    1/254).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from galore_jax.quantization import quantize_absmax
    >>> w = jax.random.normal(jax.random.key(0), (64, 32))
    >>> qw = quantize_absmax(w)  # NF4, blocks of 64
    >>> qw.nbytes  # 2048 / 2 code bytes + 32 blocks * 4 bytes of absmax
    1152
    >>> err = jnp.abs(qw.dequantize() - w).max() / jnp.abs(w).max()
    >>> bool(err < 0.16)
    True
  """
  table_np = _absmax_table(code)
  _validation.positive_int("block_size", block_size)
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise TypeError(
        f"quantize_absmax needs a float array, got {jnp.result_type(x)}")
  if (isinstance(batch_dims, bool) or not isinstance(batch_dims, int)
      or not 0 <= batch_dims <= jnp.ndim(x)):
    raise ValueError(f"`batch_dims` must be an int in [0, {jnp.ndim(x)}],"
                     f" got {batch_dims!r}")
  if batch_dims:
    fn = functools.partial(quantize_absmax, code=code, block_size=block_size)
    for _ in range(batch_dims):
      fn = jax.vmap(fn)
    return fn(x)
  table = jnp.asarray(table_np)
  blocks = pad_to_groups(jnp.asarray(x, jnp.float32), block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  normed = _true_divide(blocks, jnp.where(absmax > 0, absmax, 1.0)[:, None])
  idx = jnp.searchsorted((table[1:] + table[:-1]) / 2, normed)
  return AbsmaxQuantizedArray(
      codes=pack(idx.astype(jnp.uint8), _absmax_bits(code)), absmax=absmax,
      shape=tuple(x.shape), dtype=jnp.dtype(x.dtype), code=code,
      block_size=int(block_size))
