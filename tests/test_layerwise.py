"""galore_jax.layerwise: the fused per-layer step equals the plain step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import galore_jax
from galore_jax import layerwise as lw
from tests.test_sharding import largest_all_gather

V, D, F, L, B, S = 32, 16, 32, 3, 2, 6  # D * F = 512: whole 8-bit blocks


def embed(o, b):
  return o["emb"][b["tok"][:, :-1]]


def block(p, x):
  h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * p["norm"]
  return x + jax.nn.silu(h @ p["w1"]) @ p["w2"]


def head(o, x, b):
  logits = x @ o["out"]
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, b["tok"][:, 1:]).mean()


def plain_loss(params, b):
  x = embed(params["outer"], b)
  x, _ = jax.lax.scan(lambda x, p: (block(p, x), None), x, params["blocks"])
  return head(params["outer"], x, b)


def _model(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 4)
  outer = {"emb": jax.random.normal(k[0], (V, D)),
           "out": 0.2 * jax.random.normal(k[1], (D, V))}
  blocks = {"w1": 0.2 * jax.random.normal(k[2], (L, D, F)),
            "w2": 0.2 * jax.random.normal(k[3], (L, F, D)),
            "norm": jnp.ones((L, D))}
  cast = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)
  return cast(outer), cast(blocks)


def _batches(n, k):
  return [{"tok": jax.random.randint(jax.random.key(100 + i), (k, B, S + 1),
                                     0, V)} for i in range(n)]


def _plain(tx, k=1, n=5, clip=None, dtype=jnp.float32):
  """The reference: value_and_grad over the scanned model, MultiSteps for
  accumulation, chain(clip_by_global_norm, tx) for clipping."""
  outer, blocks = _model(dtype)
  params = {"outer": outer, "blocks": blocks}
  if clip is not None:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  if k > 1:
    tx = optax.MultiSteps(tx, k)
  state = tx.init(params)

  @jax.jit
  def step(params, state, b):
    value, g = jax.value_and_grad(plain_loss)(params, b)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state, value, optax.tree.norm(g)

  losses = []
  for batch in _batches(n, k):
    for j in range(k):
      params, state, value, norm = step(params, state,
                                        jax.tree.map(lambda a: a[j], batch))
      losses.append((value, norm))
  return params, losses


def _layerwise(tx, k=1, n=5, clip=None, mode="global", dtype=jnp.float32,
               jit=True):
  outer, blocks = _model(dtype)
  t = lw.layerwise_step(embed, block, head, tx, max_grad_norm=clip, clip=mode)
  state = t.init(outer, blocks)
  step = jax.jit(t.step, donate_argnums=(0, 1, 2)) if jit else t.step
  metrics = []
  for batch in _batches(n, k):
    outer, blocks, state, m = step(outer, blocks, state, batch)
    metrics.append(m)
  return {"outer": outer, "blocks": blocks}, metrics, state


def _rel(a, b):
  return max(float(jnp.linalg.norm((x - y).astype(jnp.float32))
                   / jnp.linalg.norm(y.astype(jnp.float32)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _moved(params):
  outer, blocks = _model()
  return _rel(params, {"outer": outer, "blocks": blocks})


SCHEDULE = optax.linear_schedule(1e-2, 1e-3, 5)
TXS = {
    "adamw": lambda: optax.adamw(SCHEDULE, weight_decay=0.1),
    "adamw_8bit": lambda: galore_jax.adamw_8bit(
        SCHEDULE, weight_decay=0.1, min_8bit_size=256),
    "galore": lambda: galore_jax.galore_adamw(
        SCHEDULE, rank=4, update_proj_gap=2, weight_decay=0.1),
    "galore_8bit": lambda: galore_jax.galore_adamw_8bit(
        SCHEDULE, rank=8, update_proj_gap=2, min_8bit_size=64),  # 256-long
    "q_galore": lambda: galore_jax.q_galore_adamw(
        SCHEDULE, rank=4, update_proj_gap=2, weight_decay=0.1),
    "galore_subspace": lambda: galore_jax.galore_adamw(
        SCHEDULE, rank=4, update_proj_gap=2, svd="subspace_iteration"),
    "sgd": lambda: optax.sgd(SCHEDULE, momentum=0.9),
    "galore_sgd": lambda: galore_jax.galore_sgd(
        SCHEDULE, rank=4, update_proj_gap=2, momentum=0.9),
    "inject": lambda: optax.inject_hyperparams(galore_jax.galore_adamw,
                                               static_args=("rank",
                                                            "update_proj_gap"))(
        learning_rate=1e-2, rank=4, update_proj_gap=2),
}


@pytest.mark.parametrize("name", sorted(TXS))
def test_equals_the_plain_step(name):
  want, losses = _plain(TXS[name]())
  got, metrics, _ = _layerwise(TXS[name]())
  assert _moved(want) > 1e-3  # it trained
  assert _rel(got, want) < 1e-6, name  # across refreshes at steps 0, 2, 4
  for m, (value, norm) in zip(metrics, losses):
    np.testing.assert_allclose(m["loss"], value, rtol=1e-6)
    np.testing.assert_allclose(m["grad_norm"], norm, rtol=1e-5)


@pytest.mark.parametrize("name", ["adamw", "galore", "q_galore"])
@pytest.mark.parametrize("k", [2, 3])
def test_accumulation_equals_multisteps(name, k):
  """Micro-batches inside each layer: the exact mean gradient, so a GaLore
  refresh sees what it sees under optax.MultiSteps."""
  want, _ = _plain(TXS[name](), k=k)
  got, metrics, state = _layerwise(TXS[name](), k=k)
  assert _rel(got, want) < 1e-6
  assert int(state.count) == 5
  assert metrics[0]["loss"].shape == ()


@pytest.mark.parametrize("name", ["sgd", "galore_sgd"])
@pytest.mark.parametrize("k", [1, 2])
def test_global_clip_equals_clip_by_global_norm(name, k):
  want, losses = _plain(TXS[name](), k=k, clip=0.3)
  got, metrics, _ = _layerwise(TXS[name](), k=k, clip=0.3)
  assert float(metrics[0]["grad_norm"]) > 0.3  # the clip is active
  assert _rel(got, want) < 1e-6
  unclipped, _ = _plain(TXS[name](), k=k)
  assert _rel(unclipped, want) > 1e-3


def test_per_layer_clip_bounds_the_global_norm():
  """With SGD at lr 1 the change is minus the applied gradient: each of the
  L + 1 pieces is clipped to c / sqrt(L + 1), so the total is <= c."""
  c = 0.05
  got, metrics, _ = _layerwise(optax.sgd(1.0), n=1, clip=c, mode="per_layer")
  outer, blocks = _model()
  delta = jax.tree.map(lambda a, b: a - b, got,
                       {"outer": outer, "blocks": blocks})
  pieces = [optax.tree.norm(delta["outer"])] + [
      optax.tree.norm(jax.tree.map(lambda x: x[l], delta["blocks"]))
      for l in range(L)]
  assert float(metrics[0]["grad_norm"]) > 2 * c
  for norm in pieces:
    assert float(norm) <= c / np.sqrt(L + 1) * (1 + 1e-5)
  assert float(optax.tree.norm(delta)) <= c * (1 + 1e-5)


def test_jit_equals_eager():
  a, _, _ = _layerwise(TXS["galore"](), k=2, n=2)
  b, _, _ = _layerwise(TXS["galore"](), k=2, n=2, jit=False)
  assert _rel(a, b) < 1e-6


def test_bf16_kept_and_close_to_the_plain_step():
  want, _ = _plain(TXS["adamw"](), dtype=jnp.bfloat16)
  got, _, state = _layerwise(TXS["adamw"](), dtype=jnp.bfloat16)
  chex.assert_trees_all_equal_dtypes(got, want)
  assert state.blocks[0].mu["w1"].dtype == jnp.bfloat16
  assert _rel(got, want) < 2e-2  # bf16 rounding of differently-ordered sums


def test_state_is_per_layer():
  outer, blocks = _model()
  t = lw.layerwise_step(embed, block, head, TXS["galore"]())
  state = t.init(outer, blocks)
  assert state.count.shape == () and state.count.dtype == jnp.int32
  gal = state.blocks[0]
  assert gal.count.shape == (L,)
  assert gal.projector["w1"].row.shape == (L, 4, D)  # per layer, (r, in)
  assert gal.base_state.mu["w1"].shape == (L, 4, F)
  assert state.outer[0].projector["emb"].col.shape == (D, 4)


def test_no_retrace():
  traces = []

  def counted(p, x):
    traces.append(None)
    return block(p, x)

  outer, blocks = _model()
  t = lw.layerwise_step(embed, counted, head, optax.adamw(1e-2))
  state = t.init(outer, blocks)
  step = jax.jit(t.step)
  for batch in _batches(3, 1):
    outer, blocks, state, _ = step(outer, blocks, state, batch)
  n = len(traces)
  for batch in _batches(2, 1):
    outer, blocks, state, _ = step(outer, blocks, state, batch)
  assert n > 0 and len(traces) == n


def _int8_reference(tx, n, seed=0):
  """Plain gradients and update of the dequantized model, then each layer's
  stochastic rounding with the layerwise step's keys."""
  outer, blocks = _model()
  qblocks = lw.quantize_blocks(blocks, mask={"w1": True, "w2": True,
                                             "norm": False})
  t = lw.layerwise_step(embed, block, head, tx)
  state = t.init(outer, qblocks)
  outer_f = outer
  flat_state = tx.init({"outer": outer,
                        "blocks": lw.dequantize_blocks(qblocks)})
  for i, batch in enumerate(_batches(n, 1)):
    params = {"outer": outer_f, "blocks": lw.dequantize_blocks(qblocks)}
    g = jax.grad(plain_loss)(params, jax.tree.map(lambda a: a[0], batch))
    u, flat_state = tx.update(g, flat_state, params)
    key = jax.random.fold_in(jax.random.key(seed), i)
    layers = []
    for l in range(L):
      take = lambda t: jax.tree.map(lambda x: x[l], t)
      layers.append(galore_jax.apply_updates_stochastic(
          take(qblocks), take(u["blocks"]),
          jax.random.fold_in(jax.random.fold_in(key, 1), l)))
    qblocks = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    outer_f = optax.apply_updates(outer_f, u["outer"])
  return outer_f, qblocks, t, state


