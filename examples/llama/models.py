"""A LLaMA in Flax NNX: RMSNorm, rotary embeddings, SwiGLU, causal GQA.

Kernels are 2-D ``nnx.Linear`` kernels ``(in, out)`` (GaLore's default rule
applies), or ``(layers, in, out)`` with ``scan_layers=True``: the blocks are
created with ``nnx.vmap`` and run with ``nnx.scan`` (with ``remat``, by
:func:`galore_jax.layerwise.remat_scan`). The module is a fork of
the HF ``LlamaForCausalLM`` math (half-split RoPE, float32 RMSNorm), so a
Hugging Face checkpoint loads into it (:mod:`examples.llama.hf`).

Shapes: B batch, S sequence, D hidden, H heads, K kv heads, E head dim,
F intermediate, V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx
import optax

from galore_jax import layerwise
from galore_jax import quantization


@dataclasses.dataclass(frozen=True)
class Config:
  """A LLaMA shape, and the GaLore paper's recipe for it.

  Attributes:
    hidden, intermediate, heads, layers, vocab: the shape.
    kv_heads: key/value heads (grouped-query attention); None: ``heads``.
    tie_embeddings: the LM head reuses the embedding matrix.
    rope_theta, norm_eps: RoPE base and RMSNorm epsilon (HF's names:
      ``rope_theta``, ``rms_norm_eps``).
    rank, lr: GaLore's recipe rank and learning rate for this size.
  """
  hidden: int
  intermediate: int
  heads: int
  layers: int
  vocab: int = 32000
  kv_heads: Optional[int] = None
  tie_embeddings: bool = False
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  rank: int = 128
  lr: float = 0.01

  def __post_init__(self):
    for name in ("hidden", "intermediate", "heads", "layers", "vocab"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    if self.hidden % self.heads:
      raise ValueError(f"`hidden` {self.hidden} is not divisible by `heads`"
                       f" {self.heads}")
    if self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head dim, got {self.head_dim}")
    if self.heads % self.num_kv_heads:
      raise ValueError(f"`heads` {self.heads} is not divisible by `kv_heads`"
                       f" {self.num_kv_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden // self.heads

  @property
  def num_kv_heads(self) -> int:
    return self.heads if self.kv_heads is None else self.kv_heads

  @property
  def num_params(self) -> int:
    """Closed-form parameter count."""
    d, f, kv = self.hidden, self.intermediate, self.num_kv_heads * self.head_dim
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else self.vocab * d
    return self.vocab * d + head + d + self.layers * per_layer


BYTE_VOCAB = 259  # 256 bytes + BOS, EOS, PAD (see input_pipeline.ByteTokenizer)

# The GaLore paper's LLaMA configs (arXiv:2403.03507, appendix) and CPU-size ones. Names give the
# size with the paper's 32000-token vocabulary, except the byte-level CPU
# configs, whose size is given with the byte vocabulary they are meant for.
CONFIGS = {
    "llama-tiny": Config(64, 176, 4, 2, vocab=BYTE_VOCAB, rank=16, lr=0.01),
    "llama-1m": Config(128, 352, 4, 4, vocab=BYTE_VOCAB, rank=32, lr=0.01),
    "llama-9m": Config(288, 768, 6, 9, vocab=BYTE_VOCAB, rank=72, lr=0.01),
    "llama-60m": Config(512, 1376, 8, 8, rank=128, lr=0.01),
    "llama-130m": Config(768, 2048, 12, 12, rank=256, lr=0.01),
    "llama-350m": Config(1024, 2736, 16, 24, rank=256, lr=0.01),
    "llama-1b": Config(2048, 5461, 32, 24, rank=512, lr=0.01),
    "llama-7b": Config(4096, 11008, 32, 32, rank=1024, lr=0.005),
}
NOMINAL_SIZES = {"llama-1m": 1e6, "llama-9m": 9e6, "llama-60m": 60e6,
                 "llama-130m": 130e6, "llama-350m": 350e6, "llama-1b": 1e9,
                 "llama-7b": 7e9}

_init = nnx.initializers.normal(0.02)  # HF LLaMA's initializer_range


def rope_tables(seq_len: int, head_dim: int, theta: float = 10000.0):
  """``cos, sin`` of shape ``(S, E)``: angle ``s theta^(-2j/E)``, j < E/2,
  repeated over both halves (HF's layout)."""
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32)
                       / head_dim)
  angle_SxE2 = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq
  angle_SxE = jnp.concatenate([angle_SxE2, angle_SxE2], axis=-1)
  return jnp.cos(angle_SxE), jnp.sin(angle_SxE)


