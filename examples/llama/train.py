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

Writes to ``--out/<method>/``: ``metrics.jsonl`` (train loss every step,
validation loss and perplexity every ``--eval-every``), ``result.json``,
Orbax checkpoints in ``ckpt/``; and to ``--out``: ``loss.png`` (every run of
the directory on one plot) and ``summary.md``.

GaLore methods project the attention and MLP kernels only; embeddings, norms
and the LM head use AdamW in full, as in the paper. The learning rate follows
the paper's recipe: linear warmup over 10% of the steps, then cosine decay to
10% of the peak. With ``--layerwise`` the blocks are stacked and each one is
updated as soon as its gradient exists (:func:`galore_jax.layerwise_step`),
so no step holds every gradient.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Optional, Sequence

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
from examples.llama import hf
from examples.llama import input_pipeline as data_lib
from examples.llama import methods as methods_lib
from examples.llama import models as model_lib

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
# Args that set the shapes of the saved state: a resumed run must match them.
_STATE_ARGS = ("model", "init_from", "method", "rank", "svd", "on_refresh",
               "zero_point", "clip", "clip_mode",
               "dtype", "param_dtype", "scan_layers", "batch_size", "seq_len",
               "grad_accum", "seed", "data", "tokenizer", "lora_alpha",
               "lora_trainable", "layerwise")


class NonFiniteLossError(RuntimeError):
  """The loss or gradient norm became NaN or infinite."""