def test_int8_blocks_dequantized_per_layer_with_per_layer_keys():
  tx = galore_jax.q_galore_adamw(1e-2, rank=4, update_proj_gap=2,
                                 state_bits=32)
  want_outer, want_blocks, t, state = _int8_reference(tx, 3)
  outer, _ = _model()
  blocks = lw.quantize_blocks(_model()[1], mask={"w1": True, "w2": True,
                                                 "norm": False})
  step = jax.jit(t.step)
  for batch in _batches(3, 1):
    outer, blocks, state, _ = step(outer, blocks, state, batch)
  assert isinstance(blocks["w1"], galore_jax.QuantizedArray)
  assert blocks["w1"].codes.shape[0] == L
  # Float moments: the same codes, up to rare flips of rounding ties.
  same = np.mean(np.asarray(blocks["w1"].codes)
                 == np.asarray(want_blocks["w1"].codes))
  assert same > 0.999
  assert _rel(lw.dequantize_blocks(blocks),
              lw.dequantize_blocks(want_blocks)) < 1e-3
  assert _rel(outer, want_outer) < 1e-5


def test_int8_rounding_is_unbiased_per_layer():
  """An update far below a code step still moves the mean weight: each
  layer adds c * sum(w1) to its input and the loss is -mean(x), so every
  w1 entry's gradient is -c and SGD at lr 1 adds c."""
  c = 1e-4
  outer, _ = _model()
  blocks = {"w1": 0.2 * jax.random.normal(jax.random.key(3), (L, 64, 256))}
  shift = lambda p, x: x + c * jnp.sum(p["w1"])
  t = lw.layerwise_step(embed, shift, lambda o, x, b: -jnp.mean(x),
                   optax.sgd(1.0))
  step = jax.jit(t.step)
  # Float offsets take a shift of a whole group almost exactly: the codes
  # stay, up to quotients a float32 rounding below an integer.
  fblocks = lw.quantize_blocks(blocks)
  _, fb, _, _ = step(outer, fblocks, t.init(outer, fblocks),
                     _batches(1, 1)[0])
  fmoved = np.asarray(lw.dequantize_blocks(fb)["w1"]
                      - lw.dequantize_blocks(fblocks)["w1"])
  assert np.mean(np.abs(fmoved - c) < 0.05 * c) > 0.999
  assert abs(float(fmoved.mean()) - c) < 0.15 * c
  # Official zero points are integers: the codes must move, stochastically.
  qblocks = lw.quantize_blocks(blocks, zero_point="official")
  state = t.init(outer, qblocks)
  _, qb, _, _ = step(outer, qblocks, state, _batches(1, 1)[0])
  before = lw.dequantize_blocks(qblocks)["w1"]
  moved = lw.dequantize_blocks(qb)["w1"] - before
  assert c < float(jnp.min(qblocks["w1"].scales)) / 10  # far below a step
  # Each entry moves by 0 or about one step s: the mean of n has a standard
  # deviation near sqrt(c s / n), 5.5e-6 per layer here.
  assert abs(float(moved.mean()) - c) < 0.15 * c
  for l in range(L):  # each layer, with its own key
    assert abs(float(moved[l].mean()) - c) < 0.3 * c, l
  assert not np.array_equal(np.asarray(moved[0] != 0),
                            np.asarray(moved[1] != 0))


