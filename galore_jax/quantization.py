r"""Quantization primitives: group-wise codes, packing, stochastic rounding.

Two schemes, each the one the official method uses:

* **Group-wise asymmetric (Q-GaLore's projectors and INT8 weights).** The
  array is flattened row-major and cut into groups of ``group_size``
  consecutive elements; each group gets a float32 ``scale`` and an integer
  zero point, with the official formulas (``b`` bits, ``Q = 2^b - 1``)

  .. math::
    s = \frac{\max(\max w - \min w,\ 10^{-5})}{Q}, \quad
    z = \mathrm{clip}(-\mathrm{round}(\min w / s), 0, Q), \quad
    q = \mathrm{clip}(\mathrm{round}(w / s) + z, 0, Q), \quad
    \hat w = s\,(q - z).

  As in the official code, the zero point is clipped to the code range, so a
  group that does not straddle zero (rare for groups of 256 weights or
  singular-vector entries) is clipped, not shifted. A size that
  ``group_size`` does not divide gets a shorter last group (the
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


# ---------------------------------------------------------------------------
# Rounding.


def stochastic_round(x: jax.Array, key: jax.Array) -> jax.Array:
  """Rounds up with probability equal to the fractional part (unbiased).

  ``E[stochastic_round(x)] = x``, so increments far below one code step still
  move the expected value, where round-to-nearest would drop them.

  Args:
    x: float array.
    key: a PRNG key (required: there is no default key).

  Returns:
    ``floor(x) + (u < x - floor(x))`` with ``u ~ U[0, 1)``, in ``x``'s dtype.
  """
  check_key(key, "stochastic_round")
  u = jax.random.uniform(key, x.shape, jnp.float32)
  x = x.astype(jnp.float32)
  lo = jnp.floor(x)
  return lo + (u < x - lo).astype(jnp.float32)


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


def _groups(x: jax.Array, group_size: int) -> jax.Array:
  """``x`` flattened row-major as ``(num_groups, group_size)``, edge-padded."""
  flat = jnp.ravel(x)
  pad = num_groups(flat.size, group_size) * group_size - flat.size
  if pad:
    flat = jnp.pad(flat, (0, pad), mode="edge")
  return flat.reshape(-1, group_size)


def quantize_groupwise(
    x: jax.Array,
    bits: int = 8,
    group_size: int = 256,
    *,
    key: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Group-wise asymmetric min-max quantization (official Q-GaLore formulas).

  Args:
    x: array of any shape; quantized over its row-major flattening.
    bits: code width, 2..8.
    group_size: elements per group (the last group may be shorter).
    key: optional PRNG key: stochastic rounding instead of nearest.

  Returns:
    ``(codes, scales, zeros)``: uint8 codes of shape ``(groups, group_size)``
    (unpacked, values in ``[0, 2^bits)``), float32 scales and uint8 zero
    points of shape ``(groups,)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from galore_jax import quantization as q
    >>> codes, scales, zeros = q.quantize_groupwise(jnp.linspace(-1, 1, 8),
    ...                                             bits=4, group_size=8)
    >>> codes.tolist(), scales.tolist(), zeros.tolist()  # s = 2/15, z = 7
    ([[0, 2, 4, 6, 8, 10, 12, 14]], [0.13333334028720856], [7])
    >>> w = q.dequantize_groupwise(codes, scales, zeros, (8,))
    >>> [round(float(v), 4) for v in w[:3]]  # s * (q - z)
    [-0.9333, -0.6667, -0.4]
  """
  bits = check_bits(bits)
  _validation.positive_int("group_size", group_size)
  max_int = 2**bits - 1
  w = _groups(x.astype(jnp.float32), group_size)
  lo = jnp.min(w, axis=1, keepdims=True)
  hi = jnp.max(w, axis=1, keepdims=True)
  scales = _true_divide(jnp.maximum(hi - lo, 1e-5), jnp.float32(max_int))
  zeros = jnp.clip(-jnp.round(_true_divide(lo, scales)), 0, max_int)
  if key is None:
    codes = jnp.clip(jnp.round(_true_divide(w, scales)) + zeros, 0, max_int)
  else:
    codes = _stochastic_codes(w, scales, zeros, max_int, key)
  return (codes.astype(jnp.uint8), scales[:, 0],
          zeros[:, 0].astype(jnp.uint8))


# Groups rounded at once by stochastic quantization: each chunk draws its
# own random bits, so a large leaf never holds them all (4 bytes a value).
_SR_CHUNK_ELEMENTS = 2**20


