"""Q-GaLore and 8-bit Adam inside the optax / Flax / Orbax ecosystem."""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import galore_jax
from tests.test_ecosystem import batch
from tests.test_ecosystem import mlp_loss
from tests.test_ecosystem import mlp_params
from tests.test_ecosystem import train

IS_QP = lambda x: isinstance(x, galore_jax.QuantizedProjector)


def q_galore(**kw):
  # Gaps grow fast (1 -> 2 -> 4 -> ...), so a restore must carry them.
  kw = dict(rank=4, update_proj_gap=1, queue_size=1, cos_threshold=-1.0,
            proj_group_size=32, weight_decay=0.01, min_8bit_size=64) | kw
  return galore_jax.q_galore_adamw(1e-2, **kw)


def gaps(state):
  return [int(e.gap) for e in jax.tree.leaves(
      state[0].projector, is_leaf=IS_QP) if IS_QP(e)]


def test_orbax_round_trip_resumes_bit_identically(tmp_path):
  opt = q_galore()
  n = 5
  full_p, full_s = train(opt, mlp_params(), 2 * n)

  p, s = train(opt, mlp_params(), n)
  assert gaps(s) == [8, 8]  # refreshes at 0, 1, 2, 4: grown three times
  # 8-bit moment codes, int4 projector codes and float schedules all saved.
  dtypes = {x.dtype for x in jax.tree.leaves(s)}
  assert {jnp.dtype(t) for t in ("uint8", "int32", "float32")} <= dtypes
  tree = {"params": p, "opt_state": s}
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(n, args=ocp.args.StandardSave(tree))
    mngr.wait_until_finished()
  abstract = jax.eval_shape(lambda: {"params": mlp_params(),
                                     "opt_state": opt.init(mlp_params())})
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    restored = mngr.restore(n, args=ocp.args.StandardRestore(abstract))
  chex.assert_trees_all_equal(restored, tree)
  assert jax.tree.structure(restored) == jax.tree.structure(tree)
  assert gaps(restored["opt_state"]) == [8, 8]
  p, s = train(opt, restored["params"], n, start=n,
               state=restored["opt_state"])
  chex.assert_trees_all_equal(p, full_p)
  chex.assert_trees_all_equal(s, full_s)


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(12, 32, rngs=rngs)
    self.l2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