def test_orbax_round_trip_resumes_exactly(tmp_path):
  tx = TXS["galore_8bit"]()
  outer, blocks = _model()
  t = lw.layerwise_step(embed, block, head, tx)
  state = t.init(outer, blocks)
  step = jax.jit(t.step)
  batches = _batches(4, 2)
  for batch in batches[:2]:
    outer, blocks, state, _ = step(outer, blocks, state, batch)
  tree = {"outer": outer, "blocks": blocks, "state": state}
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "c", tree)
  with ocp.StandardCheckpointer() as ckpt:
    back = ckpt.restore(tmp_path / "c", jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree))
  chex.assert_trees_all_equal(back, tree)
  a = (outer, blocks, state)
  b = (back["outer"], back["blocks"],
       jax.tree.unflatten(jax.tree.structure(state),
                          jax.tree.leaves(back["state"])))
  for batch in batches[2:]:
    a = step(*a, batch)[:3]
    b = step(*b, batch)[:3]
  chex.assert_trees_all_equal(a, b)


def _temp_bytes(fn, *args):
  c = jax.jit(fn, donate_argnums=(0, 1, 2)).lower(*args).compile()
  return c.memory_analysis().temp_size_in_bytes


def test_compiled_step_holds_one_layer_of_gradient():
  """The in-place property: a deep, wide stack's layerwise step needs less
  temporary memory than one stacked gradient, while the plain step's
  temporaries exceed it."""
  n_layers, d = 16, 256
  outer = {"emb": jnp.zeros((V, d)), "out": jnp.zeros((d, V))}
  blocks = {"w1": jnp.zeros((n_layers, d, d)),
            "w2": jnp.zeros((n_layers, d, d)),
            "norm": jnp.ones((n_layers, d))}
  batch = {"tok": jnp.zeros((1, 2, 9), jnp.int32)}
  stacked_grad = 4 * 2 * n_layers * d * d
  for tx in (optax.adamw(1e-3), TXS["galore"]()):
    t = lw.layerwise_step(embed, block, head, tx)
    state = t.init(outer, blocks)
    temp = _temp_bytes(t.step, outer, blocks, state, batch)

    def plain_step(outer, blocks, st, batch, tx=tx):
      params = {"outer": outer, "blocks": blocks}
      g = jax.grad(plain_loss)(params, jax.tree.map(lambda a: a[0], batch))
      u, st = tx.update(g, st, params)
      return optax.apply_updates(params, u), st

    plain_state = tx.init({"outer": outer, "blocks": blocks})
    plain_temp = _temp_bytes(plain_step, outer, blocks, plain_state, batch)
    assert temp < stacked_grad / 2, (temp, stacked_grad)  # no stacked copy
    assert plain_temp > stacked_grad, (plain_temp, stacked_grad)


