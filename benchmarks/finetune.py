"""Fine-tuning with every method: memory, quality and forgetting, on CPU.

Pre-trains a CPU-size LLaMA with AdamW on the LLaMA example's corpus (the
Python standard library's ``*.py`` sources, bytes), exports it with
``--save-hf``, then fine-tunes that checkpoint (``--init-from``) with every
method on a different text distribution: the interpreter's own non-Python
text files (``*.txt``, ``*.rst``, ``*.html`` under the stdlib directory:
IDLE's news, history and help, the license, e-mail test messages, numeric
test tables), English prose and markup the model has not seen, cut into
2 KB pieces of which 5% (by a hash of the name) validate. Every method
gets the same token budget, schedule (10% warmup, cosine to 10%) and seed;
GaLore, Q-GaLore, LoRA and QLoRA use the checkpoint's rank (hidden / 4).

Peak learning rates: 1e-3 for the Adam-family methods, LoRA, QLoRA, head and
adapters; 4e-3 with scale 0.25 for the GaLore family (the same step size as
AdamW's 1e-3 in the projected subspace). ``--lr METHOD=LR`` overrides one;
``--lr-grid 0.3,1,3`` trains each method at those multiples of its rate
and reports each at its best (lowest val loss on the new text), with the
whole grid in a second table. A run whose results are already in ``--out``
(same settings) is read back, not trained again.

For each method the table gives the trainable params, XLA's compiled
train-step memory, the final validation loss on the new text, and the
validation loss on the old one after fine-tuning (each fine-tuned model is
exported with ``--save-hf`` and read back, so the export is exercised too).
Targets: GaLore's val loss within 2% of full fine-tuning (adamw) and no
worse than LoRA at the same rank; the head method's compiled step below
every other method's.

  python benchmarks/finetune.py [--model llama-1m] [--pretrain-steps 1000] \\
      [--steps 300] [--lr-grid 0.3,1,3] [--out runs/finetune]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
from flax import nnx

from examples.llama import configs
from examples.llama import hf
from examples.llama import input_pipeline
from examples.llama import models
from examples.llama import train as train_lib

TEXT_SUFFIXES = (".txt", ".rst", ".html")
# (label, method, lora_targets)
RUNS = (("adamw", "adamw", "all"), ("adamw_8bit", "adamw_8bit", "all"),
        ("galore", "galore", "all"), ("galore_8bit", "galore_8bit", "all"),
        ("q_galore", "q_galore", "all"), ("lora", "lora", "all"),
        ("lora_attention", "lora", "attention"), ("lora_mlp", "lora", "mlp"),
        ("qlora", "qlora", "all"), ("adapters", "adapters", "all"),
        ("head", "head", "all"))
GALORE_LR, OTHER_LR = 4e-3, 1e-3


def text_corpus(out: pathlib.Path, chunk: int = 2048) -> pathlib.Path:
  """Writes the stdlib's non-Python text files to ``out`` in pieces of
  ``chunk`` bytes, one file each (``<path>.<i>``): the example's split by a
  hash of the file name then holds out 5% of the pieces, spread over every
  kind of text, not a few whole files."""
  root = input_pipeline.stdlib_dir()
  files = sorted(p for p in root.rglob("*") if p.suffix in TEXT_SUFFIXES
                 and p.is_file() and "site-packages" not in p.parts)
  if not files:
    raise SystemExit(f"no {'/'.join(TEXT_SUFFIXES)} files under {root}")
  for f in files:
    data = f.read_bytes()
    dest = out / f.relative_to(root)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(data), chunk):
      dest.with_name(f"{dest.name}.{i // chunk:04d}").write_bytes(
          data[i:i + chunk])
  return out


def mean_loss(directory: pathlib.Path, tokens_NxBxT) -> float:
  """The mean next-token loss of an exported checkpoint over batches."""
  model = models.Llama(hf.read_config(directory), rngs=nnx.Rngs(0))
  hf.load_into(model, directory)
  graphdef, params = nnx.split(model)

  @jax.jit
  def loss(params, tokens_NxBxT):
    m = nnx.merge(graphdef, params)
    return jax.lax.map(lambda t: models.loss_fn(m, t), tokens_NxBxT).mean()

  return float(loss(params, jnp.asarray(tokens_NxBxT)))


def fine_tune(config: configs.Config, run_dir: pathlib.Path,
              corpus) -> dict:
  """``train_method``'s result, or the one already in ``run_dir`` if that
  run finished with the same settings and its export exists."""
  done = run_dir / "result.json"
  if (done.is_file() and (run_dir / "args.json").is_file()
      and (pathlib.Path(config.save_hf) / "config.json").is_file()
      and json.loads((run_dir / "args.json").read_text()) == config.to_dict()):
    result = json.loads(done.read_text())
    if result["status"] == "done":
      print(f"[{run_dir.name}] reusing the finished run in {run_dir}",
            flush=True)
      return result
  return train_lib.train_method(config, run_dir, corpus, progress=False)


def trainable(result: dict) -> int:
  return sum(v for k, v in result["groups"].items() if k != "frozen")


def parse_lrs(items: list[str]) -> dict[str, float]:
  out = {}
  for item in items:
    label, eq, value = item.partition("=")
    if not eq or label not in {r[0] for r in RUNS}:
      raise SystemExit(f"--lr takes METHOD=LR with METHOD one of"
                       f" {', '.join(r[0] for r in RUNS)}; got {item!r}")
    out[label] = float(value)
  return out


def plot(rows: list[dict], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
  for i, r in enumerate(rows):
    records = [json.loads(x) for x in
               (pathlib.Path(r["run_dir"]) / "metrics.jsonl").read_text()
               .splitlines() if x.strip()]
    val = [(x["step"], x["val_loss"]) for x in records if "val_loss" in x]
    ax.plot(*zip(*val), marker="o", color=f"C{i % 10}", markersize=3,
            linestyle="-" if i < 10 else "--",
            label=f"{r['label']} ({r['new']:.3f})")
    bx.scatter(r["new"], r["old"], color=f"C{i % 10}",
               marker="o" if i < 10 else "s")
    bx.annotate(r["label"], (r["new"], r["old"]), fontsize=7,
                xytext=(3, 3), textcoords="offset points")
  ax.set_xlabel("fine-tuning step")
  ax.set_ylabel("val loss on the new text (nats / byte)")
  ax.set_title("fine-tuning on the stdlib's text files")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  bx.set_xlabel("val loss on the new text")
  bx.set_ylabel("val loss on the old text (Python sources)")
  bx.set_title("learning (left is better) vs forgetting (lower is better)")
  bx.grid(alpha=0.3)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="llama-1m")
  p.add_argument("--pretrain-steps", type=int, default=1000)
  p.add_argument("--steps", type=int, default=300,
                 help="fine-tuning steps, every method")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--eval-every", type=int, default=50)
  p.add_argument("--eval-batches", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR")
  p.add_argument("--lr-grid", default="1", metavar="X1,X2",
                 help="multiples of each method's learning rate to train at")
  p.add_argument("--only", default=None, metavar="M1,M2",
                 help="fine-tune these rows only")
  p.add_argument("--out", default="runs/finetune")
  p.add_argument("--plot", default=None, metavar="PNG",
                 help="default: OUT/finetune.png")
  args = p.parse_args(argv)
  lrs = parse_lrs(args.lr)
  grid = [float(x) for x in args.lr_grid.split(",")]
  out = pathlib.Path(args.out)
  base = configs.Config(
      steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
      eval_every=args.eval_every, eval_batches=args.eval_batches,
      save_every=max(args.steps, args.pretrain_steps), seed=args.seed)
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind},"
        f" {args.model}", flush=True)

  old = input_pipeline.load(None)
  pretrained = out / "pretrained"
  if (pretrained / "config.json").is_file():
    print(f"reusing the pre-trained checkpoint in {pretrained}", flush=True)
  else:
    config = dataclasses.replace(
        base, model=args.model, method="adamw", steps=args.pretrain_steps,
        save_every=args.pretrain_steps, save_hf=str(pretrained))
    train_lib.train_method(config, out / "pretrain", old, progress=False)

  new = input_pipeline.load(str(text_corpus(out / "text")))
  old_val = input_pipeline.eval_batches(old.val, args.eval_batches,
                                        args.batch_size, args.seq_len)
  new_val = input_pipeline.eval_batches(new.val, args.eval_batches,
                                        args.batch_size, args.seq_len)
  start = {"old": mean_loss(pretrained, old_val),
           "new": mean_loss(pretrained, new_val)}

  runs = []
  chosen = None if args.only is None else set(args.only.split(","))
  for label, method, targets in RUNS:
    if chosen is not None and label not in chosen:
      continue
    base_lr = lrs.get(label, GALORE_LR if "galore" in method else OTHER_LR)
    for x in grid:
      lr = float(f"{base_lr * x:.3g}")
      name = f"{label}_lr{lr:g}"
      export, run_dir = out / "finetuned" / name, out / "finetune" / name
      config = dataclasses.replace(
          base, init_from=str(pretrained), method=method, lr=lr,
          lora_targets=targets, save_hf=str(export))
      r = fine_tune(config, run_dir, new)
      runs.append({"label": label, "lr": lr, "trainable": trainable(r),
                   "params": r["params"], "memory": r["xla_memory"]["total"],
                   "new": r["final_val_loss"],
                   "old": mean_loss(export, old_val),
                   "tokens_per_s": r["tokens_per_s"], "run_dir": str(run_dir)})
  rows = [min((r for r in runs if r["label"] == label),
              key=lambda r: r["new"])
          for label in dict.fromkeys(r["label"] for r in runs)]

  tokens = args.steps * args.batch_size * args.seq_len
  print(f"\n{args.model} pre-trained {args.pretrain_steps} steps on the"
        f" stdlib sources, fine-tuned {args.steps} steps x"
        f" {args.batch_size} x {args.seq_len} = {tokens:,} tokens on the"
        " stdlib text files. Before fine-tuning: val loss"
        f" {start['new']:.4f} on the new text, {start['old']:.4f} on the"
        " old.\n")
  print("| method | peak lr | trainable params | XLA step memory (MiB) |"
        " val loss, new text | vs adamw | val loss, old text | forgetting |"
        " tokens/s |")
  print("|---|---|---|---|---|---|---|---|---|")
  by = {r["label"]: r for r in rows}
  full = by.get("adamw")
  for r in rows:
    ratio = "-" if full is None else f"{r['new'] / full['new']:.3f}x"
    print(f"| {r['label']} | {r['lr']:g} | {r['trainable']:,} |"
          f" {r['memory'] / 2**20:,.1f} | {r['new']:.4f} | {ratio} |"
          f" {r['old']:.4f} | {r['old'] - start['old']:+.4f} |"
          f" {r['tokens_per_s']:,.0f} |", flush=True)

  checks = []
  if {"galore", "adamw"} <= set(by):
    ratio = by["galore"]["new"] / by["adamw"]["new"]
    checks.append(("galore val loss <= 1.02x adamw's", ratio <= 1.02,
                   f"{ratio:.4f}x"))
  if {"galore", "lora"} <= set(by):
    checks.append(("galore val loss <= lora's (same rank)",
                   by["galore"]["new"] <= by["lora"]["new"],
                   f"{by['galore']['new']:.4f} vs {by['lora']['new']:.4f}"))
  if "head" in by and len(by) > 1:
    others = min(r["memory"] for r in rows if r["label"] != "head")
    checks.append(("head's compiled step below every other method's",
                   by["head"]["memory"] < others,
                   f"{by['head']['memory'] / 2**20:.1f} vs"
                   f" {others / 2**20:.1f} MiB"))
  if checks:
    print("\n| target | result | measured |\n|---|---|---|")
    for name, ok, measured in checks:
      print(f"| {name} | {'met' if ok else 'MISSED'} | {measured} |")
  plot_path = pathlib.Path(args.plot) if args.plot else out / "finetune.png"
  if len(grid) > 1:
    lrs_of = {r["label"]: [] for r in runs}
    for r in runs:
      lrs_of[r["label"]].append(r)
    print("\nThe grid (val loss on the new text at each multiple of the"
          " method's rate):\n\n| method | "
          + " | ".join(f"x{x:g}" for x in grid) + " |\n|---|"
          + "---|" * len(grid))
    for label, rs in lrs_of.items():
      print(f"| {label} | " + " | ".join(
          f"{r['new']:.4f} ({r['lr']:g})" for r in rs) + " |")
  plot(rows, plot_path)
  print(f"\nplot: {plot_path}")
  (out / "finetune.json").write_text(json.dumps(
      {"start": start, "rows": rows, "runs": runs, "tokens": tokens},
      indent=1))
  return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
  sys.exit(main())
