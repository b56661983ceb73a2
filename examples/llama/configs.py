"""The LLaMA example's settings: a :class:`Config` with defaults and checks.

Each field is a flag of ``python -m examples.llama.train`` (``batch_size``
is ``--batch-size``): :mod:`examples.llama.main` builds its parser from the
fields and their metadata (help, choices, metavar). A field marked
``state=True`` shapes the saved state or what it holds, so a ``--resume``
must match it: :data:`STATE_FIELDS` lists them and the resume check reads
that list.

  config = Config(model="llama-tiny", method="q_galore", steps=20)
  config = dataclasses.replace(config, rank=8)  # checked again
  Config.from_dict(json.loads(path.read_text()))  # a run's args.json
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Callable, Optional

import jax.numpy as jnp

from examples.llama import methods as methods_lib
from examples.llama import models

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
MAX_GAP = 2**30


def flag_field(default: Any, doc: Optional[str] = None, *,
               choices: Optional[tuple] = None, metavar: Optional[str] = None,
               convert: Optional[Callable[[str], Any]] = None,
               state: bool = False):
  """A ``Config`` field and its flag: the help ``doc``, ``choices``,
  ``metavar``, ``convert`` (the argparse ``type``; default: the default's
  type), and whether the field is ``state`` (a resumed run must keep it)."""
  if convert is None and default is not None:
    convert = default.__class__
  return dataclasses.field(default=default, metadata=dict(
      help=doc, choices=choices, metavar=metavar, type=convert, state=state))


@dataclasses.dataclass(frozen=True)
class Config:
  """One training run (or, with ``compare``, one run per method).

  Construction checks every value and raises ``ValueError`` naming the
  flag; the flags' help (``python -m examples.llama.train --help``) says
  what each field does.
  """
  model: str = flag_field(
      "llama-1m", "named config (its vocabulary is replaced by the"
      " tokenizer's)", choices=tuple(sorted(models.CONFIGS)), state=True)
  init_from: Optional[str] = flag_field(
      None, "a Hugging Face LLaMA checkpoint directory (config.json +"
      " safetensors) to fine-tune; overrides --model", metavar="DIR",
      convert=str, state=True)
  method: str = flag_field("galore", choices=methods_lib.NAMES, state=True)
  compare: Optional[str] = flag_field(
      None, "run several methods one after the other (overrides --method)",
      metavar="M1,M2,...", convert=str)
  rank: Optional[int] = flag_field(
      None, "GaLore / LoRA rank (default: the config's recipe rank)",
      convert=int, state=True)
  update_proj_gap: int = flag_field(200)
  galore_scale: float = flag_field(0.25)
  svd: str = flag_field(
      "exact", "how galore, galore_8bit and q_galore refresh their"
      " projectors (use a range finder on a --mesh: 'exact' gathers each"
      " gradient)", choices=("exact", "randomized", "subspace_iteration"),
      state=True)
  on_refresh: str = flag_field(
      "keep", "galore's moments across a subspace switch (float moments"
      " only)", choices=("keep", "reset", "transport"), state=True)
  zero_point: str = flag_field(
      "float", "q_galore's group quantization of projectors and INT8"
      " weights: 'float' offsets represent every group; 'official' is"
      " Q-GaLore's clipped uint8 zero point (same-sign groups collapse)",
      choices=("float", "official"), state=True)
  lora_alpha: Optional[float] = flag_field(
      None, "default: the rank", convert=float, state=True)
  lora_targets: str = flag_field(
      "all", "the kernels LoRA / QLoRA adapt: 'all' attention and MLP"
      " kernels, 'attention' (q, k, v, o) or 'mlp' (gate, up, down)",
      choices=tuple(methods_lib.LORA_TARGETS), state=True)
  lora_trainable: str = flag_field(
      "embed|norm|lm_head", "regex of params LoRA / QLoRA train in full (''"
      " for none)", state=True)
  lr: Optional[float] = flag_field(
      None, "peak learning rate (default: 0.01 for GaLore methods as in the"
      " paper's recipe, 1e-3 otherwise)", convert=float)
  warmup: float = flag_field(0.1, "warmup fraction of --steps")
  min_lr_ratio: float = flag_field(0.1)
  weight_decay: float = flag_field(0.0)
  clip: float = flag_field(0.0, "global-norm clip (0: off)", state=True)
  clip_mode: str = flag_field(
      "global", "--layerwise --clip: 'global' is exact (one more backward"
      " pass); 'per_layer' clips each block and the rest to clip/sqrt(L+1),"
      " so the global norm stays under --clip, in one pass",
      choices=("global", "per_layer"), state=True)
  steps: int = flag_field(400, "optimizer steps")
  batch_size: int = flag_field(16, "sequences per micro-batch", state=True)
  seq_len: int = flag_field(128, state=True)
  grad_accum: int = flag_field(
      1, "micro-batches per optimizer step (optax.MultiSteps)", state=True)
  dtype: str = flag_field("fp32", "compute dtype",
                          choices=tuple(sorted(DTYPES)), state=True)
  param_dtype: str = flag_field("fp32", choices=tuple(sorted(DTYPES)),
                                state=True)
  scan_layers: bool = flag_field(
      False, "stack the blocks: kernels (layers, in, out), run with"
      " nnx.scan", state=True)
  remat: bool = flag_field(False, "activation checkpointing")
  layerwise: bool = flag_field(
      False, "update each block as soon as its gradient exists, in a"
      " reverse loop over the stacked layers (implies --scan-layers;"
      " recomputes each block like --remat); for adamw, adamw_8bit, galore,"
      " galore_8bit and q_galore (LoRA and QLoRA use the plain step)",
      state=True)
  data: Optional[str] = flag_field(
      None, "text file, directory of text files, or .bin/.npy token ids"
      " (default: the Python stdlib sources, bytes)", metavar="PATH",
      convert=str, state=True)
  tokenizer: Optional[str] = flag_field(
      None, "local Hugging Face tokenizer.json (default: bytes)",
      metavar="PATH", convert=str, state=True)
  save_hf: Optional[str] = flag_field(
      None, "at the end of the run, write the trained model to DIR as a"
      " Hugging Face checkpoint (config.json + model.safetensors, float32;"
      " LoRA / QLoRA merged, Q-GaLore's INT8 weights dequantized) that"
      " transformers and --init-from load; with --compare, DIR/<method>."
      " DIR must not hold a checkpoint already", metavar="DIR", convert=str)
  eval_every: int = flag_field(100)
  eval_batches: int = flag_field(8)
  save_every: int = flag_field(200, "checkpoint period (steps)")
  seed: int = flag_field(0, state=True)
  mesh: Optional[str] = flag_field(
      None, "shard over a device mesh: the batch over 'data', params and"
      " optimizer state over 'fsdp'; D*F must equal the device count"
      " (CPU: XLA_FLAGS=--xla_force_host_platform_device_count=8)",
      metavar="data=D,fsdp=F", convert=str)

  def __post_init__(self):
    check(self)

  @property
  def method_names(self) -> list[str]:
    """The methods to train: ``compare``'s, else ``[method]``."""
    if self.compare:
      return [m for m in self.compare.split(",") if m]
    return [self.method]

  @property
  def mesh_shape(self) -> Optional[dict[str, int]]:
    """``mesh`` parsed (:func:`~examples.llama.methods.parse_mesh`); None
    without a mesh."""
    return None if self.mesh is None else methods_lib.parse_mesh(self.mesh)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "Config":
    """The config of ``values`` (a run's args.json); missing fields take
    their defaults.

    Raises:
      ValueError: a key that is not a field, or a value the checks refuse.
    """
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
      raise ValueError(f"not Config fields: {', '.join(unknown)}")
    return cls(**values)


