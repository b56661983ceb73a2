"""The LLaMA example: model math, HF parity, data, training, resume, CLI."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from examples.llama import checkpointing
from examples.llama import configs
from examples.llama import input_pipeline as data_lib
from examples.llama import hf
from examples.llama import models as model_lib
from examples.llama import main as main_lib
from examples.llama import methods as methods_lib
from examples.llama import train as train_lib
import galore_jax
from galore_jax import memory

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = model_lib.CONFIGS["llama-tiny"]


def _tiny(**kw):
  cfg = model_lib.Config(**{**TINY.__dict__, **kw.pop("cfg", {})})
  return model_lib.Llama(cfg, rngs=nnx.Rngs(0), **kw)


# ---------------------------------------------------------------------------
# Model.


@pytest.mark.parametrize("scan_layers", [False, True])
def test_causal_mask(scan_layers):
  model = _tiny(scan_layers=scan_layers, cfg=dict(kv_heads=2))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, TINY.vocab)
  logits = model(tokens)
  for j in (3, 7, 11):
    changed = tokens.at[:, j].set((tokens[:, j] + 1) % TINY.vocab)
    new = model(changed)
    np.testing.assert_array_equal(new[:, :j], logits[:, :j])
    assert not np.allclose(new[:, j], logits[:, j])  # the token itself counts


def test_rope_matches_direct_formula():
  s_len, heads, e, theta = 9, 3, 8, 500.0
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, s_len, heads, e)))
  cos, sin = model_lib.rope_tables(s_len, e, theta)
  got = np.asarray(model_lib.apply_rope(jnp.asarray(x), cos, sin))
  # Direct: the pair (x_j, x_{j+E/2}) as a complex number turns by s w_j,
  # w_j = theta^(-2j/E).
  half = e // 2
  w = theta ** (-2.0 * np.arange(half) / e)
  z = x[..., :half] + 1j * x[..., half:]
  rot = z * np.exp(1j * np.arange(s_len)[None, :, None, None] * w)
  want = np.concatenate([rot.real, rot.imag], axis=-1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  e = 16
  q, k = jax.random.normal(jax.random.key(2), (2, 1, 1, 1, e))
  cos, sin = model_lib.rope_tables(32, e)
  rq = lambda v, s: model_lib.apply_rope(v, cos[s:s + 1], sin[s:s + 1])
  score = lambda s1, s2: float(jnp.sum(rq(q, s1) * rq(k, s2)))
  np.testing.assert_allclose(score(5, 2), score(20, 17), rtol=1e-5)
  np.testing.assert_allclose(score(0, 0), float(jnp.sum(q * k)), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(model_lib.CONFIGS))
def test_param_counts(name):
  cfg = model_lib.CONFIGS[name]
  model = nnx.eval_shape(lambda: model_lib.Llama(cfg, rngs=nnx.Rngs(0)))
  n = model_lib.count_params(model)
  assert n == cfg.num_params
  if name in memory.CONFIGS:  # the planner's functional LLaMA agrees
    assert n == memory.CONFIGS[name].num_params
  if name in model_lib.NOMINAL_SIZES:
    # The paper's "1B" config (2048/5461/24 layers, vocab 32000) holds 1.34B
    # params counted in full; every other config is within 15% of its name.
    tol = 0.35 if name == "llama-1b" else 0.15
    assert abs(n / model_lib.NOMINAL_SIZES[name] - 1) < tol, n


def test_gqa_and_tied_embeddings_shapes():
  model = _tiny(cfg=dict(kv_heads=1, tie_embeddings=True))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert "lm_head" not in params
  attn = params["layers"][0]["attn"]
  assert attn["k"]["kernel"].shape == (64, 16)  # one kv head of dim 16
  assert attn["q"]["kernel"].shape == (64, 64)
  assert model_lib.count_params(model) == model.cfg.num_params
  assert model(jnp.zeros((1, 5), jnp.int32)).shape == (1, 5, TINY.vocab)


def test_scan_layers_equals_layer_list():
  plain, scanned = _tiny(), _tiny(scan_layers=True, remat=True)
  p = nnx.to_pure_dict(nnx.state(plain, nnx.Param))
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[
      p["layers"][i] for i in range(TINY.layers)])
  state = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(state, {**p, "layers": stacked})
  nnx.update(scanned, state)
  assert scanned.layers.attn.q.kernel.shape == (2, 64, 64)
  tokens = jax.random.randint(jax.random.key(3), (2, 10), 0, TINY.vocab)
  np.testing.assert_allclose(scanned(tokens), plain(tokens), atol=2e-5)
  g1 = nnx.grad(model_lib.loss_fn)(plain, tokens)
  g2 = nnx.grad(model_lib.loss_fn)(scanned, tokens)
  np.testing.assert_allclose(g2["layers"]["mlp"]["down"]["kernel"][1],
                             g1["layers"][1]["mlp"]["down"]["kernel"],
                             atol=1e-5)


def test_config_errors():
  with pytest.raises(ValueError, match="`heads` 4 is not divisible by"):
    model_lib.Config(64, 128, 4, 2, kv_heads=3)
  with pytest.raises(ValueError, match="`hidden` 60 is not divisible"):
    model_lib.Config(60, 128, 8, 2)
  with pytest.raises(ValueError, match="`layers` must be a positive int"):
    model_lib.Config(64, 128, 4, 0)


# ---------------------------------------------------------------------------
# Hugging Face checkpoints.


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  out = {}
  for tie in (False, True):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=176,
        num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        rms_norm_eps=1e-5, rope_theta=5000.0, tie_word_embeddings=tie,
        max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger than HF's 0.02 init: logits of size ~10
      for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(f"hf_tie{tie}")
    model.save_pretrained(path)
    tokens = np.random.default_rng(0).integers(0, 101, (2, 16))
    with torch.no_grad():
      logits = model(torch.tensor(tokens)).logits.numpy()
    out[tie] = (path, tokens, logits)
  return out


@pytest.mark.parametrize("tie,scan_layers", [(False, False), (True, True),
                                             (False, True)])
def test_hf_checkpoint_logits_match_transformers(hf_models, tie,
                                                 scan_layers):
  path, tokens, want = hf_models[tie]
  cfg = hf.read_config(path)
  assert (cfg.num_kv_heads, cfg.tie_embeddings, cfg.rope_theta,
          cfg.norm_eps) == (2, tie, 5000.0, 1e-5)
  model = model_lib.Llama(cfg, scan_layers=scan_layers, rngs=nnx.Rngs(7))
  hf.load_into(model, path)
  got = np.asarray(model(jnp.asarray(tokens)))
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_init_from_trains_the_checkpoint(hf_models, tmp_path):
  path, _, _ = hf_models[False]
  tokens = np.random.default_rng(1).integers(0, 101, 5000)
  np.save(tmp_path / "ids.npy", tokens)
  args = ["--init-from", str(path), "--data", str(tmp_path / "ids.npy"),
          "--method", "galore", "--rank", "8", "--steps", "2",
          "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
          "--out", str(tmp_path / "out"), "--no-progress"]
  assert main_lib.main(args) == 0
  result = json.loads((tmp_path / "out/galore/result.json").read_text())
  assert result["params"] == hf.read_config(path).num_params


def test_hf_errors(hf_models, tmp_path):
  path, _, _ = hf_models[False]
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf.read_config(tmp_path)
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    hf.read_weights(tmp_path)
  cfg = hf.read_config(path)
  wrong = model_lib.Llama(model_lib.Config(**{**cfg.__dict__, "hidden": 32}),
                          rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="has shape"):
    hf.load_into(wrong, path)
  tied = model_lib.Llama(model_lib.Config(**{**cfg.__dict__,
                                             "tie_embeddings": True}),
                         rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="not used by this model"):
    hf.load_into(tied, path)  # lm_head.weight would be silently dropped
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ValueError, match="not a LLaMA"):
    hf.read_config(tmp_path)


def _perturbed(model, scale=0.1, seed=3):
  """``model`` with every param moved by ``scale`` normal noise, so that
  logits are large and a wrong mapping cannot hide (in place)."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [
      x + scale * jax.random.normal(k, x.shape, x.dtype)
      for x, k in zip(leaves, keys)]))
  return model


