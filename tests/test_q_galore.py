"""Mechanics of scale_by_q_galore: quantized state, adaptive refresh, stacking."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax
from galore_jax import projection
from galore_jax import quantization


def params_tree(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 3)
  return {
      "dense": {"kernel": jax.random.normal(k[0], (48, 32), dtype),
                "bias": jnp.zeros((32,), dtype)},
      "wide": {"kernel": jax.random.normal(k[1], (16, 64), dtype)},
      "stack": {"kernel": jax.random.normal(k[2], (3, 48, 32), dtype)},
      "norm": {"scale": jnp.ones((48,), dtype)},
  }


def random_grads(params, seed):
  keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
  keys = jax.tree.unflatten(jax.tree.structure(params), list(keys))
  return jax.tree.map(
      lambda p, k: jax.random.normal(k, p.shape, p.dtype), params, keys)


def stable_grads(params, seed, noise=1e-3):
  """A fixed gradient plus a little noise: the top direction barely moves."""
  base = random_grads(params, 1000)
  return jax.tree.map(lambda b, n: b + noise * n, base,
                      random_grads(params, seed))


def dequantized(entry, shape, bits, group):
  size = int(np.prod(shape))
  padded = quantization.num_groups(size, group) * group
  codes = quantization.unpack(entry.codes, bits, padded)
  return quantization.dequantize_groupwise(codes, entry.scales, entry.zeros,
                                           shape)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_state_shapes_and_dtypes(bits):
  params = params_tree()
  tx = galore_jax.scale_by_q_galore(rank=4, update_proj_gap=7, proj_bits=bits,
                                    proj_group_size=32, queue_size=3)
  state = tx.init(params)
  assert isinstance(state, galore_jax.QGaLoreState)
  chex.assert_type(state.count, jnp.int32)
  per_byte = {2: 4, 3: 2, 4: 2}.get(bits, 1)
  # dense (in 48, out 32): std -> column projector (32, 4), 128 entries.
  p = state.projector["dense"]["kernel"]
  assert isinstance(p, galore_jax.QuantizedProjector)
  chex.assert_shape(p.codes, (128 // per_byte,))
  chex.assert_shape([p.scales, p.zeros], (4,))
  chex.assert_shape(p.vector, (32,))
  chex.assert_shape(p.queue, (3,))
  assert [x.dtype for x in p] == [jnp.uint8, jnp.float32, jnp.float32,
                                  jnp.float32, jnp.int32, jnp.float32,
                                  jnp.int32]
  official = galore_jax.scale_by_q_galore(
      rank=4, update_proj_gap=7, proj_bits=bits, proj_group_size=32,
      queue_size=3, proj_zero_point="official").init(params)
  assert official.projector["dense"]["kernel"].zeros.dtype == jnp.uint8
  assert int(p.gap) == 7 and int(p.queue_count) == 0
  # wide (in 16, out 64): row projector (4, 16); stack: one per layer.
  w = state.projector["wide"]["kernel"]
  chex.assert_shape(w.vector, (16,))
  s = state.projector["stack"]["kernel"]
  chex.assert_shape(s.codes, (3, 128 // per_byte))
  chex.assert_shape([s.gap, s.queue_count], (3,))
  chex.assert_shape(s.queue, (3, 3))
  assert isinstance(state.projector["norm"]["scale"], optax.MaskedNode)
  chex.assert_shape(state.base_state.mu["dense"]["kernel"], (48, 4))
  assert all(x.size > 0 for x in jax.tree.leaves(state))


@pytest.mark.parametrize("bits", [4, 8])
def test_projector_is_the_quantized_svd_projector(bits):
  params = {"w": jnp.zeros((48, 32))}
  g = random_grads(params, 0)
  tx = galore_jax.scale_by_q_galore(rank=4, proj_bits=bits,
                                    proj_group_size=32)
  _, state = tx.update(g, tx.init(params))
  spec = projection.resolve_specs(params, rank=4, mask=None,
                                  dim_numbers=None, proj_type="std")[2][0]
  exact = projection.svd_projectors(g["w"], spec, jnp.float32).col
  entry = state.projector["w"]
  got = dequantized(entry, (32, 4), bits, 32)
  step = np.repeat(np.asarray(entry.scales), 32).reshape(32, 4)
  assert np.all(np.abs(np.asarray(got - exact)) <= step / 2 + 1e-6)
  np.testing.assert_allclose(entry.vector, exact[:, 0], rtol=1e-6)
  gram = np.asarray(got.T @ got)
  tol = 0.05 if bits == 8 else 0.6
  np.testing.assert_allclose(gram, np.eye(4), atol=tol)
  # And the update uses exactly that dequantized projector.
  tx0 = galore_jax.scale_by_q_galore(rank=4, proj_bits=bits,
                                     proj_group_size=32, base=optax.identity())
  u, _ = tx0.update(g, tx0.init(params))
  np.testing.assert_allclose(u["w"], g["w"] @ got @ got.T, rtol=1e-5,
                             atol=1e-6)


def run_schedule(tx, params, grads_fn, steps):
  """Steps at which each leaf refreshed, and its gap after every step."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  refreshed, gaps = [], []
  prev = state.projector["w"].vector
  for t in range(steps):
    _, state = update(grads_fn(params, t), state)
    cur = state.projector["w"].vector
    if bool(jnp.any(cur != prev)):
      refreshed.append(t)
    prev = cur
    gaps.append(int(state.projector["w"].gap))
  return refreshed, gaps, state


