"""What does a subspace refresh cost, and does stagger remove the spikes?

A stack of LLaMA blocks' kernels (q, k, v, o: hidden x hidden; gate, up:
hidden x ffn; down: ffn x hidden; plus two norm scales per layer) trained by
``galore_adamw`` on a fixed token batch, one jitted donated step, in one
process. For each token count and ``svd`` method it times steady steps (no
refresh) and refresh steps and prints their medians and ratio; then, over 2K
steps, the max / median step time with and without ``stagger=True``.

A refresh costs the same whatever the batch, while a steady step grows with
the tokens per step, so the ratio falls as the batch grows (the paper trains
with 512 x 256 = 131,072 tokens per step).

  python benchmarks/refresh_speed.py --shape llama-60m   # 8 layers, 512/1376
  python benchmarks/refresh_speed.py --shape llama-1b --layers 1 --tokens 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import galore_jax
from _llama_stack import init_params
from _llama_stack import loss_fn

SHAPES = {  # hidden, ffn, layers, the paper's rank
    "llama-60m": (512, 1376, 8, 128),
    "llama-1b": (2048, 5461, 24, 512),
}


def step_times(opt, params, x, steps):
  def step(params, state, x):
    grads = jax.grad(loss_fn)(params, x)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  params = jax.tree.map(jnp.array, params)
  step = jax.jit(step, donate_argnums=(0, 1)).lower(params, state,
                                                    x).compile()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    params, state = step(params, state, x)
    jax.block_until_ready((params, state))
    times.append(time.perf_counter() - t0)
  return times


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", default="llama-60m", choices=sorted(SHAPES))
  ap.add_argument("--layers", type=int, default=None,
                  help="layers to stack (default: the model's)")
  ap.add_argument("--rank", type=int, default=None)
  ap.add_argument("--tokens", default="2048",
                  help="tokens per step; a comma list gives one row each")
  ap.add_argument("--gap", type=int, default=4)
  ap.add_argument("--periods", type=int, default=4,
                  help="refresh periods timed per method (after step 0)")
  ap.add_argument("--methods", default="exact,randomized,subspace_iteration")
  ap.add_argument("--skip-stagger", action="store_true")
  args = ap.parse_args(argv)
  hidden, ffn, layers, rank = SHAPES[args.shape]
  layers = args.layers or layers
  rank = args.rank or rank
  params = init_params(jax.random.key(0), hidden, ffn, layers)
  tokens = [int(t) for t in args.tokens.split(",")]
  n = sum(p.size for p in jax.tree.leaves(params))
  gap = args.gap
  print(f"{args.shape} shapes: {layers} layers, hidden {hidden}, ffn {ffn},"
        f" {n / 1e6:.1f}M params, rank {rank}, gap {gap}, {args.periods}"
        f" refreshes timed; {jax.devices()[0].platform},"
        f" jax {jax.__version__}\n", flush=True)

  print("| tokens/step | svd | steady step ms | refresh step ms |"
        " refresh / steady |")
  print("|---|---|---|---|---|", flush=True)
  for t in tokens:
    x = jax.random.normal(jax.random.key(1), (t, hidden))
    for svd in args.methods.split(","):
      opt = galore_jax.galore_adamw(1e-3, rank=rank, update_proj_gap=gap,
                                    svd=svd)
      # Step 0 (every method's first refresh, exact for subspace_iteration)
      # is left out.
      times = step_times(opt, params, x, args.periods * gap + 1)
      refresh = [t for i, t in enumerate(times) if i % gap == 0 and i > 0]
      steady = [t for i, t in enumerate(times) if i % gap != 0]
      r, s = statistics.median(refresh), statistics.median(steady)
      print(f"| {t:,} | {svd} | {1e3 * s:,.0f} | {1e3 * r:,.0f} |"
            f" {r / s:.2f}x |", flush=True)

  if args.skip_stagger:
    return 0
  x = jax.random.normal(jax.random.key(1), (tokens[0], hidden))
  print(f"\nOver 2K = {2 * gap} steps after the first (which sets every"
        f" projector), {tokens[0]:,} tokens/step:\n")
  print("| svd | stagger | median step ms | max step ms | max / median |")
  print("|---|---|---|---|---|", flush=True)
  for svd in args.methods.split(","):
    for stagger in (False, True):
      opt = galore_jax.galore_adamw(1e-3, rank=rank, update_proj_gap=gap,
                                    svd=svd, stagger=stagger)
      times = step_times(opt, params, x, 2 * gap + 1)[1:]
      med, top = statistics.median(times), max(times)
      print(f"| {svd} | {stagger} | {1e3 * med:,.0f} | {1e3 * top:,.0f} |"
            f" {top / med:.2f}x |", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