def nnx_train(tx, steps=20):
  """Trains MLP with nnx.Optimizer and the same run with plain optax."""
  model = MLP(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = jax.tree.map(jnp.copy, params)  # not the model's own Variables
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  @jax.jit
  def ref_step(params, state, x, y):
    loss_fn = lambda p: jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)
    g = jax.grad(loss_fn)(params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  state = tx.init(params)
  losses = []
  for t in range(steps):
    losses.append(float(step(model, optimizer, *batch(t % 2))))
    params, state = ref_step(params, state, *batch(t % 2))
  chex.assert_trees_all_close(nnx.state(model, nnx.Param), params,
                              rtol=1e-5, atol=1e-6)
  return losses, optimizer, state


def test_nnx_optimizer_with_q_galore_and_8bit_moments():
  """nnx.Optimizer hands update() records as tuples, then as mappings sorted
  by field name: the run must still equal plain optax, step for step."""
  losses, optimizer, ref_state = nnx_train(q_galore(update_proj_gap=2))
  assert losses[-1] < 0.9 * losses[0]
  state = jax.tree.leaves(
      nnx.as_pure(optimizer.opt_state),
      is_leaf=lambda x: isinstance(x, galore_jax.QGaLoreState))[0]
  assert int(state.count) == 20
  assert gaps(ref_state) == [32, 32]  # 2 -> 4 (step 4) -> 8 -> 16 -> 32
  entry = state.projector["l1"]["kernel"]
  assert int(entry["gap"]) == 32  # the gap grew inside nnx.Optimizer too


def test_nnx_optimizer_with_two_sided_galore_and_adamw_8bit():
  nnx_train(galore_jax.galore_adamw(1e-2, rank=4, proj_type="full"), 8)
  nnx_train(galore_jax.adamw_8bit(1e-2, min_8bit_size=64), 8)
  nnx_train(galore_jax.galore_adamw_8bit(1e-2, rank=4, min_8bit_size=64), 8)


@pytest.mark.parametrize("zero_point,atol", [
    ("official", 1e-6),
    # Traced and Python-float hyperparameters round alike up to an ulp,
    # which can move one 4-bit projector code across a rounding tie.
    ("float", 1e-4)])
def test_inject_hyperparams_with_static_shape_args(zero_point, atol):
  schedule = optax.linear_schedule(1e-2, 1e-3, 10)
  make = optax.inject_hyperparams(
      galore_jax.q_galore_adamw,
      static_args=("rank", "proj_bits", "proj_group_size", "queue_size",
                   "state_bits", "block_size", "min_8bit_size"))
  kw = dict(rank=4, update_proj_gap=2, proj_group_size=32, queue_size=2,
            min_8bit_size=64, proj_zero_point=zero_point)
  params, state = train(make(learning_rate=schedule, **kw), mlp_params(), 6)
  ref, _ = train(galore_jax.q_galore_adamw(schedule, **kw), mlp_params(), 6)
  chex.assert_trees_all_close(params, ref, rtol=1e-5, atol=atol)
  # cos_threshold and gamma_proj are ordinary (traced) hyperparameters.
  np.testing.assert_allclose(state.hyperparams["cos_threshold"], 0.4)
  np.testing.assert_allclose(state.hyperparams["gamma_proj"], 2.0)


def test_multisteps_equals_one_big_batch():
  k = 3
  micro = optax.MultiSteps(q_galore(), every_k_schedule=k)
  big = q_galore()
  p_micro, s_micro = mlp_params(), micro.init(mlp_params())
  p_big, s_big = mlp_params(), big.init(mlp_params())

  def step(opt):
    @jax.jit
    def f(p, s, x, y):
      u, s = opt.update(jax.grad(mlp_loss)(p, x, y), s, p)
      return optax.apply_updates(p, u), s
    return f

  micro_step, big_step = step(micro), step(big)
  for t in range(5):
    xs, ys = zip(*(batch(t * k + i) for i in range(k)))
    for x, y in zip(xs, ys):
      p_micro, s_micro = micro_step(p_micro, s_micro, x, y)
    p_big, s_big = big_step(p_big, s_big, jnp.concatenate(xs),
                            jnp.concatenate(ys))
  chex.assert_trees_all_close(p_micro, p_big, rtol=1e-4, atol=1e-5)
  assert gaps(s_micro.inner_opt_state) == gaps(s_big) == [8, 8]


def test_adamw_8bit_round_trips_through_orbax(tmp_path):
  opt = galore_jax.adamw_8bit(1e-2, min_8bit_size=64)
  p, s = train(opt, mlp_params(), 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.StandardSave(s))
    mngr.wait_until_finished()
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    restored = mngr.restore(3, args=ocp.args.StandardRestore(
        jax.eval_shape(opt.init, mlp_params())))
  chex.assert_trees_all_equal(restored, s)
  assert restored[0].mu["l1"]["kernel"].codes.dtype == jnp.uint8
  p1, _ = train(opt, p, 2, start=3, state=s)
  p2, _ = train(opt, p, 2, start=3, state=restored)
  chex.assert_trees_all_equal(p1, p2)
  np.testing.assert_array_equal(p1["l2"]["kernel"], p2["l2"]["kernel"])


def test_inject_hyperparams_without_static_shape_args_is_a_clear_error():
  make = optax.inject_hyperparams(
      galore_jax.q_galore_adamw,
      static_args=("rank", "proj_group_size", "queue_size", "state_bits",
                   "block_size", "min_8bit_size"))
  with pytest.raises(TypeError, match=r"static_args=\('proj_bits'"):
    make(learning_rate=1e-2, rank=4).init(mlp_params())
