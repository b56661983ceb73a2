"""Quantization primitives: official formulas, packing, rounding, code maps."""

import dataclasses

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from galore_jax import quantization as q
from tests import reference_q_galore as ref


def bnb_dynamic_map(signed):
  """Literal port of bitsandbytes.functional.create_dynamic_map(signed, 7, 8)."""
  max_exponent_bits, total_bits = 7, 8
  data = []
  non_sign_bits = total_bits - 1
  additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
  for i in range(max_exponent_bits):
    fraction_items = int(
        2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
        else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
    boundaries = np.linspace(0.1, 1, fraction_items, dtype=np.float32)
    means = (boundaries[:-1] + boundaries[1:]) / 2.0
    data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if signed:
      data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
  assert additional_items == 0
  data.append(0)
  data.append(1.0)
  assert len(data) == 2**total_bits
  return np.sort(np.asarray(data, np.float32))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [16, 64])
def test_groupwise_matches_official_formulas(bits, group_size):
  w = np.random.default_rng(bits).standard_normal((8, 32)).astype(np.float32)
  codes, scales, zeros = q.quantize_groupwise(jnp.asarray(w), bits, group_size,
                                             zero_point="official")
  r_codes, r_scales, r_zeros, _ = ref.quantize(w, bits, group_size)
  np.testing.assert_array_equal(codes.reshape(-1), r_codes.reshape(-1))
  np.testing.assert_array_equal(scales, r_scales[:, 0])
  np.testing.assert_array_equal(zeros, r_zeros[:, 0])
  assert codes.dtype == zeros.dtype == jnp.uint8 and int(codes.max()) < 2**bits
  back = q.dequantize_groupwise(codes, scales, zeros, w.shape)
  np.testing.assert_array_equal(back, ref.dequantize(r_codes, r_scales,
                                                     r_zeros, w.shape))
  # Groups straddle zero here: the error is at most half a code step.
  step = np.repeat(np.asarray(scales), group_size).reshape(w.shape)
  assert np.all(np.abs(np.asarray(back) - w) <= step / 2 + 1e-6)


def test_ragged_last_group_is_quantized_on_its_own():
  w = np.random.default_rng(0).standard_normal(70).astype(np.float32)
  codes, scales, zeros = q.quantize_groupwise(jnp.asarray(w), 8, 32)
  assert codes.shape == (3, 32) and scales.shape == (3,)
  assert zeros.dtype == jnp.float32  # the default: float offsets
  tail_codes, tail_scales, tail_zeros = q.quantize_groupwise(
      jnp.asarray(w[64:]), 8, 6)
  np.testing.assert_array_equal(codes[2, :6], tail_codes[0])
  assert scales[2] == tail_scales[0] and zeros[2] == tail_zeros[0]
  back = q.dequantize_groupwise(codes, scales, zeros, (70,))
  np.testing.assert_allclose(back, w, atol=float(scales.max()))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("size", [1, 7, 64, 129])