def test_gap_doubles_when_the_subspace_is_stable():
  params = {"w": jnp.zeros((48, 32))}
  tx = galore_jax.scale_by_q_galore(rank=4, update_proj_gap=2, queue_size=2,
                                    proj_group_size=32)
  refreshed, gaps, state = run_schedule(tx, params, stable_grads, 40)
  # Queue full at the third refresh (step 4); every refresh from then on
  # doubles the gap, and the next refresh is the next multiple of the gap.
  assert refreshed == [0, 2, 4, 8, 16, 32]
  assert gaps[3] == 2 and gaps[4] == 4 and gaps[8] == 8 and gaps[-1] == 32
  np.testing.assert_allclose(state.projector["w"].queue, 1.0, atol=1e-4)


def test_gap_stays_when_the_subspace_moves():
  params = {"w": jnp.zeros((48, 32))}
  tx = galore_jax.scale_by_q_galore(rank=4, update_proj_gap=3, queue_size=2,
                                    proj_group_size=32)
  refreshed, gaps, state = run_schedule(tx, params, random_grads, 20)
  assert refreshed == list(range(0, 20, 3)) and set(gaps) == {3}
  assert np.all(np.abs(np.asarray(state.projector["w"].queue)) < 0.4)
  assert int(state.projector["w"].queue_count) == 2


def test_fifo_queue_and_growth_factor():
  """cos_threshold=-1: the gap grows at every refresh once the queue is full;
  the queue keeps the last ``queue_size`` cosines, oldest first."""
  params = {"w": jnp.zeros((48, 32))}
  tx = galore_jax.scale_by_q_galore(rank=4, update_proj_gap=2, queue_size=3,
                                    cos_threshold=-1.0, gamma_proj=1.5,
                                    proj_group_size=32)
  refreshed, gaps, state = run_schedule(tx, params, random_grads, 30)
  # Gaps 2 -> 3 (step 6, queue full) -> 4 (step 9) -> 6 (step 12) -> 9 (18)
  # -> 13 (27): int(gap * 1.5) each time.
  assert refreshed == [0, 2, 4, 6, 9, 12, 18, 27]
  assert gaps[-1] == 13
  # The queue holds the cosines of the refreshes at 12, 18, 27.
  vectors = {}
  st = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(30):
    _, st = update(random_grads(params, t), st)
    vectors[t] = st.projector["w"].vector
  cos = [float(jnp.vdot(vectors[a], vectors[b])) for a, b in
         ((9, 12), (12, 18), (18, 27))]
  np.testing.assert_allclose(state.projector["w"].queue, cos, rtol=1e-5,
                             atol=1e-6)


