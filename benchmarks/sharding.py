"""Does the optimizer state shrink as 1/fsdp, and what does a refresh gather?

Two tables, from XLA and JAX alone (nothing runs on the devices, so the
figures are exact and the LLaMA-1B shapes fit on a laptop):

1. Per-device optimizer-state bytes of AdamW, GaLore and Q-GaLore for the
   attention and MLP kernels of a LLaMA (params split FSDP-style over the
   largest axis that divides, as the LLaMA example's ``--mesh``), state placed
   by ``galore_jax.state_sharding``, for fsdp = 1, 2, 4, 8.
2. The largest all-gather in the compiled, sharded optimizer update (a
   refresh step, fsdp=8) with ``svd="exact"`` against the range finders.

  python benchmarks/sharding.py                      # llama-60m shapes
  python benchmarks/sharding.py --shape llama-1b --layers 1
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

import galore_jax  # noqa: E402
from examples.llama import methods as methods_lib  # noqa: E402
from _llama_stack import kernel_shapes  # noqa: E402

SHAPES = {  # hidden, ffn, layers, the paper's rank
    "llama-60m": (512, 1376, 8, 128),
    "llama-1b": (2048, 5461, 24, 512),
}


def kernels(hidden, ffn, layers):
  return {f"layer_{i}": {n: jax.ShapeDtypeStruct(s, jnp.float32)
                         for n, s in kernel_shapes(hidden, ffn).items()}
          for i in range(layers)}


def mesh_of(fsdp):
  return jax.make_mesh((1, fsdp), ("data", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def shardings(params, mesh):
  n = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, methods_lib.fsdp_spec(x.shape, n)), params)


def state_bytes(tx, params, fsdp):
  """(bytes on one device, bytes kept whole on every device)."""
  mesh = mesh_of(fsdp)
  st = galore_jax.state_sharding(tx, params, shardings(params, mesh))
  abstract = jax.eval_shape(tx.init, params)
  per, whole = 0, 0
  for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(st)):
    b = int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
    per += b
    if s.is_fully_replicated:
      whole += b
  return per, whole


def largest_all_gather(tx, params):
  """(elements, shape) of the largest all-gather in the sharded update."""
  mesh = mesh_of(8)
  sh = shardings(params, mesh)
  st = galore_jax.state_sharding(tx, params, sh)
  update = jax.jit(tx.update, in_shardings=(sh, st, sh),
                   out_shardings=(sh, st))
  hlo = update.lower(params, jax.eval_shape(tx.init, params),
                     params).compile().as_text()
  best = (0, ())
  for dims in re.findall(r"= \w+\[([\d,]*)\][^ ]* all-gather(?:-start)?\(",
                         hlo):
    shape = tuple(int(d) for d in dims.split(",") if d)
    best = max(best, (int(np.prod(shape)), shape))
  return best


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", default="llama-60m", choices=sorted(SHAPES))
  ap.add_argument("--layers", type=int, default=None)
  args = ap.parse_args(argv)
  hidden, ffn, layers, rank = SHAPES[args.shape]
  layers = args.layers or layers
  params = kernels(hidden, ffn, layers)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"{args.shape} kernels: {layers} layers, hidden {hidden}, ffn {ffn},"
        f" {n / 1e6:.1f}M params, rank {rank}; {jax.device_count()}"
        f" {jax.devices()[0].platform} devices, jax {jax.__version__}\n")

  methods = {
      "optax.adamw": optax.adamw(1e-3),
      "galore_adamw": galore_jax.galore_adamw(1e-3, rank=rank),
      "q_galore_adamw": galore_jax.q_galore_adamw(1e-3, rank=rank),
  }
  print("| optimizer | fsdp=1 MiB | fsdp=2 MiB | fsdp=4 MiB | fsdp=8 MiB |"
        " fsdp=8 x 8 / fsdp=1 | kept whole at fsdp=8 MiB |")
  print("|---|---|---|---|---|---|---|")
  for name, tx in methods.items():
    got = {f: state_bytes(tx, params, f) for f in (1, 2, 4, 8)}
    cells = " | ".join(f"{got[f][0] / 2**20:,.2f}" for f in (1, 2, 4, 8))
    print(f"| {name} | {cells} | {8 * got[8][0] / got[1][0]:.3f} |"
          f" {got[8][1] / 2**20:,.2f} |", flush=True)

  biggest = max(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"\nLargest all-gather in the compiled update at fsdp=8 (a refresh"
        f" step); a whole kernel is up to {biggest:,} elements:\n")
  print("| optimizer | svd | largest all-gather (elements) | its shape |")
  print("|---|---|---|---|")
  makers = {
      "galore_adamw": galore_jax.galore_adamw,
      "q_galore_adamw": galore_jax.q_galore_adamw,
      "q_galore_adamw, state_bits=32": lambda *a, **k: (
          galore_jax.q_galore_adamw(*a, state_bits=32, **k)),
  }
  for name, make in makers.items():
    for svd in ("exact", "randomized", "subspace_iteration"):
      size, shape = largest_all_gather(make(1e-3, rank=rank, svd=svd), params)
      print(f"| {name} | {svd} | {size:,} | {shape} |", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