def test_sharded_equals_one_device():
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  tx = TXS["galore"]()
  outer, blocks = _model()
  t = lw.layerwise_step(embed, block, head, tx)
  o_sh = {"emb": NamedSharding(mesh, P(None, "fsdp")),
          "out": NamedSharding(mesh, P("fsdp", None))}
  b_sh = {"w1": NamedSharding(mesh, P(None, "fsdp", None)),
          "w2": NamedSharding(mesh, P(None, None, "fsdp")),
          "norm": NamedSharding(mesh, P(None, "fsdp"))}
  s_sh = t.state_sharding(outer, blocks, o_sh, b_sh)
  # (L, r, in) projector and (L, r, out) moments of w1, split along `in`:
  assert s_sh.blocks[0].projector["w1"].row.spec == P(None, None, "fsdp")
  assert s_sh.blocks[0].base_state.mu["w1"].spec == P(None, None, "fsdp")
  state = jax.jit(t.init, out_shardings=s_sh)(
      jax.device_put(outer, o_sh), jax.device_put(blocks, b_sh))
  tok_sh = NamedSharding(mesh, P(None, "data"))
  step = jax.jit(t.step, in_shardings=(o_sh, b_sh, s_sh, {"tok": tok_sh}),
                 out_shardings=(o_sh, b_sh, s_sh, None))
  o, b = jax.device_put(outer, o_sh), jax.device_put(blocks, b_sh)
  hlo = step.lower(o, b, state, _batches(1, 1)[0]).compile().as_text()
  for batch in _batches(5, 1):
    o, b, state, _ = step(o, b, state, jax.device_put(batch, {"tok": tok_sh}))
  assert b["w1"].sharding.spec == P(None, "fsdp", None)
  want, _, _ = _layerwise(TXS["galore"]())
  assert _rel({"outer": o, "blocks": b}, want) < 1e-5
  # No all-gather of a whole stacked gradient (L * D * F elements).
  assert largest_all_gather(hlo) < L * D * F


