"""The LLaMA-shaped kernel stack the speed and memory benchmarks train.

Each layer holds the attention (q, k, v, o: hidden x hidden) and MLP (gate,
up: hidden x ffn; down: ffn x hidden) kernels of a LLaMA block and its two
norm scales; ``loss_fn`` runs them as a cheap stand-in for the block.
"""

import jax
import jax.numpy as jnp

from galore_jax import llama_plan
from galore_jax.llama_plan import rms_norm


def kernel_shapes(hidden, ffn):
  """``{name: (in, out)}`` of one layer's kernels, the planner LLaMA's."""
  layer = llama_plan.llama_params(
      llama_plan.LlamaConfig(hidden, ffn, heads=1, layers=1))["layers"]
  return {name: x.shape[1:] for name, x in layer.items() if x.ndim == 3}


def init_params(key, hidden, ffn, layers):
  params = {}
  for i in range(layers):
    layer = {"attn_norm": jnp.ones((hidden,)), "mlp_norm": jnp.ones((hidden,))}
    for name, shape in kernel_shapes(hidden, ffn).items():
      key, sub = jax.random.split(key)
      layer[name] = jax.random.normal(sub, shape) * shape[0] ** -0.5
    params[f"layer_{i}"] = layer
  return params


def loss_fn(params, x_TxD):
  h = x_TxD
  for i in range(len(params)):
    p = params[f"layer_{i}"]
    a = rms_norm(h, p["attn_norm"])
    h = h + ((a @ p["q"]) * jnp.tanh(a @ p["k"]) + a @ p["v"]) @ p["o"]
    m = rms_norm(h, p["mlp_norm"])
    h = h + (jax.nn.silu(m @ p["gate"]) * (m @ p["up"])) @ p["down"]
  return jnp.mean(h * h)
