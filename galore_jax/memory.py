r"""Memory planner: which training method fits the device, before training.

For each method, the bytes of weights, gradients, optimizer state and
projectors, computed from the real transforms with ``jax.eval_shape`` (no
allocation, seconds for a 7B model on a CPU), beside a closed form (``N``
params, ``M`` trainable / low-rank moment elements, ``b`` bytes per float of
``dtype``, ``|P|`` projector elements):

=============  ========================================  =====================
method         what it trains and stores                 closed form (bytes)
=============  ========================================  =====================
adamw          all params, float moments                 ``4bN`` (16N in fp32)
adamw_8bit     all params, 8-bit moments                 ``2bN + 2N``
lora           adapters on the targets, frozen base      ``bN + 4bM``
qlora          adapters, NF4 base of the targets         ``N/2 + 4bM``
galore         all params, low-rank moments              ``2bN + 2bM + b|P|``
galore_8bit    all params, 8-bit low-rank moments        ``2bN + 2M + b|P|``
q_galore       INT8 targets, 8-bit moments, INT4 proj.   ``N + 2M + |P|/2``
head           the output head, the rest frozen          ``bN + 3bM``
adapters       input embedding and head, rest frozen     ``bN + 3bM``
=============  ========================================  =====================

In fp32 (``b = 4``) the adamw, lora and qlora forms are the familiar
``16N``, ``4N + 16M`` and ``N/2 + 16M``; ``head`` and ``adapters`` keep
every weight and train ``M`` of them (gradient and two moments each). The measured figures count what the
closed forms leave out: gradients of every trained param (a jitted JAX step
materializes them all), absmax/scales/zero points, float leaves outside the
targets, and float32 moments of small leaves in 8-bit Adam.

:func:`plan_llama` with ``batch`` and ``seq`` also compiles the whole jitted
train step of a LLaMA config for abstract inputs, with donated params and
state, and reports XLA's memory analysis (argument + output - aliased +
temp bytes), so activations and temporaries count too. The LLaMA it
compiles is :mod:`galore_jax.llama_plan`'s (the GaLore paper's configs).

Command line (markdown table; ``--budget`` marks what fits)::

  python -m galore_jax.memory --model llama-7b --rank 1024 --dtype bf16 \
      --budget 24GB [--compile --batch 1 --seq 256 --remat]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from galore_jax import _validation
from galore_jax import adam_8bit
from galore_jax import alias
from galore_jax import layerwise as layerwise_lib
from galore_jax import llama_plan
from galore_jax import projection
from galore_jax import q_galore
from galore_jax import quantization
# The planner's LLaMA, kept importable from here.
from galore_jax.llama_plan import CONFIGS, LLAMA_LORA_TARGETS, LLAMA_TARGETS
from galore_jax.llama_plan import LlamaConfig, llama_fns, llama_params

__all__ = [
    "CONFIGS", "LAYERWISE_METHODS", "LLAMA_LORA_TARGETS", "LLAMA_TARGETS",
    "METHODS", "LlamaConfig",
    "MemoryPlan", "compiled_bytes", "llama_fns", "llama_train_step",
    "llama_params", "main", "nbytes", "parse_bytes", "path_str", "plan",
    "plan_llama", "table",
]

METHODS = ("adamw", "adamw_8bit", "lora", "qlora", "galore", "galore_8bit",
           "q_galore", "head", "adapters")
# Methods that fine-tune a part of the model, the rest frozen.
PARTIAL_METHODS = ("head", "adapters")
# Methods that train every param: the ones a layerwise step serves.
LAYERWISE_METHODS = ("adamw", "adamw_8bit", "galore", "galore_8bit",
                     "q_galore")
_LR = 1e-3  # any: the learning rate does not change a byte


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes one method needs, without activations unless ``compiled`` is set.

  Attributes:
    method: the method's name (see :data:`METHODS`).
    weights: model weights as stored (frozen, quantized and adapters too).
    gradients: gradient buffers of the trained params.
    optimizer_state: optimizer state other than the projectors.
    projectors: GaLore / Q-GaLore projectors and their refresh schedule.
    closed_form: the method's closed form (the module docstring's table).
    compiled: XLA's figure for the whole jitted train step (argument +
      output - aliased + temp), or None if not compiled.
  """
  method: str
  weights: int
  gradients: int
  optimizer_state: int
  projectors: int
  closed_form: float
  compiled: Optional[int] = None

  @property
  def total(self) -> int:
    """``weights + gradients + optimizer_state + projectors``."""
    return self.weights + self.gradients + self.optimizer_state + self.projectors


