"""The training methods, each built once: optimizer, init and step.

A :class:`Spec` in :data:`SPECS` says what a method is: its optimizer, how
it stores the weights it trains (:data:`FLOAT`, or :data:`INT8` for
Q-GaLore), whether it adds LoRA adapters first, and how its params are
grouped. :func:`build` turns a model and a config into a :class:`Method`,
or a :class:`LayerwiseMethod` for ``layerwise``: the object's ``init``,
``step`` and ``eval_loss`` are the method's, so the training loop never
asks which method it runs.

GaLore methods project the attention and MLP kernels only; embeddings,
norms and the LM head use AdamW in full, as in the paper. LoRA and QLoRA
adapt the ``--lora-targets`` kernels (all, attention or MLP) and train
``--lora-trainable`` in full. The partial fine-tuning baselines freeze the
model but for the LM head (``head``: no backward pass through the
backbone) or the input embedding and the head (``adapters``). The learning
rate follows the paper's recipe: linear warmup over ``warmup`` of the
steps, then cosine decay to ``min_lr_ratio`` of the peak.

On a device mesh (:func:`placement`) the batch is split over "data", every
param and the whole optimizer state over "fsdp".
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Optional

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import galore_jax
from galore_jax import layerwise as layerwise_lib
from galore_jax import lora
from galore_jax import memory
from galore_jax import q_galore
from examples.llama import input_pipeline
from examples.llama import models

# Attention and MLP kernels: what GaLore projects and LoRA adapts.
TARGET_PARAMS = r"(^|/)(attn|mlp)/(q|k|v|o|gate|up|down)/kernel$"
TARGET_LINEARS = r"(^|/)(attn|mlp)/(q|k|v|o|gate|up|down)$"
# --lora-targets: the linear layers LoRA and QLoRA adapt.
LORA_TARGETS = {"all": TARGET_LINEARS,
                "attention": r"(^|/)attn/(q|k|v|o)$",
                "mlp": r"(^|/)mlp/(gate|up|down)$"}
# What the partial fine-tuning methods train (everything else is frozen).
HEAD_PARAMS = r"^lm_head/"
ADAPTER_PARAMS = r"^(embed|lm_head)/"


def target_mask(params: Any) -> Any:
  """``True`` for the attention and MLP kernels of a params pure dict."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: bool(re.search(TARGET_PARAMS, memory.path_str(p))), params)


def split_blocks(tree: dict) -> tuple[Any, dict]:
  """``(tree["layers"], the rest)``: the stacked blocks and the outer
  params of a (scanned) Llama's params or of a tree like them."""
  return tree["layers"], {k: v for k, v in tree.items() if k != "layers"}


def join_blocks(blocks: Any, outer: dict) -> dict:
  return {**outer, "layers": blocks}


def _count(tree: Any, mask: Any = None) -> int:
  leaves = jax.tree.leaves(tree)
  keep = [True] * len(leaves) if mask is None else jax.tree.leaves(mask)
  return sum(int(np.prod(x.shape)) for x, k in zip(leaves, keep) if k)


# ---------------------------------------------------------------------------
# How a method stores the weights it trains.


@dataclasses.dataclass(frozen=True)
class Weights:
  """How the trained params are stored, differentiated and updated.

  Attributes:
    quantize: ``(train, mask, stacked, zero_point) -> train``: the stored
      form of the float params (``stacked``: blocks with a layer axis).
    dequantize: ``train -> params``: the float params the optimizer sees.
    value_and_grad: ``jax.value_and_grad`` or its stand-in.
    apply_updates: ``(train, updates, key) -> train``.
  """
  quantize: Callable[[Any, Any, bool, str], Any]
  dequantize: Callable[[Any], Any]
  value_and_grad: Callable[[Callable], Callable]
  apply_updates: Callable[[Any, Any, jax.Array], Any]


def _as_is(train, *_):
  return train


def _apply_float(train, updates, key):
  del key
  return optax.apply_updates(train, updates)


def _quantize_int8(train, mask, stacked: bool, zero_point: str):
  """INT8 codes for the masked kernels; stacked kernels layer by layer, so
  that each scanned (or layerwise) step dequantizes one layer's codes."""
  if not stacked:
    return galore_jax.quantize_params(train, mask=mask, zero_point=zero_point)
  blocks, outer = split_blocks(train)
  blocks_mask, outer_mask = split_blocks(mask)
  return join_blocks(
      layerwise_lib.quantize_blocks(blocks, mask=blocks_mask,
                                    zero_point=zero_point),
      galore_jax.quantize_params(outer, mask=outer_mask,
                                 zero_point=zero_point))