@pytest.mark.parametrize("tie,scan_layers", [(False, False), (True, True),
                                             (False, True)])
def test_save_hf_loads_in_transformers_and_back(tmp_path, tie, scan_layers):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = _perturbed(_tiny(cfg=dict(vocab=101, kv_heads=2, rope_theta=5000.0,
                                    norm_eps=1e-5, tie_embeddings=tie),
                           scan_layers=scan_layers))
  tokens = np.random.default_rng(0).integers(0, 101, (2, 16))
  want = np.asarray(model(jnp.asarray(tokens)))
  hf.save(model, tmp_path / "hf")
  assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
      "config.json", "model.safetensors"]  # no temporary files left
  theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
  with torch.no_grad():
    got = theirs.eval()(torch.tensor(tokens)).logits.numpy()
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # --init-from reads it back to the same params, into either layout.
  cfg = hf.read_config(tmp_path / "hf")
  assert cfg == dataclasses.replace(model.cfg, rank=cfg.rank, lr=cfg.lr)
  for scan in (False, True):
    again = model_lib.Llama(cfg, scan_layers=scan, rngs=nnx.Rngs(9))
    hf.load_into(again, tmp_path / "hf")
    got = np.asarray(again(jnp.asarray(tokens)))
    if scan == scan_layers:  # the same params, the same program
      np.testing.assert_array_equal(got, want)
    else:
      np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_save_hf_keeps_bf16_and_refuses_to_overwrite(tmp_path):
  model = _tiny(param_dtype=jnp.bfloat16)
  hf.save(model, tmp_path)
  header = hf.read_safetensors(tmp_path / "model.safetensors")
  assert {x.dtype for x in header.values()} == {np.dtype(jnp.bfloat16)}
  assert json.loads((tmp_path / "config.json").read_text())[
      "torch_dtype"] == "bfloat16"
  before = (tmp_path / "model.safetensors").read_bytes()
  with pytest.raises(FileExistsError, match="already holds a checkpoint"):
    hf.save(_tiny(), tmp_path)
  assert (tmp_path / "model.safetensors").read_bytes() == before
  (tmp_path / "file").write_text("x")
  with pytest.raises(FileExistsError, match="is a file"):
    hf.save(model, tmp_path / "file")


