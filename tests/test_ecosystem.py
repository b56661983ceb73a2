"""galore_jax inside the optax / Flax / Orbax ecosystem."""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import galore_jax


def mlp_params(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {
      "l1": {"kernel": 0.3 * jax.random.normal(k[0], (12, 32)),
             "bias": jnp.zeros((32,))},
      "norm": {"scale": jnp.ones((32,))},
      "l2": {"kernel": 0.3 * jax.random.normal(k[1], (32, 10)),
             "bias": jnp.zeros((10,))},
  }


def mlp_loss(params, x, y):
  h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"])
  h = h * params["norm"]["scale"]
  out = h @ params["l2"]["kernel"] + params["l2"]["bias"]
  return jnp.mean((out - y) ** 2)


def batch(seed, n=16):
  kx, ky = jax.random.split(jax.random.key(100 + seed))
  return jax.random.normal(kx, (n, 12)), jax.random.normal(ky, (n, 10))


def train(opt, params, steps, start=0, state=None):
  state = opt.init(params) if state is None else state

  @jax.jit
  def step(params, state, x, y):
    g = jax.grad(mlp_loss)(params, x, y)
    u, state = opt.update(g, state, params)
    return optax.apply_updates(params, u), state

  for t in range(start, start + steps):
    params, state = step(params, state, *batch(t))
  return params, state


def galore(**kw):
  return galore_jax.galore_adamw(1e-2, rank=4, update_proj_gap=3,
                                 weight_decay=0.01, **kw)


def test_chain_with_clip_by_global_norm():
  opt = optax.chain(optax.clip_by_global_norm(0.1), galore())
  params, state = train(opt, mlp_params(), 5)
  # Clipping really happened inside the chain: compare to the unclipped run.
  unclipped, _ = train(galore(), mlp_params(), 5)
  assert not np.allclose(params["l1"]["kernel"], unclipped["l1"]["kernel"])
  assert int(state[1][0].count) == 5


def test_inject_hyperparams_with_schedule():
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 10)
  opt = optax.inject_hyperparams(galore_jax.galore_adamw,
                                 static_args=("rank",))(
      learning_rate=schedule, rank=4, update_proj_gap=3, weight_decay=0.01)
  params, state = train(opt, mlp_params(), 6)
  # The rate used by the last of the 6 steps (count 5).
  np.testing.assert_allclose(state.hyperparams["learning_rate"], schedule(5),
                             rtol=1e-6)
  # Same numbers as the plain alias with the same schedule.
  ref, _ = train(galore_jax.galore_adamw(schedule, rank=4, update_proj_gap=3,
                                         weight_decay=0.01), mlp_params(), 6)
  chex.assert_trees_all_close(params, ref, rtol=1e-5, atol=1e-6)
  # The gap is an ordinary (traced) hyperparameter and can be changed.
  assert int(state.hyperparams["update_proj_gap"]) == 3


def test_inject_hyperparams_without_static_rank_is_a_clear_error():
  with pytest.raises(TypeError, match="static_args"):
    optax.inject_hyperparams(galore_jax.galore_adamw)(
        learning_rate=1e-2, rank=4).init(mlp_params())


def test_multisteps_equals_one_big_batch():
  k = 3
  micro = optax.MultiSteps(galore(), every_k_schedule=k)
  big = galore()
  p_micro, s_micro = mlp_params(), micro.init(mlp_params())
  p_big, s_big = mlp_params(), big.init(mlp_params())
  for t in range(4):  # 4 outer steps: refreshes at outer steps 0 and 3
    xs, ys = zip(*(batch(t * k + i) for i in range(k)))
    for x, y in zip(xs, ys):
      g = jax.grad(mlp_loss)(p_micro, x, y)
      u, s_micro = micro.update(g, s_micro, p_micro)
      p_micro = optax.apply_updates(p_micro, u)
    g = jax.grad(mlp_loss)(p_big, jnp.concatenate(xs), jnp.concatenate(ys))
    u, s_big = big.update(g, s_big, p_big)
    p_big = optax.apply_updates(p_big, u)
  chex.assert_trees_all_close(p_micro, p_big, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s_micro.inner_opt_state[0].projector,
                              s_big[0].projector, atol=1e-5)