# Float params, updated by optax.apply_updates.
FLOAT = Weights(_as_is, _as_is, jax.value_and_grad, _apply_float)
# Q-GaLore's INT8 kernels: the model dequantizes each block where it runs
# it, gradients are w.r.t. the dequantized weights, and updates round
# stochastically back to INT8.
INT8 = Weights(_quantize_int8, galore_jax.dequantize_params,
               q_galore.value_and_grad, galore_jax.apply_updates_stochastic)


# ---------------------------------------------------------------------------
# The methods.


def _adamw(config, schedule, mask, rank):
  del mask, rank
  return optax.adamw(schedule, weight_decay=config.weight_decay)


def _adamw_8bit(config, schedule, mask, rank):
  del mask, rank
  return galore_jax.adamw_8bit(schedule, weight_decay=config.weight_decay)


def _galore_kw(config, mask, rank) -> dict:
  return dict(rank=rank, update_proj_gap=config.update_proj_gap,
              scale=config.galore_scale, projection_mask=mask,
              weight_decay=config.weight_decay, svd=config.svd)


def _galore(config, schedule, mask, rank):
  return galore_jax.galore_adamw(schedule, on_refresh=config.on_refresh,
                                 **_galore_kw(config, mask, rank))


def _galore_8bit(config, schedule, mask, rank):
  return galore_jax.galore_adamw_8bit(schedule,
                                      **_galore_kw(config, mask, rank))


def _q_galore(config, schedule, mask, rank):
  return galore_jax.q_galore_adamw(schedule, proj_zero_point=config.zero_point,
                                   **_galore_kw(config, mask, rank))


def _all_groups(name, rank, config, train, frozen, mask):
  del rank, config, frozen, mask
  return {f"{name} (all params)": _count(train)}


def _galore_groups(name, rank, config, train, frozen, mask):
  del config, frozen
  return {f"{name} (attention + MLP kernels, rank {rank})":
              _count(train, mask),
          "adamw (embeddings, norms, head)":
              _count(train) - _count(train, mask)}


def _lora_groups(name, rank, config, train, frozen, mask):
  del mask
  adapters = jax.tree_util.tree_map_with_path(
      lambda p, _: "lora_" in memory.path_str(p), train)
  return {f"{name} adapters (rank {rank})": _count(train, adapters),
          f"adamw ({config.lora_trainable or 'none'})":
              _count(train) - _count(train, adapters),
          "frozen": _count(frozen)}


def _partial_groups(name, rank, config, train, frozen, mask):
  del rank, config, mask
  return {f"adamw ({name}: {', '.join(train)})": _count(train),
          "frozen": _count(frozen)}


def _no_adapters(model, config, rank):
  del model, config, rank


def _add_adapters(model, config, rank, *, quantize_base):
  lora.apply(model, rank, alpha=config.lora_alpha,
             targets=LORA_TARGETS[config.lora_targets],
             quantize_base=quantize_base,
             trainable=config.lora_trainable or None,
             rngs=nnx.Rngs(config.seed + 1))


def _freeze_all_but(model, config, rank, *, trainable, untied_head=False):
  del config, rank
  if untied_head and model.cfg.tie_embeddings:
    raise ValueError(
        "--method head trains the LM head alone, but this model ties its"
        " head to the input embedding (tie_word_embeddings): there is no"
        " separate head to train; use --method adapters")
  lora.freeze(model, trainable)


def _adam_lr(cfg: models.Config) -> float:
  del cfg
  return 1e-3


def _recipe_lr(cfg: models.Config) -> float:
  """The GaLore paper's learning rate for the model's size."""
  return cfg.lr


@dataclasses.dataclass(frozen=True)
class Spec:
  """What a method is.

  Attributes:
    name: its ``--method`` name.
    optimizer: ``(config, schedule, mask, rank) -> tx``; ``mask`` marks the
      attention and MLP kernels (what GaLore projects).
    groups: ``(name, rank, config, train, frozen, mask) -> {group: count}``.
    weights: how it stores the params it trains.
    adapt: ``(model, config, rank)``: converts the model first, in place.
    default_lr: the peak learning rate without ``--lr``.
    layerwise: whether it has a layerwise step.
    on_refresh: whether it takes ``--on-refresh`` (float projected moments).
  """
  name: str
  optimizer: Callable[..., optax.GradientTransformation]
  groups: Callable[..., dict[str, int]] = _all_groups
  weights: Weights = FLOAT
  adapt: Callable[..., None] = _no_adapters
  default_lr: Callable[[models.Config], float] = _adam_lr
  layerwise: bool = True
  on_refresh: bool = False