@pytest.mark.parametrize("quantize_base", [None, "nf4"])
def test_save_hf_merges_lora(tmp_path, quantize_base):
  model = _perturbed(_tiny(scan_layers=True))
  galore_jax.lora.apply(model, 4, targets=methods_lib.LORA_TARGETS["all"],
                        quantize_base=quantize_base, rngs=nnx.Rngs(1))
  _perturbed(model)  # B != 0: the adapters change the logits
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab,
                                                         (2, 16)))
  want = np.asarray(model(tokens))
  hf.save(model, tmp_path)
  assert type(model.layers.attn.q).__name__ == "LoRALinear"  # not merged
  plain = model_lib.Llama(hf.read_config(tmp_path), scan_layers=True,
                          rngs=nnx.Rngs(0))
  hf.load_into(plain, tmp_path)
  np.testing.assert_allclose(np.asarray(plain(tokens)), want, atol=1e-4,
                             rtol=0)


# ---------------------------------------------------------------------------
# Data.


def test_stdlib_corpus_is_deterministic_and_split_by_file(capsys):
  a = data_lib.load()
  assert "files" in capsys.readouterr().out
  b = data_lib.load(verbose=False)
  np.testing.assert_array_equal(a.val, b.val)
  assert a.vocab_size == 259 and len(a.train) > 10 * len(a.val) > 0
  assert a.train.max() <= data_lib.ByteTokenizer.eos
  x = data_lib.batch(a.train, 5, 3, 16, seed=0)
  np.testing.assert_array_equal(x, data_lib.batch(a.train, 5, 3, 16, 0))
  assert x.shape == (3, 17)
  assert not np.array_equal(x, data_lib.batch(a.train, 6, 3, 16, 0))
  v = data_lib.eval_batches(a.val, 2, 3, 16)
  assert v.shape == (2, 3, 17)


def test_data_paths(tmp_path):
  (tmp_path / "a.txt").write_text("hello world\n" * 200)
  (tmp_path / "d").mkdir()
  for i in range(30):
    (tmp_path / "d" / f"f{i}.txt").write_text(f"file {i} " * 50)
  one = data_lib.load(str(tmp_path / "a.txt"), verbose=False)
  assert one.vocab_size == 259
  assert len(one.train) + len(one.val) == 12 * 200 + 1  # + EOS
  many = data_lib.load(str(tmp_path / "d"), verbose=False)
  assert "30 files" in many.description
  ids = np.arange(3000) % 1000
  np.save(tmp_path / "ids.npy", ids)
  ids.astype(np.uint16).tofile(tmp_path / "ids.bin")
  for name in ("ids.npy", "ids.bin"):
    c = data_lib.load(str(tmp_path / name), verbose=False)
    assert c.vocab_size == 1000
    np.testing.assert_array_equal(np.concatenate([c.train, c.val]), ids)