# ---------------------------------------------------------------------------
# Byte accounting.


def nbytes(tree: Any) -> int:
  """Stored bytes of every array leaf (``optax.MaskedNode()`` has none)."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def _key_str(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: tuple) -> str:
  """``"layers/0/kernel"`` for a key path (a trailing ``.value`` dropped)."""
  return "/".join(_key_str(k) for k in projection.normalize_path(path))


def _flat_params(params: Any, dtype: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """Floating leaves as ``{path: ShapeDtypeStruct}`` (an NNX model works)."""
  flat = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    if hasattr(x, "shape") and jnp.issubdtype(x.dtype, jnp.floating):
      flat[path_str(path)] = jax.ShapeDtypeStruct(
          tuple(x.shape), x.dtype if dtype is None else jnp.dtype(dtype))
  if not flat:
    raise ValueError("plan: `params` has no floating-point leaves")
  return flat


def _target_mask(flat: Mapping[str, Any], targets: Any, rank: int):
  """``{path: bool}``: the matrices GaLore projects and LoRA adapts."""
  if targets is None:  # GaLore's default: matrices both sides above the rank
    return {k: x.ndim >= 2 and min(x.shape[-2:]) > rank
            for k, x in flat.items()}
  if callable(targets) and not isinstance(targets, (str, re.Pattern)):
    return {k: bool(targets(k, x)) and x.ndim >= 2 for k, x in flat.items()}
  if not isinstance(targets, (str, re.Pattern)):
    raise TypeError("`targets` must be None, a regex over '/'-joined param"
                    f" paths, or a callable (path, leaf) -> bool; got"
                    f" {targets!r}")
  pattern = _regex("targets", targets)
  mask = {k: x.ndim >= 2 and bool(pattern.search(k)) for k, x in flat.items()}
  if not any(mask.values()):
    raise ValueError(
        f"`targets` {pattern.pattern!r} matches no param with ndim >= 2; the"
        f" paths are: {', '.join(flat)}")
  return mask


def _regex(name: str, value: Any) -> re.Pattern:
  if isinstance(value, re.Pattern):
    return value
  try:
    return re.compile(value)
  except (re.error, TypeError) as e:
    raise ValueError(f"`{name}` is not a valid regex: {value!r} ({e})") from e


def _check_methods(methods: Any) -> tuple[str, ...]:
  if isinstance(methods, str):
    methods = (methods,)
  methods = tuple(methods)
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    raise ValueError(f"unknown method(s) {unknown or methods!r}; known:"
                     f" {', '.join(METHODS)}")
  return methods


def _optimizer(method: str, rank: int, mask: Any, gap: int):
  if method == "adamw":
    return optax.adamw(_LR)
  if method == "adamw_8bit":
    return adam_8bit.adamw_8bit(_LR)
  if method == "galore":
    return alias.galore_adamw(_LR, rank=rank, update_proj_gap=gap,
                               projection_mask=mask)
  if method == "galore_8bit":
    return alias.galore_adamw_8bit(_LR, rank=rank, update_proj_gap=gap,
                                    projection_mask=mask)
  if method == "q_galore":
    return alias.q_galore_adamw(_LR, rank=rank, update_proj_gap=gap,
                                   projection_mask=mask)
  return optax.adamw(_LR)  # lora / qlora: AdamW on the adapters


def _adapters(flat, mask, rank, trainable_re):
  """LoRA adapters ``{path/lora_a: (..., in, r), path/lora_b: (..., r, out)}``
  of the targets, plus the params left trainable in full."""
  out = {}
  for k, x in flat.items():
    if trainable_re is not None and trainable_re.search(k):
      out[k] = x
    elif mask[k]:
      *batch, d_in, d_out = x.shape
      if rank > min(d_in, d_out):
        raise ValueError(f"`rank` {rank} is larger than target {k!r} allows:"
                         f" min(in, out) = {min(d_in, d_out)} for shape"
                         f" {x.shape}")
      out[k + "/lora_a"] = jax.ShapeDtypeStruct((*batch, d_in, rank), x.dtype)
      out[k + "/lora_b"] = jax.ShapeDtypeStruct((*batch, rank, d_out), x.dtype)
  return out


def _partial_params(flat, method, head_re, inputs_re):
  """The params a partial method trains: ``head_re``'s (and, for
  ``adapters``, ``inputs_re``'s) matches."""
  wanted = [("head", head_re)] + (
      [("inputs", inputs_re)] if method == "adapters" else [])
  for name, pattern in wanted:
    if pattern is None:
      what = "output head" if name == "head" else "input embedding"
      raise ValueError(f"method {method!r} needs `{name}`: a regex of the"
                       f" {what}'s params")
    if not any(pattern.search(k) for k in flat):
      raise ValueError(f"`{name}` {pattern.pattern!r} matches no param; the"
                       f" paths are: {', '.join(flat)}")
  return {k: x for k, x in flat.items()
          if any(pattern.search(k) for _, pattern in wanted)}


