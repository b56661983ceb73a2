"""Refresh by randomized range finding and warm-started subspace iteration."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import galore_jax
from galore_jax import projection

METHODS = ("randomized", "subspace_iteration")


def _spec(g, rank, proj_type="std"):
  return projection.leaf_spec(("w",), g, rank=rank, selected=True,
                              dim_numbers=None, proj_type=proj_type)


def _energy(g, proj, spec):
  """Fraction of ``||G||_F^2`` kept by projecting onto the subspace."""
  g = np.asarray(g, np.float64)
  low = (np.asarray(proj.row, np.float64) @ g if spec.use_row
         else g @ np.asarray(proj.col, np.float64))
  return float((low ** 2).sum() / (g ** 2).sum())


def _decaying(key, shape, power=1.0):
  """A matrix with singular values ``k^-power`` and random vectors."""
  m, n = shape
  ku, kv = jax.random.split(key)
  u = jnp.linalg.qr(jax.random.normal(ku, (m, min(m, n))))[0]
  v = jnp.linalg.qr(jax.random.normal(kv, (n, min(m, n))))[0]
  s = jnp.arange(1, min(m, n) + 1, dtype=jnp.float32) ** -power
  return (u * s) @ v.T


def _orthonormality_error(proj, spec):
  p = np.asarray(proj.row if spec.use_row else proj.col.T, np.float64)
  return np.abs(p @ p.T - np.eye(p.shape[0])).max()


@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (64, 64)])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_range_projectors_are_orthonormal_and_near_exact(shape, proj_type):
  g = _decaying(jax.random.key(0), shape, power=2.0)
  spec = _spec(g, 8, proj_type)
  exact = projection.svd_projectors(g, spec, jnp.float32)
  rand = projection.range_projectors(g, spec, jnp.float32,
                                     key=jax.random.key(1), power_iters=1,
                                     oversample=8)
  # Warm start from a perturbed copy of the exact subspace.
  noisy = g + 0.05 * jax.random.normal(jax.random.key(2), shape)
  start = projection.current_basis(
      projection.svd_projectors(noisy, spec, jnp.float32), spec)
  warm = projection.range_projectors(g, spec, jnp.float32, start=start,
                                     power_iters=1)
  for proj in (rand, warm):
    for side in ("row", "col"):
      got = getattr(proj, side)
      want = getattr(exact, side)
      assert isinstance(got, optax.MaskedNode) == isinstance(
          want, optax.MaskedNode)
      if not isinstance(got, optax.MaskedNode):
        assert got.shape == want.shape
        p = np.asarray(got if side == "col" else got.T, np.float64)
        np.testing.assert_allclose(p.T @ p, np.eye(8), atol=1e-5)
    if proj_type != "full":
      assert _energy(g, proj, spec) >= 0.99 * _energy(g, exact, spec)


def test_exact_spectrum_is_recovered_when_the_rank_suffices():
  g = _decaying(jax.random.key(3), (50, 30))[:, :30]
  low = np.asarray(projection.svd_projectors(
      g, _spec(g, 5), jnp.float32).col)
  g5 = np.asarray(g) @ low @ low.T  # exactly rank 5
  spec = _spec(jnp.asarray(g5), 5)
  exact = projection.svd_projectors(jnp.asarray(g5), spec, jnp.float32)
  rand = projection.range_projectors(jnp.asarray(g5), spec, jnp.float32,
                                     key=jax.random.key(0), power_iters=0,
                                     oversample=0)
  # Same singular vectors, same canonical signs.
  np.testing.assert_allclose(rand.col, exact.col, atol=1e-4)


@pytest.fixture(scope="module")
def llama_gradients():
  """Attention/MLP kernel gradients of the LLaMA example's llama-1m model
  after 20 AdamW steps, at two points 10 steps apart."""
  from examples.llama import input_pipeline as data_lib
  from examples.llama import models as model_lib
  from examples.llama import main as main_lib
  from examples.llama import methods as methods_lib
  from examples.llama import train as train_lib
  corpus = data_lib.load(verbose=False)
  args = main_lib.config_from_flags(["--model", "llama-1m", "--steps",
                                        "30", "--method", "adamw"])
  m = methods_lib.build("adamw", train_lib.build_model(args, 259), args)
  step = jax.jit(m.step)
  loss = lambda p, t: model_lib.loss_fn(nnx.merge(m.graphdef, p, m.frozen), t)
  train, state, key = m.train, m.tx.init(m.train), jax.random.PRNGKey(0)
  grads = []
  for i in range(30):
    if i in (19, 29):
      tokens = data_lib.batch(corpus.train, 10_000 + i, 16, 128, 0)
      grads.append(jax.grad(loss)(train, tokens))
    train, state, key, _ = step(train, m.frozen, state, key,
                                data_lib.batch(corpus.train, i, 16, 128, 0))
  mask = methods_lib.target_mask(grads[0])
  pick = lambda g: [x for x, k in zip(jax.tree.leaves(g),
                                      jax.tree.leaves(mask)) if k]
  return pick(grads[0]), pick(grads[1])


@pytest.mark.parametrize("rank", [4, 32])
def test_energy_on_real_llama_gradients(llama_gradients, rank):
  before, now = llama_gradients
  assert len(now) == 28  # 4 layers x (q, k, v, o, gate, up, down)
  worst = {m: 1.0 for m in METHODS}
  for g0, g1 in zip(before, now):
    spec = _spec(g1, rank)
    exact = _energy(g1, projection.svd_projectors(g1, spec, jnp.float32),
                    spec)
    start = projection.current_basis(
        projection.svd_projectors(g0, spec, jnp.float32), spec)
    got = {
        "randomized": projection.range_projectors(
            g1, spec, jnp.float32, key=jax.random.key(0),
            power_iters=projection.DEFAULT_POWER_ITERS["randomized"],
            oversample=8),
        "subspace_iteration": projection.range_projectors(
            g1, spec, jnp.float32, start=start,
            power_iters=projection.DEFAULT_POWER_ITERS["subspace_iteration"]),
    }
    for m, proj in got.items():
      worst[m] = min(worst[m], _energy(g1, proj, spec) / exact)
  assert min(worst.values()) >= 0.99, worst


def _train(svd, steps=7, gap=3, seed=0, **kw):
  params = {"w": jax.random.normal(jax.random.key(0), (48, 24)),
            "b": jnp.zeros((24,))}
  opt = galore_jax.galore_adamw(1e-2, rank=4, update_proj_gap=gap, svd=svd,
                                seed=seed, **kw)
  state = opt.init(params)
  traces = []

  @jax.jit
  def step(params, state, x):
    traces.append(1)
    loss = lambda p: jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - 0.5) ** 2)
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  projectors = []
  for i in range(steps):
    x = jax.random.normal(jax.random.key(10 + i), (16, 48))
    params, state = step(params, state, x)
    projectors.append(state[0].projector["w"])
  return params, projectors, len(traces)


@pytest.mark.parametrize("svd", ["exact", *METHODS])
def test_galore_refresh_modes_train_without_retrace(svd):
  params, projectors, traces = _train(svd)
  assert traces == 1
  for i, p in enumerate(projectors):
    q = np.asarray(p.row if not isinstance(p.row, optax.MaskedNode)
                   else p.col.T)
    np.testing.assert_allclose(q @ q.T, np.eye(4), atol=1e-5)
    changed = not np.array_equal(np.asarray(jax.tree.leaves(p)[0]),
                                 np.asarray(jax.tree.leaves(
                                     projectors[i - 1])[0])) if i else True
    assert changed == (i % 3 == 0), i  # refreshed exactly at the gap
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_subspace_iteration_starts_from_the_randomized_range_finder():
  # Step 0 has no projector to start from: the randomized one, same key and
  # power iterations, close to the exact SVD's vectors.
  _, warm, _ = _train("subspace_iteration", steps=1)
  _, rand, _ = _train("randomized", steps=1, power_iters=2)
  _, exact, _ = _train("exact", steps=1)
  first = lambda p: np.asarray(jax.tree.leaves(p[0])[0])
  np.testing.assert_array_equal(first(warm), first(rand))
  np.testing.assert_allclose(first(warm), first(exact), atol=5e-3)


def test_randomized_is_deterministic_per_seed():
  a = _train("randomized", seed=1)[0]["w"]
  np.testing.assert_array_equal(a, _train("randomized", seed=1)[0]["w"])
  assert not np.array_equal(a, _train("randomized", seed=2)[0]["w"])


def _refresh_steps(stagger, gap=3, steps=13):
  """For each of 6 projected leaves, the steps at which it refreshed."""
  params = {f"w{i}": jax.random.normal(jax.random.key(i), (12, 8))
            for i in range(6)}
  opt = galore_jax.galore_adamw(1e-2, rank=2, update_proj_gap=gap,
                                stagger=stagger)
  state = opt.init(params)
  update = jax.jit(opt.update)
  seen = {k: [] for k in params}
  prev = None
  for t in range(steps):
    grads = {k: jax.random.normal(jax.random.key(100 * t + i), (12, 8))
             for i, k in enumerate(params)}
    _, state = update(grads, state, params)
    now = {k: np.asarray(jax.tree.leaves(p)[0])
           for k, p in state[0].projector.items()}
    for k in params:
      if prev is None or not np.array_equal(now[k], prev[k]):
        seen[k].append(t)
    prev = now
  return seen


def test_stagger_refreshes_each_leaf_once_per_gap():
  gap, steps = 3, 13
  plain, staggered = _refresh_steps(False), _refresh_steps(True)
  assert all(v == [0, 3, 6, 9, 12] for v in plain.values())
  per_step = [sum(t in v for v in staggered.values()) for t in range(steps)]
  assert per_step[0] == 6  # every leaf starts with a projector
  assert max(per_step[1:]) == 2  # 6 leaves over 3 phases, never all at once
  for k, v in staggered.items():
    later = [t for t in v if t > 0]
    phase = later[0] % gap
    assert later == list(range(phase if phase else gap, steps, gap)), (k, v)
    for start in range(1, steps - gap + 1):  # once in every window of K
      assert sum(start <= t < start + gap for t in v) == 1
  assert sorted(v[1] % gap for v in staggered.values()) == [0, 0, 1, 1, 2, 2]


def test_q_galore_stagger_keeps_each_layer_on_its_phase():
  """Q-GaLore's refreshes, read off the cosine queue's fill count."""
  gap, steps = 3, 13
  params = {f"w{i}": jax.random.normal(jax.random.key(i), (12, 8))
            for i in range(6)}
  seen = {}
  for stagger in (False, True):
    # cos_threshold 1: random gradients never grow the gap.
    opt = galore_jax.q_galore_adamw(1e-2, rank=2, update_proj_gap=gap,
                                    cos_threshold=1.0, queue_size=8,
                                    stagger=stagger)
    state = opt.init(params)
    update = jax.jit(opt.update)
    steps_of = {k: [0] for k in params}
    for t in range(steps):
      grads = {k: jax.random.normal(jax.random.key(100 * t + i), (12, 8))
               for i, k in enumerate(params)}
      before = {k: int(v.queue_count) for k, v in state[0].projector.items()}
      _, state = update(grads, state, params)
      for k, v in state[0].projector.items():
        if int(v.queue_count) > before[k]:
          steps_of[k].append(t)
    assert all(int(v.gap) == gap for v in state[0].projector.values())
    seen[stagger] = steps_of
  assert all(v == [0, 3, 6, 9, 12] for v in seen[False].values())
  phases = []
  for k, v in seen[True].items():
    phase = (list(params).index(k) * gap) // len(params)
    phases.append(phase)
    assert v == [0] + list(range(phase or gap, steps, gap)), (k, v)
  assert sorted(phases) == [0, 0, 1, 1, 2, 2]


def test_inject_hyperparams_with_static_refresh_settings():
  opt = optax.inject_hyperparams(
      galore_jax.galore_adamw,
      static_args=("rank", "svd", "power_iters", "oversample"))(
          learning_rate=1e-2, rank=4, update_proj_gap=3, svd="randomized",
          oversample=4)
  params = {"w": jnp.ones((16, 8)) + jnp.eye(16, 8)}
  state = opt.init(params)
  updates, state = opt.update(jax.tree.map(jnp.ones_like, params), state,
                              params)
  assert updates["w"].shape == (16, 8)
  with pytest.raises(TypeError, match="static_args=\\('oversample'"):
    optax.inject_hyperparams(galore_jax.galore_adamw, static_args=("rank",))(
        learning_rate=1e-2, rank=4, svd="randomized").init(params)


@pytest.mark.parametrize("kw,msg", [
    (dict(svd="lanczos"), "`svd` must be one of"),
    (dict(svd="subspace_iteration", power_iters=0), "`power_iters` must be"),
    (dict(svd="randomized", power_iters=-1), "`power_iters` must be"),
    (dict(svd="randomized", oversample=-1), "`oversample` must be"),
    (dict(svd="randomized", power_iters=1.5), "`power_iters` must be"),
])
def test_bad_refresh_settings(kw, msg):
  with pytest.raises(ValueError, match=msg):
    galore_jax.scale_by_galore(rank=4, **kw)
  with pytest.raises(TypeError, match="`stagger` must be a bool"):
    galore_jax.scale_by_galore(rank=4, stagger="yes")
  with pytest.raises(TypeError, match="`stagger` must be a bool"):
    galore_jax.scale_by_q_galore(rank=4, stagger=1)




# ---------------------------------------------------------------------------
# Moments across a refresh.


def _galore_steps(on_refresh, grads, gap=2, b1=0.9, b2=0.99, base=None):
  tx = galore_jax.scale_by_galore(
      rank=3, update_proj_gap=gap, on_refresh=on_refresh,
      base=base or optax.scale_by_adam(b1=b1, b2=b2))
  params = {"w": jnp.zeros(grads[0].shape)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  states = [state]
  for g in grads:
    _, state = update({"w": g}, state)
    states.append(state)
  return states


def _grads(n, shape=(20, 12), seed=0):
  return [jax.random.normal(jax.random.key(seed + i), shape) for i in range(n)]


@pytest.mark.parametrize("on_refresh", ["reset", "transport"])
def test_same_subspace_leaves_moments_untouched(on_refresh):
  # A constant gradient refreshes to the same projector: nothing moves.
  g = _grads(1)[0]
  keep = _galore_steps("keep", [g] * 5)[-1]
  moved = _galore_steps(on_refresh, [g] * 5)[-1]
  chex_equal = lambda a, b: [np.testing.assert_array_equal(x, y) for x, y in
                             zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  chex_equal(keep, moved)


def test_transport_and_reset_formulas_at_a_refresh():
  b1, b2 = 0.9, 0.99
  grads = _grads(3, (12, 20))  # torch (20, 12): M >= N, the row projector
  for mode in ("keep", "reset", "transport"):
    before, after = _galore_steps(mode, grads, b1=b1, b2=b2)[2:4]
    old = np.asarray(before.projector["w"].row, np.float64)  # (3, 12)
    new = np.asarray(after.projector["w"].row, np.float64)
    assert not np.allclose(old, new)  # step 2 refreshed
    mu0 = np.asarray(before.base_state.mu["w"], np.float64)
    nu0 = np.asarray(before.base_state.nu["w"], np.float64)
    coords = new @ np.asarray(grads[2], np.float64)  # (3, 20)
    rot = new @ old.T
    carried = {"keep": (mu0, nu0), "reset": (0 * mu0, 0 * nu0),
               "transport": (rot @ mu0, np.maximum((rot * rot) @ nu0, 0))}
    mu_want = b1 * carried[mode][0] + (1 - b1) * coords
    nu_want = b2 * carried[mode][1] + (1 - b2) * coords ** 2
    np.testing.assert_allclose(after.base_state.mu["w"], mu_want, atol=1e-5)
    np.testing.assert_allclose(after.base_state.nu["w"], nu_want, atol=1e-5)
    q = np.asarray(after.projector["w"].row)
    np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-5)


def test_transport_is_the_identity_for_the_same_basis():
  grads = _grads(3)  # (20, 12), torch (12, 20): M < N, the col projector
  for mode in ("transport",):
    states = _galore_steps(mode, grads[:1] * 3)
    for a, b in zip(states[1:], states[2:]):
      assert isinstance(a.projector["w"].row, optax.MaskedNode)
      np.testing.assert_array_equal(a.projector["w"].col,
                                    b.projector["w"].col)
    # Moments of a constant gradient follow plain Adam in fixed coordinates.
    coords = np.asarray(grads[0] @ states[-1].projector["w"].col)
    mu = (1 - 0.9 ** 3) * coords
    np.testing.assert_allclose(states[-1].base_state.mu["w"], mu, atol=1e-5)


def test_on_refresh_needs_float_moments():
  with pytest.raises(ValueError, match="float `mu` / `nu`"):
    _galore_steps("transport", _grads(1, (600, 300)),
                  base=galore_jax.scale_by_adam_8bit(min_8bit_size=1))
  with pytest.raises(ValueError, match="`on_refresh` must be one of"):
    galore_jax.scale_by_galore(rank=4, on_refresh="rotate")


@pytest.mark.parametrize("on_refresh", ["keep", "reset", "transport"])
def test_on_refresh_modes_train_without_retrace(on_refresh):
  params, projectors, traces = _train("subspace_iteration",
                                      on_refresh=on_refresh)
  assert traces == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize("svd", METHODS)
def test_q_galore_refresh_modes(svd):
  params = {"w": jax.random.normal(jax.random.key(0), (64, 32)),
            "s": jax.random.normal(jax.random.key(1), (2, 64, 32))}
  opt = galore_jax.q_galore_adamw(1e-2, rank=4, update_proj_gap=2, svd=svd,
                                  state_bits=32, on_refresh="transport")
  state = opt.init(params)
  update = jax.jit(opt.update)
  for t in range(5):
    grads = jax.tree.map(
        lambda x: jax.random.normal(jax.random.key(t), x.shape), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  for name in ("w", "s"):
    st = state[0].projector[name]
    assert int(np.max(st.gap)) >= 2  # the adaptive schedule still runs
  # Its first singular vector (what the lazy refresh compares) is the exact
  # SVD's, to the INT4 codes' precision.
  tx = galore_jax.scale_by_q_galore(rank=4, update_proj_gap=1, svd=svd)
  g = _decaying(jax.random.key(5), (64, 32), power=2.0)
  st = tx.init({"w": g})
  for _ in range(2):
    _, st = tx.update({"w": g}, st)
  exact = galore_jax.scale_by_q_galore(rank=4, update_proj_gap=1)
  se = exact.init({"w": g})
  _, se = exact.update({"w": g}, se)
  np.testing.assert_allclose(st.projector["w"].vector,
                             se.projector["w"].vector, atol=0.02)


def test_q_galore_transport_needs_float_moments():
  with pytest.raises(ValueError, match="float `mu` / `nu`"):
    galore_jax.q_galore_adamw(1e-2, rank=4, on_refresh="transport",
                              min_8bit_size=1).init(
                                  {"w": jnp.ones((64, 32))})


def test_refresh_options_under_nnx_optimizer_match_plain_optax():
  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(32, 24, rngs=rngs)
      self.l2 = nnx.Linear(24, 4, rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.relu(self.l1(x)))

  make = lambda: galore_jax.galore_adamw(
      1e-2, rank=4, update_proj_gap=2, svd="subspace_iteration",
      stagger=True, on_refresh="transport")
  xs = [jax.random.normal(jax.random.key(i), (8, 32)) for i in range(5)]

  model = MLP(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  opt = nnx.Optimizer(model, make(), wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, opt, x):
    opt.update(model, nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model))

  tx = make()
  state = tx.init(params)

  @jax.jit
  def step(params, state, x):
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(x) ** 2)
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for x in xs:
    nnx_step(model, opt, x)
    params, state = step(params, state, x)
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("svd", ["randomized", "subspace_iteration"])
@pytest.mark.parametrize("scale", [1e10, 1e-12])
def test_range_finders_do_not_depend_on_the_gradient_scale(svd, scale):
  """Singular vectors are scale-invariant; float32 Gram matrices are not
  (entries near 1e10 overflowed to NaN projectors)."""
  g = jax.random.normal(jax.random.key(0), (64, 172))
  tx = galore_jax.scale_by_galore(rank=8, update_proj_gap=1, svd=svd)

  def projector(grad):
    state = tx.init({"w": grad})
    for _ in range(2):  # the second refresh warm-starts subspace iteration
      _, state = tx.update({"w": grad}, state)
    return jax.tree.leaves(state.projector)[0]

  ref, got = projector(g), projector(g * scale)
  assert bool(jnp.all(jnp.isfinite(got)))
  np.testing.assert_allclose(got, ref, atol=1e-4)
