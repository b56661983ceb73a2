r"""Trains the LLaMA example: :func:`train_and_evaluate` and its loop.

  config = configs.Config(model="llama-tiny", compare="adamw,galore")
  train_and_evaluate(config, "runs/llama")  # or: python -m examples.llama.train

For each method of the config, :func:`train_method` trains in
``workdir/<method>/``: ``metrics.jsonl`` (train loss, gradient norm and lr
every step; validation loss and perplexity every ``eval_every``),
``result.json``, ``args.json`` (the :class:`~examples.llama.configs.Config`
of the run) and Orbax checkpoints in ``ckpt/`` every ``save_every`` steps
and at the end; with ``save_hf``, the trained model as a Hugging Face
checkpoint (:func:`export`). Then ``workdir/loss.png`` plots every run of
the directory and ``workdir/summary.md`` tabulates them.

The step is compiled ahead of time with the params, optimizer state and
PRNG key donated; the loss is checked on the host one step late, so
dispatch stays asynchronous. A first Ctrl-C saves a checkpoint after the
step (and the run stops, status "interrupted"), a second one aborts. A
resumed run is bit-identical to an uninterrupted one: a checkpoint holds
the params, optimizer state, PRNG key, step and data position, and the
batch at a data position is always the same
(:func:`examples.llama.input_pipeline.batch`). With several processes
(``jax.distributed``) all of them train; the first one alone writes files
and prints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Callable, Optional

if __package__ in (None, ""):  # `python examples/llama/train.py`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from examples.llama import checkpointing
from examples.llama import configs
from examples.llama import hf
from examples.llama import input_pipeline
from examples.llama import methods as methods_lib
from examples.llama import models


class NonFiniteLossError(RuntimeError):
  """The loss or gradient norm became NaN or infinite."""


def build_model(config: configs.Config, vocab: int) -> models.Llama:
  """The config's LLaMA with the data's vocabulary, or the Hugging Face
  checkpoint of ``config.init_from``."""
  if config.init_from is not None:
    cfg = hf.read_config(config.init_from)
    if vocab > cfg.vocab:
      raise ValueError(f"the data's vocabulary ({vocab}) is larger than the"
                       f" checkpoint's ({cfg.vocab}); pass its --tokenizer")
  else:
    cfg = dataclasses.replace(models.CONFIGS[config.model], vocab=vocab)
  model = models.Llama(
      cfg, dtype=configs.DTYPES[config.dtype],
      param_dtype=configs.DTYPES[config.param_dtype],
      scan_layers=config.scan_layers or config.layerwise,
      remat=config.remat, rngs=nnx.Rngs(config.seed))
  if config.init_from is not None:
    hf.load_into(model, config.init_from)
  return model


def train_and_evaluate(config: configs.Config, workdir: str | pathlib.Path,
                       *, resume: bool = False,
                       resume_step: Optional[int] = None,
                       progress: bool = True) -> list[dict]:
  """Trains each method of ``config`` in ``workdir/<method>/``, one after
  the other, then writes ``workdir/loss.png`` and ``workdir/summary.md``.

  Args:
    config: the settings (``config.method_names``: the methods to train).
    workdir: the output directory.
    resume: continue each run from its latest checkpoint (``resume_step``:
      that one), refusing settings that change the saved state.
    progress: show a progress bar (when tqdm is installed).

  Returns:
    The results (result.json) of the runs, stopping after the first that
    did not finish (status "interrupted").

  Raises:
    NonFiniteLossError: a non-finite loss, gradient norm or state.
    OSError, ValueError: unreadable inputs, an unwritable ``workdir``, or a
      run directory the run may not use
      (:mod:`~examples.llama.checkpointing`).
  """
  workdir = pathlib.Path(workdir)
  check_writable(workdir)
  corpus = input_pipeline.load(config.data, config.tokenizer,
                               verbose=is_lead())
  exports = {name: export_dir(config, name) for name in config.method_names}
  for directory in exports.values():
    if directory is not None:
      hf.check_target(directory)  # before any training
  results = []
  for name in config.method_names:
    one = dataclasses.replace(config, method=name, compare=None,
                              save_hf=exports[name])
    results.append(train_method(one, workdir / name, corpus, resume=resume,
                                resume_step=resume_step, progress=progress))
    if results[-1]["status"] != "done":
      break
  if is_lead():
    plot(workdir)
    summary(workdir)
  return results


def export_dir(config: configs.Config, name: str) -> Optional[str]:
  """Where method ``name``'s ``--save-hf`` checkpoint goes: ``save_hf``
  itself, or ``save_hf/<name>`` with ``compare``."""
  if config.save_hf is None:
    return None
  return (str(pathlib.Path(config.save_hf) / name) if config.compare
          else config.save_hf)


def export(m: methods_lib.Method, train, frozen, directory: str | pathlib.Path,
           max_positions: int) -> None:
  """Writes the trained model as a Hugging Face checkpoint
  (:func:`examples.llama.hf.save`): INT8 weights dequantized, LoRA merged.
  With several processes every one gathers the params and the first one
  writes."""
  params = m.weights.dequantize(train)
  if jax.process_count() > 1:
    params, frozen = multihost_utils.process_allgather((params, frozen),
                                                       tiled=True)
  if is_lead():
    hf.save(nnx.merge(m.graphdef, params, frozen), directory,
            max_positions=max_positions)
  _barrier(f"{m.name}: exported")


def memory_figures(compiled) -> dict[str, int]:
  """XLA's memory analysis of a compiled step (bytes)."""
  ma = compiled.memory_analysis()
  out = {k: int(getattr(ma, f"{k}_size_in_bytes"))
         for k in ("argument", "output", "alias", "temp")}
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def device_peak_bytes() -> Optional[int]:
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


