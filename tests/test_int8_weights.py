"""INT8 weights with stochastic rounding (Q-GaLore's weight storage)."""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import galore_jax
from galore_jax import q_galore
from galore_jax import quantization


def noisy_teacher_data(seed=0, n=1024, noise=0.3):
  """Labels of a random tanh teacher, 30% flipped: a loss that plateaus."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, 32)).astype(np.float32)
  t1 = rng.standard_normal((32, 64)) / np.sqrt(32)
  t2 = rng.standard_normal((64, 10)) / 8
  y = np.argmax(np.tanh(x @ t1) @ t2, -1)
  y = np.where(rng.random(n) < noise, rng.integers(0, 10, n), y)
  return jnp.asarray(x), jnp.asarray(y)


def mlp_init(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  dims = [(32, 64), (64, 64), (64, 10)]
  return {f"l{i}": {"kernel": jax.random.normal(k[i], d) / np.sqrt(d[0]),
                    "bias": jnp.zeros(d[1])} for i, d in enumerate(dims)}


def mlp_loss(p, x, y):
  h = jax.nn.relu(x @ p["l0"]["kernel"] + p["l0"]["bias"])
  h = jax.nn.relu(h @ p["l1"]["kernel"] + p["l1"]["bias"])
  logits = h @ p["l2"]["kernel"] + p["l2"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train(mode, lr=3e-4, steps=300):
  """mode: 'float', 'stochastic' (INT8, SR) or 'nearest' (INT8, RTN)."""
  x, y = noisy_teacher_data()
  tx = optax.adam(lr)
  params = mlp_init()
  if mode != "float":
    params = galore_jax.quantize_params(params)
  state = tx.init(galore_jax.dequantize_params(params))

  @jax.jit
  def step(params, state, key):
    float_params = galore_jax.dequantize_params(params)
    grads = jax.grad(mlp_loss)(float_params, x, y)
    updates, state = tx.update(grads, state, float_params)
    if mode == "float":
      return optax.apply_updates(params, updates), state
    if mode == "stochastic":
      return galore_jax.apply_updates_stochastic(params, updates, key), state
    return galore_jax.quantize_params(
        optax.apply_updates(float_params, updates)), state

  start = float(mlp_loss(galore_jax.dequantize_params(params), x, y))
  for t in range(steps):
    params, state = step(params, state, jax.random.fold_in(jax.random.key(1),
                                                           t))
  end = float(mlp_loss(galore_jax.dequantize_params(params), x, y))
  return start, end, params


def test_stochastic_rounding_trains_like_float_and_nearest_stalls():
  """Adam steps of ~lr = 3e-4 are below half a code step (~2e-3 here):
  round-to-nearest drops them, stochastic rounding keeps them on average."""
  start, float_loss, _ = train("float")
  _, sr_loss, params = train("stochastic")
  _, rtn_loss, _ = train("nearest")
  assert float_loss < 0.6 * start  # the float run really trains
  assert abs(sr_loss - float_loss) <= 0.02 * float_loss
  assert start - rtn_loss < 0.15 * (start - float_loss)  # stalled
  kernel = params["l1"]["kernel"]
  assert isinstance(kernel, galore_jax.QuantizedArray)
  assert kernel.codes.dtype == jnp.uint8 and kernel.bits == 8
  assert isinstance(params["l1"]["bias"], jax.Array)  # 1-D leaves stay float


def test_float_leaves_get_plain_addition():
  params = {"w": galore_jax.quantize_params({"w": jnp.ones((16, 16))})["w"],
            "b": jnp.arange(4.0, dtype=jnp.bfloat16)}
  updates = {"w": jnp.zeros((16, 16)), "b": jnp.full((4,), 0.5)}
  new = galore_jax.apply_updates_stochastic(params, updates,
                                            jax.random.key(0))
  ref = optax.apply_updates(params["b"], updates["b"])
  assert new["b"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(new["b"], ref)
  # A zero update leaves the quantized weight's values unchanged.
  np.testing.assert_array_equal(new["w"].dequantize(), params["w"].dequantize())


def test_is_unbiased_and_keyed():
  w = 0.05 * jax.random.normal(jax.random.key(0), (64, 64))
  params = galore_jax.quantize_params({"w": w})
  w0 = params["w"].dequantize()
  # Not a constant: a constant shift is absorbed exactly by the float
  # offsets, without any rounding.
  tiny = {"w": 2e-4 * jnp.sign(jax.random.normal(jax.random.key(2), w.shape))}
  apply = jax.jit(galore_jax.apply_updates_stochastic)
  keys = jax.random.split(jax.random.key(1), 50)
  moved = jnp.stack([apply(params, tiny, k)["w"].dequantize() - w0
                     for k in keys])
  assert float(jnp.abs(moved.mean(0) - tiny["w"]).mean()) < 2e-4 / 4
  assert abs(float((moved.mean(0) - tiny["w"]).mean())) < 5e-6
  once = apply(params, tiny, keys[0])["w"]
  chex.assert_trees_all_equal(once, apply(params, tiny, keys[0])["w"])
  assert not np.array_equal(once.codes, apply(params, tiny, keys[1])["w"].codes)
  # Nearest rounding would have dropped every one of these updates.
  step = float(params["w"].scales.min())
  assert 2e-4 < step / 2


def test_nnx_layers_hold_int8_kernels():
  class QMLP(nnx.Module):

    def __init__(self, rngs):
      self.l1 = nnx.Linear(32, 64, rngs=rngs)
      self.l2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x_BxD):
      h_BxH = jax.nn.relu(self.l1(x_BxD))
      return self.l2(h_BxH)

  class QLinear(nnx.Module):
    """An nnx layer whose kernel is an INT8 QuantizedArray."""

    def __init__(self, linear):
      self.kernel = nnx.Param(galore_jax.quantization.quantize_array(
          linear.kernel[...]))
      self.bias = nnx.Param(linear.bias[...])

    def __call__(self, x_BxD):
      return x_BxD @ quantization.dequantize(self.kernel.get_value()) + (
          self.bias[...])

  model = QMLP(nnx.Rngs(0))
  model.l1, model.l2 = QLinear(model.l1), QLinear(model.l2)
  graphdef, qstate = nnx.split(model, nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(qstate)} == {
      jnp.dtype("uint8"), jnp.dtype("float32")}
  x, y = noisy_teacher_data()
  tx = galore_jax.q_galore_adamw(1e-2, rank=8, update_proj_gap=20,
                                 state_bits=32)
  opt_state = tx.init(galore_jax.dequantize_params(qstate))

  @jax.jit
  def step(qstate, opt_state, key):
    fstate = galore_jax.dequantize_params(qstate)
    loss_fn = lambda s: optax.softmax_cross_entropy_with_integer_labels(
        nnx.merge(graphdef, s)(x), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(fstate)
    updates, opt_state = tx.update(grads, opt_state, fstate)
    qstate = galore_jax.apply_updates_stochastic(qstate, updates, key)
    return qstate, opt_state, loss

  losses = []
  for t in range(40):
    qstate, opt_state, loss = step(qstate, opt_state, jax.random.key(t))
    losses.append(float(loss))
  nnx.update(model, qstate)
  assert losses[-1] < 0.8 * losses[0]
  assert isinstance(model.l1.kernel.get_value(), galore_jax.QuantizedArray)
  assert float(optax.softmax_cross_entropy_with_integer_labels(
      model(x), y).mean()) < 0.8 * losses[0]


def test_bad_inputs():
  params = galore_jax.quantize_params({"w": jnp.ones((16, 16))})
  updates = {"w": jnp.zeros((16, 16))}
  with pytest.raises(TypeError, match="needs an explicit PRNG key"):
    galore_jax.apply_updates_stochastic(params, updates, None)
  with pytest.raises(TypeError, match="single PRNG key"):
    galore_jax.apply_updates_stochastic(params, updates, 0)
  with pytest.raises(ValueError, match=r"update of shape \(16, 8\) for a "
                     r"quantized weight of shape \(16, 16\)"):
    galore_jax.apply_updates_stochastic(params, {"w": jnp.zeros((16, 8))},
                                        jax.random.key(0))
  with pytest.raises(ValueError, match="`bits` must be an int in 2..8"):
    galore_jax.quantize_params({"w": jnp.ones((4, 4))}, bits=16)
  # No update for a leaf (optax.MaskedNode): left as it is.
  same = galore_jax.apply_updates_stochastic(
      params, {"w": optax.MaskedNode()}, jax.random.key(0))
  assert same["w"] is params["w"]


def test_int8_weights_round_trip_through_orbax(tmp_path):
  params = galore_jax.quantize_params(mlp_init())
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(0, args=ocp.args.StandardSave(params))
    mngr.wait_until_finished()
  abstract = jax.eval_shape(lambda: galore_jax.quantize_params(mlp_init()))
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    restored = mngr.restore(0, args=ocp.args.StandardRestore(abstract))
  chex.assert_trees_all_equal(restored, params)
  kernel = restored["l0"]["kernel"]
  assert isinstance(kernel, galore_jax.QuantizedArray)
  assert (kernel.shape, kernel.bits, kernel.group_size) == ((32, 64), 8, 256)


def test_bf16_weights_do_not_drift_under_zero_updates():
  """The update is added to the float32 dequantization: rounding it to bf16
  first would give every step a fresh error for SR to turn into drift."""
  w = (0.02 * jax.random.normal(jax.random.key(0), (256, 256))).astype(
      jnp.bfloat16)
  params = galore_jax.quantize_params({"w": w})
  start = params["w"]
  apply = jax.jit(galore_jax.apply_updates_stochastic)
  zero = {"w": jnp.zeros((256, 256), jnp.bfloat16)}
  for t in range(20):
    params = apply(params, zero, jax.random.key(t))
  changed = np.mean(np.asarray(params["w"].codes) != np.asarray(start.codes))
  assert changed < 1e-3
  assert params["w"].dequantize().dtype == jnp.bfloat16


@pytest.mark.parametrize("bits,zero_point", [(8, "float"), (4, "official"),
                                             (4, "float")])
def test_chunked_stochastic_update_is_unbiased_and_in_range(
    monkeypatch, bits, zero_point):
  """Chunks of 256 values: 7 full chunks of 4 groups and a ragged rest."""
  monkeypatch.setattr(quantization, "SR_CHUNK_ELEMENTS", 256)
  w = 0.05 * jax.random.normal(jax.random.key(0), (37, 50))  # 1850 values
  p = galore_jax.quantize_params({"w": w}, bits, 64,
                                 zero_point=zero_point)["w"]
  u = 3e-4 * jax.random.normal(jax.random.key(1), w.shape)
  jaxpr = str(jax.make_jaxpr(q_galore.add_stochastic)(
      p, u, jax.random.key(2)))
  assert ("scan[" in jaxpr or "while[" in jaxpr) and "cond[" in jaxpr
  apply = jax.jit(jax.vmap(q_galore.add_stochastic, in_axes=(None, None, 0)))
  new = apply(p, u, jax.random.split(jax.random.key(3), 300))
  target = p.dequantize() + u
  back = jax.vmap(lambda n: n.dequantize())(new)
  assert new.codes.shape[1:] == p.codes.shape
  step = np.repeat(np.asarray(new.scales), 64, axis=1)[:, :1850].reshape(
      (300,) + w.shape)
  assert np.all(np.abs(np.asarray(back - target)) <= step * (1 + 1e-5))
  # 300 draws: the mean's standard error is below step / 30 per element.
  bias = np.abs(np.asarray(back.mean(0) - target))
  assert np.mean(bias < 4 * step[0] / 30) > 0.995


def test_stochastic_update_temporaries_do_not_grow_with_the_leaf():
  def temp(n):
    qa = jax.eval_shape(lambda: quantization.quantize_array(jnp.zeros((n,))))
    u = jax.ShapeDtypeStruct((n,), jnp.bfloat16)
    compiled = jax.jit(galore_jax.apply_updates_stochastic,
                       donate_argnums=(0,)).lower(
                           qa, u, jax.random.key(0)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  small, large = temp(2**21), temp(2**24)
  assert large == small  # bounded by the chunk, not by the leaf
  assert large < 2**24 * 4 / 3  # a third of a float32 copy of the leaf
