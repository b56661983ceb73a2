"""What does the refresh's one-matrix-per-call CPU linear algebra cost?

jaxlib's CPU LAPACK kernels split a batch of matrices over XLA's intra-op
thread pool and block on it, which can deadlock a mesh of CPU devices (see
the README's sharding section). On CPU, ``galore_jax``'s refresh therefore
runs a stacked ``(layers, m, n)`` leaf's SVD, QR, eigh, Cholesky and
triangular solve as a ``lax.map`` over the layers. This times each of those
calls both ways, on one device, at the shapes of a LLaMA-60M refresh: the
exact SVD of a ``512 x 1376`` kernel, and the range finders' ``m x k`` QR
and ``k x k`` eigh / Cholesky / solve with ``k = rank + oversample = 136``.
Medians of ``--repeats`` jitted calls, in one process.

  python benchmarks/cpu_linalg.py                 # 8 layers
  python benchmarks/cpu_linalg.py --layers 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp


def mapped(fn):
  """``fn`` over the leading axis, one matrix per call."""
  return lambda *xs: jax.lax.map(lambda x: fn(*x), xs)


def median_ms(fn, args, repeats):
  f = jax.jit(fn)
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--rows", type=int, default=512)
  p.add_argument("--cols", type=int, default=1376)
  p.add_argument("--k", type=int, default=136)
  p.add_argument("--repeats", type=int, default=10)
  a = p.parse_args()
  keys = jax.random.split(jax.random.key(0), 3)
  n, m, c, k = a.layers, a.rows, a.cols, a.k
  g = jax.random.normal(keys[0], (n, m, c))
  y = jax.random.normal(keys[1], (n, m, k))
  gram = jnp.matmul(jnp.swapaxes(y, 1, 2), y) + m * jnp.eye(k)
  low = jnp.linalg.cholesky(gram)
  rhs = jax.random.normal(keys[2], (n, k, m))
  calls = [
      (f"svd {m}x{c}", lambda a: jnp.linalg.svd(a, full_matrices=False), (g,)),
      (f"qr {m}x{k}", jnp.linalg.qr, (y,)),
      (f"eigh {k}x{k}", jnp.linalg.eigh, (gram,)),
      (f"cholesky {k}x{k}", jnp.linalg.cholesky, (gram,)),
      (f"solve {k}x{k}, {k}x{m}",
       lambda l, b: jax.scipy.linalg.solve_triangular(l, b, lower=True),
       (low, rhs)),
  ]
  print(f"{n} layers, {jax.device_count()} device(s), "
        f"{jax.devices()[0].platform}\n")
  print("| call | batched ms | one matrix per call ms | ratio |")
  print("|---|---|---|---|")
  for name, fn, args in calls:
    batched = median_ms(fn, args, a.repeats)
    single = median_ms(mapped(fn), args, a.repeats)
    print(f"| {name} | {batched:.2f} | {single:.2f} | {single / batched:.2f} |",
          flush=True)


if __name__ == "__main__":
  main()