# ---------------------------------------------------------------------------
# One run.


class _Interrupt:
  """Turns the first Ctrl-C into a flag the loop checks after each step."""

  def __init__(self):
    self.hit = False

  def __enter__(self):
    self._old = None
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGINT, self._handler)
    return self

  def _handler(self, *_):
    if self.hit:  # second Ctrl-C: give up at once
      signal.signal(signal.SIGINT, self._old)
      raise KeyboardInterrupt
    self.hit = True
    print("\nCtrl-C: saving a checkpoint after this step (again to abort)",
          file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGINT, self._old)
    return False


def _progress(total: int, initial: int, disable: bool):
  if disable:
    return None
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return tqdm(total=total, initial=initial, disable=disable, unit="step",
              dynamic_ncols=True)


def is_lead() -> bool:
  """Whether this process writes files and prints (the first one)."""
  return jax.process_index() == 0


def _say(*a, **kw):
  if is_lead():
    print(*a, **kw)


def _agree(flag: bool) -> bool:
  """Whether any process has ``flag`` set, so that a Ctrl-C reaching some
  of them stops all after the same step. Across processes this waits for
  the step just dispatched, once per step."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.process_allgather(np.int32(flag)).any())


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _open_run(config: configs.Config, run_dir: pathlib.Path,
              resume: bool) -> None:
  """Checks that the run may use ``run_dir`` and records its settings."""
  checkpointing.check_run_dir(run_dir, resume)
  fresh = not (resume and checkpointing.has_record(run_dir))
  record = config.to_dict()
  if not fresh:
    checkpointing.check_settings(run_dir, record, configs.STATE_FIELDS)
  if is_lead():
    checkpointing.write_record(run_dir, record, fresh)
  _barrier(f"{config.method}: output directory ready")


def _start(m: methods_lib.Method, where: methods_lib.Placement,
           config: configs.Config, mngr, run_dir: pathlib.Path, resume: bool,
           resume_step: Optional[int]) -> tuple[int, dict]:
  """``(step, state)`` to start from: fresh, or the checkpoint resumed."""
  train, frozen, opt_state = methods_lib.init_state(m, where)
  key = jax.random.PRNGKey(config.seed)
  if where.replicated is not None:
    key = methods_lib.to_mesh(key, where.replicated)
  state = {"train": train, "frozen": frozen, "opt_state": opt_state,
           "key": key, "step": np.int64(0), "position": np.int64(0)}
  ckpt_dir = run_dir / "ckpt"
  if resume and mngr.latest_step() is not None:
    start, state = checkpointing.restore_for_resume(mngr, ckpt_dir, state,
                                                    resume_step)
    if is_lead():
      moved, aside = checkpointing.set_aside_newer(mngr, run_dir, start)
      if moved:
        _say(f"moved checkpoints {moved} to {aside}", file=sys.stderr,
             flush=True)
    _say(f"[{m.name}] resumed from step {start} ({ckpt_dir})", flush=True)
    return start, state
  if resume:
    _say(f"[{m.name}] --resume: no checkpoint in {ckpt_dir}; starting fresh",
         flush=True)
  return 0, state


def _mean_metrics(s: int, micro: list[dict], name: str,
                  last_good: Callable[[], str]) -> tuple[int, float, float]:
  """``(step, loss, grad norm)``: the means over a step's micro-steps;
  ``last_good()`` names the checkpoint to go back to if they are not
  finite."""
  loss = float(np.mean([float(x["loss"]) for x in micro]))
  gnorm = float(np.mean([float(x["grad_norm"]) for x in micro]))
  if not (math.isfinite(loss) and math.isfinite(gnorm)):
    raise NonFiniteLossError(
        f"[{name}] non-finite loss {loss} / grad norm {gnorm} at step"
        f" {s + 1}: stopping. {last_good()}; lower --lr or set --clip")
  return s, loss, gnorm


def train_method(config: configs.Config, run_dir: str | pathlib.Path,
                 corpus: input_pipeline.Corpus, *, resume: bool = False,
                 resume_step: Optional[int] = None,
                 progress: bool = True) -> dict:
  """Trains ``config.method`` in ``run_dir``; returns its result (also
  written to result.json).

  With several processes all of them train; the first one alone writes
  files and prints, and every one builds the same batches.
  """
  name, run_dir = config.method, pathlib.Path(run_dir)
  ckpt_dir = run_dir / "ckpt"
  if config.save_hf is not None:
    hf.check_target(config.save_hf)
  _open_run(config, run_dir, resume)

  model = build_model(config, corpus.vocab_size)
  n_params = models.count_params(model)
  m = methods_lib.build(name, model, config)
  del model
  _say(f"[{name}] {n_params:,} params; "
       + "; ".join(f"{k}: {v:,}" for k, v in m.groups.items()), flush=True)
  shape = config.mesh_shape
  mesh = None if shape is None else methods_lib.make_mesh(shape)
  where = methods_lib.placement(m, mesh)
  if mesh is not None:
    _say(f"[{name}] mesh {dict(mesh.shape)}: batch over 'data', params"
         " and optimizer state over 'fsdp'", flush=True)
  mngr = checkpointing.manager(ckpt_dir)
  start, state = _start(m, where, config, mngr, run_dir, resume, resume_step)
  train, frozen, opt_state, key = (state["train"], state["frozen"],
                                   state["opt_state"], state["key"])
  position = int(state["position"])
  del state

  tokens = jnp.zeros(m.batch_shape(config.batch_size, config.seq_len),
                     jnp.int32)
  t0 = time.perf_counter()
  step = methods_lib.compile_step(m, where, train, frozen, opt_state, key,
                                  tokens)
  compile_s = time.perf_counter() - t0
  put = ((lambda b: b) if mesh is None
         else (lambda b: methods_lib.to_mesh(b, where.tokens)))

  def next_batch():
    nonlocal position
    tokens, position = m.batch(corpus.train, position, config)
    return put(tokens)

  memory = memory_figures(step)
  _say(f"[{name}] train step compiled in {compile_s:.1f} s; XLA memory:"
       f" {memory['total'] / 2**20:,.1f} MiB (args {memory['argument']:,},"
       f" temp {memory['temp']:,} bytes)", flush=True)
  evaluate = jax.jit(m.eval_loss)
  val_tokens = input_pipeline.eval_batches(
      corpus.val, config.eval_batches, config.batch_size, config.seq_len)
  val_tokens = (jnp.asarray(val_tokens) if mesh is None else
                methods_lib.to_mesh(val_tokens,
                                    NamedSharding(mesh, P(None, "data"))))
  tokens_per_step = config.batch_size * config.seq_len * config.grad_accum

  metrics_file = open(run_dir / "metrics.jsonl" if is_lead() else os.devnull,
                      "a", encoding="utf-8")
  bar = _progress(config.steps, start, not progress or not is_lead())
  train_time, train_tokens = 0.0, 0
  last_val = None
  pending = None  # (step, [micro-step metrics]) not yet checked on the host

  def last_good():
    latest = mngr.latest_step()
    return ("No checkpoint was saved" if latest is None else
            f"The last good checkpoint is step {latest} in {ckpt_dir}")

  def log_train(pending):
    ds, loss, gnorm = _mean_metrics(*pending, name, last_good)
    log({"step": ds + 1, "loss": loss, "grad_norm": gnorm,
         "lr": float(m.schedule(ds))})
    return loss

  def log(record):
    metrics_file.write(json.dumps(record) + "\n")

  def save(s):
    # Only what is finite is saved: a checkpoint is a state to go back to.
    if not bool(checkpointing.all_finite(train, opt_state)):
      raise NonFiniteLossError(
          f"[{name}] the params or optimizer state became non-finite by"
          f" step {s}: not saved. {last_good()}; lower --lr or set --clip")
    checkpointing.save(mngr, s, {
        "train": train, "frozen": frozen, "opt_state": opt_state, "key": key,
        "step": np.int64(s), "position": np.int64(position)})

  status = "done"
  seg_start, seg_tokens = time.perf_counter(), 0
  try:
    with _Interrupt() as interrupt:
      for s in range(start, config.steps):
        micro = []
        for _ in range(m.calls_per_step):
          train, opt_state, key, mt = step(train, frozen, opt_state, key,
                                           next_batch())
          micro.append(mt)
        seg_tokens += tokens_per_step
        done, pending = pending, (s, micro)
        if done is not None:
          loss = log_train(done)
        last = s + 1 == config.steps
        hit = _agree(interrupt.hit)
        evals = last or (s + 1) % config.eval_every == 0
        saves = last or (s + 1) % config.save_every == 0 or hit
        sync = evals or saves
        if sync:
          loss = log_train(pending)
          pending = None
          # Steady throughput: training segments only (the step is compiled
          # ahead of time; evaluation and checkpoints are not counted).
          train_time += time.perf_counter() - seg_start
          train_tokens += seg_tokens
          if evals:
            val = float(evaluate(train, frozen, val_tokens))
            last_val = val
            log({"step": s + 1, "val_loss": val, "val_ppl": math.exp(val)})
            if bar is None:
              _say(f"[{name}] step {s + 1}: loss {loss:.4f}, val"
                   f" {val:.4f}", flush=True)
          if saves:
            save(s + 1)
          metrics_file.flush()
          seg_start, seg_tokens = time.perf_counter(), 0
          if hit and not last:
            status = "interrupted"
            _say(f"[{name}] saved step {s + 1} to {ckpt_dir}; resume with"
                 " --resume", file=sys.stderr, flush=True)
            break
        if bar is not None:
          bar.update(1)
          if done is not None or sync:
            rate = (train_tokens / train_time if train_time
                    else float("nan"))
            post = {"loss": f"{loss:.3f}", "tok/s": f"{rate:,.0f}"}
            if last_val is not None:
              post["val"] = f"{last_val:.3f}"
              post["ppl"] = f"{math.exp(last_val):.2f}"
            bar.set_postfix(post, refresh=False)
  finally:
    metrics_file.close()
    if bar is not None:
      bar.close()

  if status == "done" and config.save_hf is not None:
    export(m, train, frozen, config.save_hf, max(2048, config.seq_len))
    _say(f"[{name}] wrote a Hugging Face checkpoint to {config.save_hf}",
         flush=True)
  result = {
      "method": name, "model": config.init_from or config.model,
      "params": n_params, "groups": m.groups,
      "steps": config.steps if status == "done" else s + 1,
      "tokens": position * config.batch_size * config.seq_len,
      "final_val_loss": last_val,
      "final_val_ppl": None if last_val is None else math.exp(last_val),
      "tokens_per_s": train_tokens / train_time if train_time else None,
      "compile_s": compile_s, "xla_memory": memory,
      "device_peak_bytes": device_peak_bytes(), "status": status,
      "lr": float(m.schedule(int(config.warmup * config.steps))),
  }
  if is_lead():
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
  return result


# ---------------------------------------------------------------------------
# Reports over every run of the output directory.


def read_runs(out: pathlib.Path) -> list[tuple[str, list[dict], dict]]:
  """``(name, metrics records, result)`` of each run directory in ``out``
  that has metrics (``result`` is empty for an unfinished run)."""
  runs = []
  for d in sorted(p for p in out.iterdir() if p.is_dir()):
    if not (d / "metrics.jsonl").is_file():
      continue
    lines = (d / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines if x.strip()]
    result = (json.loads((d / "result.json").read_text())
              if (d / "result.json").is_file() else {})
    runs.append((d.name, records, result))
  return runs


def plot(out: str | pathlib.Path) -> Optional[pathlib.Path]:
  """``loss.png``: train (thin) and validation (markers) loss of each run."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(out)
  runs = read_runs(out)
  if not runs:
    return None
  fig, ax = plt.subplots(figsize=(8, 5))
  for i, (name, records, _) in enumerate(runs):
    color = f"C{i}"
    train = {r["step"]: r["loss"] for r in records if "loss" in r}
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    if train:
      steps = sorted(train)
      ax.plot(steps, [train[s] for s in steps], color=color, alpha=0.35,
              linewidth=0.8, label=f"{name} train")
    if val:
      steps = sorted(val)
      ax.plot(steps, [val[s] for s in steps], "o-", color=color,
              markersize=3, label=f"{name} val ({val[steps[-1]]:.3f})")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / token)")
  ax.set_title(f"train (thin) and validation loss: {out}")
  ax.grid(alpha=0.3)
  ax.legend()
  path = out / "loss.png"
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def summary(out: str | pathlib.Path) -> str:
  """Markdown table of every finished run in ``out`` (also summary.md)."""
  out = pathlib.Path(out)
  rows = ["| method | model | steps | tokens | final val loss | val ppl |"
          " tokens/s | XLA step memory (MiB) | device peak (MiB) |",
          "|---|---|---|---|---|---|---|---|---|"]
  fmt = lambda x, f: "-" if x is None else format(x, f)
  for name, _, r in read_runs(out):
    if not r:
      continue
    peak = r.get("device_peak_bytes")
    rows.append(
        f"| {name} | {r['model']} | {r['steps']} | {r['tokens']:,} |"
        f" {fmt(r['final_val_loss'], '.4f')} | {fmt(r['final_val_ppl'], '.2f')}"
        f" | {fmt(r['tokens_per_s'], ',.0f')} |"
        f" {r['xla_memory']['total'] / 2**20:,.1f} |"
        f" {'-' if peak is None else f'{peak / 2**20:,.1f}'} |")
  text = "\n".join(rows) + "\n"
  (out / "summary.md").write_text(text)
  return text


def check_writable(out: pathlib.Path) -> None:
  """A clear error now, not a traceback after training, if ``out`` cannot
  hold the run's files."""
  try:
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as e:
    raise OSError(f"--out {out} is not a writable directory"
                  f" ({e.strerror or e})") from None


if __name__ == "__main__":
  from examples.llama import main as main_lib  # pylint: disable=g-import-not-at-top
  sys.exit(main_lib.main())
