r"""LoRA, QLoRA and low-rank factorized layers for Flax NNX: the baselines.

GaLore trains every weight with low-rank *gradients*; the methods it is
judged against train low-rank *weights* instead:

* **LoRA** (Hu et al., 2022): a frozen base ``W`` plus a trainable low-rank
  update, ``y = x W + b + (alpha / r) dropout(x) A B`` with ``A`` of shape
  ``(in, r)`` (small random normal) and ``B`` of shape ``(r, out)`` (zeros, so
  training starts from the base model). :func:`apply` turns the matching
  ``nnx.Linear`` layers of a model into :class:`LoRALinear` layers.
* **QLoRA** (Dettmers et al., 2023): the same, with the frozen base stored
  as 4-bit NormalFloat codes (blockwise absmax, blocks of 64, two codes per
  byte; ``quantize_base="nf4"``) or as int8 (``"int8"``), dequantized in the
  forward pass.
* **Low-rank factorized layers** (:class:`LowRankLinear`): ``W = A B``
  outright, no frozen base, both factors trained.
* **Partial fine-tuning** (:func:`freeze`): every param frozen but the
  matching ones, e.g. the output head alone (a classifier on a frozen
  backbone: no backward pass beyond the head) or the input embedding and
  the head (input adapters).

Frozen weights live in :class:`Frozen` variables, which are not ``nnx.Param``:
``nnx.grad`` and ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` differentiate
and keep optimizer state for the adapters (``nnx.LoRAParam``, a ``Param``)
and the explicitly trainable params only, so no gradient buffer of the base
weights exists in the jitted step.

Example:
  >>> import jax, optax
  >>> from flax import nnx
  >>> from galore_jax import lora
  >>> model = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.relu,
  ...                        nnx.Linear(32, 4, rngs=nnx.Rngs(1)))
  >>> model = lora.apply(model, rank=2, alpha=4.0, rngs=nnx.Rngs(2))
  >>> type(model.layers[0]).__name__, model.layers[0].lora_a.shape
  ('LoRALinear', (16, 2))
  >>> opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  >>> # trainable: the adapters only, 16*2 + 2*32 + 32*2 + 2*4
  >>> sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  168
  >>> merged = lora.merge(model)  # plain nnx.Linear layers again
  >>> type(merged.layers[0]).__name__
  'Linear'

References:
  Hu et al., 2022, `LoRA: Low-Rank Adaptation of Large Language Models
  <https://arxiv.org/abs/2106.09685>`_.
  Dettmers et al., 2023, `QLoRA: Efficient Finetuning of Quantized LLMs
  <https://arxiv.org/abs/2305.14314>`_.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from galore_jax import _validation
from galore_jax import quantization

__all__ = [
    "ALL_LINEAR", "ATTENTION", "MLP", "QUANTIZE_BASE", "Frozen", "LoRALinear",
    "LowRankLinear", "apply", "freeze", "merge", "linear_paths",
]

# `targets` presets, matched with `re.search` against "/"-joined module paths
# such as "layers/0/attn/q_proj".
ALL_LINEAR = r".*"
ATTENTION = r"(^|/)(self_)?(attn|attention)(/|$)"
MLP = r"(^|/)(mlp|ffn|feed_forward)(/|$)"
QUANTIZE_BASE = (None, "nf4", "int8")


class Frozen(nnx.Variable):
  """A frozen weight: state of the model, but not an ``nnx.Param``.

  Its value is an array or a quantized array
  (:class:`galore_jax.quantization.AbsmaxQuantizedArray`). Filters that
  select ``nnx.Param`` (the default of ``nnx.grad`` and the usual ``wrt`` of
  ``nnx.Optimizer``) skip it.
  """


class LoRALinear(nnx.Module):
  r"""A linear layer with a frozen (optionally quantized) base and an adapter.

  .. math::
    y = x \hat W + b + \frac{\alpha}{r}\, \mathrm{dropout}(x)\, A B

  ``W`` and ``b`` are :class:`Frozen`; ``A`` (``lora_a``, ``(in, r)``) and
  ``B`` (``lora_b``, ``(r, out)``) are ``nnx.LoRAParam``. A stacked kernel
  ``(L, in, out)`` (from ``nnx.vmap``) gets stacked adapters
  ``(L, in, r)``, ``(L, r, out)`` and per-layer quantization.

  Build one from an ``nnx.Linear`` with :meth:`from_linear`; :func:`apply`
  does that for every matching layer of a model.
  """

  def __init__(
      self,
      kernel: Any,
      bias: Optional[jax.Array],
      rank: int,
      *,
      alpha: float,
      dropout: float = 0.0,
      quantize_base: Optional[str] = None,
      block_size: int = 64,
      dtype: Any = None,
      precision: Any = None,
      a_init: Any = None,
      rngs: nnx.Rngs,
  ):
    """Args:
      kernel: the base weight, ``(..., in, out)``.
      bias: the base bias ``(..., out)`` or None.
      rank: adapter rank ``r``, at most ``min(in, out)``.
      alpha: the adapter's output is scaled by ``alpha / rank``.
      dropout: dropout rate on the adapter's input (``nnx.Dropout``: active
        unless the model is in ``eval()`` mode).
      quantize_base: None (keep the base in its dtype), ``"nf4"`` or
        ``"int8"`` (blockwise absmax codes, see
        :func:`galore_jax.quantization.quantize_absmax`).
      block_size: absmax block size of the quantized base.
      dtype: computation dtype (as ``nnx.Linear``'s ``dtype``).
      precision: matmul precision.
      a_init: initializer of ``A``; default normal with standard deviation
        ``1 / sqrt(3 in)``, the spread of a default PyTorch ``Linear`` that
        the reference LoRA uses for ``A``.
      rngs: for ``A`` and dropout.
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim < 2:
      raise ValueError(f"LoRALinear needs a kernel of ndim >= 2 (in, out),"
                       f" got shape {kernel.shape}")
    *batch, d_in, d_out = kernel.shape
    _validation.positive_int("rank", rank)
    if rank > min(d_in, d_out):
      raise ValueError(
          f"`rank` {rank} is larger than the layer allows: min(in, out) ="
          f" {min(d_in, d_out)} for a kernel of shape {kernel.shape}")
    _check_settings(alpha, dropout, quantize_base)
    self.in_features, self.out_features, self.rank = d_in, d_out, rank
    self.scale = float(alpha) / rank
    self.dtype, self.precision = dtype, precision
    self.param_dtype = kernel.dtype
    if quantize_base is None:
      self.kernel = Frozen(kernel)
    else:
      self.kernel = Frozen(quantization.quantize_absmax(  # per (in, out)
          kernel, quantize_base, block_size, batch_dims=len(batch)))
    self.bias = None if bias is None else Frozen(jnp.asarray(bias))
    if a_init is None:
      a_init = nnx.initializers.normal(1.0 / math.sqrt(3 * d_in))
    self.lora_a = nnx.LoRAParam(
        a_init(rngs.params(), (*batch, d_in, rank), kernel.dtype))
    self.lora_b = nnx.LoRAParam(jnp.zeros((*batch, rank, d_out), kernel.dtype))
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

  @classmethod
  def from_linear(cls, linear: nnx.Linear, rank: int, **kwargs) -> "LoRALinear":
    """A LoRA layer on top of ``linear``'s kernel and bias (kept frozen)."""
    bias = None if linear.bias is None else linear.bias.get_value()
    kwargs.setdefault("dtype", linear.dtype)
    kwargs.setdefault("precision", linear.precision)
    return cls(linear.kernel.get_value(), bias, rank, **kwargs)

  def base_kernel(self, dtype: Any = None) -> jax.Array:
    """The frozen base weight, dequantized if stored quantized."""
    return quantization.dequantize(self.kernel.get_value(), dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or jnp.result_type(x, self.param_dtype)
    w = self.base_kernel(dtype)
    a, b = self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype)
    x = x.astype(dtype)
    y = jnp.matmul(x, w, precision=self.precision)
    if self.bias is not None:
      y = y + self.bias.get_value().astype(dtype)
    h = x if self.dropout is None else self.dropout(x)
    h = jnp.matmul(h, a, precision=self.precision)
    return y + self.scale * jnp.matmul(h, b, precision=self.precision)


class LowRankLinear(nnx.Module):
  r"""A factorized linear layer ``y = x A B + b``, both factors trained.

  The seed-003 experiment: can ``W = A B`` (``A``: ``(in, r)``, ``B``:
  ``(r, out)``) replace a full-rank weight outright? Two initializations:

  * ``init="lora"``: both factors normal with the same standard deviation
    ``(in * r) ** -0.25``, chosen so that ``A B`` starts at the variance of
    a default full-rank ``nnx.Linear`` kernel, ``Var[(AB)_ij] = 1 / in``,
    whatever the rank.
  * ``init="default"``: each factor with ``nnx.Linear``'s own default
    (LeCun normal: ``Var = 1 / fan_in``), as two stacked ``nnx.Linear``
    layers ``in -> r -> out`` (the seed's "autoencoder"). In Flax this also
    gives ``Var[(AB)_ij] = r (1 / in)(1 / r) = 1 / in``, but split unevenly:
    ``A`` is ``sqrt(r / in)`` times smaller than ``B``. (PyTorch's default,
    uniform with ``Var = 1 / (3 fan_in)``, gives a third of a full layer's
    variance: the seed's poor start.)

  Attributes:
    a: ``nnx.Param`` ``(in, r)``.
    b: ``nnx.Param`` ``(r, out)``.
    bias: ``nnx.Param`` ``(out,)`` (zeros) or None.
  """

  INITS = ("lora", "default")

  def __init__(
      self,
      in_features: int,
      out_features: int,
      rank: int,
      *,
      init: str = "lora",
      use_bias: bool = True,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      precision: Any = None,
      rngs: nnx.Rngs,
  ):
    _validation.positive_int("in_features", in_features)
    _validation.positive_int("out_features", out_features)
    _validation.positive_int("rank", rank)
    if rank > min(in_features, out_features):
      raise ValueError(
          f"`rank` {rank} is larger than the layer allows: min(in, out) ="
          f" {min(in_features, out_features)} for {in_features} -> "
          f"{out_features}")
    if init not in self.INITS:
      raise ValueError(f"`init` must be one of {self.INITS}, got {init!r}")
    self.in_features, self.out_features, self.rank = (
        in_features, out_features, rank)
    self.dtype, self.precision = dtype, precision
    if init == "lora":
      std = (in_features * rank) ** -0.25
      a_init = b_init = nnx.initializers.normal(std)
    else:
      a_init = b_init = nnx.initializers.lecun_normal()
    self.a = nnx.Param(a_init(rngs.params(), (in_features, rank), param_dtype))
    self.b = nnx.Param(b_init(rngs.params(), (rank, out_features), param_dtype))
    self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype))
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or jnp.result_type(x, self.a[...].dtype)
    a, b = self.a[...].astype(dtype), self.b[...].astype(dtype)
    y = jnp.matmul(jnp.matmul(x.astype(dtype), a, precision=self.precision),
                   b, precision=self.precision)
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