def test_hf_tokenizer(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "t.txt").write_text("hello world " * 100)
  c = data_lib.load(str(tmp_path / "t.txt"), str(tmp_path), verbose=False)
  assert c.vocab_size == 4
  assert set(np.concatenate([c.train, c.val])) == {1, 2, 3}


def test_data_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data_lib.load(str(tmp_path / "nope.txt"))
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match="holds no tokens"):
    data_lib.load(str(tmp_path / "empty.txt"), verbose=False)
  (tmp_path / "e").mkdir()
  with pytest.raises(ValueError, match="no files under"):
    data_lib.load(str(tmp_path / "e"), verbose=False)
  np.save(tmp_path / "f.npy", np.ones((3, 3)))
  with pytest.raises(ValueError, match="1-D integer array"):
    data_lib.load(str(tmp_path / "f.npy"), verbose=False)
  with pytest.raises(FileNotFoundError, match="no tokenizer file"):
    data_lib.load(None, str(tmp_path / "missing.json"))
  with pytest.raises(ValueError, match="fewer than --seq-len"):
    data_lib.batch(np.arange(10), 0, 2, 16, 0)


# ---------------------------------------------------------------------------
# Training.


def _args(out, method, *extra, steps=6):
  return ["--model", "llama-tiny", "--method", method, "--steps", str(steps),
          "--batch-size", "4", "--seq-len", "32", "--eval-every", "3",
          "--eval-batches", "2", "--save-every", "3", "--update-proj-gap",
          "2", "--out", str(out), "--no-progress", *extra]


def _metrics(out, method):
  lines = (pathlib.Path(out) / method / "metrics.jsonl").read_text()
  return [json.loads(x) for x in lines.splitlines()]


def _restore(out, method, step=None):
  mngr = checkpointing.manager(pathlib.Path(out) / method / "ckpt")
  return mngr.restore(mngr.latest_step() if step is None else step)


@pytest.mark.parametrize("method", methods_lib.NAMES)
def test_each_method_decreases_the_loss(tmp_path, method):
  assert main_lib.main(_args(tmp_path, method, "--lr", "0.01", "--warmup",
                              "0", steps=8)) == 0
  losses = [r["loss"] for r in _metrics(tmp_path, method) if "loss" in r]
  assert len(losses) == 8
  assert np.mean(losses[-2:]) < losses[0] - 0.3, losses
  result = json.loads((tmp_path / method / "result.json").read_text())
  assert result["final_val_loss"] < np.log(TINY.vocab)
  assert result["xla_memory"]["total"] > 0 and result["tokens_per_s"] > 0
  assert result["params"] == TINY.num_params


@pytest.mark.parametrize("targets,adapted", [
    ("all", {"q", "k", "v", "o", "gate", "up", "down"}),
    ("attention", {"q", "k", "v", "o"}), ("mlp", {"gate", "up", "down"})])
def test_lora_targets_presets(targets, adapted):
  config = configs.Config(model="llama-tiny", method="lora",
                          lora_targets=targets, rank=4)
  model = _tiny()
  m = methods_lib.build("lora", model, config)
  got = {p[-1] for p, node in nnx.iter_graph(model)
         if isinstance(node, galore_jax.lora.LoRALinear)}
  assert got == adapted
  trained = {memory.path_str(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(m.train)[0]}
  assert {p.split("/")[-2] for p in trained if "lora_" in p} == adapted


@pytest.mark.parametrize("method,trained", [
    ("head", {"lm_head/kernel"}),
    ("adapters", {"embed/embedding", "lm_head/kernel"})])
def test_partial_fine_tuning_trains_only_its_params(tmp_path, method,
                                                    trained):
  out = tmp_path / "out"
  assert main_lib.main(_args(out, method, "--lr", "0.01", "--save-hf",
                             str(tmp_path / "hf"), steps=3)) == 0
  m = methods_lib.build(method, _tiny(), configs.Config(
      model="llama-tiny", method=method))
  assert {memory.path_str(p) for p, _ in
          jax.tree_util.tree_flatten_with_path(m.train)[0]} == trained
  # Everything else leaves the run as it came in (same seed, same init).
  start = nnx.to_pure_dict(nnx.state(train_lib.build_model(
      configs.Config(model="llama-tiny"), TINY.vocab), nnx.Param))
  end = model_lib.Llama(hf.read_config(tmp_path / "hf"), rngs=nnx.Rngs(5))
  hf.load_into(end, tmp_path / "hf")
  end = nnx.to_pure_dict(nnx.state(end, nnx.Param))
  for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(start)[0],
                               jax.tree_util.tree_flatten_with_path(end)[0]):
    same = np.array_equal(np.asarray(a), np.asarray(b))
    assert same != (memory.path_str(path) in trained), memory.path_str(path)