def _galore_shapes(flat, mask, rank):
  """Elements of one low-rank moment (M) and of the projectors (|P|)."""
  m = p = 0
  for k, x in flat.items():
    if mask[k]:
      batch = math.prod(x.shape[:-2])
      rows, cols = x.shape[-2:]
      r = min(rank, rows, cols)
      m += batch * r * max(rows, cols)
      p += batch * r * min(rows, cols)
    else:
      m += math.prod(x.shape)
  return m, p


def _frozen_weights(flat, mask, quantize_base, block_size):
  def quantized(x):
    return jax.eval_shape(lambda w: quantization.quantize_absmax(
        w, quantize_base, block_size, batch_dims=x.ndim - 2), x)
  return {k: quantized(x) if mask[k] else x for k, x in flat.items()}


def plan(
    params: Any,
    methods: Optional[Sequence[str]] = None,
    *,
    rank: int,
    dtype: Any = None,
    targets: Any = None,
    lora_targets: Any = None,
    trainable: Optional[str] = None,
    head: Optional[str] = None,
    inputs: Optional[str] = None,
    update_proj_gap: int = 200,
    quantize_base: str = "nf4",
    block_size: int = 64,
) -> dict[str, MemoryPlan]:
  """Bytes of weights, gradients, optimizer state and projectors per method.

  Every figure comes from ``jax.eval_shape`` of the real transforms
  (``optax.adamw``, :func:`galore_jax.adamw_8bit`,
  :func:`galore_jax.galore_adamw`, :func:`galore_jax.galore_adamw_8bit`,
  :func:`galore_jax.q_galore_adamw`, :func:`galore_jax.quantize_params`,
  :func:`galore_jax.quantization.quantize_absmax`) on abstract params:
  nothing is allocated.

  Args:
    params: a params pytree, abstract (``jax.ShapeDtypeStruct``) or not, or
      a Flax NNX model; its floating-point leaves are the params.
    methods: names from :data:`METHODS`; None: all of them, but ``head``
      without a ``head`` regex and ``adapters`` without both regexes.
    rank: GaLore / LoRA rank.
    dtype: float dtype of the params (and of LoRA adapters and float
      moments); default: each leaf's own.
    targets: the matrices GaLore projects, LoRA adapts, QLoRA stores in NF4
      and Q-GaLore in INT8: a regex searched in "/"-joined param paths
      (``"layers/0/kernel"``; only leaves with ndim >= 2), a callable
      ``(path, leaf) -> bool``, or None: every leaf with ndim >= 2 whose two
      trailing dims exceed ``rank`` (GaLore's default).
    lora_targets: the matrices LoRA / QLoRA adapt, if not ``targets`` (the
      same forms).
    trainable: regex of params LoRA / QLoRA leave trainable in full (e.g.
      ``"embed|lm_head"``); everything else not adapted is frozen.
    head: regex of the output head's params: what ``head`` trains, the
      rest frozen.
    inputs: regex of the input embedding's params: ``adapters`` trains
      them and the head.
    update_proj_gap: GaLore's refresh gap (no effect on bytes).
    quantize_base: QLoRA's base code, ``"nf4"`` or ``"int8"``.
    block_size: QLoRA's absmax block size.

  Returns:
    ``{method: MemoryPlan}`` in the order of ``methods``.

  Raises:
    ValueError: an unknown method, a LoRA rank above a target's
      ``min(in, out)``, a ``targets``, ``head`` or ``inputs`` regex that
      matches nothing, or ``head`` / ``adapters`` without their regexes.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from galore_jax import memory
    >>> params = {"w1": jax.ShapeDtypeStruct((784, 512), jnp.float32),
    ...           "b1": jax.ShapeDtypeStruct((512,), jnp.float32),
    ...           "w2": jax.ShapeDtypeStruct((512, 512), jnp.float32)}
    >>> p = memory.plan(params, ["adamw", "galore", "lora"], rank=64)
    >>> p["adamw"].total == 16 * (784 * 512 + 512 + 512 * 512) + 4  # + count
    True
    >>> p["galore"].projectors  # float32 (64, 512) per kernel
    262144
    >>> p["lora"].gradients == 4 * 64 * (784 + 512 + 512 + 512)  # A and B
    True
    >>> head = memory.plan(params, ["head"], rank=64, head="w2")["head"]
    >>> head.gradients == 4 * 512 * 512  # w2 trained, the rest frozen
    True
  """
  if methods is None:
    methods = [m for m in METHODS if m not in PARTIAL_METHODS
               or (head is not None and (m == "head" or inputs is not None))]
  methods = _check_methods(methods)
  rank = _validation.positive_int("rank", rank)
  if quantize_base not in ("nf4", "int8"):
    raise ValueError(f"`quantize_base` must be 'nf4' or 'int8', got"
                     f" {quantize_base!r}")
  flat = _flat_params(params, dtype)
  mask = _target_mask(flat, targets, rank)
  lora_mask = (mask if lora_targets is None
               else _target_mask(flat, lora_targets, rank))
  trainable_re = None if trainable is None else _regex("trainable", trainable)
  head_re = None if head is None else _regex("head", head)
  inputs_re = None if inputs is None else _regex("inputs", inputs)
  n = sum(math.prod(x.shape) for x in flat.values())
  b = sum(nbytes(x) for x in flat.values()) / n  # bytes per float
  weights = nbytes(flat)
  m, p = _galore_shapes(flat, mask, rank)  # closed forms of the GaLore family
  out = {}
  for method in methods:
    if method in PARTIAL_METHODS:
      train = _partial_params(flat, method, head_re, inputs_re)
      state = jax.eval_shape(optax.adamw(_LR).init, train)
      m_part = sum(math.prod(x.shape) for x in train.values())
      out[method] = MemoryPlan(
          method, weights=weights, gradients=nbytes(train),
          optimizer_state=nbytes(state), projectors=0,
          closed_form=b * n + 3 * b * m_part)
      continue
    if method in ("lora", "qlora"):
      train = _adapters(flat, lora_mask, rank, trainable_re)
      frozen = {k: x for k, x in flat.items() if k not in train}
      if method == "qlora":
        frozen = _frozen_weights(frozen, lora_mask, quantize_base,
                                 block_size)
      state = jax.eval_shape(optax.adamw(_LR).init, train)
      m_lora = sum(math.prod(x.shape) for x in train.values())
      base = n / 2 if method == "qlora" else b * n
      out[method] = MemoryPlan(
          method, weights=nbytes(frozen) + nbytes(train),
          gradients=nbytes(train), optimizer_state=nbytes(state),
          projectors=0, closed_form=base + 4 * b * m_lora)
      continue
    state = jax.eval_shape(
        _optimizer(method, rank, mask, update_proj_gap).init, flat)
    proj = nbytes(state[0].projector) if "galore" in method else 0
    w = weights
    if method == "q_galore":
      w = nbytes(jax.eval_shape(
          lambda p: q_galore.quantize_params(p, mask=mask), flat))
    closed = {"adamw": 4 * b * n, "adamw_8bit": 2 * b * n + 2 * n,
              "galore": 2 * b * n + 2 * b * m + b * p,
              "galore_8bit": 2 * b * n + 2 * m + b * p,
              "q_galore": n + 2 * m + p / 2}[method]
    out[method] = MemoryPlan(
        method, weights=w, gradients=weights,
        optimizer_state=nbytes(state) - proj, projectors=proj,
        closed_form=closed)
  return out


