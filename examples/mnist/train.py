r"""Can low-rank replace full rank? An MNIST MLP trained seven ways, per rank.

The lecture's experiment (seed 003) on a 784-512-512-10 ReLU MLP: full-rank
layers vs factorized layers ``W = A B`` with a rank-aware ("LoRA") init or
the default ("autoencoder") init, and GaLore's answer from the other side:
full-rank weights, low-rank gradients.

  python examples/mnist/train.py --methods all --ranks 4,16,64,256 --epochs 5

Methods (Adam, batch 128, no weight decay, cosine decay of the learning rate
over all steps, for all; peak lr 1e-3, and the GaLore paper's recipe for
GaLore and Q-GaLore: lr 0.01 with scale 0.25):

* ``full``: full-rank layers, ``optax.adamw``.
* ``adamw_8bit``: full-rank layers, ``galore_jax.adamw_8bit``.
* ``lowrank-lora-init`` / ``lowrank-default-init``: every layer with
  ``rank < min(in, out)`` becomes ``galore_jax.lora.LowRankLinear`` (``init=
  "lora"`` / ``"default"``), trained in full.
* ``galore``: full-rank layers, ``galore_adamw`` (rank, gap 200, scale 0.25):
  the kernels with both sides above the rank are projected.
* ``q_galore``: ``q_galore_adamw`` with INT8 kernels updated by stochastic
  rounding (``quantize_params`` / ``apply_updates_stochastic``).
* ``lora``: a frozen *random* base (kernels and biases) plus rank-r adapters
  on every layer with ``rank < min(in, out)``; the other layers (the 512 x 10
  head for ranks >= 10) train in full. It shows why LoRA needs a pre-trained
  base.

Writes to ``--out``: ``results.jsonl`` (one record per run), ``summary.md``,
``accuracy_default_init.png``, ``accuracy_lora_init.png``,
``accuracy_all.png`` (accuracy vs epoch) and ``accuracy_vs_rank.png``.
"""

from __future__ import annotations

import argparse
import math
import json
import pathlib
import statistics
import sys
import time
from typing import Optional, Sequence

if __package__ in (None, ""):  # `python examples/mnist/train.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import galore_jax
from galore_jax import lora
from galore_jax import memory
from examples.mnist import data as data_lib

SIZES = (784, 512, 512, 10)
METHODS = ("full", "adamw_8bit", "lowrank-lora-init", "lowrank-default-init",
           "galore", "q_galore", "lora")
RANKED = METHODS[2:]  # the methods that take a rank
MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics: inputs are standardized


class MLP(nnx.Module):
  """784-512-512-10 with ReLU; layers with ``rank < min(in, out)`` are
  factorized (``LowRankLinear``) when ``rank`` is given."""

  def __init__(self, rank: Optional[int] = None, init: str = "lora", *,
               rngs: nnx.Rngs):
    layers = []
    for d_in, d_out in zip(SIZES[:-1], SIZES[1:]):
      if rank is not None and rank < min(d_in, d_out):
        layers.append(lora.LowRankLinear(d_in, d_out, rank, init=init,
                                         rngs=rngs))
      else:
        layers.append(nnx.Linear(d_in, d_out, rngs=rngs))
    self.layers = nnx.List(layers)

  def __call__(self, x_BxI):
    for layer in self.layers[:-1]:
      x_BxI = jax.nn.relu(layer(x_BxI))
    return self.layers[-1](x_BxI)


def adapted_layers(rank: int) -> list[int]:
  """Indices of the layers a rank-``rank`` factorization or adapter fits."""
  return [i for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:]))
          if rank < min(a, b)]


