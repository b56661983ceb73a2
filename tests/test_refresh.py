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
  from examples.llama import data as data_lib
  from examples.llama import model as model_lib
  from examples.llama import train as train_lib
  corpus = data_lib.load(verbose=False)
  args = train_lib.parser().parse_args(["--model", "llama-1m", "--steps",
                                        "30", "--method", "adamw"])
  m = train_lib.setup("adamw", train_lib.build_model(args, 259), args)
  step = jax.jit(train_lib.make_step(m)[0])
  loss = lambda p, t: model_lib.loss_fn(nnx.merge(m.graphdef, p, m.frozen), t)
  train, state, key = m.train, m.tx.init(m.train), jax.random.PRNGKey(0)
  grads = []
  for i in range(30):
    if i in (19, 29):
      tokens = data_lib.batch(corpus.train, 10_000 + i, 16, 128, 0)
      grads.append(jax.grad(loss)(train, tokens))
    train, state, key, _ = step(train, m.frozen, state, key,
                                data_lib.batch(corpus.train, i, 16, 128, 0))
  mask = train_lib.target_mask(grads[0])
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


def test_subspace_iteration_starts_exact():
  _, exact, _ = _train("exact", steps=1)
  _, warm, _ = _train("subspace_iteration", steps=1)
  np.testing.assert_array_equal(jax.tree.leaves(exact[0])[0],
                                jax.tree.leaves(warm[0])[0])


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