# ---------------------------------------------------------------------------
# Converting models.


def _real(name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"`{name}` must be a real number, got {value!r}")
  return float(value)


def _check_settings(alpha, dropout, quantize_base):
  if not _real("alpha", alpha) > 0:
    raise ValueError(f"`alpha` must be positive, got {alpha!r}")
  if not 0.0 <= _real("dropout", dropout) < 1.0:
    raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}")
  if quantize_base not in QUANTIZE_BASE:
    raise ValueError(f"`quantize_base` must be one of {QUANTIZE_BASE}, got"
                     f" {quantize_base!r}")


def _compile(regex: Any, name: str) -> Optional[re.Pattern]:
  if regex is None:
    return None
  if isinstance(regex, re.Pattern):
    return regex
  if not isinstance(regex, str):
    raise TypeError(f"`{name}` must be a regex string, got {regex!r}")
  try:
    return re.compile(regex)
  except re.error as e:
    raise ValueError(f"`{name}` is not a valid regex: {regex!r} ({e})") from e


def _path_str(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def _get(root: Any, path: tuple) -> Any:
  node = root
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def _set(root: Any, path: tuple, value: Any) -> None:
  parent, key = _get(root, path[:-1]), path[-1]
  if isinstance(key, int):
    parent[key] = value
  else:
    setattr(parent, key, value)


def linear_paths(model: nnx.Module) -> list[str]:
  """The "/"-joined paths of every ``nnx.Linear`` in ``model``."""
  return [_path_str(p) for p, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Linear)]


