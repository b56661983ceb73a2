"""Orbax checkpoints of the LLaMA example, and the checks around a resume.

A run directory ``<out>/<method>/`` holds ``args.json`` (the settings of
the run, :data:`RECORD`) and ``ckpt/<step>/``. Nothing here deletes a
checkpoint: a fresh run over checkpoints, a resume without its settings
record or with other state settings, and a corrupt checkpoint are refused
with a ``ValueError`` that says what to do; checkpoints newer than the one
resumed from are moved to ``ckpt-set-aside/``.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

RECORD = "args.json"
# What a fresh run replaces (a run directory's records, no checkpoints).
RECORDS = ("metrics.jsonl", "result.json", RECORD)


def manager(directory: pathlib.Path) -> ocp.CheckpointManager:
  """Keeps the 2 newest checkpoints; every save is synchronous."""
  return ocp.CheckpointManager(
      pathlib.Path(directory).resolve(),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=2, create=True, enable_async_checkpointing=False))


def save(mngr: ocp.CheckpointManager, step: int, tree: dict) -> None:
  mngr.save(step, args=ocp.args.StandardSave(tree), force=True)
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int, like: dict) -> dict:
  """Checkpoint ``step`` with the shapes, dtypes and shardings of
  ``like``."""
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                     sharding=getattr(x, "sharding", None)),
      like)
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


@jax.jit
def all_finite(*trees) -> jax.Array:
  """Whether every float leaf of ``trees`` is finite (one device scalar)."""
  leaves = [x for x in jax.tree.leaves(trees)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def check_run_dir(run_dir: pathlib.Path, resume: bool) -> None:
  """Refuses a run that would delete or build on checkpoints it cannot
  vouch for: a fresh run over a directory holding checkpoints, or a
  --resume whose directory has checkpoints but no args.json record."""
  ckpt_dir = run_dir / "ckpt"
  steps = (sorted(int(p.name) for p in ckpt_dir.iterdir()
                  if p.name.isdigit()) if ckpt_dir.is_dir() else [])
  if not steps:
    return
  steps = [str(s) for s in steps]
  if not resume:
    raise ValueError(
        f"{run_dir} already holds checkpoints (steps {', '.join(steps)}):"
        " pass --resume to continue that run, or another --out; nothing was"
        " deleted")
  if not (run_dir / RECORD).is_file():
    raise ValueError(
        f"--resume: {ckpt_dir} holds checkpoints (steps {', '.join(steps)})"
        f" but {run_dir / RECORD}, the record of the settings that wrote"
        " them, is missing: restore it (or copy the whole run directory);"
        " nothing was deleted")


def has_record(run_dir: pathlib.Path) -> bool:
  return (run_dir / RECORD).is_file()


def check_settings(run_dir: pathlib.Path, record: dict[str, Any],
                   state_fields: Sequence[str]) -> None:
  """Refuses to resume the run in ``run_dir`` with ``record``'s settings if
  one of ``state_fields`` differs from the saved record's."""
  saved = json.loads((run_dir / RECORD).read_text())
  diff = {k: (saved.get(k), record[k]) for k in state_fields
          if saved.get(k) != record[k]}
  if diff:
    raise ValueError(f"--resume: these settings differ from the saved run"
                     f" in {run_dir} (saved, now): {diff}")


def write_record(run_dir: pathlib.Path, record: dict[str, Any],
                 fresh: bool) -> None:
  """Writes ``record`` as the run's args.json; ``fresh``: first removes the
  old run's records (metrics, result; never checkpoints)."""
  if fresh:
    for name in RECORDS:
      (run_dir / name).unlink(missing_ok=True)
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / RECORD).write_text(json.dumps(record, indent=1))


def resume_step(mngr: ocp.CheckpointManager, ckpt_dir: pathlib.Path,
                wanted: Optional[int]) -> int:
  """``wanted``, or the newest step; a step that is not there is refused."""
  steps = sorted(mngr.all_steps())
  if wanted is None:
    return steps[-1]
  if wanted not in steps:
    raise ValueError(f"--resume-step {wanted}: {ckpt_dir} has steps"
                     f" {steps}")
  return wanted


def restore_checked(mngr: ocp.CheckpointManager, ckpt_dir: pathlib.Path,
                    step: int, like: dict) -> dict:
  """:func:`restore`, with a clear error for a corrupt or partial
  checkpoint that names the newest older one that restores."""
  try:
    return restore(mngr, step, like)
  except Exception as e:  # pylint: disable=broad-except
    older = [s for s in sorted(mngr.all_steps(), reverse=True) if s < step]
    intact = None
    for s in older:
      try:
        restore(mngr, s, like)
        intact = s
        break
      except Exception:  # pylint: disable=broad-except
        continue
    hint = ("no older checkpoint restores either" if intact is None else
            f"the newest intact checkpoint is step {intact}: resume from it"
            f" with --resume --resume-step {intact}")
    raise ValueError(
        f"--resume: checkpoint step {step} in {ckpt_dir} is corrupt,"
        f" partial or was written by other settings"
        f" ({type(e).__name__}: {str(e).splitlines()[0][:160]}); {hint}."
        " Nothing was deleted") from None


def restore_for_resume(mngr: ocp.CheckpointManager, ckpt_dir: pathlib.Path,
                       like: dict, wanted: Optional[int]) -> tuple[int, dict]:
  """``(step, state)`` of the checkpoint to resume from (``wanted`` or the
  newest), checked to hold that step."""
  start = resume_step(mngr, ckpt_dir, wanted)
  state = restore_checked(mngr, ckpt_dir, start, like)
  if int(state["step"]) != start:
    raise ValueError(f"checkpoint {start} in {ckpt_dir} holds step"
                     f" {int(state['step'])}")
  return start, state


def set_aside_newer(mngr: ocp.CheckpointManager, run_dir: pathlib.Path,
                    start: int) -> tuple[list[int], pathlib.Path]:
  """Moves checkpoints newer than ``start`` (when resuming from an older
  one) to ``run_dir/ckpt-set-aside/``, so the run can save those steps
  again and nothing is deleted. Returns the steps moved and where."""
  newer = [s for s in mngr.all_steps() if s > start]
  aside = run_dir / "ckpt-set-aside"
  if not newer:
    return newer, aside
  aside.mkdir(exist_ok=True)
  for s in newer:
    shutil.move(str(run_dir / "ckpt" / str(s)), str(aside / str(s)))
  mngr.reload()
  return newer, aside
