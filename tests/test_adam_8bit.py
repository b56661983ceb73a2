"""scale_by_adam_8bit / adamw_8bit: blockwise 8-bit Adam against float Adam."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax
from galore_jax import adam_8bit


def regression(seed=0, n=256, d_in=64, d_out=96):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n, d_in)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((d_in, d_out)) / 8, jnp.float32)
  y = jnp.tanh(x @ w) + 0.1 * jnp.asarray(rng.standard_normal((n, d_out)),
                                         jnp.float32)
  params = {"w": jnp.zeros((d_in, d_out)), "b": jnp.zeros((d_out,))}
  loss = lambda p: jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2)
  return params, loss


def run(tx, params, loss, steps):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    u, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, u), state

  losses = []
  for _ in range(steps):
    params, state = step(params, state)
    losses.append(float(loss(params)))
  return params, state, losses


def test_state_is_uint8_codes_and_float32_absmax():
  params = {"w": jnp.zeros((64, 100)), "b": jnp.zeros((100,))}
  state = galore_jax.scale_by_adam_8bit(block_size=256).init(params)
  assert isinstance(state, galore_jax.ScaleByAdam8bitState)
  for m in (state.mu["w"], state.nu["w"]):
    chex.assert_shape(m.codes, (25, 256))  # 6400 elements
    chex.assert_shape(m.absmax, (25,))
    assert m.codes.dtype == jnp.uint8 and m.absmax.dtype == jnp.float32
  # Below min_8bit_size (4096, bitsandbytes' default): float32 moments.
  assert state.mu["b"].dtype == jnp.float32
  # 8-bit Adam state <= 0.27 of float32 Adam's on the big leaf.
  ours = sum(x.nbytes for x in jax.tree.leaves((state.mu["w"],
                                                state.nu["w"])))
  assert ours / (2 * 4 * 6400) <= 0.27
  # A fresh state dequantizes to exact zeros: first step equals Adam's.
  g = {"w": jnp.linspace(-1, 1, 6400).reshape(64, 100),
       "b": jnp.ones((100,))}
  u8, _ = galore_jax.scale_by_adam_8bit().update(g, state)
  u32, _ = optax.scale_by_adam().update(g, optax.scale_by_adam().init(params))
  chex.assert_trees_all_close(u8, u32, rtol=1e-6, atol=1e-6)


def test_without_8bit_leaves_equals_optax_adam():
  params, loss = regression()
  tx8 = galore_jax.adamw_8bit(1e-2, weight_decay=0.1, min_8bit_size=10**9)
  p8, _, _ = run(tx8, params, loss, 30)
  p32, _, _ = run(optax.adamw(1e-2, weight_decay=0.1), params, loss, 30)
  chex.assert_trees_all_close(p8, p32, rtol=1e-5, atol=1e-6)


def test_8bit_tracks_float_adam():
  params, loss = regression()
  kw = dict(weight_decay=0.0)
  p8, s8, l8 = run(galore_jax.adamw_8bit(3e-3, min_8bit_size=1024, **kw),
                   params, loss, 300)
  p32, _, l32 = run(optax.adamw(3e-3, **kw), params, loss, 300)
  assert s8[0].mu["w"].codes.dtype == jnp.uint8  # really 8-bit
  assert abs(l8[-1] - l32[-1]) <= 0.02 * l32[-1]
  assert l8[-1] < 0.5 * l8[0]
  w8, w32 = np.asarray(p8["w"]), np.asarray(p32["w"])
  cos = (w8 * w32).sum() / np.linalg.norm(w8) / np.linalg.norm(w32)
  assert cos > 0.99


def test_one_step_update_error_is_small():
  """Starting from the same float moments, the 8-bit step's update differs
  from float Adam's by the moment quantization error only (a few %)."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.zeros((128, 128))}
  tx8, tx32 = galore_jax.scale_by_adam_8bit(), optax.scale_by_adam()
  s8, s32 = tx8.init(params), tx32.init(params)
  for t in range(20):
    g = {"w": jnp.asarray(rng.standard_normal((128, 128))
                          * 10.0 ** rng.uniform(-4, 0, (128, 128)),
                          jnp.float32)}
    u8, s8 = tx8.update(g, s8)
    u32, s32 = tx32.update(g, s32)
  rel = np.linalg.norm(u8["w"] - u32["w"]) / np.linalg.norm(u32["w"])
  assert rel < 0.05


def test_galore_adamw_8bit_state_and_training():
  params, loss = regression(d_in=96, d_out=128)
  tx = galore_jax.galore_adamw_8bit(1e-2, rank=16, update_proj_gap=20,
                                    min_8bit_size=1024)
  _, state, losses = run(tx, params, loss, 60)
  mu = state[0].base_state.mu["w"]
  assert mu.codes.dtype == jnp.uint8
  assert mu.codes.size == 256 * 8  # (16, 128) low-rank moment, 8 blocks
  assert losses[-1] < 0.6 * losses[0]