def _stochastic_codes(w, scales, zeros, max_int, key):
  """``clip(SR(w / s) + z)`` per group, ``_SR_CHUNK_ELEMENTS`` at a time;
  chunk ``c`` rounds with ``fold_in(key, c)``."""
  groups, group_size = w.shape
  per_chunk = max(1, _SR_CHUNK_ELEMENTS // group_size)
  if groups <= per_chunk:
    y = stochastic_round(_true_divide(w, scales), key)
    return jnp.clip(y + zeros, 0, max_int)
  n = -(-groups // per_chunk)
  pad = n * per_chunk - groups
  chunked = lambda a: jnp.pad(a, ((0, pad), (0, 0)), mode="edge").reshape(
      n, per_chunk, a.shape[1])

  def chunk(args):
    c, w_c, s_c, z_c = args
    y = stochastic_round(_true_divide(w_c, s_c), jax.random.fold_in(key, c))
    return jnp.clip(y + z_c, 0, max_int).astype(jnp.uint8)

  codes = jax.lax.map(chunk, (jnp.arange(n), chunked(w), chunked(scales),
                              chunked(zeros)))
  return codes.reshape(n * per_chunk, group_size)[:groups]


def dequantize_groupwise(
    codes: jax.Array,
    scales: jax.Array,
    zeros: jax.Array,
    shape: tuple[int, ...],
    dtype: Any = jnp.float32,
) -> jax.Array:
  """Inverse of :func:`quantize_groupwise`: ``scale * (q - zero)``."""
  size = math.prod(shape)
  q = codes.reshape(scales.shape[0], -1).astype(jnp.float32)
  w = scales[:, None] * (q - zeros[:, None].astype(jnp.float32))
  return w.reshape(-1)[:size].reshape(shape).astype(dtype)


# ---------------------------------------------------------------------------
# Packing codes of <= 4 bits several to a byte.


def codes_per_byte(bits: int) -> int:
  """4 codes per byte for 2 bits, 2 for 3-4 bits, 1 for 5-8 bits."""
  bits = check_bits(bits)
  return 4 if bits == 2 else 2 if bits <= 4 else 1


def packed_size(size: int, bits: int) -> int:
  """Bytes that :func:`pack` uses for ``size`` codes of ``bits`` bits."""
  return -(-size // codes_per_byte(bits))


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
  pad = packed_size(flat.size, bits) * k - flat.size
  if pad:
    flat = jnp.pad(flat, (0, pad))
  slots = flat.reshape(-1, k).astype(jnp.uint32)
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
    zeros: uint8 per-group zero points, ``(groups,)``.
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

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """The float array, ``scale * (code - zero)``, in ``dtype``.

    Args:
      dtype: result dtype; default :attr:`dtype`. Pass ``jnp.float32`` to
        skip the rounding to a low-precision :attr:`dtype`.
    """
    size = num_groups(self.size, self.group_size) * self.group_size
    codes = unpack(self.codes, self.bits, size)
    return dequantize_groupwise(codes, self.scales, self.zeros, self.shape,
                                self.dtype if dtype is None else dtype)


def quantize_array(
    x: jax.Array,
    bits: int = 8,
    group_size: int = 256,
    *,
    key: Optional[jax.Array] = None,
) -> QuantizedArray:
  """Quantizes ``x`` group-wise into a :class:`QuantizedArray`.

  Args:
    x: a floating-point array.
    bits: code width, 2..8 (codes of <= 4 bits are packed).
    group_size: elements per group of the row-major flattening.
    key: optional PRNG key: stochastic rounding instead of nearest.

  Returns:
    A :class:`QuantizedArray`. Where a group's values straddle zero (as in
    any group of 256 weights of a trained matrix), it dequantizes to ``x``
    within half a code step per element (one step with stochastic
    rounding). The official zero point is clipped to the code range, so a
    group of same-sign values (e.g. norm scales near 1) is not represented:
    keep such leaves in float.

  Examples:
    >>> import jax.numpy as jnp
    >>> from galore_jax.quantization import quantize_array
    >>> w = jnp.linspace(-1.0, 1.0, 512).reshape(16, 32)
    >>> qw = quantize_array(w)
    >>> qw.codes.dtype, qw.nbytes  # 512 codes + 2 groups of (scale, zero)
    (dtype('uint8'), 522)
    >>> bool(jnp.abs(qw.dequantize() - w).max() <= 2 / 255 / 2 + 1e-6)
    True
  """
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"quantize_array needs a float array, got {x.dtype}")
  bits = check_bits(bits)
  _validation.positive_int("group_size", group_size)
  codes, scales, zeros = quantize_groupwise(x, bits, group_size, key=key)
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
  if isinstance(x, (QuantizedArray, AbsmaxQuantizedArray)):
    return x.dequantize(dtype)
  return x if dtype is None else x.astype(dtype)


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedArray)


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
  flat = jnp.ravel(x).astype(jnp.float32)
  pad = num_groups(flat.size, block_size) * block_size - flat.size
  blocks = jnp.pad(flat, (0, pad)).reshape(-1, block_size)
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
  x = code_map[codes.astype(jnp.int32)] * absmax[:, None]
  return x.reshape(-1)[:math.prod(shape)].reshape(shape)


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
    """``table[code] * absmax`` in ``dtype`` (default :attr:`dtype`)."""
    padded = num_groups(self.size, self.block_size) * self.block_size
    idx = unpack(self.codes, _absmax_bits(self.code), padded)
    table = jnp.asarray(_absmax_table(self.code))
    x = table[idx.astype(jnp.int32)].reshape(-1, self.block_size)
    x = (x * self.absmax[:, None]).reshape(-1)[:self.size]
    return x.reshape(self.shape).astype(self.dtype if dtype is None else dtype)


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
  flat = jnp.ravel(x).astype(jnp.float32)
  pad = num_groups(flat.size, block_size) * block_size - flat.size
  blocks = jnp.pad(flat, (0, pad)).reshape(-1, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  normed = _true_divide(blocks, jnp.where(absmax > 0, absmax, 1.0)[:, None])
  idx = jnp.searchsorted((table[1:] + table[:-1]) / 2, normed)
  return AbsmaxQuantizedArray(
      codes=pack(idx.astype(jnp.uint8), _absmax_bits(code)), absmax=absmax,
      shape=tuple(x.shape), dtype=jnp.dtype(x.dtype), code=code,
      block_size=int(block_size))