def test_apply_if_finite_keeps_every_state_leaf_on_nan():
  opt = optax.apply_if_finite(galore(), max_consecutive_errors=5)
  params, state = train(opt, mlp_params(), 3)  # next step (3) is a refresh
  grads = jax.tree.map(jnp.ones_like, params)
  grads["l1"]["kernel"] = grads["l1"]["kernel"].at[0, 0].set(jnp.nan)
  updates, new_state = jax.jit(opt.update)(grads, state, params)
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  assert int(new_state.notfinite_count) == 1


def test_partition_with_different_ranks():
  params = {"attn": {"kernel": jnp.ones((24, 16))},
            "mlp": {"kernel": jnp.ones((24, 40))},
            "emb": jnp.ones((50, 8))}
  labels = {"attn": "attn", "mlp": "mlp", "emb": "emb"}
  opt = optax.partition(
      {"attn": galore_jax.galore_adamw(1e-2, rank=2),
       "mlp": galore_jax.galore_adamw(1e-2, rank=6),
       "emb": optax.adamw(1e-2)},
      labels)
  state = opt.init(params)
  inner = state.inner_states
  chex.assert_shape(inner["attn"].inner_state[0].projector["attn"]["kernel"]
                    .col, (16, 2))
  chex.assert_shape(inner["mlp"].inner_state[0].projector["mlp"]["kernel"]
                    .row, (6, 24))
  updates, _ = opt.update(jax.tree.map(jnp.ones_like, params), state, params)
  chex.assert_trees_all_equal_shapes(updates, params)


def test_jit_with_donated_params_and_state():
  opt = galore()
  params = mlp_params()
  state = opt.init(params)

  @jax.jit
  def step(params, state, x, y):
    g = jax.grad(mlp_loss)(params, x, y)
    u, state = opt.update(g, state, params)
    return optax.apply_updates(params, u), state

  donated = jax.jit(step.__wrapped__, donate_argnums=(0, 1))
  ref_p, ref_s = step(params, state, *batch(0))
  copy = lambda t: jax.tree.map(jnp.array, t)
  p, s = donated(copy(params), copy(state), *batch(0))
  chex.assert_trees_all_equal(p, ref_p)
  chex.assert_trees_all_equal(s, ref_s)
  # The compiled step aliases (reuses) the donated buffers.
  mem = donated.lower(params, state, *batch(0)).compile().memory_analysis()
  assert mem.alias_size_in_bytes > 0


def test_nnx_optimizer():
  class MLP(nnx.Module):

    def __init__(self, rngs):
      self.l1 = nnx.Linear(12, 32, rngs=rngs)
      self.norm = nnx.RMSNorm(32, rngs=rngs)
      self.l2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
      return self.l2(self.norm(jnp.tanh(self.l1(x))))

  model = MLP(nnx.Rngs(0))

  def rank(path, leaf):
    return 4 if "kernel" in jax.tree_util.keystr(path) else None

  mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  tx = galore_jax.galore_adamw(3e-2, rank=rank, update_proj_gap=3,
                               weight_decay=0.01, mask=mask)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, *batch(t % 2))) for t in range(20)]
  assert losses[-1] < 0.7 * losses[0]
  galore_state = jax.tree.leaves(
      nnx.as_pure(optimizer.opt_state),
      is_leaf=lambda x: isinstance(x, galore_jax.GaLoreState))[0]
  assert isinstance(galore_state, galore_jax.GaLoreState)
  assert int(galore_state.count) == 20
  chex.assert_shape(galore_state.projector["l1"]["kernel"].row, (4, 12))
  assert isinstance(galore_state.projector["l1"]["bias"], optax.MaskedNode)


def test_orbax_round_trip_resumes_bit_identically(tmp_path):
  opt = galore()
  n = 4
  full_p, full_s = train(opt, mlp_params(), 2 * n)

  p, s = train(opt, mlp_params(), n)
  tree = {"params": p, "opt_state": s}
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(n, args=ocp.args.StandardSave(tree))
    mngr.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    restored = mngr.restore(n, args=ocp.args.StandardRestore(abstract))
  chex.assert_trees_all_equal(restored, tree)
  assert jax.tree.structure(restored) == jax.tree.structure(tree)
  p, s = train(opt, restored["params"], n, start=n,
               state=restored["opt_state"])
  chex.assert_trees_all_equal(p, full_p)
  chex.assert_trees_all_equal(s, full_s)