SPECS = {s.name: s for s in (
    Spec("adamw", _adamw),
    Spec("adamw_8bit", _adamw_8bit),
    Spec("galore", _galore, _galore_groups, default_lr=_recipe_lr,
         on_refresh=True),
    Spec("galore_8bit", _galore_8bit, _galore_groups, default_lr=_recipe_lr),
    Spec("q_galore", _q_galore, _galore_groups, weights=INT8,
         default_lr=_recipe_lr),
    Spec("lora", _adamw, _lora_groups, layerwise=False,
         adapt=functools.partial(_add_adapters, quantize_base=None)),
    Spec("qlora", _adamw, _lora_groups, layerwise=False,
         adapt=functools.partial(_add_adapters, quantize_base="nf4")),
    Spec("head", _adamw, _partial_groups, layerwise=False,
         adapt=functools.partial(_freeze_all_but, trainable=HEAD_PARAMS,
                                 untied_head=True)),
    Spec("adapters", _adamw, _partial_groups, layerwise=False,
         adapt=functools.partial(_freeze_all_but, trainable=ADAPTER_PARAMS)),
)}
NAMES = tuple(SPECS)
LORA_METHODS = ("lora", "qlora")  # the methods --lora-targets applies to


def default_lr(name: str, cfg: models.Config) -> float:
  """The GaLore paper's recipe: its lr for GaLore, 1e-3 for the others."""
  return SPECS[name].default_lr(cfg)


def lr_schedule(config, peak: float) -> optax.Schedule:
  """Linear warmup over ``warmup`` of the steps, cosine decay to
  ``min_lr_ratio`` of ``peak``."""
  return optax.warmup_cosine_decay_schedule(
      0.0, peak, warmup_steps=int(config.warmup * config.steps),
      decay_steps=config.steps, end_value=peak * config.min_lr_ratio)


# ---------------------------------------------------------------------------
# A method built for one model.