def test_non_integer_growth_is_python_s_int_of_the_product():
  """int(100 * 1.15) == 114 in float64; a float32 product would give 115."""
  params = {"w": jnp.zeros((48, 32))}
  tx = galore_jax.scale_by_q_galore(rank=4, update_proj_gap=100, queue_size=1,
                                    cos_threshold=-1.0, gamma_proj=1.15,
                                    proj_group_size=32)
  refreshed, gaps, _ = run_schedule(tx, params, random_grads, 116)
  assert int(100 * 1.15) == 114 and int(114 * 1.15) == 131
  assert refreshed == [0, 100, 114] and gaps[-1] == 131


def test_stacked_layers_keep_their_own_gaps():
  """A stacked leaf equals its layers as separate leaves, gap for gap."""
  layers = {"a": jnp.zeros((48, 32)), "b": jnp.zeros((48, 32))}
  stacked = {"s": jnp.zeros((2, 48, 32))}
  kw = dict(rank=4, update_proj_gap=2, queue_size=2, proj_group_size=32)
  tx = galore_jax.scale_by_q_galore(**kw)
  s_sep, s_stack = tx.init(layers), tx.init(stacked)
  update = jax.jit(tx.update)
  for t in range(24):
    g = {"a": stable_grads(layers, t)["a"], "b": random_grads(layers, t)["b"]}
    u_sep, s_sep = update(g, s_sep)
    u_stack, s_stack = update({"s": jnp.stack([g["a"], g["b"]])}, s_stack)
    np.testing.assert_allclose(u_stack["s"][0], u_sep["a"], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(u_stack["s"][1], u_sep["b"], rtol=1e-5,
                               atol=1e-6)
  gaps = s_stack.projector["s"].gap
  assert gaps.tolist() == [int(s_sep.projector["a"].gap),
                           int(s_sep.projector["b"].gap)]
  assert gaps.tolist() == [16, 2]
  for f in ("codes", "scales", "zeros", "queue", "queue_count"):
    np.testing.assert_array_equal(
        getattr(s_stack.projector["s"], f)[1],
        getattr(s_sep.projector["b"], f))


def test_svd_runs_only_inside_the_refresh_branch():
  params = {"w": jnp.zeros((48, 32)), "stack": jnp.zeros((3, 48, 32))}
  tx = galore_jax.scale_by_q_galore(rank=4)
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(tx.update)(params, state).jaxpr
  assert "svd" not in [str(e.primitive) for e in jaxpr.eqns]
  # The refresh conds; the others choose the platform's projection code.
  conds = [e for e in jaxpr.eqns if str(e.primitive) == "cond"
           and not e.params.get("branches_platforms")]
  assert len(conds) == 2
  for c in conds:
    assert sum("svd" in str(b) for b in c.params["branches"]) == 1


def test_no_retrace_across_refreshes_and_gap_changes():
  params = params_tree()
  tx = galore_jax.q_galore_adamw(1e-2, rank=4, update_proj_gap=1,
                                 queue_size=1, cos_threshold=-1.0,
                                 proj_group_size=32)
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for t in range(6):
    params, state = step(params, state, random_grads(params, t))
  assert len(traces) == 1
  # Refreshes at 0 (first), 1 (queue full: 1 -> 2), 2 (-> 4), 4 (-> 8).
  assert int(state[0].projector["dense"]["kernel"].gap) == 8


def test_jit_equals_eager():
  params = params_tree()
  tx = galore_jax.q_galore_adamw(1e-2, rank=4, update_proj_gap=2,
                                 weight_decay=0.1, proj_group_size=32,
                                 min_8bit_size=64)
  s_eager = s_jit = tx.init(params)
  p_eager = p_jit = params
  update = jax.jit(tx.update)
  for t in range(5):
    g = stable_grads(params, t)
    u, s_eager = tx.update(g, s_eager, p_eager)
    p_eager = optax.apply_updates(p_eager, u)
    u, s_jit = update(g, s_jit, p_jit)
    p_jit = optax.apply_updates(p_jit, u)
  chex.assert_trees_all_close(p_eager, p_jit, rtol=1e-5, atol=1e-5)
  gaps = lambda s: jax.tree.map(lambda e: e.gap, s[0].projector,
                                is_leaf=lambda x: isinstance(
                                    x, galore_jax.QuantizedProjector))
  chex.assert_trees_all_equal(gaps(s_eager), gaps(s_jit))


@pytest.mark.parametrize("state_bits", [8, 32])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params_stay_low_precision(dtype, state_bits):
  params = params_tree(dtype)
  tx = galore_jax.q_galore_adamw(1e-2, rank=4, proj_group_size=32,
                                 state_bits=state_bits)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(random_grads(params, 0), state, params)
  for u in jax.tree.leaves(updates):
    assert u.dtype == dtype
  assert state[0].projector["dense"]["kernel"].scales.dtype == jnp.float32
  # state_bits=32: float32 moments; 8-bit Adam keeps float32 moments for
  # leaves below min_8bit_size, as bitsandbytes.
  for moments in (state[0].base_state.mu, state[0].base_state.nu):
    assert moments["dense"]["kernel"].dtype == jnp.float32
    assert moments["norm"]["scale"].dtype == jnp.float32


@pytest.mark.parametrize("proj_type,shape", [
    ("reverse_std", (4, 48)), ("right", (4, 48)), ("left", (32, 4))])
def test_other_one_sided_proj_types(proj_type, shape):
  params = {"w": jnp.zeros((48, 32))}
  tx = galore_jax.scale_by_q_galore(rank=4, proj_type=proj_type, proj_bits=8,
                                    proj_group_size=32, base=optax.identity())
  g = random_grads(params, 0)
  u, state = tx.update(g, tx.init(params))
  entry = state.projector["w"]
  got = dequantized(entry, shape, 8, 32)
  spec = projection.resolve_specs(params, rank=4, mask=None, dim_numbers=None,
                                  proj_type=proj_type)[2][0]
  proj = projection.Projectors(
      row=got if spec.use_row else optax.MaskedNode(),
      col=got if spec.use_col else optax.MaskedNode())
  want = projection.project_back(projection.project(g["w"], proj, spec), proj,
                                 spec)
  np.testing.assert_allclose(u["w"], want, rtol=1e-5, atol=1e-6)


def test_group_size_not_dividing_the_projector_gets_a_short_last_group():
  params = {"w": jnp.zeros((48, 30))}  # column projector (30, 4): 120 entries
  tx = galore_jax.scale_by_q_galore(rank=4, proj_bits=4, proj_group_size=50)
  g = random_grads(params, 0)
  _, state = tx.update(g, tx.init(params))
  entry = state.projector["w"]
  chex.assert_shape(entry.scales, (3,))  # 50 + 50 + 20
  spec = projection.resolve_specs(params, rank=4, mask=None,
                                  dim_numbers=None, proj_type="std")[2][0]
  exact = projection.svd_projectors(g["w"], spec, jnp.float32).col
  tail = quantization.quantize_groupwise(exact.reshape(-1)[100:], 4, 20)
  assert float(entry.scales[2]) == float(tail[1][0])
  got = dequantized(entry, (30, 4), 4, 50)
  np.testing.assert_allclose(got, exact, atol=float(entry.scales.max()) / 2
                             + 1e-6)


@pytest.mark.parametrize("state_bits", [8, 32])
def test_q_galore_adamw_trains_and_uses_the_requested_moments(state_bits):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((64, 96)), jnp.float32)
  w_true = jnp.asarray(rng.standard_normal((96, 80)) / 10, jnp.float32)
  y = x @ w_true
  params = {"w": jnp.zeros((96, 80)), "b": jnp.zeros((80,))}
  loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
  tx = galore_jax.q_galore_adamw(3e-2, rank=16, update_proj_gap=10,
                                 state_bits=state_bits, min_8bit_size=64)
  state = tx.init(params)
  moments = state[0].base_state
  if state_bits == 8:
    assert isinstance(moments, galore_jax.ScaleByAdam8bitState)
    assert moments.mu["w"].codes.dtype == jnp.uint8
    assert moments.mu["b"].codes.dtype == jnp.uint8  # 80 >= min_8bit_size
  else:
    assert moments.mu["w"].dtype == jnp.float32

  @jax.jit
  def step(params, state):
    u, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, u), state

  start = float(loss(params))
  for _ in range(100):
    params, state = step(params, state)
  assert float(loss(params)) < 0.2 * start