# ---------------------------------------------------------------------------
# Command line.


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m examples.llama.train",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  a = p.add_argument
  a("--model", default="llama-1m", choices=sorted(model_lib.CONFIGS),
    help="named config (its vocabulary is replaced by the tokenizer's)")
  a("--init-from", default=None, metavar="DIR",
    help="a Hugging Face LLaMA checkpoint directory (config.json +"
         " safetensors) to fine-tune; overrides --model")
  a("--method", default="galore", choices=methods_lib.NAMES)
  a("--compare", default=None, metavar="M1,M2,...",
    help="run several methods one after the other (overrides --method)")
  a("--rank", type=int, default=None,
    help="GaLore / LoRA rank (default: the config's recipe rank)")
  a("--update-proj-gap", type=int, default=200)
  a("--galore-scale", type=float, default=0.25)
  a("--svd", default="exact", choices=("exact", "randomized",
                                       "subspace_iteration"),
    help="how galore, galore_8bit and q_galore refresh their projectors"
         " (use a range finder on a --mesh: 'exact' gathers each gradient)")
  a("--on-refresh", default="keep", choices=("keep", "reset", "transport"),
    help="galore's moments across a subspace switch (float moments only)")
  a("--zero-point", default="float", choices=("float", "official"),
    help="q_galore's group quantization of projectors and INT8 weights:"
         " 'float' offsets represent every group; 'official' is Q-GaLore's"
         " clipped uint8 zero point (same-sign groups collapse)")
  a("--lora-alpha", type=float, default=None, help="default: the rank")
  a("--lora-trainable", default="embed|norm|lm_head",
    help="regex of params LoRA / QLoRA train in full ('' for none)")
  a("--lr", type=float, default=None,
    help="peak learning rate (default: 0.01 for GaLore methods as in the"
         " paper's recipe, 1e-3 otherwise)")
  a("--warmup", type=float, default=0.1, help="warmup fraction of --steps")
  a("--min-lr-ratio", type=float, default=0.1)
  a("--weight-decay", type=float, default=0.0)
  a("--clip", type=float, default=0.0, help="global-norm clip (0: off)")
  a("--clip-mode", default="global", choices=("global", "per_layer"),
    help="--layerwise --clip: 'global' is exact (one more backward pass);"
         " 'per_layer' clips each block and the rest to clip/sqrt(L+1), so"
         " the global norm stays under --clip, in one pass")
  a("--steps", type=int, default=400, help="optimizer steps")
  a("--batch-size", type=int, default=16, help="sequences per micro-batch")
  a("--seq-len", type=int, default=128)
  a("--grad-accum", type=int, default=1,
    help="micro-batches per optimizer step (optax.MultiSteps)")
  a("--dtype", default="fp32", choices=sorted(DTYPES), help="compute dtype")
  a("--param-dtype", default="fp32", choices=sorted(DTYPES))
  a("--scan-layers", action="store_true",
    help="stack the blocks: kernels (layers, in, out), run with nnx.scan")
  a("--remat", action="store_true", help="activation checkpointing")
  a("--layerwise", action="store_true",
    help="update each block as soon as its gradient exists, in a reverse"
         " loop over the stacked layers (implies --scan-layers; recomputes"
         " each block like --remat); for adamw, adamw_8bit, galore,"
         " galore_8bit and q_galore (LoRA and QLoRA use the plain step)")
  a("--data", default=None, metavar="PATH",
    help="text file, directory of text files, or .bin/.npy token ids"
         " (default: the Python stdlib sources, bytes)")
  a("--tokenizer", default=None, metavar="PATH",
    help="local Hugging Face tokenizer.json (default: bytes)")
  a("--eval-every", type=int, default=100)
  a("--eval-batches", type=int, default=8)
  a("--save-every", type=int, default=200, help="checkpoint period (steps)")
  a("--out", default="runs/llama", help="output directory")
  a("--resume-step", type=int, default=None, metavar="N",
    help="with --resume: continue from checkpoint N instead of the newest"
         " (e.g. the newest intact one after a corrupt save)")
  a("--resume", action="store_true",
    help="continue from the latest checkpoint in --out/<method>/ckpt")
  a("--seed", type=int, default=0)
  a("--mesh", default=None, metavar="data=D,fsdp=F",
    help="shard over a device mesh: the batch over 'data', params and"
         " optimizer state over 'fsdp'; D*F must equal the device count"
         " (CPU: XLA_FLAGS=--xla_force_host_platform_device_count=8)")
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


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace):
  for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every",
               "eval_batches", "save_every", "update_proj_gap"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1, got"
              f" {getattr(args, name)}")
  for name, value in vars(args).items():
    if isinstance(value, float) and not math.isfinite(value):
      p.error(f"--{name.replace('_', '-')} must be finite, got {value}")
  if args.rank is not None and args.rank < 1:
    p.error(f"--rank must be >= 1, got {args.rank}")
  if args.lr is not None and not args.lr > 0:
    p.error(f"--lr must be > 0, got {args.lr}")
  if args.update_proj_gap > 2**30:
    p.error(f"--update-proj-gap must be <= 2**30, got {args.update_proj_gap}")
  if not 0 <= args.min_lr_ratio <= 1:
    p.error(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
  if args.weight_decay < 0:
    p.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
  if args.lora_alpha is not None and not args.lora_alpha > 0:
    p.error(f"--lora-alpha must be > 0, got {args.lora_alpha}")
  if args.seed < 0:
    p.error(f"--seed must be >= 0, got {args.seed}")
  if args.resume_step is not None and not args.resume:
    p.error("--resume-step needs --resume")
  if args.resume_step is not None and args.resume_step < 1:
    p.error(f"--resume-step must be >= 1, got {args.resume_step}")
  methods = ([m for m in args.compare.split(",") if m] if args.compare
             else [args.method])
  if args.on_refresh != "keep" and any(m != "galore" for m in methods):
    p.error("--on-refresh applies to --method galore only (the other"
            " methods keep 8-bit or no projected moments)")
  if not args.galore_scale > 0:
    p.error(f"--galore-scale must be > 0, got {args.galore_scale}")
  if not 0 <= args.warmup < 1:
    p.error(f"--warmup must be in [0, 1), got {args.warmup}")
  if args.clip < 0:
    p.error(f"--clip must be >= 0, got {args.clip}")
  if args.clip_mode != "global" and not (args.layerwise and args.clip):
    p.error("--clip-mode applies to --layerwise with --clip")
  if args.layerwise:
    plain_only = [m for m in methods if m in ("lora", "qlora")]
    if plain_only:
      p.error(f"--layerwise: {', '.join(plain_only)} train on the plain step;"
              " use --layerwise with adamw, adamw_8bit, galore, galore_8bit"
              " or q_galore")
  if args.compare is not None:
    methods = [m for m in args.compare.split(",") if m]
    bad = [m for m in methods if m not in methods_lib.NAMES]
    if bad or not methods:
      p.error(f"--compare: unknown method(s) {bad or args.compare!r}; known:"
              f" {', '.join(methods_lib.NAMES)}")
  if args.init_from is not None and not pathlib.Path(args.init_from).is_dir():
    p.error(f"--init-from: {args.init_from} is not a directory")
  given = [f for f in ("coordinator", "num_processes", "process_id")
           if getattr(args, f) is not None]
  if given and not args.distributed:
    p.error(f"--{given[0].replace('_', '-')} needs --distributed")
  if args.num_processes is not None and args.num_processes < 1:
    p.error(f"--num-processes must be >= 1, got {args.num_processes}")
  if args.process_id is not None and not (
      0 <= args.process_id < (args.num_processes or args.process_id + 1)):
    p.error(f"--process-id must be in [0, --num-processes), got"
            f" {args.process_id}")
  if args.distributed and args.mesh is None:
    p.error("--distributed needs a --mesh over the devices of every process")
  if args.mesh is not None:
    try:
      sizes = methods_lib.parse_mesh(args.mesh)
    except ValueError as e:
      p.error(f"--mesh: {e}")
    if args.batch_size % sizes["data"]:
      p.error(f"--batch-size {args.batch_size} must be divisible by the"
              f" mesh's data={sizes['data']}")


# ---------------------------------------------------------------------------
# Model and method.


def build_model(args, vocab: int) -> model_lib.Llama:
  if args.init_from is not None:
    cfg = hf.read_config(args.init_from)
    if vocab > cfg.vocab:
      raise ValueError(f"the data's vocabulary ({vocab}) is larger than the"
                       f" checkpoint's ({cfg.vocab}); pass its --tokenizer")
  else:
    cfg = dataclasses.replace(model_lib.CONFIGS[args.model], vocab=vocab)
  model = model_lib.Llama(
      cfg, dtype=DTYPES[args.dtype], param_dtype=DTYPES[args.param_dtype],
      scan_layers=args.scan_layers or args.layerwise, remat=args.remat,
      rngs=nnx.Rngs(args.seed))
  if args.init_from is not None:
    hf.load_into(model, args.init_from)
  return model


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


def _lead() -> bool:
  """Whether this process writes files and prints (the first one)."""
  return jax.process_index() == 0


def _say(*a, **kw):
  if _lead():
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


def run(args, method: str, corpus: data_lib.Corpus) -> dict:
  """Trains one method; returns its result (also written to result.json).

  With several processes all of them train; the first one alone writes
  files and prints, and every one builds the same batches.
  """
  out = pathlib.Path(args.out) / method
  ckpt_dir = out / "ckpt"
  run_args = {k: getattr(args, k) for k in _STATE_ARGS}
  run_args["method"] = method
  checkpointing.check_run_dir(out, args.resume)
  fresh = not (args.resume and checkpointing.has_record(out))
  if not fresh:
    checkpointing.check_settings(out, run_args, _STATE_ARGS)
  if _lead():
    checkpointing.write_record(out, run_args, fresh)
  _barrier(f"{method}: output directory ready")

  model = build_model(args, corpus.vocab_size)
  n_params = model_lib.count_params(model)
  m = methods_lib.build(method, model, args)
  del model
  _say(f"[{method}] {n_params:,} params; "
       + "; ".join(f"{k}: {v:,}" for k, v in m.groups.items()), flush=True)
  mesh = (None if args.mesh is None
          else methods_lib.make_mesh(methods_lib.parse_mesh(args.mesh)))
  where = methods_lib.placement(m, mesh)
  if mesh is not None:
    _say(f"[{method}] mesh {dict(mesh.shape)}: batch over 'data', params"
         " and optimizer state over 'fsdp'", flush=True)
  train, frozen, opt_state = methods_lib.init_state(m, where)
  key = jax.random.PRNGKey(args.seed)
  if mesh is not None:
    key = methods_lib.to_mesh(key, where.replicated)
  state = {"train": train, "frozen": frozen, "opt_state": opt_state,
           "key": key, "step": np.int64(0), "position": np.int64(0)}

  mngr = checkpointing.manager(ckpt_dir)
  start = 0
  if args.resume and mngr.latest_step() is not None:
    start, state = checkpointing.restore_for_resume(mngr, ckpt_dir, state,
                                                    args.resume_step)
    if _lead():
      moved, aside = checkpointing.set_aside_newer(mngr, out, start)
      if moved:
        _say(f"moved checkpoints {moved} to {aside}", file=sys.stderr,
             flush=True)
    _say(f"[{method}] resumed from step {start} ({ckpt_dir})", flush=True)
  elif args.resume:
    _say(f"[{method}] --resume: no checkpoint in {ckpt_dir}; starting fresh",
         flush=True)
  train, frozen, opt_state, key = (state["train"], state["frozen"],
                                   state["opt_state"], state["key"])
  position = int(state["position"])
  del state

  tokens = jnp.zeros(m.batch_shape(args.batch_size, args.seq_len), jnp.int32)
  t0 = time.perf_counter()
  step = methods_lib.compile_step(m, where, train, frozen, opt_state, key,
                                  tokens)
  compile_s = time.perf_counter() - t0
  put = ((lambda b: b) if mesh is None
         else (lambda b: methods_lib.to_mesh(b, where.tokens)))

  def next_batch():
    nonlocal position
    tokens, position = m.batch(corpus.train, position, args)
    return tokens

  memory = memory_figures(step)
  _say(f"[{method}] train step compiled in {compile_s:.1f} s; XLA memory:"
       f" {memory['total'] / 2**20:,.1f} MiB (args {memory['argument']:,},"
       f" temp {memory['temp']:,} bytes)", flush=True)
  evaluate = jax.jit(m.eval_loss)
  val_tokens = data_lib.eval_batches(
      corpus.val, args.eval_batches, args.batch_size, args.seq_len)
  val_tokens = (jnp.asarray(val_tokens) if mesh is None else
                methods_lib.to_mesh(val_tokens,
                                    NamedSharding(mesh, P(None, "data"))))
  tokens_per_step = args.batch_size * args.seq_len * args.grad_accum

  metrics_file = open(out / "metrics.jsonl" if _lead() else os.devnull, "a",
                      encoding="utf-8")
  bar = _progress(args.steps, start, args.no_progress or not _lead())
  train_time, train_tokens = 0.0, 0
  last_val = None
  pending = None  # (step, [micro-step metrics]) not yet checked on the host

  def last_good():
    latest = mngr.latest_step()
    return ("No checkpoint was saved" if latest is None else
            f"The last good checkpoint is step {latest} in {ckpt_dir}")

  def check(pending):
    s, ms = pending
    loss = float(np.mean([float(x["loss"]) for x in ms]))
    gnorm = float(np.mean([float(x["grad_norm"]) for x in ms]))
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
      raise NonFiniteLossError(
          f"[{method}] non-finite loss {loss} / grad norm {gnorm} at step"
          f" {s + 1}: stopping. {last_good()}; lower --lr or set --clip")
    return s, loss, gnorm

  def log(record):
    metrics_file.write(json.dumps(record) + "\n")

  def save(s):
    # Only what is finite is saved: a checkpoint is a state to go back to.
    if not bool(checkpointing.all_finite(train, opt_state)):
      raise NonFiniteLossError(
          f"[{method}] the params or optimizer state became non-finite by"
          f" step {s}: not saved. {last_good()}; lower --lr or set --clip")
    checkpointing.save(mngr, s, {
        "train": train, "frozen": frozen, "opt_state": opt_state, "key": key,
        "step": np.int64(s), "position": np.int64(position)})

  status = "done"
  seg_start, seg_tokens = time.perf_counter(), 0
  try:
    with _Interrupt() as interrupt:
      for s in range(start, args.steps):
        micro = []
        for _ in range(m.calls_per_step):
          train, opt_state, key, mt = step(train, frozen, opt_state, key,
                                           put(next_batch()))
          micro.append(mt)
        seg_tokens += tokens_per_step
        done, pending = pending, (s, micro)
        if done is not None:
          ds, loss, gnorm = check(done)
          log({"step": ds + 1, "loss": loss, "grad_norm": gnorm,
               "lr": float(m.schedule(ds))})
        last = s + 1 == args.steps
        hit = _agree(interrupt.hit)
        sync = (last or (s + 1) % args.eval_every == 0
                or (s + 1) % args.save_every == 0 or hit)
        if sync:
          ds, loss, gnorm = check(pending)
          pending = None
          log({"step": ds + 1, "loss": loss, "grad_norm": gnorm,
               "lr": float(m.schedule(ds))})
          # Steady throughput: training segments only (the step is compiled
          # ahead of time; evaluation and checkpoints are not counted).
          train_time += time.perf_counter() - seg_start
          train_tokens += seg_tokens
          if last or (s + 1) % args.eval_every == 0:
            val = float(evaluate(train, frozen, val_tokens))
            last_val = val
            log({"step": s + 1, "val_loss": val, "val_ppl": math.exp(val)})
            if bar is None:
              _say(f"[{method}] step {s + 1}: loss {loss:.4f}, val"
                   f" {val:.4f}", flush=True)
          if last or (s + 1) % args.save_every == 0 or hit:
            save(s + 1)
          metrics_file.flush()
          seg_start, seg_tokens = time.perf_counter(), 0
          if hit and not last:
            status = "interrupted"
            _say(f"[{method}] saved step {s + 1} to {ckpt_dir}; resume with"
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

  result = {
      "method": method, "model": args.init_from or args.model,
      "params": n_params, "groups": m.groups,
      "steps": args.steps if status == "done" else s + 1,
      "tokens": position * args.batch_size * args.seq_len,
      "final_val_loss": last_val,
      "final_val_ppl": None if last_val is None else math.exp(last_val),
      "tokens_per_s": train_tokens / train_time if train_time else None,
      "compile_s": compile_s, "xla_memory": memory,
      "device_peak_bytes": device_peak_bytes(), "status": status,
      "lr": float(m.schedule(int(args.warmup * args.steps))),
  }
  if _lead():
    (out / "result.json").write_text(json.dumps(result, indent=1))
  return result


# ---------------------------------------------------------------------------
# Reports over every run of the output directory.


def _runs(out: pathlib.Path) -> list[tuple[str, list[dict], dict]]:
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
  runs = _runs(out)
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
  for name, _, r in _runs(out):
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


def _check_writable(out: pathlib.Path) -> None:
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


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = parser()
  args = p.parse_args(argv)
  _check_args(p, args)
  if args.distributed:
    jax.distributed.initialize(args.coordinator, args.num_processes,
                               args.process_id)
  methods = ([x for x in args.compare.split(",") if x] if args.compare
             else [args.method])
  try:
    _check_writable(pathlib.Path(args.out))
    corpus = data_lib.load(args.data, args.tokenizer, verbose=_lead())
    for method in methods:
      r = run(args, method, corpus)
      if r["status"] != "done":
        break
  except NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except (OSError, ValueError) as e:  # FileNotFoundError is an OSError
    print(f"error: {e}", file=sys.stderr)
    return 2
  if _lead():
    plot(args.out)
    print(summary(args.out), flush=True)
    print(f"plot: {pathlib.Path(args.out) / 'loss.png'}", flush=True)
  return 0 if r["status"] == "done" else 130


if __name__ == "__main__":
  sys.exit(main())