@dataclasses.dataclass(eq=False)
class Method:
  """A method's state and step: the plain step, one micro-batch a call.

  Attributes:
    name: the method's name.
    graphdef: the model's graph, which ``train`` and ``frozen`` fill.
    train: what the optimizer updates (INT8 leaves for q_galore).
    frozen: the rest of the model's state (LoRA's base, NF4 for QLoRA).
    tx: the optimizer of ``train`` (``optax.MultiSteps`` accumulates the
      micro-batches); read when the step is traced.
    groups: param counts of the method's groups, for the log.
    schedule: the learning rate of each step.
    weights: how ``train`` is stored and updated.
    grad_accum: micro-batches per optimizer step.
  """
  name: str
  graphdef: Any
  train: Any
  frozen: Any
  tx: optax.GradientTransformation
  groups: dict[str, int]
  schedule: Any
  weights: Weights = FLOAT
  grad_accum: int = 1

  token_spec = P("data")  # how token batches split over a mesh

  @property
  def calls_per_step(self) -> int:
    """Step calls per optimizer step."""
    return self.grad_accum

  def batch_shape(self, batch_size: int, seq_len: int) -> tuple[int, ...]:
    """The shape of one call's token windows."""
    return (batch_size, seq_len + 1)

  def batch(self, ids: np.ndarray, position: int, config
            ) -> tuple[np.ndarray, int]:
    """One call's tokens from data ``position``, and the next position."""
    return input_pipeline.batch(ids, position, config.batch_size,
                                config.seq_len, config.seed), position + 1

  def init_view(self) -> Any:
    """The float params ``tx.init`` takes, as shapes."""
    return jax.eval_shape(self.weights.dequantize, self.train)

  def init(self, train: Any) -> Any:
    """The optimizer state of ``train``."""
    return self.tx.init(self.weights.dequantize(train))

  def _loss(self, params, frozen, tokens_BxT):
    return models.loss_fn(nnx.merge(self.graphdef, params, frozen),
                          tokens_BxT)

  def step(self, train, frozen, opt_state, key, tokens_BxT):
    """``(train, frozen, opt_state, key, tokens) -> (train, opt_state, key,
    metrics)``."""
    w = self.weights
    value, grads = w.value_and_grad(self._loss)(train, frozen, tokens_BxT)
    updates, opt_state = self.tx.update(grads, opt_state, w.dequantize(train))
    key, sub = jax.random.split(key)
    train = w.apply_updates(train, updates, sub)
    metrics = {"loss": value, "grad_norm": optax.tree.norm(grads)}
    return train, opt_state, key, metrics

  def eval_loss(self, train, frozen, tokens_NxBxT) -> jax.Array:
    """The mean loss over ``N`` batches."""
    losses = jax.lax.map(lambda t: self._loss(train, frozen, t),
                         tokens_NxBxT)
    return losses.mean()

  def train_shardings(self, tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """FSDP shardings of ``tree``, shaped like ``train``."""
    return param_shardings(tree, mesh)

  def opt_state_shardings(self, mesh: jax.sharding.Mesh) -> Any:
    view = self.init_view()
    return galore_jax.state_sharding(self.tx, view,
                                     param_shardings(view, mesh))


@dataclasses.dataclass(eq=False)
class LayerwiseMethod(Method):
  """:class:`Method` with the layerwise step
  (:func:`galore_jax.layerwise_step`): each block is updated as soon as its
  gradient exists. A call takes all ``K`` micro-batches of an optimizer
  step, ``(K, B, T)``; ``frozen`` is empty; ``tx`` is the blocks'
  optimizer, ``layerwise`` holds it and the outer params' one."""
  layerwise: Optional[galore_jax.Layerwise] = None

  token_spec = P(None, "data")

  @property
  def calls_per_step(self) -> int:
    return 1

  def batch_shape(self, batch_size: int, seq_len: int) -> tuple[int, ...]:
    return (self.grad_accum, batch_size, seq_len + 1)

  def batch(self, ids, position, config):
    k = self.grad_accum
    windows = [input_pipeline.batch(ids, p, config.batch_size,
                                    config.seq_len, config.seed)
               for p in range(position, position + k)]
    return np.stack(windows), position + k

  def init(self, train):
    blocks, outer = split_blocks(train)
    return self.layerwise.init(outer, blocks)

  def step(self, train, frozen, opt_state, key, tokens_KxBxT):
    del frozen
    blocks, outer = split_blocks(train)
    outer, blocks, opt_state, metrics = self.layerwise.step(
        outer, blocks, opt_state, tokens_KxBxT)
    return join_blocks(blocks, outer), opt_state, key, metrics

  def eval_loss(self, train, frozen, tokens_NxBxT):
    del frozen
    blocks, outer = split_blocks(train)
    return self.layerwise.loss(outer, blocks, tokens_NxBxT)

  def train_shardings(self, tree, mesh):
    """The blocks' shardings never split their layer axis."""
    blocks, outer = split_blocks(tree)
    return join_blocks(param_shardings(blocks, mesh, stacked=True),
                       param_shardings(outer, mesh))

  def opt_state_shardings(self, mesh):
    blocks, outer = split_blocks(self.train)
    float_blocks, float_outer = split_blocks(
        self.train_shardings(self.init_view(), mesh))
    return self.layerwise.state_sharding(outer, blocks, float_outer,
                                         float_blocks)


def build(name: str, model: models.Llama, config) -> Method:
  """Converts ``model`` for method ``name`` and builds its optimizer and
  step (``config.layerwise``: the layerwise one)."""
  spec = SPECS[name]
  cfg = model.cfg
  rank = cfg.rank if config.rank is None else config.rank
  schedule = lr_schedule(
      config, spec.default_lr(cfg) if config.lr is None else config.lr)
  spec.adapt(model, config, rank)
  graphdef, train, frozen = nnx.split(model, nnx.Param, ...)
  train, frozen = nnx.to_pure_dict(train), nnx.to_pure_dict(frozen)
  mask = target_mask(train)
  groups = spec.groups(name, rank, config, train, frozen, mask)
  kw = dict(name=name, graphdef=graphdef, frozen=frozen, groups=groups,
            schedule=schedule, weights=spec.weights,
            grad_accum=config.grad_accum,
            train=spec.weights.quantize(train, mask, model.scan_layers,
                                        config.zero_point))
  if config.layerwise:
    # The blocks' optimizer runs on one layer's params, the outer one on
    # the embeddings, final norm and head; clipping and accumulation are
    # the layerwise step's own.
    blocks_mask, outer_mask = split_blocks(mask)
    tx = spec.optimizer(config, schedule, blocks_mask, rank)
    layerwise = galore_jax.layerwise_step(
        *models.layerwise_fns(model), tx,
        outer_tx=spec.optimizer(config, schedule, outer_mask, rank),
        max_grad_norm=config.clip or None, clip=config.clip_mode,
        seed=config.seed)
    return LayerwiseMethod(tx=tx, layerwise=layerwise, **kw)
  tx = spec.optimizer(config, schedule, mask, rank)
  if config.clip:
    tx = optax.chain(optax.clip_by_global_norm(config.clip), tx)
  if config.grad_accum > 1:
    tx = optax.MultiSteps(tx, config.grad_accum)
  return Method(tx=tx, **kw)


# ---------------------------------------------------------------------------
# Placement on a device mesh.

MESH_AXES = ("data", "fsdp")


def parse_mesh(text: str) -> dict[str, int]:
  """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}`` (a missing axis: 1)."""
  sizes = {}
  for part in text.split(","):
    name, eq, value = part.partition("=")
    name = name.strip()
    if not eq or name not in MESH_AXES or name in sizes:
      raise ValueError(f"expected axes from {MESH_AXES} as name=size, each"
                       f" once, got {text!r}")
    if not value.strip().isdigit() or int(value) < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
    sizes[name] = int(value)
  return {a: sizes.get(a, 1) for a in MESH_AXES}


def make_mesh(sizes: dict[str, int]) -> jax.sharding.Mesh:
  """A ``("data", "fsdp")`` mesh of ``sizes`` over every device."""
  n = math.prod(sizes.values())
  if n != jax.device_count():
    raise ValueError(
        f"--mesh {sizes} needs {n} devices, there are"
        f" {jax.device_count()} ({jax.devices()[0].platform}); on CPU set"
        f" XLA_FLAGS=--xla_force_host_platform_device_count={n}")
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
  """Splits the largest axis that ``n`` divides over "fsdp" (the first of
  equals); arrays with none stay replicated."""
  axes = [i for i, d in enumerate(shape) if d % n == 0 and d >= n]
  if n == 1 or not axes:
    return P()
  best = max(axes, key=lambda i: (shape[i], -i))
  return P(*([None] * best + ["fsdp"]))


def param_shardings(tree: Any, mesh: jax.sharding.Mesh,
                    stacked: bool = False) -> Any:
  """FSDP shardings for every array of ``tree`` (params, frozen, codes);
  ``stacked``: every array has a leading layer axis, never split."""
  n = mesh.shape["fsdp"]
  if stacked:
    spec = lambda shape: P(None, *fsdp_spec(shape[1:], n))
  else:
    spec = lambda shape: fsdp_spec(shape, n)
  return jax.tree.map(lambda x: NamedSharding(mesh, spec(np.shape(x))), tree)


def to_mesh(tree: Any, shardings: Any) -> Any:
  """``tree`` placed by ``shardings``. With several processes each one
  holds the same values and writes only its own devices' shards."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  return jax.tree.map(put, tree, shardings)


@dataclasses.dataclass
class Placement:
  """Where a run's arrays live on the mesh (``None``: one device)."""
  train: Any = None
  frozen: Any = None
  opt_state: Any = None
  replicated: Any = None
  tokens: Any = None


def placement(m: Method, mesh: Optional[jax.sharding.Mesh]) -> Placement:
  """Shardings of a method's train params, frozen params, optimizer state
  (:func:`galore_jax.state_sharding`), key and token batches."""
  if mesh is None:
    return Placement()
  return Placement(
      train=m.train_shardings(m.train, mesh),
      frozen=param_shardings(m.frozen, mesh),
      opt_state=m.opt_state_shardings(mesh),
      replicated=NamedSharding(mesh, P()),
      tokens=NamedSharding(mesh, m.token_spec))


def init_state(m: Method, where: Placement):
  """Train and frozen params placed on the mesh, and the optimizer state
  created there by a jitted ``init`` (never whole on one device)."""
  if where.train is None:
    return m.train, m.frozen, m.init(m.train)
  train = to_mesh(m.train, where.train)
  frozen = to_mesh(m.frozen, where.frozen)
  opt_state = jax.jit(m.init, out_shardings=where.opt_state)(train)
  return train, frozen, opt_state


def compile_step(m: Method, where: Placement, train, frozen, opt_state, key,
                 tokens):
  """The train step compiled ahead of time, params, state and key donated;
  on a mesh with explicit in and out shardings."""
  kw = {}
  if where.train is not None:
    rep = where.replicated
    kw = dict(in_shardings=(where.train, where.frozen, where.opt_state, rep,
                            where.tokens),
              out_shardings=(where.train, where.opt_state, rep, rep))
  return jax.jit(m.step, donate_argnums=(0, 2, 3), **kw).lower(
      train, frozen, opt_state, key, tokens).compile()