def _check_raises(exc, match, fn, *args, **kw):
  with pytest.raises(exc, match=match):
    fn(*args, **kw)


def test_bad_input():
  outer, blocks = _model()
  tx = optax.adamw(1e-3)
  t = lw.layerwise_step(embed, block, head, tx)
  state = t.init(outer, blocks)
  batch = _batches(1, 1)[0]
  _check_raises(TypeError, "`block` must be a callable", lw.layerwise_step,
                embed, None, head, tx)
  _check_raises(TypeError, "`tx` must be an optax.GradientTransformation",
                lw.layerwise_step, embed, block, head, "adamw")
  _check_raises(ValueError, "`clip` must be one of", lw.layerwise_step,
                embed, block, head, tx, clip="norm")
  _check_raises(ValueError, "`max_grad_norm` must be in", lw.layerwise_step,
                embed, block, head, tx, max_grad_norm=-1.0)
  _check_raises(ValueError, "not stacked", t.init, outer,
                {**blocks, "scalar": jnp.float32(1)})
  _check_raises(ValueError, "do not share one leading layer axis", t.init,
                outer, {**blocks, "norm": jnp.ones((L + 1, D))})
  stacked_q = galore_jax.quantize_params(blocks, mask={"w1": True,
                                                       "w2": False,
                                                       "norm": False})
  _check_raises(ValueError, "quantize_blocks", t.init, outer, stacked_q)
  _check_raises(ValueError, "optax.MultiSteps, which accumulates",
                lw.layerwise_step, embed, block, head, optax.MultiSteps(tx, 2))
  _check_raises(ValueError, "MultiStepsState, which accumulates",
                lw.layerwise_step(embed, block, head, optax.MultiSteps(
                    tx, 2).gradient_transformation()).init, outer, blocks)
  _check_raises(ValueError, "ApplyIfFiniteState",
                lw.layerwise_step(embed, block, head,
                             optax.apply_if_finite(tx, 3)).init, outer, blocks)
  host = optax.GradientTransformation(  # reads values on the host
      lambda p: jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), p),
      lambda g, s, p=None: (g, s))
  _check_raises(ValueError, "cannot be split per layer",
                lw.layerwise_step(embed, block, head, host).init, outer,
                blocks)
  shrink = lambda p, x: block(p, x)[..., :-1]
  _check_raises(ValueError, "embed -> L identical blocks -> head",
                lw.layerwise_step(embed, shrink, head, tx).step, outer, blocks,
                state, batch)
  per_token = lambda o, x, b: jnp.sum(x, -1)
  _check_raises(ValueError, "`head` must return a scalar",
                lw.layerwise_step(embed, block, per_token, tx).step, outer,
                blocks, state, batch)
  _check_raises(ValueError, "leading micro-batch axis", t.step, outer,
                blocks, state, {"tok": jnp.zeros((), jnp.int32)})
  mesh = Mesh(np.array(jax.devices()[:2]), ("fsdp",))
  bad = {k: NamedSharding(mesh, P("fsdp")) for k in blocks}
  _check_raises(ValueError, "split along its layer axis", t.state_sharding,
                outer, blocks, {k: NamedSharding(mesh, P()) for k in outer},
                bad)


