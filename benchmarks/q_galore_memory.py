"""Optimizer-state and weight bytes of Q-GaLore vs GaLore, 8-bit and fp32 AdamW.

How much memory does each optimizer's state take on the GaLore paper's LLaMA
configs, and does Q-GaLore meet its targets: state at most 0.25x galore_adamw's,
and adamw_8bit's at most 0.27x adamw's? Also: weight bytes in fp32 / bf16 /
int8 next to the closed form N + 2M + |proj|.

Everything comes from `jax.eval_shape` of `opt.init` / `quantize_params` on
abstract float32 params: nothing is allocated, it runs in seconds on a CPU.
Exits with status 1 if a target fails, so it doubles as a check.

  python benchmarks/q_galore_memory.py [--configs llama-60m llama-7b]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import optax

import galore_jax
from galore_jax import memory

VOCAB = 32000
# name: (hidden, intermediate, heads, layers, GaLore rank of the paper's recipe)
CONFIGS = {
    "llama-60m": (512, 1376, 8, 8, 128),
    "llama-130m": (768, 2048, 12, 12, 256),
    "llama-350m": (1024, 2736, 16, 24, 256),
    "llama-1b": (2048, 5461, 32, 24, 512),
    "llama-7b": (4096, 11008, 32, 32, 1024),
}
PROJECTED = ("q", "k", "v", "o", "gate", "up", "down")  # attention + MLP kernels
METHODS = ("adamw", "adamw_8bit", "galore_adamw", "galore_adamw_8bit",
           "q_galore_adamw")
TARGETS = {("q_galore_adamw", "galore_adamw"): 0.25,
           ("adamw_8bit", "adamw"): 0.27}


def abstract_params(d, inter, layers):
  """LLaMA params as float32 ShapeDtypeStructs, Flax (in, out) kernels."""
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  params = {"embed": f32(VOCAB, d), "final_norm": f32(d), "lm_head": f32(d, VOCAB)}
  for i in range(layers):
    params[f"layers_{i}"] = {
        **{n: f32(d, d) for n in ("q", "k", "v", "o")},
        "gate": f32(d, inter), "up": f32(d, inter), "down": f32(inter, d),
        "attn_norm": f32(d), "mlp_norm": f32(d)}
  return params


def projection_mask(params):
  return jax.tree.map_with_path(lambda path, _: path[-1].key in PROJECTED, params)


nbytes = memory.nbytes  # stored bytes of every array leaf


def masked_bytes(mask, tree, want):
  """Bytes of the subtrees of `tree` whose `mask` entry equals `want`."""
  return sum(jax.tree.leaves(jax.tree.map(
      lambda m, sub: nbytes(sub) if m == want else 0, mask, tree)))


def optimizers(rank, mask):
  return {
      "adamw": optax.adamw(1e-3),
      "adamw_8bit": galore_jax.adamw_8bit(1e-3),
      "galore_adamw": galore_jax.galore_adamw(
          1e-3, rank=rank, projection_mask=mask),
      "galore_adamw_8bit": galore_jax.galore_adamw_8bit(
          1e-3, rank=rank, projection_mask=mask),
      "q_galore_adamw": galore_jax.q_galore_adamw(
          1e-3, rank=rank, projection_mask=mask),
  }


def closed_form(params, mask, rank):
  """Seeds' Q-GaLore total N + 2M + |proj| bytes: int8 weights and moments,
  M = one moment's elements (r max(m, n) if projected, else full), int4 proj."""
  n = m = proj = 0
  for x, projected in zip(jax.tree.leaves(params), jax.tree.leaves(mask)):
    n += x.size
    if projected:
      m += rank * max(x.shape)
      proj += rank * min(x.shape) / 2
    else:
      m += x.size
  return n + 2 * m + proj