def apply(
    model: nnx.Module,
    rank: int,
    alpha: Optional[float] = None,
    targets: Any = ALL_LINEAR,
    dropout: float = 0.0,
    quantize_base: Optional[str] = None,
    *,
    trainable: Any = None,
    block_size: int = 64,
    rngs: Optional[nnx.Rngs] = None,
) -> nnx.Module:
  """Turns the matching ``nnx.Linear`` layers of ``model`` into LoRA layers.

  The model is changed in place (``nnx.clone`` it first to keep the
  original) and returned:

  * every ``nnx.Linear`` whose path matches ``targets`` (``re.search`` on the
    "/"-joined module path, e.g. ``"layers/0/attn/q_proj"``) becomes a
    :class:`LoRALinear` with a frozen base;
  * every other ``nnx.Param`` becomes :class:`Frozen`, unless its path
    (module path + attribute, e.g. ``"embed/embedding"``) matches
    ``trainable``; layers matching ``trainable`` get no adapter.

  Afterwards only the adapters and the ``trainable`` params are
  ``nnx.Param``: train with ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.

  Args:
    model: a Flax NNX model.
    rank: adapter rank, at most ``min(in, out)`` of every target layer.
    alpha: scale numerator: the adapter output is ``alpha / rank`` times
      ``x A B``. Default ``rank`` (scale 1).
    targets: regex over module paths; presets :data:`ALL_LINEAR`,
      :data:`ATTENTION` and :data:`MLP` (paths containing an ``attn`` /
      ``attention`` or ``mlp`` / ``ffn`` component).
    dropout: dropout rate on the adapters' input.
    quantize_base: None, ``"nf4"`` (QLoRA) or ``"int8"``: how the frozen
      base kernels of the LoRA layers are stored.
    trainable: optional regex of params to leave trainable in full, e.g.
      ``"embed|lm_head"`` for the input embedding and output head.
    block_size: absmax block size of a quantized base (QLoRA: 64).
    rngs: ``nnx.Rngs`` for the adapters' initialization and dropout.

  Returns:
    ``model``, converted.

  Raises:
    ValueError: ``targets`` matches no ``nnx.Linear`` (the message lists the
      available paths), ``rank`` too large for a target, or a bad setting.
  """
  _validation.positive_int("rank", rank)
  alpha = float(rank) if alpha is None else alpha
  _check_settings(alpha, dropout, quantize_base)
  _validation.positive_int("block_size", block_size)
  if rngs is None:
    raise TypeError("lora.apply needs `rngs` (an nnx.Rngs) to initialize the"
                    " adapters, e.g. rngs=nnx.Rngs(0)")
  targets_re = _compile(targets, "targets")
  trainable_re = _compile(trainable, "trainable")
  keep = lambda path: trainable_re is not None and bool(
      trainable_re.search(_path_str(path)))

  linears = [(p, m) for p, m in nnx.iter_graph(model)
             if isinstance(m, nnx.Linear)]
  chosen = [(p, m) for p, m in linears
            if targets_re.search(_path_str(p)) and not keep(p)]
  if not chosen:
    available = ", ".join(repr(_path_str(p)) for p, _ in linears) or "none"
    raise ValueError(
        f"`targets` {targets_re.pattern!r} matches no nnx.Linear of the model"
        f" (outside `trainable`); its nnx.Linear paths are: {available}")
  for path, linear in chosen:
    d_in, d_out = linear.in_features, linear.out_features
    if rank > min(d_in, d_out):
      raise ValueError(
          f"`rank` {rank} is larger than layer {_path_str(path)!r} allows:"
          f" min(in, out) = {min(d_in, d_out)} ({d_in} -> {d_out})")

  for path, linear in chosen:
    _set(model, path, LoRALinear.from_linear(
        linear, rank, alpha=alpha, dropout=dropout,
        quantize_base=quantize_base, block_size=block_size, rngs=rngs))
  _freeze_params(model, keep)
  return model