def test_same_sign_gradients_train_with_float_zero_points():
  """A parabola whose gradient has a common sign: its top singular vector
  is a same-sign vector that the official clipped zero point collapses to a
  constant (Q-GaLore then stalls), while float offsets keep it and train as
  GaLore does."""
  target = 0.5 + 0.1 * jax.random.uniform(jax.random.key(0), (64, 128))
  loss = lambda p: 0.5 * jnp.sum((p["w"] - target) ** 2)

  def run(tx, steps=200):
    p = {"w": jnp.zeros_like(target)}
    s = tx.init(p)

    @jax.jit
    def step(p, s):
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, u), s

    for _ in range(steps):
      p, s = step(p, s)
    return float(loss(p))

  start = float(loss({"w": jnp.zeros_like(target)}))
  kw = dict(rank=1, update_proj_gap=20)
  galore = run(galore_jax.galore_adamw(0.1, **kw))
  faithful = run(galore_jax.q_galore_adamw(0.1, **kw))
  official = run(galore_jax.q_galore_adamw(0.1, proj_zero_point="official",
                                           **kw))
  assert galore < 0.01 * start
  assert faithful < 2 * galore
  assert official > 0.5 * start  # the stall this scheme fixes


def test_push_similarity_fills_then_drops_the_oldest():
  """The FIFO against a deque(maxlen=3), as the official queue."""
  import collections
  queue, count = jnp.zeros(3), jnp.zeros([], jnp.int32)
  want = collections.deque(maxlen=3)
  for cos in (0.1, -0.2, 0.3, 0.4, 0.5):
    queue, count = galore_jax.q_galore.push_similarity(queue, count,
                                                       jnp.float32(cos))
    want.append(cos)
    assert int(count) == len(want)
    np.testing.assert_allclose(queue[:int(count)], list(want), rtol=1e-6)
  assert count.dtype == jnp.int32


