"""q_galore_adamw(state_bits=32) against a NumPy port of the official Q-GaLore."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax
from tests import reference_q_galore as ref
from tests.test_parity import drifting_low_rank_grads

SHAPES = {"tall": (64, 48), "wide": (48, 64)}  # Flax (in, out)
Q = dict(rank=8, update_proj_gap=2, scale=0.25, proj_group_size=128,
         cos_threshold=0.4, gamma_proj=2, queue_size=2,
         proj_zero_point="official")


def stable_grads(rng, shape, steps):
  """Low-rank-dominated gradients whose singular vectors drift slowly."""
  return drifting_low_rank_grads(rng, shape, steps, drift=0.004)


def run_both(proj_bits, steps=60, lr=1e-2, wd=0.1, eps=1e-6, **overrides):
  rng = np.random.default_rng(0)
  init = {name: rng.standard_normal(shape).astype(np.float32)
          for name, shape in SHAPES.items()}
  init["b"] = rng.standard_normal(48).astype(np.float32)
  grads = {name: stable_grads(rng, shape, steps)
           for name, shape in SHAPES.items()}
  grads["b"] = [1e-2 * rng.standard_normal(48) for _ in range(steps)]

  q = Q | overrides
  opt = galore_jax.q_galore_adamw(
      lr, proj_bits=proj_bits, eps=eps, weight_decay=wd, state_bits=32,
      hf_eps=True, **q)
  params = jax.tree.map(jnp.asarray, init)
  state = opt.init(params)

  @jax.jit
  def step(params, state, g):
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state

  names = list(init)
  cfg = dict(n_bit=proj_bits, group_size=q["proj_group_size"],
             **{k: v for k, v in q.items()
                if k not in ("proj_group_size", "proj_zero_point")})
  oracle = ref.QGaLoreAdamW(
      [init[n].T.astype(np.float64) if n != "b" else init[n].astype(np.float64)
       for n in names],
      [cfg if n != "b" else None for n in names], lr=lr, eps=eps,
      weight_decay=wd)
  for t in range(steps):
    g = {n: jnp.asarray(grads[n][t], jnp.float32) for n in names}
    params, state = step(params, state, g)
    oracle.step([grads[n][t].T.copy() if n != "b" else grads[n][t].copy()
                 for n in names])
  theirs = {n: p.T if n != "b" else p for n, p in zip(names, oracle.params)}
  projectors = {n: s["projector"] for n, s in zip(names, oracle.state)
                if n != "b"}
  return params, state, theirs, projectors, init


@pytest.mark.parametrize("proj_bits,overrides,growth", [
    (4, {}, 4), (8, {}, 4),  # every layer's gap doubles at least twice
    # The official defaults: queue of 5, groups of 256 (rank 16: 768 entries);
    # the wide layer's cosines average lower, its gap doubles once.
    (4, dict(rank=16, queue_size=5, proj_group_size=256), 2),
])
def test_matches_official_q_galore(proj_bits, overrides, growth):
  params, state, theirs, projectors, init = run_both(proj_bits, **overrides)
  qstate = state[0]
  for name in SHAPES:
    ours_gap = int(qstate.projector[name].gap)
    assert ours_gap == projectors[name].update_proj_gap
    assert ours_gap >= growth * Q["update_proj_gap"]
    np.testing.assert_allclose(
        qstate.projector[name].queue, projectors[name].queue, atol=1e-5)
  for name in params:
    x, y, x0 = np.asarray(params[name]), theirs[name], init[name]
    np.testing.assert_allclose(x, y, rtol=2e-3, atol=2e-3 * np.abs(y).max())
    assert np.abs(x - y).max() <= 2e-3 * np.abs(y - x0).max()


def test_oracle_tells_quantization_apart():
  """The comparison is sharp enough to see the projector's bits: int4 and
  int8 runs end further apart than the tolerance above."""
  p4, _, _, _, init = run_both(4, steps=20)
  p8, _, _, _, _ = run_both(8, steps=20)
  for name in SHAPES:
    moved = np.abs(np.asarray(p8[name]) - init[name]).max()
    assert np.abs(np.asarray(p4[name] - p8[name])).max() > 1e-2 * moved