def apply_rope(x_BxSxHxE, cos_SxE, sin_SxE):
  """Rotates each (j, j + E/2) pair by its angle: ``x cos + rot(x) sin``."""
  x = x_BxSxHxE.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos_SxE[:, None, :], sin_SxE[:, None, :]
  return (x * cos + rotated * sin).astype(x_BxSxHxE.dtype)


class RMSNorm(nnx.Module):
  """``x / rms(x) * w`` computed in float32, cast back to the input dtype."""

  def __init__(self, dim: int, eps: float, *, param_dtype: Any):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True)
                              + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def _linear(d_in, d_out, dtype, param_dtype, rngs):
  return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype,
                    param_dtype=param_dtype, kernel_init=_init, rngs=rngs)


class Attention(nnx.Module):
  """Causal multi-head attention with grouped-query K/V heads and RoPE."""

  def __init__(self, cfg: Config, *, dtype, param_dtype, rngs):
    d, e = cfg.hidden, cfg.head_dim
    self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.num_kv_heads, e
    self.q = _linear(d, cfg.heads * e, dtype, param_dtype, rngs)
    self.k = _linear(d, cfg.num_kv_heads * e, dtype, param_dtype, rngs)
    self.v = _linear(d, cfg.num_kv_heads * e, dtype, param_dtype, rngs)
    self.o = _linear(cfg.heads * e, d, dtype, param_dtype, rngs)

  def __call__(self, x_BxSxD, cos_SxE, sin_SxE):
    b, s, _ = x_BxSxD.shape
    q_BxSxHxE = self.q(x_BxSxD).reshape(b, s, self.heads, self.head_dim)
    k_BxSxKxE = self.k(x_BxSxD).reshape(b, s, self.kv_heads, self.head_dim)
    v_BxSxKxE = self.v(x_BxSxD).reshape(b, s, self.kv_heads, self.head_dim)
    q_BxSxHxE = apply_rope(q_BxSxHxE, cos_SxE, sin_SxE)
    k_BxSxKxE = apply_rope(k_BxSxKxE, cos_SxE, sin_SxE)
    out_BxSxHxE = jax.nn.dot_product_attention(
        q_BxSxHxE, k_BxSxKxE, v_BxSxKxE, is_causal=True)
    return self.o(out_BxSxHxE.reshape(b, s, self.heads * self.head_dim))


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg: Config, *, dtype, param_dtype, rngs):
    d, f = cfg.hidden, cfg.intermediate
    self.gate = _linear(d, f, dtype, param_dtype, rngs)
    self.up = _linear(d, f, dtype, param_dtype, rngs)
    self.down = _linear(f, d, dtype, param_dtype, rngs)

  def __call__(self, x_BxSxD):
    return self.down(jax.nn.silu(self.gate(x_BxSxD)) * self.up(x_BxSxD))


class Block(nnx.Module):
  """Pre-norm residual block: attention, then MLP."""

  def __init__(self, cfg: Config, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps, param_dtype=param_dtype)
    self.attn = Attention(cfg, **kw, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.hidden, cfg.norm_eps, param_dtype=param_dtype)
    self.mlp = MLP(cfg, **kw, rngs=rngs)

  def __call__(self, x_BxSxD, cos_SxE, sin_SxE):
    x_BxSxD = x_BxSxD + self.attn(self.attn_norm(x_BxSxD), cos_SxE, sin_SxE)
    return x_BxSxD + self.mlp(self.mlp_norm(x_BxSxD))


