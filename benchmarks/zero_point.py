"""Q-GaLore's group quantization: float offsets vs the official zero point.

Two questions, on the LLaMA example (llama-1m, the built-in corpus):

1. How well does each scheme store the projectors of real gradients? The
   model is trained ``--warm-steps`` steps with AdamW (the example's step),
   then for each attention / MLP kernel the gradient of one batch is
   projected by ``scale_by_galore`` (float32 projector ``P``) and by
   ``scale_by_q_galore`` (``--bits``-bit projector ``P^``, each scheme):
   the table gives the relative reconstruction error ``|P^ - P| / |P|`` and
   the gradient energy kept, ``|proj_P^(G)|^2 / |proj_P(G)|^2``, median and
   worst over the kernels.
2. What does it change in training? ``q_galore`` trained with each scheme,
   the settings of ``benchmarks/llama_quality.py``, final validation loss.

  python benchmarks/zero_point.py [--steps 1000] [--skip-train]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import optax
from flax import nnx

import galore_jax
from examples.llama import input_pipeline as data_lib
from examples.llama import models as model_lib
from examples.llama import main as main_lib
from examples.llama import methods as methods_lib
from examples.llama import train as train_lib
from galore_jax import memory
from galore_jax import quantization

SCHEMES = ("float", "official")


def warm_model(args, corpus):
  """The example's llama after ``--warm-steps`` AdamW steps, its params."""
  opts = main_lib.config_from_flags(
      ["--model", args.model, "--steps", str(max(args.warm_steps, 1)),
       "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)])
  m = methods_lib.build("adamw",
                        train_lib.build_model(opts, corpus.vocab_size), opts)
  step_fn = m.step
  step = jax.jit(step_fn, donate_argnums=(0, 2, 3))
  train, state, key = m.train, m.tx.init(m.train), jax.random.key(0)
  for i in range(args.warm_steps):
    tokens = jnp.asarray(data_lib.batch(corpus.train, i, args.batch_size,
                                        args.seq_len, 0))
    train, state, key, _ = step(train, m.frozen, state, key, tokens)
  tokens = jnp.asarray(data_lib.batch(corpus.train, args.warm_steps,
                                      args.batch_size, args.seq_len, 0))
  loss = lambda p: model_lib.loss_fn(
      nnx.merge(m.graphdef, p, m.frozen), tokens)
  return jax.grad(loss)(train), methods_lib.target_mask(train), opts


def _matrix(projectors):
  return projectors.row if not isinstance(
      projectors.row, optax.MaskedNode) else projectors.col


def projector_errors(grads, mask, rank, bits):
  """``{scheme: [(relative error, energy kept), ...]}`` over the kernels."""
  exact = galore_jax.scale_by_galore(rank=rank, update_proj_gap=1, mask=mask)
  _, st = exact.update(grads, exact.init(grads))
  out = {s: [] for s in SCHEMES}
  for scheme in SCHEMES:
    tx = galore_jax.scale_by_q_galore(rank=rank, update_proj_gap=1,
                                      mask=mask, proj_bits=bits,
                                      proj_zero_point=scheme)
    _, qst = tx.update(grads, tx.init(grads))
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        grads, is_leaf=lambda x: x is None)
    for (path, g), p, q in zip(flat, treedef.flatten_up_to(st.projector),
                               treedef.flatten_up_to(qst.projector)):
      name = memory.path_str(path)
      if isinstance(p, optax.MaskedNode):
        continue
      row = not isinstance(p.row, optax.MaskedNode)
      mat = _matrix(p)
      deq = quantization.QuantizedArray(
          q.codes, q.scales, q.zeros, shape=mat.shape, dtype=jnp.float32,
          bits=bits, group_size=256).dequantize()
      err = float(jnp.linalg.norm(deq - mat) / jnp.linalg.norm(mat))
      keep = (lambda P: jnp.sum((P @ g) ** 2)) if row else (
          lambda P: jnp.sum((g @ P) ** 2))
      out[scheme].append((name, err, float(keep(deq) / keep(mat))))
  return out


def train_runs(args):
  finals = {}
  for scheme in SCHEMES:
    out = pathlib.Path(args.out) / scheme
    argv = ["--model", args.model, "--steps", str(args.steps),
            "--batch-size", str(args.batch_size),
            "--seq-len", str(args.seq_len), "--eval-every", "100",
            "--eval-batches", "16", "--save-every", str(args.steps),
            "--out", str(out), "--seed", "0", "--method", "q_galore",
            "--zero-point", scheme, "--no-progress"]
    if main_lib.main(argv) != 0:
      raise SystemExit("training failed")
    (_, _, result), = train_lib.read_runs(out)
    finals[scheme] = result["final_val_loss"]
  return finals


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="llama-1m")
  p.add_argument("--warm-steps", type=int, default=200)
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--bits", type=int, default=4)
  p.add_argument("--rank", type=int, default=None,
                 help="default: the config's (hidden / 4)")
  p.add_argument("--out", default="runs/zero_point")
  p.add_argument("--skip-train", action="store_true")
  args = p.parse_args(argv)
  corpus = data_lib.load(verbose=False)
  grads, mask, opts = warm_model(args, corpus)
  rank = args.rank or train_lib.build_model(opts, corpus.vocab_size).cfg.rank
  errors = projector_errors(grads, mask, rank, args.bits)
  print(f"{args.model} after {args.warm_steps} AdamW steps, rank {rank},"
        f" {args.bits}-bit projectors, groups of 256,"
        f" {len(errors['float'])} kernels:\n")
  print("| zero point | rel. error median | worst | energy kept median |"
        " worst |")
  print("|---|---|---|---|---|")
  for scheme in SCHEMES:
    e = [x[1] for x in errors[scheme]]
    k = [x[2] for x in errors[scheme]]
    print(f"| {scheme} | {statistics.median(e):.4f} | {max(e):.4f} |"
          f" {statistics.median(k):.4f} | {min(k):.4f} |")
  for scheme in SCHEMES:
    worst = min(errors[scheme], key=lambda x: x[2])
    print(f"\n{scheme}: least energy kept by {worst[0]} ({worst[2]:.4f},"
          f" error {worst[1]:.4f})")
  if not args.skip_train:
    finals = train_runs(args)
    print(f"\nq_galore, {args.steps} steps x {args.batch_size} x"
          f" {args.seq_len} tokens, final val loss:\n")
    print("| zero point | final val loss |")
    print("|---|---|")
    for scheme in SCHEMES:
      print(f"| {scheme} | {finals[scheme]:.4f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