def _freeze_params(model: nnx.Module, keep) -> None:
  """Every ``nnx.Param`` but the adapters and those whose path ``keep``
  accepts becomes :class:`Frozen`."""
  for path, var in list(nnx.iter_graph(model)):
    if (isinstance(var, nnx.Param) and not isinstance(var, nnx.LoRAParam)
        and not keep(path)):
      _set(model, path, Frozen(var.get_value()))


def freeze(model: nnx.Module, trainable: Any) -> nnx.Module:
  """Freezes every ``nnx.Param`` of ``model`` except those ``trainable``
  matches, in place: partial fine-tuning without adapters.

  The frozen params become :class:`Frozen`, as in :func:`apply`, so
  ``nnx.Param`` filters select the trainable ones alone, and a jitted step
  differentiates only those: with ``trainable`` the output head, no
  backward pass runs through the frozen backbone. :func:`merge` makes
  every param an ``nnx.Param`` again.

  Args:
    model: a Flax NNX model.
    trainable: regex searched in each param's "/"-joined path (module path
      and attribute, e.g. ``"lm_head/kernel"``, ``"embed/embedding"``).

  Returns:
    ``model``, with only the matching params left as ``nnx.Param``.

  Raises:
    ValueError: ``trainable`` is not a valid regex or matches no param.

  Examples:
    >>> import jax
    >>> from flax import nnx
    >>> from galore_jax import lora
    >>> model = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(32, 4, rngs=nnx.Rngs(1)))
    >>> model = lora.freeze(model, r"^layers/2/")  # the classifier alone
    >>> [x.shape for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    [(4,), (32, 4)]
  """
  trainable_re = _compile(trainable, "trainable")
  if trainable_re is None:
    raise TypeError("`trainable` must be a regex string, got None")
  paths = [_path_str(p) for p, v in nnx.iter_graph(model)
           if isinstance(v, nnx.Param)]
  keep = lambda path: bool(trainable_re.search(_path_str(path)))
  if not any(trainable_re.search(p) for p in paths):
    raise ValueError(f"`trainable` {trainable_re.pattern!r} matches no"
                     f" nnx.Param of the model; its param paths are:"
                     f" {', '.join(paths) or 'none'}")
  _freeze_params(model, keep)
  return model


