"""Memory planner: its bytes are the real states' bytes; the 7B ranking."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from examples.llama import models as llama_models
import galore_jax
from galore_jax import llama_plan
from galore_jax import lora
from galore_jax import memory
from tests.test_lora import Block

TARGETS = r"attn|mlp"
RANK = 8


def nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def params_of(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def mask_of(params):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x.ndim >= 2 and any(
          getattr(k, "key", None) in ("attn", "mlp") for k in p), params)


@pytest.fixture(scope="module")
def plans():
  return memory.plan(Block(nnx.Rngs(0)), rank=RANK, targets=TARGETS)


def test_full_methods_equal_the_initialized_states(plans):
  params = params_of(Block(nnx.Rngs(0)))
  mask = mask_of(params)
  n_bytes = nbytes(params)
  real = {
      "adamw": optax.adamw(1e-3),
      "adamw_8bit": galore_jax.adamw_8bit(1e-3),
      "galore": galore_jax.galore_adamw(1e-3, rank=RANK, projection_mask=mask),
      "galore_8bit": galore_jax.galore_adamw_8bit(1e-3, rank=RANK,
                                                  projection_mask=mask),
      "q_galore": galore_jax.q_galore_adamw(1e-3, rank=RANK,
                                            projection_mask=mask),
  }
  for method, tx in real.items():
    state = tx.init(params)
    proj = nbytes(state[0].projector) if "galore" in method else 0
    p = plans[method]
    assert p.gradients == n_bytes, method
    assert p.projectors == proj, method
    assert p.optimizer_state + p.projectors == nbytes(state), method
    assert p.total == p.weights + p.gradients + p.optimizer_state + proj
  assert plans["adamw"].weights == n_bytes
  assert plans["galore"].projectors > 0
  qparams = galore_jax.quantize_params(params, mask=mask)
  assert plans["q_galore"].weights == nbytes(qparams) < n_bytes


@pytest.mark.parametrize("method,quantize_base", [("lora", None),
                                                  ("qlora", "nf4")])
def test_lora_methods_equal_the_converted_model(plans, method, quantize_base):
  model = lora.apply(Block(nnx.Rngs(0)), rank=RANK, targets=TARGETS,
                     quantize_base=quantize_base, rngs=nnx.Rngs(1))
  opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  p = plans[method]
  assert p.weights == nbytes(nnx.state(model))  # frozen + quantized + adapters
  assert p.gradients == nbytes(nnx.state(model, nnx.Param))
  assert p.optimizer_state == nbytes(nnx.state(opt.opt_state))
  assert p.projectors == 0


@pytest.mark.parametrize("method,trainable", [
    ("head", r"^lm_head/"), ("adapters", r"^(embed|lm_head)/")])
def test_partial_methods_equal_the_frozen_model(method, trainable):
  plans = memory.plan(Block(nnx.Rngs(0)), [method], rank=RANK,
                      head=r"^lm_head/", inputs=r"^embed/")
  model = lora.freeze(Block(nnx.Rngs(0)), trainable)
  opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  p = plans[method]
  assert p.weights == nbytes(nnx.state(model))
  assert p.gradients == nbytes(nnx.state(model, nnx.Param))
  assert p.optimizer_state == nbytes(nnx.state(opt.opt_state))
  m = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
  assert p.closed_form == 4 * n + 12 * m == p.total - 4  # + Adam's count


def test_default_methods_follow_the_regexes():
  block = Block(nnx.Rngs(0))
  assert tuple(memory.plan(block, rank=RANK)) == memory.METHODS[:7]
  assert tuple(memory.plan(block, rank=RANK, head="lm_head")) == (
      memory.METHODS[:8])
  assert tuple(memory.plan(block, rank=RANK, head="lm_head",
                           inputs="embed")) == memory.METHODS
  with pytest.raises(ValueError, match="'head' needs `head`"):
    memory.plan(block, ["head"], rank=RANK)
  with pytest.raises(ValueError, match="'adapters' needs `inputs`"):
    memory.plan(block, ["adapters"], rank=RANK, head="lm_head")
  with pytest.raises(ValueError, match="`head` 'classifier' matches no"
                     " param; the paths are: attn/o_proj/bias"):
    memory.plan(block, ["head"], rank=RANK, head="classifier")


def test_lora_targets_presets_of_the_llama_planner():
  config = memory.CONFIGS["llama-60m"]
  d, f, r = config.hidden, config.intermediate, 64
  got = {t: memory.plan_llama(config, ["lora"], rank=r,
                              lora_targets=t)["lora"].gradients
         for t in memory.LLAMA_LORA_TARGETS}
  per_layer = {"attention": 4 * r * (d + d), "mlp": 3 * r * (d + f)}
  assert got == {"attention": 4 * config.layers * per_layer["attention"],
                 "mlp": 4 * config.layers * per_layer["mlp"],
                 "all": 4 * config.layers * sum(per_layer.values())}
  with pytest.raises(ValueError, match="`lora_targets` must be one of"):
    memory.plan_llama(config, lora_targets="ffn")


def test_closed_forms_in_fp32(plans):
  params = params_of(Block(nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(params))
  adapters = sum(RANK * (x.shape[0] + x.shape[1])
                 for x, m in zip(jax.tree.leaves(params),
                                 jax.tree.leaves(mask_of(params))) if m)
  count = 4  # Adam's int32 step count: the only byte the formulas leave out
  assert plans["adamw"].closed_form == 16 * n == plans["adamw"].total - count
  assert plans["lora"].closed_form == 4 * n + 16 * adapters
  assert plans["lora"].total == plans["lora"].closed_form + count
  assert plans["qlora"].closed_form == n / 2 + 16 * adapters


def test_abstract_params_and_dtype():
  params = {"w": jax.ShapeDtypeStruct((256, 128), jnp.float32),
            "b": jax.ShapeDtypeStruct((128,), jnp.float32)}
  f32 = memory.plan(params, ["adamw", "galore"], rank=16)
  bf16 = memory.plan(params, ["adamw", "galore"], rank=16, dtype=jnp.bfloat16)
  n = 256 * 128 + 128
  assert f32["adamw"].total == 16 * n + 4 and bf16["adamw"].total == 8 * n + 4
  assert f32["galore"].projectors == 4 * 16 * 128  # std: right, (16, 128)
  assert bf16["galore"].projectors == 2 * 16 * 128


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_llama_7b_reproduces_the_lectures_ranking(dtype):
  """Full > LoRA ~ GaLore > QLoRA ~ Q-GaLore (REFERENCE.md §5)."""
  p = {m: x.total for m, x in memory.plan_llama(
      "llama-7b", rank=1024, dtype=dtype).items()}
  n = memory.CONFIGS["llama-7b"].num_params
  assert 6.7e9 < n < 6.8e9
  assert p["adamw"] > max(p["lora"], p["galore"])
  assert min(p["lora"], p["galore"]) > max(p["qlora"], p["q_galore"])
  near = lambda a, b: abs(math.log(a / b)) < math.log(1.25)
  assert near(p["lora"], p["galore"]) and near(p["qlora"], p["q_galore"])
  itemsize = jnp.dtype(dtype).itemsize
  assert p["adamw"] == 4 * itemsize * n + 4


def test_llama_param_counts():
  for name, nominal in [("llama-60m", 58e6), ("llama-130m", 134e6),
                        ("llama-350m", 368e6), ("llama-1b", 1.34e9)]:
    config = memory.CONFIGS[name]
    params = memory.llama_params(config)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    assert n == config.num_params
    assert abs(n / nominal - 1) < 0.02, (name, n)


def test_compiled_train_steps_of_a_tiny_llama():
  config = memory.LlamaConfig(64, 128, 4, 2, vocab=256, rank=16)
  plans = memory.plan_llama(config, batch=2, seq=16)
  for m, p in plans.items():
    assert p.compiled is not None and p.compiled >= p.weights, m
  assert plans["lora"].compiled < plans["adamw"].compiled
  # The head alone: no backward pass through the frozen model, the smallest.
  assert plans["head"].compiled < min(
      p.compiled for m, p in plans.items() if m != "head")
  # The step really trains: the loss at init is about log(vocab).
  params = jax.tree.map(
      lambda s: 0.02 * jax.random.normal(jax.random.key(0), s.shape, s.dtype),
      memory.llama_params(config))
  tokens = jnp.arange(34).reshape(2, 17) % 256
  loss = llama_plan.llama_loss(params, tokens, config)
  assert abs(float(loss) - math.log(256)) < 0.1


def example_llama_params(state):
  """A state of the LLaMA example's scanned model (params or gradients,
  ``nnx.State``) as :mod:`galore_jax.llama_plan` params."""
  p = nnx.to_pure_dict(state)
  layers = p["layers"]
  return {
      "embed": p["embed"]["embedding"], "final_norm": p["norm"]["scale"],
      "lm_head": p["lm_head"]["kernel"],
      "layers": {**{n: layers["attn"][n]["kernel"] for n in "qkvo"},
                 **{n: layers["mlp"][n]["kernel"]
                    for n in ("gate", "up", "down")},
                 "attn_norm": layers["attn_norm"]["scale"],
                 "mlp_norm": layers["mlp_norm"]["scale"]}}


@pytest.mark.parametrize("remat", [False, True])
def test_planner_llama_loss_is_the_example_models(remat):
  """The planner compiles its own flax-free LLaMA; for the example model's
  weights its loss (and gradient) is the example's, so the two cannot drift
  apart."""
  cfg = llama_models.CONFIGS["llama-tiny"]
  model = llama_models.Llama(cfg, rngs=nnx.Rngs(0), scan_layers=True)
  params = example_llama_params(nnx.state(model, nnx.Param))
  config = llama_plan.LlamaConfig(cfg.hidden, cfg.intermediate, cfg.heads,
                                  cfg.layers, vocab=cfg.vocab)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      lambda s: s.shape, llama_plan.llama_params(config))
  tokens = jax.random.randint(jax.random.key(0), (2, 17), 0, cfg.vocab)
  want, want_grad = nnx.value_and_grad(
      lambda m: llama_models.loss_fn(m, tokens))(model)
  got, grad = jax.value_and_grad(llama_plan.llama_loss)(params, tokens,
                                                        config, remat)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grad),
                  jax.tree.leaves(example_llama_params(want_grad))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  embed, block, head = llama_plan.llama_fns(config)  # the layerwise pieces
  x = embed(params, tokens)
  for l in range(cfg.layers):
    x = block(jax.tree.map(lambda a, l=l: a[l], params["layers"]), x)
  np.testing.assert_allclose(head(params, x, tokens), want, rtol=1e-6)
  step, carry = memory.llama_train_step("adamw", config, params, rank=16,
                                        remat=remat)
  _, loss = jax.jit(step)(carry, tokens)  # the plain step's loss
  np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_compiled_bytes_counts_donation():
  x = jax.ShapeDtypeStruct((1024,), jnp.float32)
  kept = memory.compiled_bytes(lambda a: a + 1, x)
  donated = memory.compiled_bytes(lambda a: a + 1, x, donate_argnums=0)
  assert kept == 8192 and donated == 4096


def test_cli_prints_the_table_and_marks_the_budget(capsys):
  assert memory.main(["--model", "llama-60m", "--dtype", "fp32",
                      "--budget", "0.5GB"]) == 0
  out = capsys.readouterr().out
  rows = {line.split("|")[1].strip(): line for line in out.splitlines()
          if line.startswith("| ") and "method" not in line}
  assert set(rows) == set(memory.METHODS)
  assert rows["adamw"].rstrip(" |").endswith("no")  # 0.87 GiB
  assert rows["qlora"].rstrip(" |").endswith("yes")


def test_parse_bytes():
  assert memory.parse_bytes("24GB") == 24 * 2**30
  assert memory.parse_bytes("16 GiB") == 16 * 2**30
  assert memory.parse_bytes("512MB") == 2**29
  assert memory.parse_bytes("1000") == 1000
  with pytest.raises(ValueError, match="cannot read a memory size"):
    memory.parse_bytes("24 gigs")


# ---------------------------------------------------------------------------
# Bad input.


def test_unknown_method():
  with pytest.raises(ValueError, match="unknown method.*'sgd'.*known: adamw"):
    memory.plan_llama("llama-60m", ["adamw", "sgd"])


def test_lora_rank_too_large_names_the_target():
  params = {"attn": {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32)}}
  with pytest.raises(ValueError, match="larger than target 'attn/w' allows"):
    memory.plan(params, ["lora"], rank=33, targets="attn")


def test_targets_matching_nothing_lists_the_paths():
  with pytest.raises(ValueError, match="matches no param.*layers/q"):
    memory.plan(memory.llama_params(memory.CONFIGS["llama-60m"]), rank=8,
                targets="decoder")


@pytest.mark.parametrize("argv,match", [
    (["--methods", "adamw,full"], "unknown method"),
    (["--budget", "lots"], "cannot read a memory size"),
    (["--compile"], "--compile needs --batch and --seq"),
    (["--batch", "2"], "only apply with --compile"),
    (["--model", "gpt-2"], "invalid choice"),
])
def test_cli_errors(argv, match, capsys):
  with pytest.raises(SystemExit) as e:
    memory.main(argv)
  assert e.value.code == 2
  assert match in capsys.readouterr().err


def test_bad_config_and_compile_args():
  with pytest.raises(ValueError, match="unknown LLaMA config 'llama-3b'"):
    memory.plan_llama("llama-3b")
  with pytest.raises(ValueError, match="give both `batch` and `seq`"):
    memory.plan_llama("llama-60m", batch=2)
  with pytest.raises(ValueError, match="`quantize_base` must be"):
    memory.plan_llama("llama-60m", quantize_base="fp4")


@pytest.mark.parametrize("name", ["targets", "trainable"])
def test_invalid_regexes_name_the_argument(name):
  params = memory.llama_params(memory.CONFIGS["llama-60m"])
  with pytest.raises(ValueError, match=f"`{name}` is not a valid regex: '\\('"):
    memory.plan(params, ["lora"], rank=8, **{name: "("})


# ---------------------------------------------------------------------------
# The layerwise step.

DEEP = memory.LlamaConfig(128, 256, 4, 8, vocab=64, rank=16)


def test_layerwise_plan_holds_the_outer_and_one_layer_of_gradients():
  methods = memory.LAYERWISE_METHODS
  fused = memory.plan_llama(DEEP, methods, batch=2, seq=16, layerwise=True)
  plain = memory.plan_llama(DEEP, methods, batch=2, seq=16, remat=True)
  d, f, v = DEEP.hidden, DEEP.intermediate, DEEP.vocab
  outer = 4 * (2 * v * d + d)
  layer = 4 * (4 * d * d + 3 * d * f + 2 * d)
  n = 4 * DEEP.num_params
  for m in methods:
    assert fused[m].gradients == outer + layer, m
    assert plain[m].gradients == n, m
    # The stacked layers' compiled step stays under the plain one's.
    assert fused[m].compiled < plain[m].compiled, m
  for m in ("adamw", "galore"):  # elementwise / per-matrix: the same state
    assert fused[m].weights == plain[m].weights
    extra = fused[m].optimizer_state - plain[m].optimizer_state
    assert 0 < extra <= 16 * (DEEP.layers + 2)  # int32 counts per layer
    assert fused[m].closed_form == plain[m].closed_form - n + outer + layer
  assert fused["q_galore"].closed_form == plain["q_galore"].closed_form


def test_layerwise_train_step_equals_the_plain_step():
  params = jax.tree.map(
      lambda s: 0.02 * jax.random.normal(jax.random.key(0), s.shape, s.dtype),
      memory.llama_params(DEEP))
  tokens = jnp.arange(2 * 17).reshape(2, 17) % DEEP.vocab
  runs = {}
  for fused in (False, True):
    step, carry = memory.llama_train_step(
        "galore", DEEP, jax.tree.map(jnp.copy, params), rank=16, remat=True,
        layerwise=fused)
    step = jax.jit(step, donate_argnums=(0,))
    losses = []
    for _ in range(3):
      carry, loss = step(carry, tokens)
      losses.append(float(loss))
    runs[fused] = losses
  assert runs[True][-1] < runs[True][0]  # it trains
  np.testing.assert_allclose(runs[True], runs[False], rtol=1e-5)


def test_layerwise_cli(capsys):
  assert memory.main(["--model", "llama-60m", "--layerwise", "--methods",
                      "adamw,q_galore"]) == 0
  out = capsys.readouterr().out
  assert "layerwise step" in out and "| q_galore |" in out
  with pytest.raises(SystemExit):
    memory.main(["--model", "llama-60m", "--layerwise", "--methods", "lora"])
  assert "lora train on the plain step" in capsys.readouterr().err