def field_names() -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(Config))


def state_fields(cls: type = Config) -> tuple[str, ...]:
  """The fields of ``cls`` marked ``state=True``, in field order."""
  return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["state"])


# The settings a resumed run must share with the run that saved the state.
STATE_FIELDS = state_fields()


def flag(name: str) -> str:
  """``"batch_size"`` -> ``"--batch-size"``."""
  return "--" + name.replace("_", "-")


def _join(names: list[str]) -> str:
  """``["a", "b", "c"]`` -> ``"a, b or c"``."""
  return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1
                     else names)


def check(c: Config) -> None:
  """Raises ``ValueError`` for the first value of ``c`` out of range."""

  def fail(message):
    raise ValueError(message)

  for f in dataclasses.fields(c):
    value, choices = getattr(c, f.name), f.metadata["choices"]
    if choices is not None and value not in choices:
      fail(f"{flag(f.name)}: invalid choice {value!r} (choose from"
           f" {', '.join(choices)})")
  for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every",
               "eval_batches", "save_every", "update_proj_gap"):
    if getattr(c, name) < 1:
      fail(f"{flag(name)} must be >= 1, got {getattr(c, name)}")
  for f in dataclasses.fields(c):
    value = getattr(c, f.name)
    if isinstance(value, float) and not math.isfinite(value):
      fail(f"{flag(f.name)} must be finite, got {value}")
  if c.rank is not None and c.rank < 1:
    fail(f"--rank must be >= 1, got {c.rank}")
  if c.lr is not None and not c.lr > 0:
    fail(f"--lr must be > 0, got {c.lr}")
  if c.update_proj_gap > MAX_GAP:
    fail(f"--update-proj-gap must be <= 2**30, got {c.update_proj_gap}")
  if not 0 <= c.min_lr_ratio <= 1:
    fail(f"--min-lr-ratio must be in [0, 1], got {c.min_lr_ratio}")
  if c.weight_decay < 0:
    fail(f"--weight-decay must be >= 0, got {c.weight_decay}")
  if c.lora_alpha is not None and not c.lora_alpha > 0:
    fail(f"--lora-alpha must be > 0, got {c.lora_alpha}")
  if c.seed < 0:
    fail(f"--seed must be >= 0, got {c.seed}")
  names = c.method_names
  specs = methods_lib.SPECS
  if c.on_refresh != "keep" and any(
      m not in specs or not specs[m].on_refresh for m in names):
    takes = [m for m in specs if specs[m].on_refresh]
    fail(f"--on-refresh applies to --method {_join(takes)} only (the other"
         " methods keep 8-bit or no projected moments)")
  if c.lora_targets != "all" and not any(
      m in methods_lib.LORA_METHODS for m in names):
    fail(f"--lora-targets applies to --method"
         f" {_join(list(methods_lib.LORA_METHODS))}")
  if not c.galore_scale > 0:
    fail(f"--galore-scale must be > 0, got {c.galore_scale}")
  if not 0 <= c.warmup < 1:
    fail(f"--warmup must be in [0, 1), got {c.warmup}")
  if c.clip < 0:
    fail(f"--clip must be >= 0, got {c.clip}")
  if c.clip_mode != "global" and not (c.layerwise and c.clip):
    fail("--clip-mode applies to --layerwise with --clip")
  if c.layerwise:
    plain_only = [m for m in names if m in specs and not specs[m].layerwise]
    if plain_only:
      fail(f"--layerwise: {', '.join(plain_only)} train on the plain step;"
           " use --layerwise with"
           f" {_join([m for m in specs if specs[m].layerwise])}")
  if c.compare is not None:
    bad = [m for m in names if m not in specs]
    if bad or not names:
      fail(f"--compare: unknown method(s) {bad or c.compare!r}; known:"
           f" {', '.join(specs)}")
  if c.init_from is not None and not pathlib.Path(c.init_from).is_dir():
    fail(f"--init-from: {c.init_from} is not a directory")
  if c.mesh is not None:
    try:
      sizes = methods_lib.parse_mesh(c.mesh)
    except ValueError as e:
      fail(f"--mesh: {e}")
    if c.batch_size % sizes["data"]:
      fail(f"--batch-size {c.batch_size} must be divisible by the mesh's"
           f" data={sizes['data']}")
