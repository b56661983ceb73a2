r"""The LLaMA that the memory planner (:mod:`galore_jax.memory`) compiles.

A pure-JAX LLaMA: params are a dict of arrays with the blocks stacked
(kernels ``(layers, in, out)``), and the forward pass is a few functions
(RMSNorm, RoPE, causal attention, SwiGLU), so the planner can build any
method's train step on abstract params without a model library. It computes
the same loss as the Flax NNX model of the LLaMA example for the same
weights (``tests/test_memory.py`` checks it).

The shapes are the GaLore paper's (Zhao et al., `GaLore: Memory-Efficient
LLM Training by Gradient Low-Rank Projection
<https://arxiv.org/abs/2403.03507>`_, ICML 2024): the LLaMA architectures
of its appendix table "Hyperparameters of LLaMA models for evaluation", and
the ranks of its pre-training experiments (``scripts/benchmark_c4`` of the
official code; 1024 for the 7B model trained with 8-bit GaLore).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from galore_jax import layerwise
from galore_jax import quantization

__all__ = ["CONFIGS", "LLAMA_HEAD", "LLAMA_INPUTS", "LLAMA_LORA_TARGETS",
           "LLAMA_TARGETS", "LlamaConfig", "llama_fns", "llama_loss",
           "llama_params", "rms_norm"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """A LLaMA shape: hidden size, MLP size, heads, layers, vocabulary."""
  hidden: int
  intermediate: int
  heads: int
  layers: int
  vocab: int = 32000
  rank: int = 128  # the GaLore paper's rank for this size

  @property
  def num_params(self) -> int:
    d, i = self.hidden, self.intermediate
    per_layer = 4 * d * d + 3 * d * i + 2 * d
    return 2 * self.vocab * d + d + self.layers * per_layer


# The GaLore paper's configs and ranks (see the module docstring).
CONFIGS = {
    "llama-60m": LlamaConfig(512, 1376, 8, 8, rank=128),
    "llama-130m": LlamaConfig(768, 2048, 12, 12, rank=256),
    "llama-350m": LlamaConfig(1024, 2736, 16, 24, rank=256),
    "llama-1b": LlamaConfig(2048, 5461, 32, 24, rank=512),
    "llama-7b": LlamaConfig(4096, 11008, 32, 32, rank=1024),
}
# Attention and MLP kernels: what the paper projects (and LoRA adapts).
LLAMA_TARGETS = r"^layers/(q|k|v|o|gate|up|down)$"
# The kernels LoRA / QLoRA adapt, by preset.
LLAMA_LORA_TARGETS = {"all": LLAMA_TARGETS, "attention": r"^layers/(q|k|v|o)$",
                      "mlp": r"^layers/(gate|up|down)$"}
# The output head and the input embedding (the head / adapters methods).
LLAMA_HEAD, LLAMA_INPUTS = r"^lm_head$", r"^embed$"


def llama_params(config: LlamaConfig, dtype: Any = jnp.float32) -> dict:
  """Abstract LLaMA params; layers stacked: kernels ``(layers, in, out)``."""
  d, i, n_layers = config.hidden, config.intermediate, config.layers
  sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
  layers = {name: sds(n_layers, d, d) for name in ("q", "k", "v", "o")}
  layers.update(gate=sds(n_layers, d, i), up=sds(n_layers, d, i),
                down=sds(n_layers, i, d), attn_norm=sds(n_layers, d),
                mlp_norm=sds(n_layers, d))
  return {"embed": sds(config.vocab, d), "layers": layers,
          "final_norm": sds(d), "lm_head": sds(d, config.vocab)}


def rms_norm(x: jax.Array, w: jax.Array, eps: float = 1e-6) -> jax.Array:
  """``x / rms(x) * w`` over the last axis, in float32, cast back to
  ``x``'s dtype."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
  return (x32 * w.astype(jnp.float32)).astype(x.dtype)


