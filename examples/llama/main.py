r"""Pre-train or fine-tune a LLaMA with AdamW, 8-bit Adam, GaLore, Q-GaLore,
LoRA or QLoRA, on one GPU or on CPU.

  python -m examples.llama.train                       # llama-1m, galore, stdlib
  python -m examples.llama.train --compare adamw,galore,q_galore --steps 600
  python -m examples.llama.train --model llama-60m --method galore \
      --data corpus.txt --dtype bf16 --batch-size 64 --seq-len 256
  python -m examples.llama.train --init-from ./hf-llama --method galore ...
  python -m examples.llama.train ... --resume          # continue exactly
  python -m examples.llama.train --layerwise ...      # per-layer updates
  python -m examples.llama.train ... --distributed --mesh data=2,fsdp=16  # each host

(``python -m examples.llama.main`` is the same command.) Writes to
``--out/<method>/``: ``metrics.jsonl`` (train loss every step, validation
loss and perplexity every ``--eval-every``), ``result.json``, ``args.json``
(the run's settings), Orbax checkpoints in ``ckpt/``; and to ``--out``:
``loss.png`` (every run of the directory on one plot) and ``summary.md``.

The flags are the fields of :class:`examples.llama.configs.Config`, plus the
ones below that say where and how to run: ``--out`` (the work directory),
``--resume`` / ``--resume-step``, ``--distributed`` and its peers, and
``--no-progress``.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):  # `python examples/llama/main.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax

from examples.llama import configs
from examples.llama import train as train_lib


def parser() -> argparse.ArgumentParser:
  """The flags: one per :class:`~examples.llama.configs.Config` field, then
  the run's own (work directory, resume, processes, progress bar)."""
  p = argparse.ArgumentParser(
      prog="python -m examples.llama.train",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  for f in dataclasses.fields(configs.Config):
    md = f.metadata
    if isinstance(f.default, bool):
      p.add_argument(configs.flag(f.name), action="store_true",
                     help=md["help"])
    else:
      p.add_argument(configs.flag(f.name), default=f.default,
                     type=md["type"], choices=md["choices"],
                     metavar=md["metavar"], help=md["help"])
  a = p.add_argument
  a("--out", default="runs/llama", help="output directory")
  a("--resume-step", type=int, default=None, metavar="N",
    help="with --resume: continue from checkpoint N instead of the newest"
         " (e.g. the newest intact one after a corrupt save)")
  a("--resume", action="store_true",
    help="continue from the latest checkpoint in --out/<method>/ckpt")
  a("--distributed", action="store_true",
    help="several hosts (processes): call jax.distributed.initialize()"
         " first; run the same command on every host, with --mesh over all"
         " their devices. Under SLURM or Open MPI it finds its peers;"
         " elsewhere give the three flags below")
  a("--coordinator", default=None, metavar="HOST:PORT",
    help="--distributed: process 0's address (or JAX_COORDINATOR_ADDRESS)")
  a("--num-processes", type=int, default=None,
    help="--distributed: how many processes")
  a("--process-id", type=int, default=None,
    help="--distributed: this process's index, 0 to --num-processes - 1")
  a("--no-progress", action="store_true", help="no progress bar")
  return p


def _check_run_flags(p: argparse.ArgumentParser, flags: argparse.Namespace,
                     config: configs.Config) -> None:
  if flags.resume_step is not None and not flags.resume:
    p.error("--resume-step needs --resume")
  if flags.resume_step is not None and flags.resume_step < 1:
    p.error(f"--resume-step must be >= 1, got {flags.resume_step}")
  given = [f for f in ("coordinator", "num_processes", "process_id")
           if getattr(flags, f) is not None]
  if given and not flags.distributed:
    p.error(f"{configs.flag(given[0])} needs --distributed")
  if flags.num_processes is not None and flags.num_processes < 1:
    p.error(f"--num-processes must be >= 1, got {flags.num_processes}")
  if flags.process_id is not None and not (
      0 <= flags.process_id < (flags.num_processes or flags.process_id + 1)):
    p.error(f"--process-id must be in [0, --num-processes), got"
            f" {flags.process_id}")
  if flags.distributed and config.mesh is None:
    p.error("--distributed needs a --mesh over the devices of every process")


def parse(argv: Optional[Sequence[str]] = None
          ) -> tuple[configs.Config, argparse.Namespace]:
  """``(config, flags)`` of a command line; an invalid one exits with an
  argparse error (exit code 2). ``flags`` holds every flag."""
  p = parser()
  flags = p.parse_args(argv)
  fields = configs.field_names()
  try:
    config = configs.Config(**{k: v for k, v in vars(flags).items()
                               if k in fields})
  except ValueError as e:
    p.error(str(e))
  _check_run_flags(p, flags, config)
  return config, flags


def config_from_flags(argv: Sequence[str]) -> configs.Config:
  """The :class:`~examples.llama.configs.Config` of a command line."""
  return parse(argv)[0]


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command line; returns its exit code: 0 done, 1 a non-finite
  loss or state, 2 a bad input or run directory, 130 interrupted."""
  config, flags = parse(argv)
  if flags.distributed:
    jax.distributed.initialize(flags.coordinator, flags.num_processes,
                               flags.process_id)
  try:
    results = train_lib.train_and_evaluate(
        config, flags.out, resume=flags.resume, resume_step=flags.resume_step,
        progress=not flags.no_progress)
  except train_lib.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except (OSError, ValueError) as e:  # FileNotFoundError is an OSError
    print(f"error: {e}", file=sys.stderr)
    return 2
  if train_lib.is_lead():
    out = pathlib.Path(flags.out)
    print((out / "summary.md").read_text(), flush=True)
    print(f"plot: {out / 'loss.png'}", flush=True)
  return 0 if results[-1]["status"] == "done" else 130


if __name__ == "__main__":
  sys.exit(main())