class Llama(nnx.Module):
  """A decoder-only LLaMA returning next-token logits ``(B, S, V)``.

  Args:
    cfg: the shape.
    dtype: compute dtype (activations, matmul inputs).
    param_dtype: storage dtype of the params.
    scan_layers: stack the blocks (kernels ``(L, in, out)``) and run them
      with ``nnx.scan``; otherwise an ``nnx.List`` of blocks.
    remat: recompute each block's activations in the backward pass.
    rngs: init randomness (normal, std 0.02, as HF's LLaMA).
  """

  def __init__(self, cfg: Config, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, scan_layers: bool = False,
               remat: bool = False, rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, dtype
    self.scan_layers, self.remat = scan_layers, remat
    self.embed = nnx.Embed(cfg.vocab, cfg.hidden, dtype=dtype,
                           param_dtype=param_dtype, embedding_init=_init,
                           rngs=rngs)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    if scan_layers:
      @nnx.split_rngs(splits=cfg.layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return Block(cfg, **kw, rngs=rngs)
      self.layers = make(rngs)
    else:
      self.layers = nnx.List([Block(cfg, **kw, rngs=rngs)
                              for _ in range(cfg.layers)])
    self.norm = RMSNorm(cfg.hidden, cfg.norm_eps, param_dtype=param_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = _linear(cfg.hidden, cfg.vocab, dtype, param_dtype, rngs)

  def __call__(self, tokens_BxS):
    x_BxSxD = self.embed(tokens_BxS)
    cos_SxE, sin_SxE = rope_tables(tokens_BxS.shape[1], self.cfg.head_dim,
                                   self.cfg.rope_theta)

    def body(block, x):
      return dequantized(block)(x, cos_SxE, sin_SxE)

    if self.scan_layers and self.remat:
      # The library's rematerialized scan: its loops convert one layer's
      # weights at a time (XLA:CPU would keep a float32 copy of every
      # layer's bf16 weights through an nnx.scan step).
      graphdef, state = nnx.split(self.layers)
      x_BxSxD = layerwise.remat_scan(
          lambda layer, x: body(nnx.merge(graphdef, layer), x), state,
          x_BxSxD)
    elif self.scan_layers:
      x_BxSxD = nnx.scan(body, in_axes=(0, nnx.Carry),
                         out_axes=nnx.Carry)(self.layers, x_BxSxD)
    else:
      body = nnx.remat(body) if self.remat else body
      for block in self.layers:
        x_BxSxD = body(block, x_BxSxD)
    x_BxSxD = self.norm(x_BxSxD)
    if self.cfg.tie_embeddings:
      return self.embed.attend(x_BxSxD)
    return self.lm_head(x_BxSxD)


def dequantized(module: nnx.Module) -> nnx.Module:
  """``module`` itself, or a float copy if it holds INT8 (quantized) params.

  :meth:`Llama.__call__` dequantizes each block where it runs it, so with
  scanned layers one layer is in float at a time, never the whole model.
  """
  graphdef, state = nnx.split(module)
  leaves = jax.tree.leaves(state, is_leaf=quantization.is_dequantizable)
  if not any(map(quantization.is_dequantizable, leaves)):
    return module
  return nnx.merge(graphdef, jax.tree.map(
      quantization.dequantize, state, is_leaf=quantization.is_dequantizable))


def layerwise_fns(model: Llama):
  """``(embed, block, head)`` for :func:`galore_jax.layerwise_step`.

  Pure functions of the model's params split as ``outer`` (every top-level
  entry of ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` but
  ``layers``) and one layer's slice of ``layers``; batches are token
  windows ``(B, T)``. The math is :meth:`Llama.__call__` and
  :func:`loss_fn`'s, module for module.

  Raises:
    ValueError: the model's blocks are not stacked (``scan_layers=False``).
  """
  if not model.scan_layers:
    raise ValueError("a layerwise step needs stacked blocks: build the"
                     " Llama with scan_layers=True")
  cfg = model.cfg
  kw = dict(dtype=model.dtype,
            param_dtype=model.embed.embedding.get_value().dtype)
  block_def = nnx.graphdef(nnx.eval_shape(
      lambda: Block(cfg, **kw, rngs=nnx.Rngs(0))))
  embed_def, norm_def = nnx.graphdef(model.embed), nnx.graphdef(model.norm)
  head_def = None if cfg.tie_embeddings else nnx.graphdef(model.lm_head)

  def embed(outer, tokens_BxT):
    return nnx.merge(embed_def, outer["embed"])(tokens_BxT[:, :-1])

  def block(layer, x_BxSxD):
    cos_SxE, sin_SxE = rope_tables(x_BxSxD.shape[1], cfg.head_dim,
                                   cfg.rope_theta)
    return nnx.merge(block_def, layer)(x_BxSxD, cos_SxE, sin_SxE)

  def head(outer, x_BxSxD, tokens_BxT):
    x_BxSxD = nnx.merge(norm_def, outer["norm"])(x_BxSxD)
    if head_def is None:
      logits_BxSxV = nnx.merge(embed_def, outer["embed"]).attend(x_BxSxD)
    else:
      logits_BxSxV = nnx.merge(head_def, outer["lm_head"])(x_BxSxD)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BxSxV.astype(jnp.float32), tokens_BxT[:, 1:]).mean()

  return embed, block, head


def loss_fn(model: Llama, tokens_BxT) -> jax.Array:
  """Mean next-token cross-entropy of ``tokens[:, 1:]`` given the prefix."""
  logits_BxSxV = model(tokens_BxT[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BxSxV.astype(jnp.float32), tokens_BxT[:, 1:]).mean()


def count_params(model: nnx.Module) -> int:
  """Elements of every ``nnx.Param`` (works on ``nnx.eval_shape`` models)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
