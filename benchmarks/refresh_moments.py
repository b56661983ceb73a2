"""Keep, reset or transport Adam's moments when GaLore's subspace changes?

Trains the LLaMA example with ``--method galore --on-refresh MODE`` for each
mode and seed (same config, token budget and schedule), then reports the
final validation loss (mean and spread over seeds) and the loss spike after
each refresh: the max training loss over the 20 steps after a refresh minus
the mean over the 20 steps before it, averaged over the refreshes after the
first (steps gap, 2 gap, ...) and the seeds.

  python benchmarks/refresh_moments.py [--model llama-tiny] [--steps 1000]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from examples.llama import main as main_lib  # pylint: disable=g-import-not-at-top

MODES = ("keep", "reset", "transport")


def spikes(losses: dict[int, float], gap: int, steps: int, window: int):
  """Max loss in the ``window`` steps after each refresh minus the mean of
  the ``window`` steps before it."""
  out = []
  for s in range(gap, steps - window, gap):
    # Step numbers in metrics.jsonl are 1-based: step s + 1 uses the
    # projectors refreshed at count s.
    after = [losses[t] for t in range(s + 1, s + 1 + window)]
    before = [losses[t] for t in range(s + 1 - window, s + 1)]
    out.append(max(after) - statistics.mean(before))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="llama-tiny")
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--gap", type=int, default=200)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--svd", default="exact")
  p.add_argument("--window", type=int, default=20)
  p.add_argument("--out", default="runs/refresh_moments")
  args = p.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",")]
  rows = {}
  for mode in MODES:
    for seed in seeds:
      out = pathlib.Path(args.out) / f"{mode}_seed{seed}"
      argv = ["--model", args.model, "--method", "galore", "--steps",
              str(args.steps), "--update-proj-gap", str(args.gap),
              "--on-refresh", mode, "--svd", args.svd, "--seed", str(seed),
              "--eval-every", str(args.steps), "--eval-batches", "16",
              "--save-every", str(args.steps), "--out", str(out),
              "--no-progress"]
      if main_lib.main(argv) != 0:
        raise SystemExit(f"{mode} seed {seed} failed")
      records = [json.loads(x) for x in
                 (out / "galore" / "metrics.jsonl").read_text().splitlines()]
      losses = {r["step"]: r["loss"] for r in records if "loss" in r}
      val = [r["val_loss"] for r in records if "val_loss" in r][-1]
      rows.setdefault(mode, []).append(
          (val, spikes(losses, args.gap, args.steps, args.window)))

  print(f"\n{args.model}, galore, {args.steps} steps, gap {args.gap}, svd"
        f" {args.svd}, seeds {args.seeds}:\n")
  print("| on_refresh | final val loss (mean) | min..max over seeds |"
        f" loss spike after a refresh (mean, {args.window} steps) |"
        " largest spike |")
  print("|---|---|---|---|---|")
  for mode, runs in rows.items():
    vals = [v for v, _ in runs]
    sp = [x for _, s in runs for x in s]
    print(f"| {mode} | {statistics.mean(vals):.4f} | {min(vals):.4f}.."
          f"{max(vals):.4f} | {statistics.mean(sp):+.4f} | {max(sp):+.4f} |",
          flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