def merge(model: nnx.Module) -> nnx.Module:
  """Folds trained adapters into plain ``nnx.Linear`` layers, in place.

  Each :class:`LoRALinear` becomes an ``nnx.Linear`` with kernel
  ``W + (alpha / r) A B`` (a quantized base is dequantized first) in the
  base's dtype, and every :class:`Frozen` param becomes an ``nnx.Param``
  again: the model has the structure it had before :func:`apply` and,
  dropout aside, the same outputs to float tolerance.

  Args:
    model: a model converted by :func:`apply`.

  Returns:
    ``model``, merged.
  """
  for path, layer in list(nnx.iter_graph(model)):
    if not isinstance(layer, LoRALinear):
      continue
    w = layer.base_kernel(jnp.float32)
    delta = jnp.matmul(layer.lora_a[...].astype(jnp.float32),
                       layer.lora_b[...].astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    kernel = (w + layer.scale * delta).astype(layer.param_dtype)
    bias = None if layer.bias is None else layer.bias.get_value()
    linear = nnx.eval_shape(lambda: nnx.Linear(
        layer.in_features, layer.out_features, use_bias=bias is not None,
        dtype=layer.dtype, param_dtype=layer.param_dtype,
        precision=layer.precision, rngs=nnx.Rngs(0)))
    linear.kernel = nnx.Param(kernel)
    if bias is not None:
      linear.bias = nnx.Param(bias)
    _set(model, path, linear)
  for path, var in list(nnx.iter_graph(model)):
    if isinstance(var, Frozen):
      _set(model, path, nnx.Param(var.get_value()))
  return model
