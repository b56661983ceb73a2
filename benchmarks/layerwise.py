"""The layerwise step against the plain step: compiled memory and step time.

  python benchmarks/layerwise.py                        # both tables
  python benchmarks/layerwise.py --models llama-7b --dtypes bf16 --skip-time
  python benchmarks/layerwise.py --skip-memory --time-model llama-9m

Memory: XLA's figure for the whole compiled train step (argument + output -
aliased + temp bytes, params and state donated), batch 1 x seq 256, for the
plain remat step (``jax.value_and_grad`` over ``lax.scan`` + ``tx.update``)
and :func:`galore_jax.layerwise_step` of the same LLaMA
(:func:`galore_jax.memory.llama_fns`), beside the floor (weights + optimizer
state + projectors, as the layerwise step stores them) and the layerwise
closed form. Nothing is allocated. XLA:CPU computes bf16 matmuls and many
elementwise bf16 ops in float32, so bf16 figures include float32 copies a
GPU does not make.

Time: steady step time of both steps on a CPU-size LLaMA with real arrays,
medians of interleaved runs (plain, layerwise, plain, ...), one process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from galore_jax import memory

METHODS = ("adamw", "adamw_8bit", "galore", "galore_8bit", "q_galore")
DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}
# The LLaMA example's byte-level CPU configs, for timing.
TIME_CONFIGS = {
    "llama-9m": memory.LlamaConfig(288, 768, 6, 9, vocab=259, rank=72),
    "llama-1m": memory.LlamaConfig(128, 352, 4, 4, vocab=259, rank=32),
}


def _gib(x: float) -> str:
  return f"{x / 2**30:.2f}"


def memory_rows(model: str, dtype: str, methods, batch: int, seq: int):
  plain = memory.plan_llama(model, methods, dtype=DTYPES[dtype], batch=batch,
                            seq=seq, remat=True)
  fused = memory.plan_llama(model, methods, dtype=DTYPES[dtype], batch=batch,
                            seq=seq, remat=True, layerwise=True)
  rows = []
  for m in methods:
    p, f = plain[m], fused[m]
    floor = f.weights + f.optimizer_state + f.projectors
    rows.append([model, dtype, m, _gib(floor), _gib(f.closed_form),
                 _gib(p.compiled), _gib(f.compiled),
                 f"{(f.compiled - floor) / 2**30:+.2f}"])
  return rows


def time_rows(model: str, methods, batch: int, seq: int, reps: int):
  config = TIME_CONFIGS[model]
  shapes = memory.llama_params(config, jnp.float32)
  keys = iter(jax.random.split(jax.random.key(0), 64))
  params = jax.tree.map(
      lambda s: 0.02 * jax.random.normal(next(keys), s.shape, s.dtype), shapes)
  params = jax.tree_util.tree_map_with_path(  # norm scales start at 1
      lambda p, x: x + 1 if "norm" in memory.path_str(p) else x, params)
  tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0,
                              config.vocab)
  rows = []
  for method in methods:
    steps, carries = {}, {}
    for name, fused in (("plain", False), ("layerwise", True)):
      step, carry = memory.llama_train_step(
          method, config, jax.tree.map(jnp.copy, params), rank=config.rank,
          remat=True, layerwise=fused)
      steps[name] = jax.jit(step, donate_argnums=(0,))
      carries[name] = carry
    times = {"plain": [], "layerwise": []}
    for i in range(reps + 2):  # two warm-up rounds, then interleaved
      for name in ("plain", "layerwise"):
        t0 = time.perf_counter()
        carries[name], loss = steps[name](carries[name], tokens)
        jax.block_until_ready((carries[name], loss))
        if i >= 2:
          times[name].append(time.perf_counter() - t0)
    tp, tl = (statistics.median(times[k]) for k in ("plain", "layerwise"))
    rows.append([model, method, f"{batch} x {seq}", f"{1e3 * tp:.1f}",
                 f"{1e3 * tl:.1f}", f"{tl / tp:.3f}"])
  return rows


def _table(head, rows):
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--models", default="llama-1b,llama-7b")
  ap.add_argument("--dtypes", default="bf16,fp32")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--time-model", default="llama-9m",
                  choices=sorted(TIME_CONFIGS))
  ap.add_argument("--time-batch", type=int, default=8)
  ap.add_argument("--time-seq", type=int, default=256)
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--skip-memory", action="store_true")
  ap.add_argument("--skip-time", action="store_true")
  args = ap.parse_args(argv)
  methods = [m for m in args.methods.split(",") if m]
  if not args.skip_memory:
    rows = []
    for model in args.models.split(","):
      for dtype in args.dtypes.split(","):
        rows += memory_rows(model, dtype, methods, args.batch, args.seq)
    print(f"## Compiled train step, batch {args.batch} x seq {args.seq},"
          " remat (GiB, XLA:CPU)\n")
    print(_table(["model", "dtype", "method", "floor (weights + state +"
                  " projectors)", "closed form (layerwise)", "plain step",
                  "layerwise step", "layerwise - floor"], rows))
    print()
  if not args.skip_time:
    rows = time_rows(args.time_model, methods, args.time_batch,
                     args.time_seq, args.reps)
    print(f"## Steady step time, medians of {args.reps} interleaved runs"
          f" ({jax.devices()[0].platform})\n")
    print(_table(["model", "method", "batch x seq", "plain remat (ms)",
                  "layerwise (ms)", "layerwise / plain"], rows))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