def test_head_needs_an_untied_head():
  model = _tiny(cfg=dict(tie_embeddings=True))
  with pytest.raises(ValueError, match="ties its head to the input"):
    methods_lib.build("head", model, configs.Config(method="head"))


def test_save_hf_after_training_and_fine_tune_from_it(tmp_path, capsys):
  """A q_galore run exports dequantized weights; --init-from fine-tunes
  them with qlora; --save-hf never overwrites, and refuses before
  training."""
  hf_dir = tmp_path / "hf"
  assert main_lib.main(_args(tmp_path / "a", "q_galore", "--save-hf",
                             str(hf_dir), steps=2)) == 0
  assert "wrote a Hugging Face checkpoint" in capsys.readouterr().out
  assert hf.read_config(hf_dir).num_params == TINY.num_params
  assert main_lib.main(_args(tmp_path / "b", "qlora", "--init-from",
                             str(hf_dir), "--lora-targets", "attention",
                             "--save-hf", str(tmp_path / "hf2"),
                             steps=2)) == 0
  before = (hf_dir / "model.safetensors").read_bytes()
  assert main_lib.main(_args(tmp_path / "c", "adamw", "--save-hf",
                             str(hf_dir), steps=2)) == 2
  assert "already holds a checkpoint" in capsys.readouterr().err
  assert not (tmp_path / "c").exists() or not list(
      (tmp_path / "c").rglob("metrics.jsonl"))  # refused before training
  assert (hf_dir / "model.safetensors").read_bytes() == before
  # --compare writes DIR/<method>.
  assert main_lib.main(_args(tmp_path / "d", "adamw", "--compare",
                             "head,adapters", "--save-hf",
                             str(tmp_path / "hf3"), steps=1)) == 0
  assert sorted(p.name for p in (tmp_path / "hf3").iterdir()) == [
      "adapters", "head"]


def test_galore_projects_only_attention_and_mlp_kernels(tmp_path):
  args = main_lib.config_from_flags(_args(tmp_path, "galore"))
  model = train_lib.build_model(args, TINY.vocab)
  m = methods_lib.build("galore", model, args)
  mask = methods_lib.target_mask(m.train)
  projected = {memory.path_str(p) for p, v in
               jax.tree_util.tree_leaves_with_path(mask) if v}
  assert len(projected) == 7 * TINY.layers
  assert all("/attn/" in k or "/mlp/" in k for k in projected)
  opt_state = m.tx.init(m.train)
  proj = opt_state[0].projector  # scale_by_galore's state
  q = jax.tree.leaves(proj["layers"][0]["attn"]["q"]["kernel"])
  assert [sorted(x.shape) for x in q] == [[16, 64]]  # one side, rank 16
  down = jax.tree.leaves(proj["layers"][1]["mlp"]["down"]["kernel"])
  assert [sorted(x.shape) for x in down] == [[16, 64]]  # the smaller side
  assert jax.tree.leaves(proj["embed"]) == []  # not projected
  assert jax.tree.leaves(proj["lm_head"]) == []


def _interrupting_batch(monkeypatch, at_call, sig=True):
  """Sends SIGINT (or raises NaN-making tokens) at the ``at_call``-th batch."""
  original = data_lib.batch
  calls = {"n": 0}

  def batch(*a, **k):
    calls["n"] += 1
    x = original(*a, **k)
    if calls["n"] == at_call:
      if sig:
        os.kill(os.getpid(), signal.SIGINT)
      else:
        x = x.copy()
        x[0, 0] = -1  # marks the batch whose loss becomes NaN
    return x

  monkeypatch.setattr(data_lib, "batch", batch)