# --- remat_scan: the plain step's rematerialized scan ------------------------


def _mixed_blocks():
  """Float32 kernels and a bf16 norm scale: remat_scan takes its own loops
  (it has a bf16 leaf to carry) while the math stays float32-exact."""
  _, blocks = _model()
  return {**blocks, "norm": blocks["norm"].astype(jnp.bfloat16)}


def _scan_loss(run):
  outer, _ = _model()
  b = jax.tree.map(lambda a: a[0], _batches(1, 1)[0])

  def loss(blocks, x_scale):
    x = embed(outer, b) * x_scale
    return head(outer, run(blocks, x), b)

  return loss


def _checkpoint_scan(blocks, x, fn=block):
  body = jax.checkpoint(fn)
  return jax.lax.scan(lambda x, p: (body(p, x), None), x, blocks)[0]


def _remat_scan(blocks, x, fn=block):
  return lw.remat_scan(fn, blocks, x)


def test_remat_scan_equals_a_checkpointed_scan():
  """Value, block gradients and input gradient of lax.scan over
  jax.checkpoint(block), eager and under jit."""
  blocks = _mixed_blocks()
  want = jax.value_and_grad(_scan_loss(_checkpoint_scan), (0, 1))(blocks, 1.0)
  ours = jax.value_and_grad(_scan_loss(_remat_scan), (0, 1))
  assert "custom_vjp" in str(jax.make_jaxpr(_scan_loss(_remat_scan))(
      blocks, 1.0))
  for fn in (ours, jax.jit(ours)):
    got = fn(blocks, 1.0)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
    assert got[1][0]["norm"].dtype == jnp.bfloat16  # gradients keep dtypes


def test_remat_scan_without_bf16_leaves_is_jax_s_scan():
  _, blocks = _model()
  jaxpr = str(jax.make_jaxpr(_scan_loss(_remat_scan))(blocks, 1.0))
  assert "custom_vjp" not in jaxpr and "scan" in jaxpr


def test_remat_scan_differentiates_only_what_is_asked():
  """Leaves outside the differentiated argument (a LoRA's frozen kernels)
  get no gradient buffer: the step that trains only `norm` holds less than
  half of one stacked kernel."""
  n_layers, d = 16, 256
  frozen = {"w1": jnp.zeros((n_layers, d, d)), "w2": jnp.zeros((n_layers, d, d))}
  norm = jnp.ones((n_layers, d), jnp.bfloat16)
  x = jnp.ones((2, 8, d))

  def grad_of_norm(run):
    return jax.grad(lambda norm, frozen: run({**frozen, "norm": norm}, x).sum())

  chex.assert_trees_all_close(
      grad_of_norm(_remat_scan)(norm, frozen),
      grad_of_norm(_checkpoint_scan)(norm, frozen), rtol=1e-6)
  temp = jax.jit(grad_of_norm(_remat_scan)).lower(
      norm, frozen).compile().memory_analysis().temp_size_in_bytes
  assert temp < 4 * n_layers * d * d / 2, temp