# ---------------------------------------------------------------------------
# Compiled train steps: XLA's memory analysis.


def compiled_bytes(fn: Callable, *args, donate_argnums=()) -> int:
  """Peak-memory bound XLA reports for ``jax.jit(fn)(*args)``.

  ``argument + output - alias + temp`` bytes of the compiled executable's
  memory analysis; ``args`` may be ``jax.ShapeDtypeStruct`` trees: nothing
  is allocated. Donated arguments alias their outputs.
  """
  compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes
             - m.alias_size_in_bytes + m.temp_size_in_bytes)


def _split(tree: dict) -> tuple[Any, dict]:
  """``(tree["layers"], the rest)``: blocks and outer params."""
  return tree["layers"], {k: v for k, v in tree.items() if k != "layers"}


def _made(fn: Callable, *args) -> Any:
  """``fn(*args)``, or its shapes if any input is abstract."""
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(args)):
    return jax.eval_shape(fn, *args)
  return fn(*args)


def llama_train_step(method: str, config: LlamaConfig, params: dict, *,
                     rank: int, remat: bool = False, layerwise: bool = False,
                     update_proj_gap: int = 200):
  """A full-parameter train step of ``method`` on :func:`llama_params`'
  LLaMA, the one :func:`plan_llama` compiles.

  Args:
    method: one of :data:`LAYERWISE_METHODS`.
    config: the shape.
    params: :func:`llama_params`' tree, abstract or real arrays (the state
      is made abstract or real to match).
    rank: GaLore rank; the targets are :data:`LLAMA_TARGETS`.
    remat: recompute each block in the plain step's backward pass.
    layerwise: :func:`galore_jax.layerwise_step` (blocks ``params["layers"]``,
      INT8 per layer for ``q_galore``; outer params the rest, each part with
      its own transform) instead of ``jax.value_and_grad`` + ``tx.update``.
    update_proj_gap: GaLore's refresh gap.

  Returns:
    ``(step, carry)``: ``step(carry, tokens_BxT) -> (carry, loss)``, to jit
    with ``carry`` donated; ``carry`` holds the params (INT8 for
    ``q_galore``), the optimizer state and, for ``q_galore``'s plain step,
    the stochastic-rounding key.
  """
  if method not in LAYERWISE_METHODS:
    raise ValueError(f"{method!r} is not a full-parameter method; these"
                     f" are: {', '.join(LAYERWISE_METHODS)}")
  flat = _flat_params(params, None)
  mask = _target_mask(flat, LLAMA_TARGETS, rank)
  tree_mask = jax.tree_util.tree_map_with_path(
      lambda p, _: mask[path_str(p)], params)
  if layerwise:
    blocks_mask, outer_mask = _split(tree_mask)
    blocks, outer = _split(params)
    if method == "q_galore":
      blocks = _made(lambda b: layerwise_lib.quantize_blocks(
          b, mask=blocks_mask), blocks)
    lw = layerwise_lib.layerwise_step(
        *llama_fns(config), _optimizer(method, rank, blocks_mask,
                                       update_proj_gap),
        outer_tx=_optimizer(method, rank, outer_mask, update_proj_gap))

    def lw_step(carry, tokens_BxT):
      outer, blocks, state, metrics = lw.step(*carry, tokens_BxT[None])
      return (outer, blocks, state), metrics["loss"]

    return lw_step, (outer, blocks, _made(lw.init, outer, blocks))

  tx = _optimizer(method, rank, tree_mask, update_proj_gap)
  state = _made(tx.init, params)
  loss = lambda p, t: llama_plan.llama_loss(p, t, config, remat)
  if method == "q_galore":
    # INT8 kernels quantized per layer: the scan body dequantizes one
    # layer at a time (`llama_plan.llama_loss`), and the gradients are taken w.r.t. the
    # dequantized weights without a float copy of the model.
    def q_step(carry, tokens_BxT):
      qparams, state, key = carry
      value, grads = q_galore.value_and_grad(loss)(qparams, tokens_BxT)
      updates, state = tx.update(grads, state,
                                 q_galore.dequantize_params(qparams))
      key, sub = jax.random.split(key)
      qparams = q_galore.apply_updates_stochastic(qparams, updates, sub)
      return (qparams, state, key), value

    def quantize(p):
      blocks, outer = _split(p)
      blocks_mask, outer_mask = _split(tree_mask)
      return {**q_galore.quantize_params(outer, mask=outer_mask),
              "layers": layerwise_lib.quantize_blocks(blocks,
                                                      mask=blocks_mask)}

    qparams = _made(quantize, params)
    return q_step, (qparams, state, _made(lambda: jax.random.key(0)))

  def step(carry, tokens_BxT):
    params, state = carry
    value, grads = jax.value_and_grad(loss)(params, tokens_BxT)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), value

  return step, (params, state)