@pytest.mark.parametrize("method,extra", [
    ("galore", ("--scan-layers", "--grad-accum", "2")),
    ("q_galore", ()),
    ("qlora", ()),
    ("galore_8bit", ("--layerwise", "--grad-accum", "2", "--clip", "1")),
    ("q_galore", ("--layerwise",)),
])
def test_ctrl_c_saves_and_resume_is_bit_exact(tmp_path, monkeypatch, method,
                                              extra):
  once, split = tmp_path / "once", tmp_path / "split"
  assert main_lib.main(_args(once, method, *extra)) == 0
  accum = 2 if "--grad-accum" in extra else 1
  with monkeypatch.context() as mp:
    _interrupting_batch(mp, at_call=2 * accum)  # Ctrl-C during step 2
    assert main_lib.main(_args(split, method, *extra)) == 130
  assert _restore(split, method)["step"] == 2
  assert main_lib.main(_args(split, method, *extra, "--resume")) == 0
  a, b = _restore(once, method, 6), _restore(split, method, 6)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The metrics continue where they stopped: one train record per step.
  steps = [r["step"] for r in _metrics(split, method) if "loss" in r]
  assert steps == list(range(1, 7))


def _final(out, method):
  return {k: v for k, v in _restore(out, method)["train"].items()}