def build(method: str, rank: Optional[int], args, key_seed: int,
          total_steps: int = 1):
  """``(graphdef, train, frozen, tx, quantized)`` for one run."""
  rngs = nnx.Rngs(key_seed)
  if method.startswith("lowrank"):
    model = MLP(rank, init="lora" if method == "lowrank-lora-init"
                else "default", rngs=rngs)
  else:
    model = MLP(rngs=rngs)
  if method == "lora":
    adapted = adapted_layers(rank)
    if not adapted:
      raise ValueError(f"rank {rank} fits no layer of {SIZES}")
    others = [i for i in range(len(SIZES) - 1) if i not in adapted]
    trainable = "|".join(f"^layers/{i}/" for i in others) or None
    lora.apply(model, rank, targets="|".join(f"^layers/{i}$" for i in adapted),
               trainable=trainable, rngs=nnx.Rngs(key_seed + 1))
  graphdef, train, frozen = nnx.split(model, nnx.Param, ...)
  train, frozen = nnx.to_pure_dict(train), nnx.to_pure_dict(frozen)
  kw = dict(weight_decay=0.0)
  peak = args.lr if args.lr is not None else (
      1e-2 if method in ("galore", "q_galore") else 1e-3)
  lr = (optax.cosine_decay_schedule(peak, total_steps)
        if args.schedule == "cosine" else peak)
  if method == "adamw_8bit":
    tx = galore_jax.adamw_8bit(lr, **kw)
  elif method == "galore":
    tx = galore_jax.galore_adamw(lr, rank=rank,
                                 update_proj_gap=args.update_proj_gap,
                                 scale=args.galore_scale, **kw)
  elif method == "q_galore":
    tx = galore_jax.q_galore_adamw(lr, rank=rank,
                                   update_proj_gap=args.update_proj_gap,
                                   scale=args.galore_scale, **kw)
  else:
    tx = optax.adamw(lr, **kw)
  quantized = method == "q_galore"
  if quantized:
    train = galore_jax.quantize_params(train)  # the kernels: INT8
  return graphdef, train, frozen, tx, quantized


