"""LoRA / QLoRA / LowRankLinear for Flax NNX: formula, freezing, merge, memory."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from galore_jax import lora
from galore_jax import quantization


class Block(nnx.Module):
  """A transformer-shaped toy: embedding, attention and MLP linears, head."""

  def __init__(self, rngs, d=32, hidden=48, vocab=20):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.attn = nnx.Dict(q_proj=nnx.Linear(d, d, rngs=rngs),
                         o_proj=nnx.Linear(d, d, rngs=rngs))
    self.mlp = nnx.Dict(up=nnx.Linear(d, hidden, rngs=rngs),
                        down=nnx.Linear(hidden, d, rngs=rngs))
    self.norm = nnx.RMSNorm(d, rngs=rngs)
    self.lm_head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    x = x + self.attn["o_proj"](jnp.tanh(self.attn["q_proj"](x)))
    x = x + self.mlp["down"](jax.nn.relu(self.mlp["up"](self.norm(x))))
    return self.lm_head(x)


def block():
  return Block(nnx.Rngs(0))


TOKENS = jnp.arange(24).reshape(4, 6) % 20


def loss_fn(model):
  logits = model(TOKENS)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, (TOKENS + 1) % 20).mean()


def randomize_b(model, seed=1):
  """Non-zero B so the adapter path contributes."""
  for i, (_, layer) in enumerate(nnx.iter_graph(model)):
    if isinstance(layer, lora.LoRALinear):
      layer.lora_b[...] = 0.1 * jax.random.normal(
          jax.random.key(seed + i), layer.lora_b.shape)


def test_starts_at_the_base_model_and_freezes_everything_else():
  base = block()
  model = lora.apply(nnx.clone(base), rank=4, rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(model(TOKENS), base(TOKENS))  # B = 0
  for name in ("q_proj", "o_proj"):
    layer = model.attn[name]
    assert isinstance(layer, lora.LoRALinear)
    assert isinstance(layer.kernel, lora.Frozen)
    assert isinstance(layer.lora_a, nnx.LoRAParam)
    assert layer.lora_a.shape == (32, 4) and layer.lora_b.shape == (4, 32)
    np.testing.assert_array_equal(layer.lora_b[...], 0.0)
    assert float(jnp.std(layer.lora_a[...])) > 0
  assert isinstance(model.lm_head, lora.LoRALinear)  # ALL_LINEAR
  assert isinstance(model.embed.embedding, lora.Frozen)
  assert isinstance(model.norm.scale, lora.Frozen)
  trainable = nnx.state(model, nnx.Param)
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
  assert paths == {f"{m}/{n}/lora_{ab}" for m, n in [
      ("attn", "q_proj"), ("attn", "o_proj"), ("mlp", "up"),
      ("mlp", "down")] for ab in "ab"} | {"lm_head/lora_a", "lm_head/lora_b"}


def test_output_formula_with_alpha_and_bias():
  base = block()
  model = lora.apply(nnx.clone(base), rank=4, alpha=12.0, targets=lora.MLP,
                     rngs=nnx.Rngs(1))
  assert isinstance(model.attn["q_proj"], nnx.Linear)  # not a target
  randomize_b(model)
  layer, ref = model.mlp["up"], base.mlp["up"]
  x = jax.random.normal(jax.random.key(3), (5, 32))
  hi = jax.lax.Precision.HIGHEST
  want = (jnp.dot(x, ref.kernel[...], precision=hi) + ref.bias[...]
          + 3.0 * jnp.dot(jnp.dot(x, layer.lora_a[...], precision=hi),
                          layer.lora_b[...], precision=hi))
  np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)


def test_presets_and_trainable():
  model = lora.apply(block(), rank=2, targets=lora.ATTENTION,
                     trainable=r"embed|lm_head", rngs=nnx.Rngs(1))
  assert isinstance(model.attn["q_proj"], lora.LoRALinear)
  assert isinstance(model.mlp["up"], nnx.Linear)
  assert isinstance(model.mlp["up"].kernel, lora.Frozen)
  assert type(model.embed.embedding) is nnx.Param
  assert isinstance(model.lm_head, nnx.Linear)
  assert type(model.lm_head.kernel) is nnx.Param
  grads = nnx.grad(loss_fn)(model)
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)}
  assert paths == {"embed/embedding", "lm_head/kernel",
                   "attn/q_proj/lora_a", "attn/q_proj/lora_b",
                   "attn/o_proj/lora_a", "attn/o_proj/lora_b"}


def train(model, steps=5):
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(steps)]
  return opt, losses


@pytest.mark.parametrize("quantize_base", [None, "nf4", "int8"])
def test_train_then_merge_gives_the_same_outputs(quantize_base):
  base = block()
  frozen_before = jax.tree.map(jnp.copy, nnx.state(base))
  model = lora.apply(nnx.clone(base), rank=4, alpha=8.0,
                     quantize_base=quantize_base, rngs=nnx.Rngs(1))
  _, losses = train(model)
  assert losses[-1] < losses[0]
  out = model(TOKENS)
  merged = lora.merge(model)
  assert isinstance(merged.attn["q_proj"], nnx.Linear)
  assert not any(isinstance(v, (lora.Frozen, nnx.LoRAParam))
                 for _, v in nnx.iter_graph(merged))
  np.testing.assert_allclose(merged(TOKENS), out, rtol=1e-4, atol=1e-4)
  # Same structure as before apply; the frozen params never moved.
  assert (jax.tree.structure(nnx.state(merged))
          == jax.tree.structure(frozen_before))
  np.testing.assert_array_equal(merged.embed.embedding[...],
                                frozen_before["embed"]["embedding"][...])
  np.testing.assert_array_equal(merged.norm.scale[...],
                                frozen_before["norm"]["scale"][...])


def test_merge_is_exact_for_a_known_update():
  model = lora.apply(block(), rank=4, alpha=8.0, rngs=nnx.Rngs(1))
  randomize_b(model)
  layer = model.mlp["down"]
  want = layer.kernel.get_value() + 2.0 * np.asarray(
      layer.lora_a[...], np.float64) @ np.asarray(layer.lora_b[...], np.float64)
  merged = lora.merge(model)
  np.testing.assert_allclose(merged.mlp["down"].kernel[...], want, rtol=1e-6,
                             atol=1e-7)


@pytest.mark.parametrize("code,bits_per_weight", [("nf4", 4), ("int8", 8)])
def test_qlora_base_is_quantized(code, bits_per_weight):
  base = block()
  model = lora.apply(nnx.clone(base), rank=4, quantize_base=code,
                     rngs=nnx.Rngs(1))
  w = model.mlp["up"].kernel.get_value()
  assert isinstance(w, quantization.AbsmaxQuantizedArray)
  ref = base.mlp["up"].kernel[...]
  assert w.code == code and w.shape == ref.shape and w.dtype == ref.dtype
  assert w.codes.dtype == jnp.uint8
  assert w.codes.size == ref.size * bits_per_weight // 8
  assert w.absmax.shape == (ref.size // 64,)
  # Within half the widest code gap times the absmax of each block.
  blocks = np.abs(np.asarray(ref).reshape(-1, 64)).max(1, keepdims=True)
  gap = 0.5 * np.diff(quantization.nf4_code_map()).max() if code == "nf4" \
      else 0.5 / 127
  err = np.abs(np.asarray(w.dequantize()) - np.asarray(ref)).reshape(-1, 64)
  assert np.all(err <= gap * blocks + 1e-6)
  # Forward at B = 0 is the dequantized base model's.
  layer = model.mlp["up"]
  x = jax.random.normal(jax.random.key(0), (3, 32))
  np.testing.assert_allclose(layer(x), x @ w.dequantize() + layer.bias[...],
                             rtol=1e-5, atol=1e-5)


def test_nf4_code_map_is_the_normal_float_construction():
  from scipy.stats import norm
  offset = 0.9677083  # bitsandbytes create_normal_map
  pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
  neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
  values = np.sort(np.concatenate([pos, [0.0], neg]))
  np.testing.assert_allclose(quantization.nf4_code_map(), values / values.max(),
                             atol=2e-7)


def test_quantize_absmax_picks_the_nearest_code_and_packs_two_per_byte():
  table = quantization.nf4_code_map()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)), jnp.float32)
  q = quantization.quantize_absmax(x, "nf4", block_size=64)  # ragged tail
  assert q.codes.shape == (128,) and q.absmax.shape == (4,)  # padded block
  flat = np.pad(np.asarray(x).ravel(), (0, 56)).reshape(4, 64)
  absmax = np.abs(flat).max(1, keepdims=True)
  want_idx = np.abs(flat[..., None] / absmax[..., None] - table).argmin(-1)
  idx = quantization.unpack(q.codes, 4, 256).reshape(4, 64)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(q.dequantize(), (table[want_idx] * absmax)
                             .ravel()[:200].reshape(4, 50), rtol=1e-6)
  assert q.nbytes == 128 + 16
  np.testing.assert_array_equal(
      jax.jit(lambda q: q.dequantize())(q), q.dequantize())


def test_stacked_kernels_are_quantized_per_layer():
  w = jax.random.normal(jax.random.key(0), (3, 16, 8))
  layer = lora.LoRALinear(w, jnp.zeros((3, 8)), rank=2, alpha=2.0,
                          quantize_base="nf4", rngs=nnx.Rngs(0))
  assert layer.lora_a.shape == (3, 16, 2) and layer.lora_b.shape == (3, 2, 8)
  q = layer.kernel.get_value()
  assert q.shape == (16, 8) and q.codes.shape == (3, 64)
  for i in range(3):
    qi = jax.tree.map(lambda a: a[i], q)
    np.testing.assert_array_equal(
        qi.dequantize(), quantization.quantize_absmax(w[i], "nf4").dequantize())
  # The stacked codes dequantize whole, slice by slice, and merge so.
  whole = np.asarray(layer.base_kernel())
  assert whole.shape == (3, 16, 8)
  for i in range(3):
    np.testing.assert_array_equal(
        whole[i], quantization.quantize_absmax(w[i], "nf4").dequantize())
  x = jax.random.normal(jax.random.key(1), (3, 5, 16))
  layer.lora_b[...] = jax.random.normal(jax.random.key(2), (3, 2, 8))
  want = jax.vmap(lambda k, a, b, xi: xi @ k + xi @ a @ b)(
      whole, layer.lora_a[...], layer.lora_b[...], x)
  merged = lora.merge(nnx.Dict(l=layer))["l"]
  np.testing.assert_allclose(
      jax.vmap(lambda k, xi: xi @ k)(merged.kernel[...], x), want, atol=1e-5)


def test_no_gradient_of_the_base_weight_is_materialized():
  """XLA memory analysis of the jitted step: LoRA's temporaries stay below
  one base kernel; full fine-tuning needs at least its gradient."""
  d = 512
  make = lambda: nnx.Sequential(nnx.Linear(d, d, rngs=nnx.Rngs(0)))
  x = jnp.ones((2, d))
  loss = lambda m: jnp.sum(m(x) ** 2)
  kernel_bytes = d * d * 4

  def temp_bytes(model):
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))

    def step(state):
      model, opt = nnx.merge(graphdef, state)
      grads = nnx.grad(loss)(model)
      opt.update(model, grads)
      return nnx.state((model, opt))

    compiled = jax.jit(step, donate_argnums=0).lower(state).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  full = temp_bytes(make())
  adapted = temp_bytes(lora.apply(make(), rank=8, rngs=nnx.Rngs(1)))
  assert full >= kernel_bytes
  assert adapted < kernel_bytes / 4, (adapted, kernel_bytes)


def test_orbax_round_trip_of_a_qlora_model(tmp_path):
  import orbax.checkpoint as ocp
  model = lora.apply(block(), rank=4, quantize_base="nf4", rngs=nnx.Rngs(1))
  randomize_b(model)
  state = nnx.state(model)
  with ocp.CheckpointManager(tmp_path) as mngr:
    mngr.save(0, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = mngr.restore(0, args=ocp.args.StandardRestore(abstract))
  fresh = lora.apply(block(), rank=4, quantize_base="nf4", rngs=nnx.Rngs(7))
  nnx.update(fresh, restored)
  np.testing.assert_array_equal(fresh(TOKENS), model(TOKENS))


def test_dropout_only_in_train_mode():
  model = lora.apply(block(), rank=4, dropout=0.5, rngs=nnx.Rngs(1))
  randomize_b(model)
  layer = model.mlp["up"]
  x = jax.random.normal(jax.random.key(0), (3, 32))
  assert not np.allclose(layer(x), layer(x))  # fresh masks
  model.eval()
  want = (x @ layer.kernel.get_value() + layer.bias.get_value()
          + (x @ layer.lora_a[...]) @ layer.lora_b[...])
  np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["lora", "default"])
def test_low_rank_linear_starts_at_a_full_layers_variance(init):
  d_in, d_out, rank = 512, 384, 16
  layer = lora.LowRankLinear(d_in, d_out, rank, init=init, rngs=nnx.Rngs(0))
  assert layer.a.shape == (d_in, rank) and layer.b.shape == (rank, d_out)
  w = layer.a[...] @ layer.b[...]
  np.testing.assert_allclose(float(jnp.var(w)), 1.0 / d_in, rtol=0.1)
  full = nnx.Linear(d_in, d_out, rngs=nnx.Rngs(0)).kernel[...]
  np.testing.assert_allclose(float(jnp.var(full)), 1.0 / d_in, rtol=0.1)
  x = jax.random.normal(jax.random.key(1), (4, d_in))
  np.testing.assert_allclose(layer(x), (x @ layer.a[...]) @ layer.b[...],
                             rtol=1e-5, atol=1e-5)
  ratio = float(jnp.std(layer.a[...]) / jnp.std(layer.b[...]))
  want = 1.0 if init == "lora" else (rank / d_in) ** 0.5
  np.testing.assert_allclose(ratio, want, rtol=0.1)


# ---------------------------------------------------------------------------
# Bad input.


def test_targets_matching_nothing_lists_the_paths():
  with pytest.raises(ValueError, match=re.escape(
      "matches no nnx.Linear")) as e:
    lora.apply(block(), rank=2, targets="decoder", rngs=nnx.Rngs(0))
  for path in ("'attn/q_proj'", "'mlp/down'", "'lm_head'"):
    assert path in str(e.value)


def test_rank_too_large_names_the_layer():
  with pytest.raises(ValueError, match="larger than layer 'lm_head' allows"):
    lora.apply(block(), rank=21, rngs=nnx.Rngs(0))  # lm_head: 32 -> 20
  with pytest.raises(ValueError, match="larger than the layer allows"):
    lora.LowRankLinear(784, 10, 16, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(quantize_base="fp4"), ValueError, "`quantize_base` must be one of"),
    (dict(rank=0), ValueError, "`rank` must be a positive int"),
    (dict(rank=2.0), ValueError, "`rank` must be a positive int"),
    (dict(alpha=-1.0), ValueError, "`alpha` must be positive"),
    (dict(alpha="8"), TypeError, "`alpha` must be a real number"),
    (dict(dropout=1.0), ValueError, r"`dropout` must be in \[0, 1\)"),
    (dict(targets="("), ValueError, "`targets` is not a valid regex"),
    (dict(targets=3), TypeError, "`targets` must be a regex string"),
    (dict(rngs=None), TypeError, "lora.apply needs `rngs`"),
])
def test_bad_settings(kwargs, err, match):
  args = dict(rank=2, rngs=nnx.Rngs(0)) | kwargs
  with pytest.raises(err, match=match):
    lora.apply(block(), **args)


def test_bad_low_rank_init_and_absmax_code():
  with pytest.raises(ValueError, match="`init` must be one of"):
    lora.LowRankLinear(8, 8, 2, init="kaiming", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="`code` must be one of"):
    quantization.quantize_absmax(jnp.ones(8), "nf3")
  with pytest.raises(TypeError, match="needs a float array"):
    quantization.quantize_absmax(jnp.ones(8, jnp.int32))
