"""galore_adamw vs optax.contrib.galore vs optax.adamw on a LLaMA-60M stack.

Prints a markdown table: optimizer-state bytes (ours checked against the
analytic formula), XLA's compiled memory of the donated train step, and median
step times as ratios to adamw's, all measured in this one process.

  python benchmarks/galore_vs_optax.py [--tokens 2048] [--steps 40] [--gap 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

import galore_jax
from _llama_stack import init_params as _init_params
from _llama_stack import kernel_shapes
from _llama_stack import loss_fn

# LLaMA-60M (the GaLore paper's config): hidden 512, intermediate 1376, 8 layers.
HIDDEN, FFN, LAYERS = 512, 1376, 8
MATRICES = kernel_shapes(HIDDEN, FFN)


def init_params(key):
  return _init_params(key, HIDDEN, FFN, LAYERS)


def make_step(opt):
  def step(params, state, x):
    grads = jax.grad(loss_fn)(params, x)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1))


def tree_bytes(tree):
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def analytic_galore_bytes(rank):
  """std side: Adam moments r x max(m, n), projector r x min(m, n), fp32."""
  total = 4  # galore count
  total += 4  # adam count
  for m, n in MATRICES.values():
    total += LAYERS * 4 * (2 * rank * max(m, n) + rank * min(m, n))
  total += LAYERS * 2 * 4 * (2 * HIDDEN)  # norm scales: two moments each
  return total


def timed_steps(step, params, state, x, steps):
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    params, state = step(params, state, x)
    jax.block_until_ready((params, state))
    times.append(time.perf_counter() - t0)
  return times


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rank", type=int, default=128)
  ap.add_argument("--tokens", type=int, default=2048,
                  help="tokens per step (rows of the activation)")
  ap.add_argument("--steps", type=int, default=40)
  ap.add_argument("--gap", type=int, default=10, help="update_proj_gap")
  args = ap.parse_args(argv)

  params = init_params(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (args.tokens, HIDDEN))
  n_params = sum(p.size for p in jax.tree.leaves(params))
  optimizers = {
      "optax.adamw": optax.adamw(1e-3, weight_decay=0.0),
      "optax.contrib.galore": optax.contrib.galore(
          1e-3, rank=args.rank, update_proj_gap=args.gap),
      "galore_jax.galore_adamw": galore_jax.galore_adamw(
          1e-3, rank=args.rank, update_proj_gap=args.gap),
  }

  rows = {}
  for name, opt in optimizers.items():
    state = opt.init(params)
    step = make_step(opt)
    mem = step.lower(params, state, x).compile().memory_analysis()
    p = jax.tree.map(jnp.array, params)
    times = timed_steps(step, p, state, x, args.steps)
    refresh = [t for i, t in enumerate(times) if i % args.gap == 0]
    steady = [t for i, t in enumerate(times) if i % args.gap != 0 and i > 0]
    rows[name] = dict(
        state=tree_bytes(state), arg=mem.argument_size_in_bytes,
        out=mem.output_size_in_bytes, alias=mem.alias_size_in_bytes,
        temp=mem.temp_size_in_bytes, steady=statistics.median(steady),
        refresh=statistics.median(refresh[1:] or refresh))

  ours = rows["galore_jax.galore_adamw"]
  expected = analytic_galore_bytes(args.rank)
  if ours["state"] != expected:
    sys.exit(f"state bytes {ours['state']} != analytic formula {expected}")

  base = rows["optax.adamw"]
  mib = lambda b: f"{b / 2**20:.1f}"
  print(f"LLaMA-60M stack: {LAYERS} layers, hidden {HIDDEN}, ffn {FFN},"
        f" {n_params / 1e6:.1f}M params, rank {args.rank},"
        f" {args.tokens} tokens/step, gap {args.gap}, {args.steps} steps,"
        f" {jax.devices()[0].platform} ({jax.device_count()} device),"
        f" jax {jax.__version__}, optax {optax.__version__}\n")
  print("| optimizer | state MiB | step argument MiB | output MiB | alias MiB"
        " | temp MiB | temp / adamw | steady step ms | steady / adamw"
        " | refresh step ms | refresh / adamw |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for name, r in rows.items():
    print(f"| {name} | {mib(r['state'])} | {mib(r['arg'])} | {mib(r['out'])}"
          f" | {mib(r['alias'])} | {mib(r['temp'])}"
          f" | {r['temp'] / base['temp']:.2f}x | {1e3 * r['steady']:.1f}"
          f" | {r['steady'] / base['steady']:.2f}x | {1e3 * r['refresh']:.1f}"
          f" | {r['refresh'] / base['steady']:.2f}x |")
  print(f"\ngalore_jax state bytes equal the analytic formula: {expected} B"
        " (moments 2 r max(m,n) + projector r min(m,n), fp32, plus norm"
        " moments and counters).")
  print("Medians over the steps; 'refresh' are the steps with"
        " count % gap == 0 (SVD), excluding the compiling first step.\n")

  # Compiled temp memory against the token batch (compile only, no run).
  token_counts = (1, 256, args.tokens)
  print("| optimizer | " + " | ".join(f"temp MiB @ {t} tokens"
                                       for t in token_counts) + " |")
  print("|---|" + "---|" * len(token_counts))
  for name, opt in optimizers.items():
    state = jax.eval_shape(opt.init, params)
    temps = []
    for t in token_counts:
      x_t = jax.ShapeDtypeStruct((t, HIDDEN), jnp.float32)
      mem = make_step(opt).lower(params, state, x_t).compile().memory_analysis()
      temps.append(mib(mem.temp_size_in_bytes))
    print(f"| {name} | " + " | ".join(temps) + " |")


if __name__ == "__main__":
  main()