def _rope(x_BxSxHxD, theta=10000.0):
  s, h = x_BxSxHxD.shape[1], x_BxSxHxD.shape[-1] // 2
  freq = theta ** (-jnp.arange(h, dtype=jnp.float32) / h)
  angle = jnp.arange(s, dtype=jnp.float32)[:, None] * freq  # (S, D/2)
  cos, sin = jnp.cos(angle)[:, None], jnp.sin(angle)[:, None]
  x1, x2 = jnp.split(x_BxSxHxD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  return out.astype(x_BxSxHxD.dtype)


def _linear(x, w, scale):
  """``x W``, or ``x W + scale x A B`` for a LoRA ``{"w", "a", "b"}``."""
  if isinstance(w, dict):
    y = x @ quantization.dequantize(w["w"], x.dtype)
    return y + scale * ((x @ w["a"].astype(x.dtype)) @ w["b"].astype(x.dtype))
  return x @ quantization.dequantize(w, x.dtype)


def _embed(outer, tokens_BxT):
  return outer["embed"][tokens_BxT[:, :-1]].astype(outer["final_norm"].dtype)


def _block(layer, x_BxSxD, heads, lora_scale=1.0):
  """One pre-norm block: causal attention with RoPE, then a SwiGLU MLP."""
  b, s, d = x_BxSxD.shape
  lin = lambda x, w: _linear(x, w, lora_scale)
  h = rms_norm(x_BxSxD, layer["attn_norm"])
  q, k, v = (lin(h, layer[n]).reshape(b, s, heads, d // heads)
             for n in ("q", "k", "v"))
  att = jax.nn.dot_product_attention(_rope(q), _rope(k), v, is_causal=True)
  x_BxSxD = x_BxSxD + lin(att.reshape(b, s, d), layer["o"])
  h = rms_norm(x_BxSxD, layer["mlp_norm"])
  return x_BxSxD + lin(jax.nn.silu(lin(h, layer["gate"]))
                       * lin(h, layer["up"]), layer["down"])


def _head(outer, x_BxSxD, tokens_BxT):
  logits = rms_norm(x_BxSxD, outer["final_norm"]) @ outer["lm_head"]
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), tokens_BxT[:, 1:]).mean()


def llama_fns(config: LlamaConfig):
  """``(embed, block, head)`` of :func:`llama_params`' LLaMA, for
  :func:`galore_jax.layerwise_step`: ``outer`` is every entry but
  ``layers``, ``block`` takes one layer's slice of ``layers``."""
  block = lambda layer, x: _block(layer, x, config.heads)
  return _embed, block, _head


def llama_loss(params: dict, tokens_BxT: jax.Array, config: LlamaConfig,
               remat: bool = False, lora_scale: float = 1.0) -> jax.Array:
  """Mean next-token cross-entropy of ``tokens_BxT[:, 1:]`` given the prefix.

  :func:`llama_fns`' pieces, the blocks run by ``lax.scan``, or with
  ``remat`` by :func:`galore_jax.layerwise.remat_scan` (each block
  recomputed in the backward pass, one layer's weights converted at a
  time).

  Args:
    params: :func:`llama_params`' tree of arrays. A kernel may also be a
      quantized array (dequantized where its layer runs) or a LoRA dict
      ``{"w", "a", "b"}`` (``w`` frozen, possibly quantized).
    tokens_BxT: int tokens, ``(batch, seq + 1)``.
    config: the shape.
    remat: recompute each block in the backward pass.
    lora_scale: the LoRA adapters' scale.

  Returns:
    The loss, a float32 scalar.
  """
  x_BxSxD = _embed(params, tokens_BxT)
  block = lambda layer, x: _block(layer, x, config.heads, lora_scale)
  if remat:
    x_BxSxD = layerwise.remat_scan(block, params["layers"], x_BxSxD)
  else:
    x_BxSxD, _ = jax.lax.scan(lambda x, l: (block(l, x), None), x_BxSxD,
                              params["layers"])
  return _head(params, x_BxSxD, tokens_BxT)
