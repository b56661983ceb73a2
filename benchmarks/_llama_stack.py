"""The LLaMA-shaped kernel stack the speed and memory benchmarks train.

Each layer holds the attention (q, k, v, o: hidden x hidden) and MLP (gate,
up: hidden x ffn; down: ffn x hidden) kernels of a LLaMA block and its two
norm scales; ``loss_fn`` runs them as a cheap stand-in for the block.
"""

import jax
import jax.numpy as jnp


def kernel_shapes(hidden, ffn):
  return {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden),
          "o": (hidden, hidden), "gate": (hidden, ffn), "up": (hidden, ffn),
          "down": (ffn, hidden)}


def init_params(key, hidden, ffn, layers):
  params = {}
  for i in range(layers):
    layer = {"attn_norm": jnp.ones((hidden,)), "mlp_norm": jnp.ones((hidden,))}
    for name, shape in kernel_shapes(hidden, ffn).items():
      key, sub = jax.random.split(key)
      layer[name] = jax.random.normal(sub, shape) * shape[0] ** -0.5
    params[f"layer_{i}"] = layer
  return params


def rms_norm(x, scale):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def loss_fn(params, x_TxD):
  h = x_TxD
  for i in range(len(params)):
    p = params[f"layer_{i}"]
    a = rms_norm(h, p["attn_norm"])
    h = h + ((a @ p["q"]) * jnp.tanh(a @ p["k"]) + a @ p["v"]) @ p["o"]
    m = rms_norm(h, p["mlp_norm"])
    h = h + (jax.nn.silu(m @ p["gate"]) * (m @ p["up"])) @ p["down"]
  return jnp.mean(h * h)