def test_pack_round_trip(bits, size):
  codes = np.random.default_rng(size).integers(0, 2**bits, size, np.uint8)
  packed = q.pack(jnp.asarray(codes), bits)
  assert packed.dtype == jnp.uint8
  assert packed.shape == (q.packed_size(size, bits),)
  per_byte = {2: 4, 3: 2, 4: 2}.get(bits, 1)
  assert packed.size == -(-size // per_byte)
  np.testing.assert_array_equal(q.unpack(packed, bits, size), codes)


def test_int4_packing_layout():
  packed = q.pack(jnp.array([0x3, 0xA, 0xF, 0x1], jnp.uint8), 4)
  assert packed.tolist() == [0xA3, 0x1F]  # low nibble first


def test_stochastic_round_is_unbiased_and_adjacent():
  x = jnp.full((200_000,), 2.3)
  y = q.stochastic_round(x, jax.random.key(0))
  assert set(np.unique(np.asarray(y)).tolist()) == {2.0, 3.0}
  assert abs(float(y.mean()) - 2.3) < 5e-3
  neg = q.stochastic_round(-x, jax.random.key(1))
  assert abs(float(neg.mean()) + 2.3) < 5e-3
  ints = q.stochastic_round(jnp.arange(-3.0, 4.0), jax.random.key(2))
  np.testing.assert_array_equal(ints, np.arange(-3.0, 4.0))
  # Deterministic given the key, different across keys.
  again = q.stochastic_round(x, jax.random.key(0))
  np.testing.assert_array_equal(y, again)
  assert not np.array_equal(y, q.stochastic_round(x, jax.random.key(3)))


def test_stochastic_quantization_is_unbiased():
  w = jnp.asarray(np.random.default_rng(0).standard_normal(512), jnp.float32)
  keys = jax.random.split(jax.random.key(0), 400)
  back = jax.vmap(lambda k: q.dequantize_groupwise(
      *q.quantize_groupwise(w, 4, 128, key=k), (512,)))(keys)
  step = float(q.quantize_groupwise(w, 4, 128)[1].max())
  assert float(jnp.abs(back - w).max()) <= step + 1e-6
  # Unbiased wherever the code range does not clip: away from each group's
  # min and max (the official zero point is rounded, so the extremes may
  # fall half a step outside the range and be clipped).
  groups = np.asarray(w).reshape(4, 128)
  inner = ((groups > groups.min(1, keepdims=True) + step)
           & (groups < groups.max(1, keepdims=True) - step)).reshape(-1)
  bias = np.abs(np.asarray(back.mean(0) - w))[inner]
  assert inner.sum() > 400 and bias.max() < 4 * step * 0.5 / 20


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes(signed):
  m = q.dynamic_code_map(signed)
  np.testing.assert_allclose(m, bnb_dynamic_map(signed), rtol=1e-6, atol=0)
  assert m.dtype == np.float32 and m.shape == (256,)
  assert len(np.unique(m)) == 256 and m.max() == 1.0
  assert (m.min() < -0.99) if signed else (m.min() == 0.0)


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_is_nearest_code(signed):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(1000) * 10.0 ** rng.uniform(-6, 0, 1000)
  x = np.abs(x) if not signed else x
  x = x.astype(np.float32)
  codes, absmax = q.quantize_blockwise(jnp.asarray(x), signed, 256)
  assert codes.shape == (4, 256) and absmax.shape == (4,)
  m = q.dynamic_code_map(signed)
  padded = np.pad(x, (0, 24)).reshape(4, 256)
  normed = padded / np.asarray(absmax)[:, None]
  best = np.abs(normed[..., None] - m).min(-1)
  got = np.abs(normed - m[np.asarray(codes)])
  np.testing.assert_allclose(got, best, atol=1e-7)
  back = q.dequantize_blockwise(codes, absmax, signed, (1000,))
  # The dynamic map keeps a few percent relative error over four decades
  # below each block's absmax (a linear 8-bit code would lose the small ones).
  rel = np.abs(np.asarray(back) - x) / np.abs(x)
  big = np.abs(x) > 1e-4 * np.repeat(np.asarray(absmax), 256)[:1000]
  assert big.sum() > 500 and np.median(rel[big]) < 0.05


def test_quantized_array_is_a_pytree_of_three_arrays():
  w = jnp.asarray(np.random.default_rng(0).standard_normal((48, 40)),
                  jnp.bfloat16)
  qa = q.quantize_array(w, bits=4, group_size=64)
  leaves, treedef = jax.tree.flatten(qa)
  assert [x.dtype for x in leaves] == [jnp.uint8, jnp.float32, jnp.float32]
  assert leaves[0].shape == (48 * 40 // 2,)  # int4: two codes per byte
  assert qa.nbytes == 960 + 30 * 4 + 30 * 4
  official = q.quantize_array(w, bits=4, group_size=64, zero_point="official")
  assert official.nbytes == 960 + 30 * 4 + 30  # uint8 zero points
  again = jax.tree.unflatten(treedef, leaves)
  assert isinstance(again, q.QuantizedArray)
  assert (again.shape, again.dtype, again.bits, again.group_size) == (
      (48, 40), jnp.bfloat16, 4, 64)
  assert jax.tree.structure(dataclasses.replace(qa, bits=8)) != treedef
  out = jax.jit(lambda a: a.dequantize())(qa)
  assert out.dtype == jnp.bfloat16 and out.shape == (48, 40)
  assert q.dequantize(w) is w


def test_nnx_layer_holds_quantized_kernel():
  class QLinear(nnx.Module):

    def __init__(self, w):
      self.kernel = nnx.Param(q.quantize_array(w))

    def __call__(self, x_BxD):
      return x_BxD @ q.dequantize(self.kernel.get_value())

  w = jnp.asarray(np.random.default_rng(0).standard_normal((32, 16)),
                  jnp.float32)
  layer = QLinear(w)
  x = jnp.ones((2, 32))
  np.testing.assert_allclose(layer(x), x @ w, rtol=0, atol=0.5)
  np.testing.assert_array_equal(
      layer(x), x @ layer.kernel.get_value().dequantize())
  state = nnx.state(layer, nnx.Param)
  assert [a.dtype for a in jax.tree.leaves(state)] == [
      jnp.uint8, jnp.float32, jnp.float32]


def test_bad_bits_and_keys():
  for bits in (1, 9, 4.0, True, None):
    with pytest.raises(ValueError, match="`bits` must be an int in 2..8"):
      q.quantize_groupwise(jnp.ones(4), bits)
  with pytest.raises(ValueError, match="`group_size` must be a positive int"):
    q.quantize_groupwise(jnp.ones(4), 8, 0)
  with pytest.raises(TypeError, match="needs an explicit PRNG key"):
    q.stochastic_round(jnp.ones(3), None)
  with pytest.raises(TypeError, match="single PRNG key"):
    q.stochastic_round(jnp.ones(3), 0)
  with pytest.raises(TypeError, match="single PRNG key"):
    q.stochastic_round(jnp.ones(3), jax.random.split(jax.random.key(0)))
  with pytest.raises(TypeError, match="needs a float array"):
    q.quantize_array(jnp.ones(3, jnp.int32))


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_keep_nonzero(signed):
  x = jnp.array([1.0, 1e-9, -1e-9, 0.0] if signed else [1.0, 1e-9, 0.0, 0.0])
  m = q.dynamic_code_map(signed)
  plain, _ = q.quantize_blockwise(x, signed, 4)
  kept, _ = q.quantize_blockwise(x, signed, 4, keep_nonzero=True)
  assert m[plain[0, 1]] == 0.0  # below resolution: rounds to zero...
  assert m[kept[0, 1]] == m[m > 0].min()  # ...unless asked to keep it
  if signed:
    assert m[kept[0, 2]] == m[m < 0].max()
  assert m[kept[0, 3]] == 0.0 and kept[0, 0] == plain[0, 0]


@pytest.mark.parametrize("bits", [4, 8])
def test_groupwise_under_jit_is_the_official_formula_bit_for_bit(bits):
  """XLA turns divisions by a broadcast or constant into multiplications by a
  rounded reciprocal; near-ties would then round to the other code."""
  w = np.random.default_rng(bits).standard_normal(1 << 16).astype(np.float32)
  codes, scales, zeros = jax.jit(
      lambda x: q.quantize_groupwise(x, bits, 256, zero_point="official"))(
          jnp.asarray(w))
  r_codes, r_scales, r_zeros, _ = ref.quantize(w, bits, 256)
  np.testing.assert_array_equal(scales, r_scales[:, 0])
  np.testing.assert_array_equal(zeros, r_zeros[:, 0])
  np.testing.assert_array_equal(codes.reshape(-1), r_codes.reshape(-1))


def near_tie_group(group_size=16):
  """A group with entries whose w / s lies next to a .5 tie, where
  ``w * (1 / s)`` (XLA's rewrite of a division) rounds the other way."""
  lo, hi = np.float32(-1.3), np.float32(1.7)
  s = (np.maximum(hi - lo, np.float32(1e-5)) / np.float32(255)).astype(
      np.float32)
  recip = np.float32(1) / s
  found = []
  for k in range(-120, 120):
    x = np.float32((k + 0.5) * s)
    for _ in range(8):
      if np.round(x / s) != np.round(x * recip) and lo < x < hi:
        found.append(x)
      x = np.nextafter(x, np.float32(np.inf))
  assert len(found) >= group_size - 2
  return np.asarray([lo, hi] + found[:group_size - 2], np.float32)


def test_groupwise_near_ties_under_jit():
  w = near_tie_group()
  codes = jax.jit(lambda x: q.quantize_groupwise(
      x, 8, 16, zero_point="official")[0])(jnp.asarray(w))
  np.testing.assert_array_equal(codes.reshape(-1),
                                ref.quantize(w, 8, 16)[0].reshape(-1))


def hostile_groups(group_size=16):
  """Groups the official zero point cannot represent, and other edges."""
  rng = np.random.default_rng(0)
  base = rng.standard_normal(group_size).astype(np.float32)
  return np.stack([
      0.7071 + 1e-4 * base,                      # same sign, span << 2x
      -3.0 - 1e-3 * np.abs(base),                # negative, narrow
      np.full(group_size, 0.25),                 # constant
      np.full(group_size, -7.0),                 # constant, negative
      np.zeros(group_size),                      # all zero
      1e-30 * base,                              # tiny values
      1e-30 + 1e-38 * np.abs(base),              # tiny span near tiny value
      1e6 + np.arange(group_size) * 0.0625,      # float32 spacing at 1e6
      1.7e38 * np.sign(base),                    # span near float32's max
      1e3 * base,                                # wide, straddles zero
      np.linspace(5.0, 9.0, group_size),         # positive, > 2x
  ]).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_float_zero_point_represents_every_group(bits):
  w = hostile_groups()
  for key in (None, jax.random.key(bits)):
    codes, scales, zeros = q.quantize_groupwise(jnp.asarray(w), bits, 16,
                                                key=key)
    assert zeros.dtype == jnp.float32 and codes.dtype == jnp.uint8
    assert int(codes.max()) < 2**bits
    back = np.asarray(q.dequantize_groupwise(codes, scales, zeros, w.shape))
    assert np.all(np.isfinite(back))
    err = np.abs(back.astype(np.float64) - w.astype(np.float64))
    step = np.asarray(scales, np.float64)[:, None]
    # Half a step rounding to nearest, one step rounding stochastically
    # (plus float32's own rounding of s q + m).
    bound = step * (0.5 if key is None else 1.0)
    assert np.all(err <= bound * (1 + 1e-5) + np.spacing(np.abs(w)))
  np.testing.assert_array_equal(back[2:5], w[2:5])  # constants: exact


def test_official_zero_point_collapses_same_sign_groups():
  """Why the default changed: the official formula maps a same-sign group
  spanning less than 2x to about one code step."""
  near_one = jnp.array([[0.7069], [0.7073]])
  official = q.quantize_array(near_one, 4, 256, zero_point="official")
  assert official.zero_point == "official" and official.zeros.dtype == jnp.uint8
  np.testing.assert_allclose(official.dequantize(), [[0.0004], [0.0004]],
                             atol=1e-4)
  faithful = q.quantize_array(near_one, 4, 256)
  assert faithful.zero_point == "float"
  np.testing.assert_allclose(faithful.dequantize(), near_one, atol=2e-5)


def test_round_up_counts_exactly():
  """Of all 2^16 equally likely uint16 draws, the fraction that rounds up
  is the fractional part, to 2^-17, and exactly on the 2^-16 grid."""
  bits = jnp.arange(2**16, dtype=jnp.uint32).astype(jnp.uint16)
  fracs = np.concatenate([np.arange(0, 2**16, 997) / 2**16,
                          np.random.default_rng(0).random(64)]
                         ).astype(np.float32)
  up = jax.vmap(lambda f: q.round_up(f, bits).sum())(jnp.asarray(fracs))
  p = np.asarray(up, np.float64) / 2**16
  on_grid = np.arange(0, 2**16, 997).size
  np.testing.assert_array_equal(p[:on_grid], fracs[:on_grid])
  assert np.abs(p - fracs).max() <= 2.0**-17


def test_stochastic_round_draws_uint16_bits():
  jaxpr = str(jax.make_jaxpr(
      lambda k: q.stochastic_round(jnp.full((4096,), 0.3), k))(
          jax.random.key(0)))
  assert "random_bits[bit_width=16 shape=(4096,)]" in jaxpr
  assert "bit_width=32" not in jaxpr


def test_float_zero_point_stochastic_quantization_is_unbiased():
  w = jnp.asarray(0.7071 + 1e-3 * np.random.default_rng(1).random(512),
                  jnp.float32)  # same-sign groups, narrow
  keys = jax.random.split(jax.random.key(0), 400)
  back = jax.vmap(lambda k: q.dequantize_groupwise(
      *q.quantize_groupwise(w, 4, 128, key=k), (512,)))(keys)
  step = float(q.quantize_groupwise(w, 4, 128)[1].max())
  assert float(jnp.abs(back - w).max()) <= step * (1 + 1e-5)
  # 400 draws: the mean's standard error is at most step / 40.
  assert float(jnp.abs(back.mean(0) - w).max()) < 4 * step / 40


@pytest.mark.parametrize("mode,fill", [("edge", 7), ("constant", 0)])
def test_pad_to_groups_and_back(mode, fill):
  x = jnp.arange(1, 8).reshape(7, 1)  # 7 values: groups of 3, 2 filled
  groups = q.pad_to_groups(x, 3, mode)
  np.testing.assert_array_equal(groups,
                                [[1, 2, 3], [4, 5, 6], [7, fill, fill]])
  assert groups.shape == (q.num_groups(7, 3), 3)
  np.testing.assert_array_equal(q.from_groups(groups, (7, 1)), x)
  # A size the group size divides is only reshaped.
  np.testing.assert_array_equal(q.pad_to_groups(x[:6], 3, mode),
                                [[1, 2, 3], [4, 5, 6]])


@pytest.mark.parametrize("zero_point", ["float", "official"])
def test_chunked_stochastic_quantization_is_chunk_by_chunk(monkeypatch,
                                                           zero_point):
  """Chunks of 4 groups of 16 (2 full, 3 groups left, the last ragged),
  rounded in place in a loop: chunk c is the quantization of its own groups
  with fold_in(key, c)."""
  monkeypatch.setattr(q, "SR_CHUNK_ELEMENTS", 64)
  x = jax.random.normal(jax.random.key(0), (11 * 16 - 5,))
  key = jax.random.key(1)
  quantize = lambda x, key: q.quantize_groupwise(x, 4, 16, key=key,
                                                 zero_point=zero_point)
  jaxpr = str(jax.make_jaxpr(quantize)(x, key))
  assert ("scan[" in jaxpr or "while[" in jaxpr) and "cond[" in jaxpr
  got = jax.jit(quantize)(x, key)
  want = [quantize(x[c * 64:(c + 1) * 64], jax.random.fold_in(key, c))
          for c in range(3)]
  for part, parts in zip(got, zip(*want)):
    np.testing.assert_array_equal(part, jnp.concatenate(parts))