def test_remat_scan_of_int8_blocks():
  """INT8 blocks (quantized per layer) under q_galore.value_and_grad: the
  gradients w.r.t. the dequantized weights, as the checkpointed scan's."""
  from galore_jax import q_galore
  qblocks = lw.quantize_blocks(_mixed_blocks(), mask={
      "w1": True, "w2": True, "norm": False})
  outer, _ = _model()
  b = jax.tree.map(lambda a: a[0], _batches(1, 1)[0])
  dq_block = lambda layer, x: block(q_galore.dequantize_params(layer), x)

  def loss(run):
    return lambda blocks: head(outer, run(blocks, embed(outer, b), dq_block),
                               b)

  want = q_galore.value_and_grad(loss(_checkpoint_scan))(qblocks)
  got = q_galore.value_and_grad(loss(_remat_scan))(qblocks)
  chex.assert_trees_all_close(got, want, rtol=2e-6, atol=1e-7)


def test_remat_scan_converts_one_layer_at_a_time():
  """A bf16 stack: the checkpointed scan's temporaries hold a float32 copy
  of the whole stack on XLA:CPU, remat_scan's less than half of one."""
  n_layers, d = 16, 256
  blocks = {"w1": jnp.zeros((n_layers, d, d), jnp.bfloat16),
            "w2": jnp.zeros((n_layers, d, d), jnp.bfloat16),
            "norm": jnp.ones((n_layers, d), jnp.bfloat16)}
  x = jnp.ones((1, 8, d), jnp.bfloat16)
  f32_stack = 4 * 2 * n_layers * d * d

  def temp(run):
    loss = lambda blocks: run(blocks, x).astype(jnp.float32).sum()
    return jax.jit(jax.grad(loss)).lower(blocks).compile(
        ).memory_analysis().temp_size_in_bytes

  assert temp(_checkpoint_scan) > f32_stack, temp(_checkpoint_scan)
  assert temp(_remat_scan) < f32_stack / 2, temp(_remat_scan)


def test_remat_scan_bad_input():
  with pytest.raises(TypeError, match="`block` must be a callable"):
    lw.remat_scan(None, {"w": jnp.ones((2, 3, 3))}, jnp.ones(3))
  with pytest.raises(ValueError, match="not stacked"):
    lw.remat_scan(block, {"w": jnp.ones(())}, jnp.ones(3))


def test_remat_scan_differentiates_what_block_closes_over():
  """A block that closes over a differentiated value (a shared scale, tied
  params): its gradient, summed over the layers, as the scan's."""
  blocks = _mixed_blocks()
  x = jnp.ones((2, 6, D))

  def loss(run):
    def f(blocks, shared):
      fn = lambda p, x: block(p, x) * shared
      return run(blocks, x, fn).sum()
    return jax.grad(f, (0, 1))

  chex.assert_trees_all_close(loss(_remat_scan)(blocks, 0.9),
                              loss(_checkpoint_scan)(blocks, 0.9),
                              rtol=1e-6, atol=1e-7)


def test_remat_scan_does_not_materialize_int8_zero_offsets():
  """bf16 INT8 blocks under q_galore.value_and_grad: the zero offsets it
  differentiates through stay broadcasts (not carried through the loops),
  so the temporaries stay below a quarter of the kernels' bf16 bytes (the
  offsets alone would be half of them)."""
  from galore_jax import q_galore
  n_layers, d = 16, 256
  blocks = {"w1": jnp.zeros((n_layers, d, d), jnp.bfloat16),
            "w2": jnp.zeros((n_layers, d, d), jnp.bfloat16),
            "norm": jnp.ones((n_layers, d), jnp.bfloat16)}
  qblocks = lw.quantize_blocks(blocks, mask={"w1": True, "w2": True,
                                             "norm": False})
  x = jnp.ones((1, 8, d), jnp.bfloat16)
  dq_block = lambda p, x: block(q_galore.dequantize_params(p), x)
  loss = lambda b: lw.remat_scan(dq_block, b, x).astype(jnp.float32).sum()
  temp = jax.jit(q_galore.value_and_grad(loss)).lower(qblocks).compile(
      ).memory_analysis().temp_size_in_bytes
  assert temp < 2 * n_layers * d * d * 2 / 4, temp