def make_epoch(graphdef, tx, quantized: bool, batch_size: int, n: int):
  """A jitted epoch: shuffle, then ``lax.scan`` over ``n // batch_size``
  batches (the last partial batch dropped)."""
  steps = n // batch_size

  def loss_fn(params, frozen, x, y):
    logits = nnx.merge(graphdef, params, frozen)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def epoch(train, opt_state, key, frozen, x_NxI, y_N):
    key, perm_key = jax.random.split(key)
    order = jax.random.permutation(perm_key, x_NxI.shape[0])
    order = order[:steps * batch_size].reshape(steps, batch_size)

    def body(carry, idx):
      train, opt_state, key = carry
      params = galore_jax.dequantize_params(train) if quantized else train
      loss, grads = jax.value_and_grad(loss_fn)(params, frozen, x_NxI[idx],
                                                y_N[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      key, sub = jax.random.split(key)
      if quantized:
        train = galore_jax.apply_updates_stochastic(train, updates, sub)
      else:
        train = optax.apply_updates(train, updates)
      return (train, opt_state, key), loss

    (train, opt_state, key), losses = jax.lax.scan(
        body, (train, opt_state, key), order)
    return train, opt_state, key, losses.mean()

  def accuracy(train, frozen, x_NxI, y_N):
    params = galore_jax.dequantize_params(train) if quantized else train
    logits = nnx.merge(graphdef, params, frozen)(x_NxI)
    return jnp.mean(jnp.argmax(logits, -1) == y_N)

  return epoch, accuracy


def _progress(desc: str, total: int, disable: bool):
  if disable:
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, unit="epoch", dynamic_ncols=True,
              leave=True)


def run_one(method: str, rank: Optional[int], data, args) -> dict:
  """Trains one (method, rank); returns its record."""
  x_train, y_train, x_test, y_test = data
  steps = args.epochs * (len(x_train) // args.batch_size)
  graphdef, train, frozen, tx, quantized = build(method, rank, args,
                                                 args.seed, steps)
  trainable = sum(x.size for x in jax.tree.leaves(
      galore_jax.dequantize_params(train) if quantized else train))
  opt_state = tx.init(galore_jax.dequantize_params(train) if quantized
                      else train)
  state_bytes = memory.nbytes(opt_state)
  weight_bytes = memory.nbytes(train) + memory.nbytes(frozen)
  epoch_fn, acc_fn = make_epoch(graphdef, tx, quantized, args.batch_size,
                                len(x_train))
  key = jax.random.PRNGKey(args.seed)
  epoch = jax.jit(epoch_fn, donate_argnums=(0, 1, 2)).lower(
      train, opt_state, key, frozen, x_train, y_train).compile()
  accuracy = jax.jit(acc_fn)
  accs = [float(accuracy(train, frozen, x_test, y_test))]  # at init
  losses, seconds = [], []
  label = method if rank is None else f"{method} r{rank}"
  bar = _progress(label, args.epochs, args.no_progress)
  for _ in range(args.epochs):
    t0 = time.perf_counter()
    train, opt_state, key, loss = epoch(train, opt_state, key, frozen,
                                        x_train, y_train)
    loss = float(loss)
    seconds.append(time.perf_counter() - t0)
    losses.append(loss)
    accs.append(float(accuracy(train, frozen, x_test, y_test)))
    if bar is not None:
      bar.set_postfix(loss=f"{loss:.4f}", acc=f"{100 * accs[-1]:.2f}%",
                      refresh=False)
      bar.update(1)
  if bar is not None:
    bar.close()
  if args.no_progress:
    print(f"{label}: test accuracy {100 * accs[-1]:.2f}%", flush=True)
  return {"method": method, "rank": rank, "accuracy": accs,
          "final_accuracy": accs[-1], "train_loss": losses,
          "trainable_params": int(trainable),
          "optimizer_state_bytes": int(state_bytes),
          "weight_bytes": int(weight_bytes),
          "seconds_per_epoch": statistics.median(seconds),
          "epochs": args.epochs, "seed": args.seed}


# ---------------------------------------------------------------------------
# Reports.


def _rank_colors(ranks):
  import matplotlib  # pylint: disable=g-import-not-at-top
  cmap = matplotlib.colormaps["viridis"]
  return {r: cmap(i / max(1, len(ranks) - 1)) for i, r in enumerate(ranks)}


def plot(records: Sequence[dict], out: pathlib.Path) -> list[pathlib.Path]:
  """The seed's three accuracy-vs-epoch plots and accuracy vs rank."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  full = next((r for r in records if r["method"] == "full"), None)
  ranks = sorted({r["rank"] for r in records if r["rank"] is not None})
  colors = _rank_colors(ranks)
  paths = []

  def baseline(ax):
    if full is not None:
      ax.plot(full["accuracy"], "k-o", markersize=3, label="full rank",
              linewidth=2)

  def finish(fig, ax, title, name):
    ax.set_xlabel("epoch (0: at init)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    paths.append(out / name)

  for method, name, title in (
      ("lowrank-default-init", "accuracy_default_init.png",
       "factorized layers, default ('autoencoder') init vs full rank"),
      ("lowrank-lora-init", "accuracy_lora_init.png",
       "factorized layers, LoRA init vs full rank")):
    runs = [r for r in records if r["method"] == method]
    if not runs:
      continue
    fig, ax = plt.subplots(figsize=(7, 4.5))
    baseline(ax)
    for r in runs:
      ax.plot(r["accuracy"], "-o", markersize=3, color=colors[r["rank"]],
              label=f"rank {r['rank']}")
    finish(fig, ax, title, name)

  if ranks:
    cols = min(4, len(ranks))
    rows = -(-len(ranks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows),
                             squeeze=False, sharey=True)
    for ax, rank in zip(axes.flat, ranks):
      baseline(ax)
      for i, method in enumerate(RANKED):
        r = next((x for x in records if x["method"] == method
                  and x["rank"] == rank), None)
        if r is not None:
          ax.plot(r["accuracy"], "-o", markersize=2, color=f"C{i}",
                  label=method)
      ax.set_title(f"rank {rank}")
      ax.set_xlabel("epoch")
      ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(ranks):]:
      ax.axis("off")
    axes[0, 0].set_ylabel("test accuracy")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("all methods: test accuracy vs epoch, per rank")
    fig.tight_layout()
    fig.savefig(out / "accuracy_all.png", dpi=110)
    plt.close(fig)
    paths.append(out / "accuracy_all.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, method in enumerate(RANKED):
      runs = sorted((r for r in records if r["method"] == method),
                    key=lambda r: r["rank"])
      if runs:
        ax.plot([r["rank"] for r in runs],
                [r["final_accuracy"] for r in runs], "-o", color=f"C{i}",
                label=method)
    for method, style in (("full", "k--"), ("adamw_8bit", "k:")):
      r = next((x for x in records if x["method"] == method), None)
      if r is not None:
        ax.axhline(r["final_accuracy"], linestyle=style[1:], color="k",
                   label=f"{method} (no rank)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank")
    ax.set_ylabel(f"test accuracy after {records[0]['epochs']} epochs")
    ax.set_title("final accuracy vs rank")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_rank.png", dpi=110)
    plt.close(fig)
    paths.append(out / "accuracy_vs_rank.png")
  return paths


def summary(records: Sequence[dict]) -> str:
  """Markdown: final accuracy, trainable params, state bytes, s/epoch."""
  rows = ["| method | rank | final test acc. (%) | trainable params |"
          " optimizer state (bytes) | weights (bytes) | s / epoch |",
          "|---|---|---|---|---|---|---|"]
  for r in records:
    rows.append(
        f"| {r['method']} | {'-' if r['rank'] is None else r['rank']} |"
        f" {100 * r['final_accuracy']:.2f} | {r['trainable_params']:,} |"
        f" {r['optimizer_state_bytes']:,} | {r['weight_bytes']:,} |"
        f" {r['seconds_per_epoch']:.2f} |")
  return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------
# Command line.


def _int_list(text: str) -> list[int]:
  try:
    values = [int(x) for x in text.split(",") if x]
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"expected integers like 4,16,64: {e}")
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"ranks must be positive, got {text!r}")
  return values


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python examples/mnist/train.py",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  a = p.add_argument
  a("--methods", default="all",
    help=f"'all' or a comma list of: {', '.join(METHODS)}")
  a("--ranks", type=_int_list, default=[4, 16, 64, 256],
    help="ranks for the rank-taking methods (2,4,...,256)")
  a("--epochs", type=int, default=5)
  a("--batch-size", type=int, default=128)
  a("--lr", type=float, default=None,
    help="peak learning rate (default: the GaLore paper's recipe, 0.01 with"
         " --galore-scale 0.25 for galore and q_galore; 1e-3 otherwise)")
  a("--schedule", default="cosine", choices=("cosine", "constant"),
    help="cosine: decay to 0 over all the steps")
  a("--update-proj-gap", type=int, default=200)
  a("--galore-scale", type=float, default=0.25)
  a("--seed", type=int, default=0)
  a("--data", default=None, metavar="PATH",
    help="mnist.npz or a directory of the four IDX files (default:"
         f" {data_lib.DEFAULT_DIR}, downloaded if missing)")
  a("--train-limit", type=int, default=None,
    help="train on the first N examples only")
  a("--out", default="runs/mnist")
  a("--no-progress", action="store_true")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = parser()
  args = p.parse_args(argv)
  methods = (list(METHODS) if args.methods == "all"
             else [m for m in args.methods.split(",") if m])
  bad = [m for m in methods if m not in METHODS]
  if bad or not methods:
    p.error(f"--methods: unknown {bad or args.methods!r}; known: all,"
            f" {', '.join(METHODS)}")
  for name in ("epochs", "batch_size", "update_proj_gap"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1")
  for name in ("lr", "galore_scale"):
    value = getattr(args, name)
    if value is not None and not (value > 0 and math.isfinite(value)):
      p.error(f"--{name.replace('_', '-')} must be finite and > 0, got"
              f" {value}")
  if args.update_proj_gap > 2**30:
    p.error(f"--update-proj-gap must be <= 2**30, got {args.update_proj_gap}")
  if args.seed < 0:
    p.error(f"--seed must be >= 0, got {args.seed}")

  if args.train_limit is not None and args.train_limit < args.batch_size:
    p.error(f"--train-limit must be >= --batch-size ({args.batch_size})")
  try:
    mnist = data_lib.load(args.data)
  except data_lib.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  flat = lambda x: (jnp.asarray(x.reshape(len(x), -1), jnp.float32) / 255.0
                    - MEAN) / STD
  x_train, y_train = mnist.x_train, mnist.y_train
  if args.train_limit is not None:
    x_train, y_train = x_train[:args.train_limit], y_train[:args.train_limit]
  data = (flat(x_train), jnp.asarray(y_train, jnp.int32), flat(mnist.x_test),
          jnp.asarray(mnist.y_test, jnp.int32))
  print(f"MNIST: {len(x_train):,} train / {len(mnist.x_test):,} test images;"
        f" jax {jax.__version__} on {jax.devices()[0].device_kind}",
        flush=True)

  out = pathlib.Path(args.out)
  results = out / "results.jsonl"
  try:
    out.mkdir(parents=True, exist_ok=True)
    results.write_text("")
  except OSError as e:
    print(f"error: --out {out} is not a writable directory"
          f" ({e.strerror or e})", file=sys.stderr)
    return 2
  records = []
  for method in methods:
    ranks = args.ranks if method in RANKED else [None]
    for rank in ranks:
      if method == "lora" and not adapted_layers(rank):
        print(f"lora r{rank}: skipped, no layer has min(in, out) > {rank}")
        continue
      record = run_one(method, rank, data, args)
      records.append(record)
      with results.open("a") as f:
        f.write(json.dumps(record) + "\n")
  table = summary(records)
  (out / "summary.md").write_text(table)
  paths = plot(records, out)
  print("\n" + table, flush=True)
  print("plots: " + ", ".join(str(x) for x in paths), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