def _rel(a, b):
  return max(float(np.linalg.norm(np.asarray(x, np.float32) - y)
                   / np.linalg.norm(np.asarray(y, np.float32)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_layerwise_gradients_equal_the_plain_gradients():
  """The layerwise step's accumulated gradient of the LLaMA (recorded by a
  transform that keeps it as its state) is the mean of jax.grad over the
  micro-batches, to float rounding."""
  model = _tiny(scan_layers=True)
  graphdef, train = nnx.split(model, nnx.Param)
  train = nnx.to_pure_dict(train)
  tokens = jax.random.randint(jax.random.key(0), (2, 4, 33), 0, TINY.vocab)
  loss = lambda p, t: model_lib.loss_fn(nnx.merge(graphdef, p), t)
  grads = [jax.jit(jax.grad(loss))(train, t) for t in tokens]
  want = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  record = optax.GradientTransformation(
      lambda p: jax.tree.map(jnp.zeros_like, p),
      lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
  step = galore_jax.layerwise_step(*model_lib.layerwise_fns(model), record)
  blocks, outer = methods_lib.split_blocks(train)
  state = step.init(outer, blocks)
  _, _, state, metrics = jax.jit(step.step)(outer, blocks, state, tokens)
  got = methods_lib.join_blocks(state.blocks, state.outer)
  assert _rel(got, want) < 1e-6
  np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(want),
                             rtol=1e-6)


@pytest.mark.parametrize("method,extra,tol", [
    ("adamw", ("--weight-decay", "0.1"), 5e-6),
    ("galore", ("--grad-accum", "2", "--clip", "0.5"), 2e-4),
    ("galore_8bit", (), 1e-2),
])
def test_layerwise_equals_the_plain_step(tmp_path, method, extra, tol):
  """--layerwise trains what the plain scanned step trains, with
  accumulation and clipping. The gradients agree to 3e-7 (the test above);
  six steps of Adam at lr 0.01 carry that last-bit difference further:
  its early updates are nearly sign(g), GaLore's SVD turns with it where
  singular values are close, and 8-bit moments flip rounding ties."""
  plain, fused = tmp_path / "plain", tmp_path / "fused"
  assert main_lib.main(_args(plain, method, "--scan-layers", *extra)) == 0
  assert main_lib.main(_args(fused, method, "--layerwise", *extra)) == 0
  start = methods_lib.build(method, train_lib.build_model(
      main_lib.config_from_flags(_args(plain, method, "--scan-layers")),
      TINY.vocab), main_lib.config_from_flags(_args(plain, method))).train
  a, b = _final(fused, method), _final(plain, method)
  assert _rel(b, start) > 1e-3  # it trained
  assert _rel(a, b) < tol
  va = [r["val_loss"] for r in _metrics(fused, method) if "val_loss" in r]
  vb = [r["val_loss"] for r in _metrics(plain, method) if "val_loss" in r]
  np.testing.assert_allclose(va, vb, rtol=1e-4)


def test_layerwise_on_a_mesh_equals_one_device(tmp_path):
  one, mesh = tmp_path / "one", tmp_path / "mesh"
  extra = ("--layerwise", "--grad-accum", "2", "--batch-size", "8",
           "--update-proj-gap", "5")
  assert main_lib.main(_args(one, "galore", *extra, steps=10)) == 0
  assert main_lib.main(_args(mesh, "galore", *extra, "--mesh",
                              "data=2,fsdp=4", steps=10)) == 0
  a, b = _final(mesh, "galore"), _final(one, "galore")
  distance = lambda a, b: np.sqrt(sum(
      float(np.sum((np.asarray(x) - np.asarray(y)) ** 2))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
  zero = jax.tree.map(np.zeros_like, b)
  assert distance(a, b) / distance(b, zero) < 1e-5  # as the plain step's
  kernel = _restore(mesh, "galore")["train"]["layers"]["mlp"]["up"]["kernel"]
  assert kernel.shape == (TINY.layers, 64, 176)


def test_layerwise_q_galore_keeps_int8_layers(tmp_path):
  assert main_lib.main(_args(tmp_path, "q_galore", "--layerwise",
                              steps=3)) == 0
  args = main_lib.config_from_flags(_args(tmp_path, "q_galore",
                                             "--layerwise"))
  m = methods_lib.build("q_galore", train_lib.build_model(args, TINY.vocab),
                      args)
  q = m.train["layers"]["attn"]["q"]["kernel"]
  assert isinstance(q, galore_jax.QuantizedArray)
  assert q.shape == (64, 64) and q.codes.shape == (TINY.layers, 64 * 64)
  saved = _restore(tmp_path, "q_galore")["train"]["layers"]["attn"]["q"]
  assert np.asarray(saved["kernel"]["codes"]).dtype == np.uint8


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path, monkeypatch,
                                                  capsys):
  original = model_lib.loss_fn
  monkeypatch.setattr(model_lib, "loss_fn", lambda model, t: original(
      model, t) + jnp.where(t[0, 0] < 0, jnp.nan, 0.0))
  _interrupting_batch(monkeypatch, at_call=5, sig=False)
  assert main_lib.main(_args(tmp_path, "galore")) == 1
  err = capsys.readouterr().err
  assert "non-finite loss nan" in err and "at step 5" in err
  assert "last good checkpoint is step 3" in err
  saved = _restore(tmp_path, "galore")
  assert saved["step"] == 3
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved["train"]))


def test_bf16_params_stay_bf16(tmp_path):
  assert main_lib.main(_args(tmp_path, "galore", "--dtype", "bf16",
                              "--param-dtype", "bf16", steps=3)) == 0
  saved = _restore(tmp_path, "galore")
  assert {x.dtype for x in jax.tree.leaves(saved["train"])} == {
      np.dtype(jnp.bfloat16)}


def test_compare_writes_plot_and_summary(tmp_path):
  assert main_lib.main(_args(tmp_path, "adamw", "--compare",
                              "adamw,galore", steps=3)) == 0
  png = (tmp_path / "loss.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  table = (tmp_path / "summary.md").read_text()
  assert "| adamw | llama-tiny | 3 |" in table
  assert "| galore | llama-tiny | 3 |" in table
  # Each run's args.json is the command line's Config for that method.
  config = main_lib.config_from_flags(_args(tmp_path, "adamw", "--compare",
                                            "adamw,galore", steps=3))
  for name in ("adamw", "galore"):
    saved = json.loads((tmp_path / name / "args.json").read_text())
    assert configs.Config.from_dict(saved) == dataclasses.replace(
        config, method=name, compare=None)


# ---------------------------------------------------------------------------
# The Config.


def test_config_round_trips_through_args_json(tmp_path):
  config = configs.Config(
      model="llama-tiny", method="q_galore", rank=8, lr=3e-3, clip=0.5,
      zero_point="official", scan_layers=True, data=str(tmp_path),
      mesh="data=2,fsdp=4", batch_size=4, steps=7)
  checkpointing.write_record(tmp_path, config.to_dict(), fresh=True)
  saved = json.loads((tmp_path / checkpointing.RECORD).read_text())
  assert saved == dataclasses.asdict(config)
  assert configs.Config.from_dict(saved) == config
  assert configs.Config.from_dict({}) == configs.Config()  # all defaults
  with pytest.raises(ValueError, match="not Config fields: out"):
    configs.Config.from_dict({**saved, "out": "runs"})
  with pytest.raises(ValueError, match="--steps must be >= 1"):
    dataclasses.replace(config, steps=0)
  with pytest.raises(ValueError, match="--method: invalid choice 'sgd'"):
    configs.Config(method="sgd")


def test_state_fields_are_derived_from_the_field_metadata(tmp_path):
  marked = tuple(f.name for f in dataclasses.fields(configs.Config)
                 if f.metadata["state"])
  assert configs.STATE_FIELDS == marked
  # What shapes the saved state or what it holds (the README's list).
  assert set(marked) == {
      "model", "init_from", "method", "rank", "svd", "on_refresh",
      "zero_point", "clip", "clip_mode", "dtype", "param_dtype",
      "scan_layers", "batch_size", "seq_len", "grad_accum", "seed", "data",
      "tokenizer", "lora_alpha", "lora_targets", "lora_trainable",
      "layerwise"}

  @dataclasses.dataclass(frozen=True)
  class Wider(configs.Config):
    extra: int = configs.flag_field(0, state=True)
    note: str = configs.flag_field("")

  assert configs.state_fields(Wider) == marked + ("extra",)
  # The resume check compares these fields and no others.
  record = configs.Config().to_dict()
  checkpointing.write_record(tmp_path, record, fresh=True)
  for name in configs.field_names():
    changed = {**record, name: "changed"}
    if name in marked:
      with pytest.raises(ValueError, match=f"settings differ.*'{name}'"):
        checkpointing.check_settings(tmp_path, changed, marked)
    else:
      checkpointing.check_settings(tmp_path, changed, marked)


def test_cli_errors(tmp_path, capsys):
  for bad, msg in [(["--compare", "adamw,sgd"], "unknown method"),
                   (["--steps", "0"], "--steps must be >= 1"),
                   (["--galore-scale", "0"], "--galore-scale must be > 0"),
                   (["--method", "q_galore", "--on-refresh", "transport"],
                    "--on-refresh applies to --method galore only"),
                   (["--warmup", "1"], "--warmup must be in [0, 1)"),
                   (["--init-from", str(tmp_path / "x")], "not a directory"),
                   (["--method", "sgd"], "invalid choice"),
                   (["--method", "lora", "--layerwise"],
                    "lora train on the plain step"),
                   (["--clip", "1", "--clip-mode", "per_layer"],
                    "--clip-mode applies to --layerwise with --clip"),
                   (["--min-lr-ratio", "-5"], "--min-lr-ratio must be in"),
                   (["--min-lr-ratio", "1.5"], "--min-lr-ratio must be in"),
                   (["--lr", "inf"], "--lr must be finite"),
                   (["--clip", "nan"], "--clip must be finite"),
                   (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
                   (["--lora-alpha", "0"], "--lora-alpha must be > 0"),
                   (["--seed", "-1"], "--seed must be >= 0"),
                   (["--update-proj-gap", str(2**31)],
                    "--update-proj-gap must be <= 2**30"),
                   (["--method", "galore", "--lora-targets", "mlp"],
                    "--lora-targets applies to --method lora or qlora"),
                   (["--lora-targets", "ffn"], "invalid choice"),
                   (["--method", "head", "--layerwise"],
                    "head train on the plain step")]:
    with pytest.raises(SystemExit) as e:
      main_lib.main(bad)
    assert e.value.code == 2 and msg in capsys.readouterr().err
  assert main_lib.main(_args(tmp_path, "galore", "--data",
                              str(tmp_path / "none.txt"))) == 2
  assert "does not exist" in capsys.readouterr().err
  assert main_lib.main(_args(tmp_path, "galore", steps=3)) == 0
  assert main_lib.main(_args(tmp_path, "galore", "--rank", "8",
                              "--resume")) == 2
  assert "settings differ" in capsys.readouterr().err


def test_cli_smoke_script(tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "examples/llama/train.py"), "--model",
       "llama-tiny", "--method", "q_galore", "--steps", "3", "--batch-size",
       "2", "--seq-len", "16", "--eval-every", "3", "--out", str(out)],
      capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "stdlib" in proc.stdout and "| q_galore | llama-tiny | 3 |" in (
      proc.stdout)
  assert (out / "loss.png").is_file() and (out / "q_galore/ckpt/3").is_dir()