@pytest.mark.parametrize("queue,count,gap,want", [
    ([0.5, 0.5, 0.5], 3, 10, 20),   # full, mean 0.5 >= 0.4: grows
    ([0.5, 0.5, 0.0], 2, 10, 10),   # not full: stays
    ([0.4, 0.4, 0.4], 3, 10, 20),   # mean at the threshold grows (>=)
    ([0.4, 0.4, 0.3], 3, 10, 10),   # below: stays
    ([0.9, 0.9, 0.9], 3, 100, 114),  # int(100 * 1.15) == 114, not 115
])
def test_next_gap_follows_the_official_rule(queue, count, gap, want):
  gamma = 2.0 if gap == 10 else 1.15
  seq = galore_jax.q_galore._gap_sequence(gap, gamma)  # pylint: disable=protected-access
  got = galore_jax.q_galore.next_gap(
      jnp.int32(gap), jnp.asarray(queue, jnp.float32), jnp.int32(count),
      0.4, gamma, seq)
  assert int(got) == want == (int(gap * gamma) if want != gap else gap)


def test_cosine_is_signed_and_safe_at_zero():
  a = jnp.array([1.0, 0.0])
  assert float(galore_jax.q_galore.cosine(a, -a)) == -1.0
  assert float(galore_jax.q_galore.cosine(a, jnp.zeros(2))) == 0.0