def _layerwise_plan(method, config, params, rank, gap, flat_plan, tokens):
  """``flat_plan`` recounted for the layerwise step: its weights and state
  as that step stores them, and the gradients it holds: the outer params'
  and one layer's. In the closed form the gradient term ``bN`` becomes
  ``b (N_outer + N_layer)`` (the q_galore formula has none). With
  ``tokens``, the compiled figure is the layerwise step's."""
  step, carry = llama_train_step(method, config, params, rank=rank,
                                 layerwise=True, update_proj_gap=gap)
  outer, blocks, state = carry
  proj = nbytes([state.blocks[0].projector, state.outer[0].projector]
                if "galore" in method else [])
  float_blocks, float_outer = _split(params)
  layer = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                       float_blocks)
  held = nbytes(float_outer) + nbytes(layer)
  closed = flat_plan.closed_form
  if method != "q_galore":
    closed = closed - nbytes(params) + held
  compiled = (None if tokens is None else
              compiled_bytes(step, carry, tokens, donate_argnums=(0,)))
  return MemoryPlan(method, weights=nbytes([outer, blocks]), gradients=held,
                    optimizer_state=nbytes(state) - proj, projectors=proj,
                    closed_form=closed, compiled=compiled)


def _frozen_step(config, params, train, frozen, tokens, remat):
  """XLA bytes of a step that trains ``train`` and keeps ``frozen`` (LoRA:
  adapters ``{"a", "b"}`` of frozen kernels; partial fine-tuning: a part of
  the params): AdamW on ``train`` alone, so nothing else is
  differentiated."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  treedef = jax.tree.structure(params)
  keys = [path_str(p) for p, _ in flat]
  tx = optax.adamw(_LR)

  def leaf(k, train, frozen):
    if k not in train:
      return frozen[k]
    return dict(w=frozen[k], **train[k]) if k in frozen else train[k]

  def step(train, frozen, state, tokens):
    def loss(train):
      params = jax.tree.unflatten(treedef, [leaf(k, train, frozen)
                                            for k in keys])
      return llama_plan.llama_loss(params, tokens, config, remat)
    value, grads = jax.value_and_grad(loss)(train)
    updates, state = tx.update(grads, state, train)
    return optax.apply_updates(train, updates), state, value

  state = jax.eval_shape(tx.init, train)
  return compiled_bytes(step, train, frozen, state, tokens,
                        donate_argnums=(0, 2))


def _compiled_step(method, config, params, lora_mask, trained, rank, tokens,
                   remat, quantize_base, block_size, gap):
  """XLA bytes of one jitted train step of ``method`` on ``params``
  (``lora_mask``: the LoRA targets; ``trained``: the keys each partial
  method trains)."""
  flat = {path_str(p): x for p, x in
          jax.tree_util.tree_flatten_with_path(params)[0]}
  if method in PARTIAL_METHODS:
    train = {k: x for k, x in flat.items() if k in trained[method]}
    frozen = {k: x for k, x in flat.items() if k not in train}
    return _frozen_step(config, params, train, frozen, tokens, remat)
  if method in ("lora", "qlora"):
    train, frozen = {}, {}
    for key, x in flat.items():
      if lora_mask[key]:
        sds = lambda *shape: jax.ShapeDtypeStruct(x.shape[:-2] + shape, x.dtype)
        train[key] = {"a": sds(x.shape[-2], rank), "b": sds(rank, x.shape[-1])}
        frozen[key] = (x if method == "lora" else
                       _frozen_weights({key: x}, {key: True}, quantize_base,
                                       block_size)[key])
      else:
        frozen[key] = x
    return _frozen_step(config, params, train, frozen, tokens, remat)

  step, carry = llama_train_step(method, config, params, rank=rank,
                                 remat=remat, update_proj_gap=gap)
  return compiled_bytes(step, carry, tokens, donate_argnums=(0,))


def plan_llama(
    config: LlamaConfig | str,
    methods: Sequence[str] = METHODS,
    *,
    rank: Optional[int] = None,
    dtype: Any = jnp.float32,
    batch: Optional[int] = None,
    seq: Optional[int] = None,
    remat: bool = False,
    layerwise: bool = False,
    lora_targets: str = "all",
    update_proj_gap: int = 200,
    quantize_base: str = "nf4",
    block_size: int = 64,
) -> dict[str, MemoryPlan]:
  """:func:`plan` for a LLaMA config, targets = attention and MLP kernels.

  ``head`` trains the LM head, ``adapters`` the input embedding and the
  head, each with the rest frozen.

  Args:
    config: a :class:`LlamaConfig` or a name in :data:`CONFIGS`.
    methods: names from :data:`METHODS`.
    rank: GaLore / LoRA rank; default the paper's rank for the config.
    dtype: params dtype (``jnp.bfloat16`` as the paper trains).
    batch, seq: if both are given, each method's whole jitted train step
      (forward, backward, optimizer update, donated params and state) is
      compiled for abstract ``(batch, seq + 1)`` tokens and XLA's memory
      figure is stored in :attr:`MemoryPlan.compiled`.
    remat: recompute each layer's activations in the backward pass.
    layerwise: count and compile :func:`galore_jax.layerwise_step` (each
      block updated as soon as its gradient exists; blocks recomputed, so
      ``remat`` does not change it) instead of the plain step; only for
      :data:`LAYERWISE_METHODS`.
    lora_targets: what LoRA / QLoRA adapt: ``"all"`` attention and MLP
      kernels, ``"attention"`` or ``"mlp"`` (:data:`LLAMA_LORA_TARGETS`).
    update_proj_gap, quantize_base, block_size: as in :func:`plan`.

  Returns:
    ``{method: MemoryPlan}``.
  """
  if isinstance(config, str):
    if config not in CONFIGS:
      raise ValueError(f"unknown LLaMA config {config!r}; known:"
                       f" {', '.join(CONFIGS)}")
    config = CONFIGS[config]
  rank = config.rank if rank is None else rank
  if (batch is None) != (seq is None):
    raise ValueError("give both `batch` and `seq` to compile the train step,"
                     f" or neither; got batch={batch!r}, seq={seq!r}")
  _validation.boolean("layerwise", layerwise)
  if layerwise:
    plain = [m for m in _check_methods(methods)
             if m not in LAYERWISE_METHODS]
    if plain:
      raise ValueError(f"{', '.join(plain)} train on the plain step; a"
                       " layerwise step serves "
                       + ", ".join(LAYERWISE_METHODS))
  if lora_targets not in LLAMA_LORA_TARGETS:
    raise ValueError(f"`lora_targets` must be one of"
                     f" {', '.join(LLAMA_LORA_TARGETS)}, got {lora_targets!r}")
  params = llama_params(config, dtype)
  lora_re = LLAMA_LORA_TARGETS[lora_targets]
  plans = plan(params, methods, rank=rank, targets=LLAMA_TARGETS,
               lora_targets=lora_re, head=llama_plan.LLAMA_HEAD,
               inputs=llama_plan.LLAMA_INPUTS,
               update_proj_gap=update_proj_gap, quantize_base=quantize_base,
               block_size=block_size)
  if batch is not None:
    _validation.positive_int("batch", batch)
    _validation.positive_int("seq", seq)
  if layerwise:
    tokens = (None if batch is None
              else jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32))
    return {m: _layerwise_plan(m, config, params, rank, update_proj_gap, p,
                               tokens) for m, p in plans.items()}
  if batch is None:
    return plans
  flat = _flat_params(params, None)
  lora_mask = _target_mask(flat, lora_re, rank)
  trained = {m: set(_partial_params(flat, m,
                                    _regex("head", llama_plan.LLAMA_HEAD),
                                    _regex("inputs", llama_plan.LLAMA_INPUTS)))
             for m in PARTIAL_METHODS}
  tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
  return {
      m: dataclasses.replace(p, compiled=_compiled_step(
          m, config, params, lora_mask, trained, rank, tokens, remat,
          quantize_base, block_size, update_proj_gap))
      for m, p in plans.items()}


# ---------------------------------------------------------------------------
# Command line.

_UNITS = {"": 1, "b": 1, "kb": 2**10, "kib": 2**10, "mb": 2**20, "mib": 2**20,
          "gb": 2**30, "gib": 2**30, "tb": 2**40, "tib": 2**40}
_DTYPES = {"fp32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16,
           "bfloat16": jnp.bfloat16, "fp16": jnp.float16,
           "float16": jnp.float16}


def parse_bytes(text: str) -> int:
  """``"24GB"`` -> ``24 * 2**30``: binary units, as GPU memory is quoted."""
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
  if not m or m.group(2).lower() not in _UNITS:
    raise ValueError(f"cannot read a memory size from {text!r}; write e.g."
                     " 24GB, 16GiB, 500MB")
  return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _gib(x: float) -> str:
  return f"{x / 2**30:,.2f}"


def table(plans: Mapping[str, MemoryPlan], budget: Optional[int] = None) -> str:
  """A markdown table of ``plans`` in GiB, with a fits column for a budget."""
  compiled = any(p.compiled is not None for p in plans.values())
  head = ["method", "weights", "gradients", "optimizer state", "projectors",
          "total", "closed form"]
  head += ["compiled step (XLA)"] if compiled else []
  head += [f"fits {_gib(budget)} GiB"] if budget is not None else []
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for p in plans.values():
    cells = [p.method, _gib(p.weights), _gib(p.gradients),
             _gib(p.optimizer_state), _gib(p.projectors), _gib(p.total),
             _gib(p.closed_form)]
    if compiled:
      cells.append(_gib(p.compiled))
    if budget is not None:
      need = p.compiled if p.compiled is not None else p.total
      cells.append("yes" if need <= budget else "no")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  ap = argparse.ArgumentParser(
      prog="python -m galore_jax.memory",
      description="Memory of every training method for a LLaMA config, from"
      " the real transforms (jax.eval_shape; nothing is allocated).")
  ap.add_argument("--model", default="llama-7b", choices=list(CONFIGS))
  ap.add_argument("--rank", type=int, default=None,
                  help="GaLore / LoRA rank (default: the paper's)")
  ap.add_argument("--dtype", default="bf16", choices=list(_DTYPES))
  ap.add_argument("--methods", default=",".join(METHODS),
                  help="comma-separated, from: " + ", ".join(METHODS))
  ap.add_argument("--budget", default=None,
                  help="device memory, e.g. 24GB (binary units): marks fits")
  ap.add_argument("--compile", action="store_true",
                  help="also compile the jitted train step (XLA's figure)")
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--seq", type=int, default=None)
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--lora-targets", default="all",
                  choices=list(LLAMA_LORA_TARGETS),
                  help="the kernels lora and qlora adapt: all attention and"
                  " MLP kernels, attention (q, k, v, o) or mlp (gate, up,"
                  " down)")
  ap.add_argument("--layerwise", action="store_true",
                  help="the layerwise step (galore_jax.layerwise_step): each"
                  " block updated as soon as its gradient exists; gradients"
                  " held: the outer params' and one layer's")
  args = ap.parse_args(argv)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  if args.compile and (args.batch is None or args.seq is None):
    ap.error("--compile needs --batch and --seq")
  if not args.compile and (args.batch is not None or args.seq is not None):
    ap.error("--batch and --seq only apply with --compile")
  try:
    budget = None if args.budget is None else parse_bytes(args.budget)
    plans = plan_llama(args.model, methods, rank=args.rank,
                       dtype=_DTYPES[args.dtype], batch=args.batch,
                       seq=args.seq, remat=args.remat,
                       layerwise=args.layerwise,
                       lora_targets=args.lora_targets)
  except ValueError as e:
    ap.error(str(e))
  config = CONFIGS[args.model]
  rank = config.rank if args.rank is None else args.rank
  print(f"## {args.model}: {config.num_params / 1e9:.2f}B params, rank {rank},"
        f" {args.dtype}" + (f", batch {args.batch} x seq {args.seq}"
                            f"{', remat' if args.remat else ''}"
                            if args.compile else "")
        + (", layerwise step" if args.layerwise else "") + " (GiB)\n")
  print(table(plans, budget))
  return 0


if __name__ == "__main__":
  sys.exit(main())
