"""Do GaLore, Q-GaLore and INT8 weights train an MNIST MLP as well as AdamW?

Trains the MLP 784-512-512-10 (ReLU) on MNIST with each optimizer for a few
seeds (same init and data order per seed across optimizers) and prints a
markdown table of test accuracy, then checks the project's two quality
targets and exits non-zero if one fails:

* |median(q_galore_adamw) - median(galore_adamw)| <= 0.5 accuracy points,
* |median(adamw_8bit) - median(adamw)| <= 0.3 accuracy points.

Setup: batch 128, constant learning rate 1e-3, no weight decay, He-normal
kernels (std sqrt(2 / fan_in)), zero biases, reshuffled every epoch, last
partial batch dropped; GaLore family at rank 64, update_proj_gap 50 (so
Q-GaLore's 5-entry cosine queue fills and its gaps can grow within 936
steps; the final gaps are printed), scale 1.0 (only the 784x512 and
512x512 kernels are projected). The INT8
rows store every kernel as group-wise INT8 codes (group 256) and train the
dequantized weights, requantizing after each update with stochastic rounding
(or, for contrast, round-to-nearest).

  python benchmarks/mnist_quality.py [--data PATH] [--seeds 3] [--epochs 2]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import galore_jax

SIZES = (784, 512, 512, 10)
BATCH, LR, RANK, GAP, SCALE = 128, 1e-3, 64, 50, 1.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "mnist.npz")

# name -> (optimizer factory, how the weights are stored and updated)
METHODS = {
    "adamw": (lambda: optax.adamw(LR, weight_decay=0.0), "float"),
    "adamw_8bit": (lambda: galore_jax.adamw_8bit(LR, weight_decay=0.0),
                   "float"),
    "galore_adamw": (lambda: galore_jax.galore_adamw(
        LR, rank=RANK, update_proj_gap=GAP, scale=SCALE), "float"),
    "q_galore_adamw": (lambda: galore_jax.q_galore_adamw(
        LR, rank=RANK, update_proj_gap=GAP, scale=SCALE), "float"),
    "q_galore_adamw + int8 weights": (lambda: galore_jax.q_galore_adamw(
        LR, rank=RANK, update_proj_gap=GAP, scale=SCALE), "int8_stochastic"),
    "q_galore_adamw + int8 weights (round-to-nearest)": (
        lambda: galore_jax.q_galore_adamw(
            LR, rank=RANK, update_proj_gap=GAP, scale=SCALE), "int8_nearest"),
    # Q-GaLore's official clipped zero point, projectors and weights.
    "q_galore_adamw + int8 weights (official zero point)": (
        lambda: galore_jax.q_galore_adamw(
            LR, rank=RANK, update_proj_gap=GAP, scale=SCALE,
            proj_zero_point="official"), "int8_stochastic_official"),
}
TARGETS = (  # (method, reference, max |difference| in accuracy points)
    ("q_galore_adamw", "galore_adamw", 0.5),
    ("adamw_8bit", "adamw", 0.3),
)


def load_mnist(path):
  if not os.path.isfile(path):
    sys.exit(f"MNIST file not found: {path}\n(expected an .npz with x_train,"
             " y_train, x_test, y_test; pass its location with --data)")
  with np.load(path) as f:
    flat = lambda x: (x.reshape(len(x), -1) / 255.0).astype(np.float32)
    return (flat(f["x_train"]), f["y_train"].astype(np.int32),
            flat(f["x_test"]), f["y_test"].astype(np.int32))


def init_params(key):
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
    key, sub = jax.random.split(key)
    params[f"dense_{i}"] = {
        "kernel": jax.random.normal(sub, (fan_in, fan_out))
                  * math.sqrt(2.0 / fan_in),
        "bias": jnp.zeros((fan_out,)),
    }
  return params


def logits_fn(params, x):
  h = x
  for i in range(len(SIZES) - 1):
    layer = params[f"dense_{i}"]
    h = h @ layer["kernel"] + layer["bias"]
    if i < len(SIZES) - 2:
      h = jax.nn.relu(h)
  return h


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_fn(params, x), y).mean()


def make_epoch(opt, weights):
  """One jitted epoch: ``lax.scan`` of the train step over batch indices.

  The carry holds the stored weights (float, or ``QuantizedArray`` kernels),
  the optimizer state, the step counter and the rounding key.
  """

  def step(carry, idx, x_all, y_all):
    stored, opt_state, count, key = carry
    params = galore_jax.dequantize_params(stored)  # no-op on float weights
    loss, grads = jax.value_and_grad(loss_fn)(params, x_all[idx], y_all[idx])
    updates, opt_state = opt.update(grads, opt_state, params)
    if weights == "float":
      stored = optax.apply_updates(stored, updates)
    elif weights.startswith("int8_stochastic"):
      stored = galore_jax.apply_updates_stochastic(
          stored, updates, jax.random.fold_in(key, count))
    elif weights == "int8_nearest":
      stored = galore_jax.quantize_params(optax.apply_updates(params, updates))
    else:
      raise ValueError(weights)
    return (stored, opt_state, count + 1, key), loss

  def epoch(carry, batches, x_all, y_all):
    return jax.lax.scan(lambda c, i: step(c, i, x_all, y_all), carry, batches)

  return jax.jit(epoch, donate_argnums=0)


@jax.jit
def evaluate(params, x, y):
  logits = logits_fn(params, x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return jnp.mean(jnp.argmax(logits, -1) == y), loss


def batches_for_epoch(seed, epoch, n):
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  steps = n // BATCH
  return perm[:steps * BATCH].reshape(steps, BATCH).astype(np.int32)


def train(name, seed, epochs, data, compiled):
  """One run; returns test accuracy, final train loss, seconds, compile s."""
  opt_factory, weights = METHODS[name]
  opt = opt_factory()
  x_train, y_train, x_test, y_test = data
  params = init_params(jax.random.key(seed))
  stored = params if weights == "float" else galore_jax.quantize_params(
      params, zero_point="official" if weights.endswith("official")
      else "float")
  carry = (stored, opt.init(params), jnp.zeros((), jnp.int32),
           jax.random.fold_in(jax.random.key(seed), 1))
  compile_s = 0.0
  if name not in compiled:  # compile outside the timed run (same shapes)
    t0 = time.perf_counter()
    compiled[name] = make_epoch(opt, weights).lower(
        carry, batches_for_epoch(seed, 0, len(y_train)), x_train,
        y_train).compile()
    compile_s = time.perf_counter() - t0
  epoch_fn = compiled[name]
  t0 = time.perf_counter()
  for e in range(epochs):
    carry, _ = epoch_fn(carry, batches_for_epoch(seed, e, len(y_train)),
                        x_train, y_train)
  jax.block_until_ready(carry)
  seconds = time.perf_counter() - t0
  final = galore_jax.dequantize_params(carry[0])
  acc, _ = evaluate(final, x_test, y_test)
  _, train_loss = evaluate(final, x_train, y_train)
  is_qp = lambda x: isinstance(x, galore_jax.QuantizedProjector)
  gaps = [int(e.gap) for e in jax.tree.leaves(carry[1], is_leaf=is_qp)
          if is_qp(e)]
  return dict(acc=100 * float(acc), loss=float(train_loss), seconds=seconds,
              compile=compile_s, gaps=gaps)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data", default=DEFAULT_DATA,
                  help="mnist.npz (default: ../shared/data/mnist.npz from the"
                  " repository root)")
  ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
  ap.add_argument("--epochs", type=int, default=2)
  ap.add_argument("--methods", default=",".join(METHODS),
                  help="comma-separated subset of: " + ", ".join(METHODS))
  args = ap.parse_args(argv)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    sys.exit(f"unknown methods {unknown}; choose from {list(METHODS)}")

  t_start = time.perf_counter()
  data_np = load_mnist(os.path.normpath(args.data))
  data = tuple(jnp.asarray(a) for a in data_np)
  seeds = range(args.seeds)
  runs, compiled = {}, {}
  for name in methods:
    runs[name] = [train(name, s, args.epochs, data, compiled) for s in seeds]
    accs = ", ".join(f"{r['acc']:.2f}" for r in runs[name])
    print(f"  {name}: test acc {accs}", file=sys.stderr, flush=True)

  steps = args.epochs * (len(data_np[1]) // BATCH)
  print(f"MNIST MLP {'-'.join(map(str, SIZES))} (ReLU), {args.epochs} epochs"
        f" x {len(data_np[1]) // BATCH} steps = {steps} steps of batch"
        f" {BATCH}, lr {LR} constant, no weight decay, He-normal init;"
        f" GaLore rank {RANK}, update_proj_gap {GAP}, scale {SCALE};"
        f" seeds {', '.join(map(str, seeds))}\n")
  print("| method | median test acc % | min-max test acc % | median final"
        " train loss | median s / run | compile s |")
  print("|---|---|---|---|---|---|")
  med = {}
  for name, rs in runs.items():
    accs = [r["acc"] for r in rs]
    med[name] = statistics.median(accs)
    print(f"| {name} | {med[name]:.2f} | {min(accs):.2f}-{max(accs):.2f}"
          f" | {statistics.median(r['loss'] for r in rs):.4f}"
          f" | {statistics.median(r['seconds'] for r in rs):.1f}"
          f" | {rs[0]['compile']:.1f} |")
  print("\nTest accuracy on the 10000 test images, final train loss on all"
        " 60000 training images, both with the final (dequantized) weights;"
        " s / run is the training loop alone (compiled ahead, once per"
        " method).\n")
  for name, rs in runs.items():
    if rs[0]["gaps"]:
      print(f"- {name}: final refresh gaps of the projected kernels, per"
            f" seed: {'; '.join(str(r['gaps']) for r in rs)}")
  print()

  failed = False
  for method, ref, tol in TARGETS:
    if method not in med or ref not in med:
      print(f"- target |{method} - {ref}| <= {tol}: not run")
      continue
    diff = med[method] - med[ref]
    ok = abs(diff) <= tol
    failed |= not ok
    print(f"- target |median({method}) - median({ref})| <= {tol} points:"
          f" {med[method]:.2f} - {med[ref]:.2f} = {diff:+.2f}"
          f" -> {'PASS' if ok else 'FAIL'}")

  print(f"\ncommand: python {' '.join(sys.argv)}")
  print(f"jax {jax.__version__}, optax {optax.__version__},"
        f" {jax.devices()[0].platform} ({jax.device_count()} device),"
        f" total {time.perf_counter() - t_start:.0f} s")
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  main()