def test_bad_arguments():
  with pytest.raises(ValueError, match="`block_size` must be a positive int"):
    galore_jax.scale_by_adam_8bit(block_size=0)
  with pytest.raises(ValueError, match="`min_8bit_size` must be a"):
    galore_jax.scale_by_adam_8bit(min_8bit_size=-1)
  with pytest.raises(ValueError, match=r"`b1` must be in \[0, 1\)"):
    galore_jax.adamw_8bit(1e-3, b1=1.5)
  with pytest.raises(ValueError, match="`weight_decay` must be in"):
    galore_jax.adamw_8bit(1e-3, weight_decay=-1.0)


def test_tiny_second_moment_is_not_stored_as_zero():
  """One large gradient sets a block's absmax; a tiny one beside it gives a
  v below the map's resolution. If v were stored as 0, the next step with a
  zero gradient would update by m / eps (thousands): it must stay as
  bounded as float Adam's update."""
  g1 = jnp.zeros((256,)).at[0].set(1.0).at[1].set(1e-4)
  g2 = jnp.zeros((256,)).at[0].set(1.0)
  params = {"w": jnp.zeros((256,))}
  tx8 = galore_jax.scale_by_adam_8bit(min_8bit_size=0)
  tx32 = optax.scale_by_adam()
  s8, s32 = tx8.init(params), tx32.init(params)
  for g in (g1, g2, g2):
    u8, s8 = tx8.update({"w": g}, s8)
    u32, s32 = tx32.update({"w": g}, s32)
  assert int(s8.nu["w"].codes[0, 1]) != 0  # smallest non-zero code
  assert abs(float(u32["w"][1])) < 3
  assert abs(float(u8["w"][1])) < 3 * abs(float(u32["w"][1]))


def test_no_update_spikes_with_sparse_inputs():
  """Sparse inputs on features of very different scales (as MNIST's pixels
  and dead ReLUs) give gradients that are tiny, then exactly zero. 8-bit
  Adam's updates stay within float Adam's bound (|m| / sqrt(v) <= 7.3 for
  b1=.9, b2=.999); storing tiny v as 0 gave updates of ~70 here."""
  rng = np.random.default_rng(0)
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"w1": jax.random.normal(k1, (64, 256)) / 8,
            "w2": jax.random.normal(k2, (256, 10)) / 16}
  loss = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
      jax.nn.relu(x @ p["w1"]) @ p["w2"], y).mean()
  tx = galore_jax.scale_by_adam_8bit()
  state = tx.init(params)
  update = jax.jit(tx.update)
  largest = 0.0
  for _ in range(60):
    x = (rng.standard_normal((32, 64)) * (rng.random((32, 64)) < 0.05)
         * 10.0 ** rng.uniform(-3, 0, (1, 64)))
    y = rng.integers(0, 10, 32)
    g = jax.grad(loss)(params, jnp.asarray(x, jnp.float32), jnp.asarray(y))
    u, state = update(g, state)
    largest = max(largest, max(float(jnp.abs(v).max())
                               for v in jax.tree.leaves(u)))
    params = jax.tree.map(lambda p, v: p - 1e-3 * v, params, u)
  assert largest < 7.3


def test_chunked_update_equals_the_whole_leaf_update(monkeypatch):
  """Chunks of 2 blocks of 64 (3 full chunks and one block left), updated
  in place in a loop, give the updates and states of the whole leaf at
  once, to float rounding (XLA fuses a chunk's arithmetic differently; a
  last-bit difference may move a code at a near-tie)."""
  params = {"w": jnp.zeros((7, 64))}
  grads = [{"w": jax.random.normal(jax.random.key(i), (7, 64))}
           for i in range(3)]

  def steps():
    tx = galore_jax.scale_by_adam_8bit(block_size=64, min_8bit_size=0)
    state, out = tx.init(params), []
    for g in grads:
      u, state = jax.jit(tx.update)(g, state)
      out.append((u, state))
    return out, jax.make_jaxpr(tx.update)(grads[0], state)

  whole, jaxpr = steps()
  assert "cond[" not in str(jaxpr)
  monkeypatch.setattr(adam_8bit, "_CHUNK_ELEMENTS", 128)
  chunked, jaxpr = steps()
  assert "cond[" in str(jaxpr)  # the loop body, its own computation
  for (u, state), (u_chunked, state_chunked) in zip(whole, chunked):
    chex.assert_trees_all_close(u, u_chunked, rtol=1e-6, atol=1e-7)
    for m, m_chunked in ((state.mu["w"], state_chunked.mu["w"]),
                         (state.nu["w"], state_chunked.nu["w"])):
      np.testing.assert_allclose(m.absmax, m_chunked.absmax, rtol=1e-6)
      assert np.mean(np.asarray(m.codes == m_chunked.codes)) > 0.99