ALIASES = {
    "galore_adamw": dict(rank=4),
    "galore_adam": dict(rank=4),
    "galore_sgd": dict(rank=4),
    "galore_lion": dict(rank=4),
    "galore_adafactor": dict(rank=4, min_dim_size_to_factor=4),
    "galore_adamw_8bit": dict(rank=4, min_8bit_size=64),
    "q_galore_adamw": dict(rank=4, proj_group_size=32, min_8bit_size=64),
    "adamw_8bit": dict(min_8bit_size=64),
}


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_every_alias_under_inject_hyperparams_names_static_args(name):
  """Injected (traced, under jit) shape-setting arguments: a clear error
  that says which to pass as static_args, never a bare tracer error."""
  make = optax.inject_hyperparams(getattr(galore_jax, name))
  opt = make(learning_rate=1e-2, **ALIASES[name])
  params = mlp_params()
  with pytest.raises(TypeError, match="static_args=") as info:
    state = jax.jit(opt.init)(params)
    jax.jit(opt.update)(params, state, params)
  assert not isinstance(info.value, jax.errors.TracerBoolConversionError)
  # Passing the named argument(s) as static makes the alias work.
  static = []
  while True:
    try:
      opt = optax.inject_hyperparams(getattr(galore_jax, name),
                                     static_args=tuple(static))(
          learning_rate=1e-2, **ALIASES[name])
      state = jax.jit(opt.init)(params)
      jax.jit(opt.update)(params, state, params)
      break
    except TypeError as e:
      missing = str(e).split("static_args=('")[1].split("'")[0]
      assert missing not in static and len(static) < 10, e
      static.append(missing)


GALORE_ALIASES = {
    "galore_adamw": {}, "galore_adam": {}, "galore_sgd": dict(momentum=0.9),
    "galore_lion": {}, "galore_adafactor": dict(min_dim_size_to_factor=4),
    "galore_adamw_8bit": dict(min_8bit_size=64),
    "q_galore_adamw": dict(proj_group_size=32, min_8bit_size=64),
}


@pytest.mark.parametrize("name", sorted(GALORE_ALIASES))
def test_every_alias_takes_every_option_of_its_transform(name):
  import inspect
  transform = (galore_jax.scale_by_q_galore if name.startswith("q_")
               else galore_jax.scale_by_galore)
  options = {p.name for p in inspect.signature(transform).parameters.values()
             if p.kind is inspect.Parameter.KEYWORD_ONLY} - {"mask"}
  alias = inspect.signature(getattr(galore_jax, name)).parameters
  assert options <= set(alias), options - set(alias)
  for opt in options:  # with the transform's own default
    assert alias[opt].default == inspect.signature(
        transform).parameters[opt].default, opt
  with pytest.raises(TypeError, match=f"{name}\\(\\).*'colour'"):
    getattr(galore_jax, name)(1e-2, colour="red")


@pytest.mark.parametrize("name", sorted(GALORE_ALIASES))
def test_stagger_reaches_the_transform_through_every_alias(name):
  """Two projected leaves, gap 2: staggered, the second refreshes at step 1
  (its phase), so its projector differs after step 1 from the unstaggered
  one's, which still holds step 0's."""
  params = mlp_params()
  out = {}
  for stagger in (False, True):
    opt = getattr(galore_jax, name)(
        1e-2, rank=4, update_proj_gap=2, stagger=stagger,
        **GALORE_ALIASES[name])
    state = opt.init(params)
    for t in range(2):
      grads = mlp_params(seed=t + 1)
      _, state = opt.update(grads, state, params)
    out[stagger] = state[0].projector["l2"]["kernel"]
  differ = [bool(jnp.any(a != b)) for a, b in
            zip(jax.tree.leaves(out[False]), jax.tree.leaves(out[True]))]
  assert any(differ)
