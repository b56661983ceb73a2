"""Quality and throughput of every method on the LLaMA example, on CPU.

Trains a CPU-size LLaMA on the built-in corpus (the Python stdlib sources,
bytes) with each method for the same token budget and the same schedule
(cosine, 10% warmup, 10% floor), each at its recipe learning rate: GaLore
methods the paper's 0.01 with scale 0.25, the others 1e-3 (the best of 1e-3,
3e-3, 1e-2 for AdamW on llama-1m; see the README). GaLore, Q-GaLore, LoRA and
QLoRA use rank = hidden / 4.

Then measures steady throughput side by side in this one process: the
compiled train steps of adamw and galore (and q_galore) run in alternating
blocks of ``--block`` steps; refresh steps are included, amortized, as in
training. Prints markdown tables with the targets (galore val loss <= 1.02x
adamw's, q_galore <= 1.03x, galore tokens/s >= 0.95x adamw's).

  python benchmarks/llama_quality.py [--model llama-1m] [--steps 1000]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from examples.llama import input_pipeline as data_lib
from examples.llama import main as main_lib
from examples.llama import methods as methods_lib
from examples.llama import train as train_lib

TARGETS = {"galore": ("val loss", 1.02), "q_galore": ("val loss", 1.03)}


def quality(args) -> list[dict]:
  argv = ["--model", args.model, "--steps", str(args.steps),
          "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
          "--eval-every", str(args.eval_every), "--eval-batches", "16",
          "--save-every", str(args.steps), "--out", args.out,
          "--seed", str(args.seed), "--compare", args.methods, "--no-progress"]
  if main_lib.main(argv) != 0:
    raise SystemExit("training failed")
  runs = {name: r for name, _, r in
          train_lib.read_runs(pathlib.Path(args.out))}
  return [runs[m] for m in args.methods.split(",")]


def throughput(args, methods: list[str]) -> dict[str, list[float]]:
  """Tokens/s of each block of ``--block`` steps, methods interleaved."""
  corpus = data_lib.load(verbose=False)
  opts = main_lib.config_from_flags([
      "--model", args.model, "--steps", str(args.steps),
      "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)])
  runners = {}
  for method in methods:
    model = train_lib.build_model(opts, corpus.vocab_size)
    m = methods_lib.build(method, model, opts)
    step_fn = m.step
    state = [m.train, m.init(m.train), jax.random.PRNGKey(0)]
    tokens = jnp.zeros((args.batch_size, args.seq_len + 1), jnp.int32)
    step = jax.jit(step_fn, donate_argnums=(0, 2, 3)).lower(
        state[0], m.frozen, state[1], state[2], tokens).compile()
    runners[method] = (step, m.frozen, state)
  batches = [jnp.asarray(data_lib.batch(corpus.train, i, args.batch_size,
                                        args.seq_len, 0))
             for i in range(args.block)]
  rates = {m: [] for m in methods}
  for r in range(args.rounds + 1):
    for method in methods:
      step, frozen, state = runners[method]
      t0 = time.perf_counter()
      for b in batches:
        state[0], state[1], state[2], metrics = step(
            state[0], frozen, state[1], state[2], b)
      jax.block_until_ready(metrics["loss"])
      if r:  # round 0 warms up
        rates[method].append(args.block * b.size / (time.perf_counter() - t0))
  return rates


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="llama-1m")
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--eval-every", type=int, default=100)
  p.add_argument("--methods", default="adamw,galore,q_galore,lora,qlora")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="runs/llama_quality")
  p.add_argument("--block", type=int, default=50,
                 help="steps per timed block (the gap is 200)")
  p.add_argument("--rounds", type=int, default=8)
  p.add_argument("--skip-quality", action="store_true")
  args = p.parse_args(argv)
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind},"
        f" {args.model}, {args.steps} steps x {args.batch_size} x"
        f" {args.seq_len} tokens\n", flush=True)

  if not args.skip_quality:
    runs = quality(args)
    base = next(r for r in runs if r["method"] == "adamw")["final_val_loss"]
    print("\n| method | peak lr | final val loss | vs adamw | target |"
          " val ppl | tokens/s (own run) | XLA step memory (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
      ratio = r["final_val_loss"] / base
      t = TARGETS.get(r["method"])
      target = "-" if t is None else (
          f"<= {t[1]:.2f}x: {'met' if ratio <= t[1] else 'MISSED'}")
      print(f"| {r['method']} | {r['lr']:g} | {r['final_val_loss']:.4f} |"
            f" {ratio:.3f}x | {target} | {r['final_val_ppl']:.2f} |"
            f" {r['tokens_per_s']:,.0f} |"
            f" {r['xla_memory']['total'] / 2**20:,.1f} |", flush=True)

  methods = ["adamw", "galore", "q_galore"]
  rates = throughput(args, methods)
  med = {m: statistics.median(v) for m, v in rates.items()}
  print(f"\nSteady throughput, {args.rounds} interleaved blocks of"
        f" {args.block} steps each (medians):\n")
  print("| method | tokens/s | vs adamw | min..max block | target |")
  print("|---|---|---|---|---|")
  for m in methods:
    ratio = med[m] / med["adamw"]
    target = ("-" if m != "galore" else
              f">= 0.95x: {'met' if ratio >= 0.95 else 'MISSED'}")
    print(f"| {m} | {med[m]:,.0f} | {ratio:.3f}x |"
          f" {min(rates[m]):,.0f}..{max(rates[m]):,.0f} | {target} |",
          flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