def measure(name):
  d, inter, _, layers, rank = CONFIGS[name]
  params = abstract_params(d, inter, layers)
  mask = projection_mask(params)
  row = {"N": sum(x.size for x in jax.tree.leaves(params)), "rank": rank}
  for method, opt in optimizers(rank, mask).items():
    state = jax.eval_shape(opt.init, params)
    row[method] = nbytes(state)
    if method.startswith(("galore", "q_galore")):  # chain: state[0] is GaLore's
      base = state[0].base_state
      row[method + "/proj"] = nbytes(state[0].projector)
      row[method + "/low"] = (masked_bytes(mask, base.mu, True)
                              + masked_bytes(mask, base.nu, True))
      row[method + "/full"] = (masked_bytes(mask, base.mu, False)
                               + masked_bytes(mask, base.nu, False))
  quantized = jax.eval_shape(
      lambda p: galore_jax.quantize_params(p, mask=mask), params)
  bf16 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
                      params)  # unprojected leaves: bf16, as official
  row["w_int8"] = (masked_bytes(mask, quantized, True)
                   + masked_bytes(mask, bf16, False))
  row["closed"] = closed_form(params, mask, rank)
  return row


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
  args = ap.parse_args(argv)
  t0 = time.perf_counter()
  rows = {name: measure(name) for name in args.configs}
  mib = lambda b: f"{b / 2**20:,.1f}"
  failed = []

  print("## Optimizer state (MiB)\n")
  ratio_heads = [f"{a} / {b} (<= {t})" for (a, b), t in TARGETS.items()]
  print("| config | rank | N params | " + " | ".join(METHODS) + " | "
        + " | ".join(ratio_heads) + " |")
  print("|---" * (3 + len(METHODS) + len(TARGETS)) + "|")
  for name, r in rows.items():
    cells = [mib(r[m]) for m in METHODS]
    for (a, b), target in TARGETS.items():
      ratio = r[a] / r[b]
      ok = ratio <= target
      failed += [] if ok else [f"{name}: {a} / {b} = {ratio:.4f} > {target}"]
      cells.append(f"{ratio:.4f} {'PASS' if ok else 'FAIL'}")
    print(f"| {name} | {r['rank']} | {r['N'] / 1e6:,.1f}M | " + " | ".join(cells) + " |")

  print("\nExact state bytes:\n")
  print("| config | " + " | ".join(METHODS) + " |")
  print("|---" * (1 + len(METHODS)) + "|")
  for name, r in rows.items():
    print(f"| {name} | " + " | ".join(f"{r[m]:,}" for m in METHODS) + " |")

  galores = [m for m in METHODS if "galore" in m]
  print("\n## Where the GaLore states go (MiB): projector / low-rank moments"
        " (projected kernels) / full-space moments (embed, lm_head, norms)\n")
  print("| config | " + " | ".join(galores) + " |")
  print("|---" * (1 + len(galores)) + "|")
  for name, r in rows.items():
    print(f"| {name} | " + " | ".join(
        f"{mib(r[m + '/proj'])} / {mib(r[m + '/low'])} / {mib(r[m + '/full'])}"
        for m in galores) + " |")

  print("\n## Weights (MiB) and Q-GaLore total\n")
  print("| config | fp32 (4N) | bf16 (2N) | int8 weights | closed form"
        " N + 2M + \\|proj\\| | int8 weights + q_galore_adamw state"
        " | measured / closed form |")
  print("|---" * 7 + "|")
  for name, r in rows.items():
    total = r["w_int8"] + r["q_galore_adamw"]
    print(f"| {name} | {mib(4 * r['N'])} | {mib(2 * r['N'])} | {mib(r['w_int8'])}"
          f" | {mib(r['closed'])} | {mib(total)} | {total / r['closed']:.3f} |")
  print("\nint8 weights: the projected kernels (q, k, v, o, gate, up, down) as"
        " `quantize_params` stores them (8-bit codes + float32 scale and"
        " float32 offset per group of 256); embed, lm_head and norms counted in bf16, as"
        " the official Q-GaLore keeps them. Closed form: N = params at 1 byte,"
        " M = elements of one Adam moment (r max(m, n) per projected kernel,"
        " full size otherwise) at 1 byte each for m and v, |proj| ="
        " r min(m, n) / 2 bytes (int4); it ignores group scales/zeros, block"
        " absmax, bf16 embeddings and fp32 norm moments.\n")
  print(f"`python {' '.join(sys.argv)}`: jax {jax.__version__}, optax"
        f" {optax.__version__}, {time.perf_counter() - t0:.1f} s")
  if failed:
    sys.exit("target failed: " + "; ".join(failed))


if __name__ == "__main__":
  main()
