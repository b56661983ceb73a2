"""Mechanics of scale_by_galore: state, refresh, stacking, jit, dtypes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_jax
from galore_jax import projection


def params_tree(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 4)
  return {
      "dense": {"kernel": jax.random.normal(k[0], (24, 16), dtype),
                "bias": jnp.zeros((16,), dtype)},
      "wide": {"kernel": jax.random.normal(k[1], (8, 40), dtype)},
      "stack": {"kernel": jax.random.normal(k[2], (3, 24, 16), dtype)},
      "norm": {"scale": jnp.ones((24,), dtype)},
      "small": jax.random.normal(k[3], (3, 4), dtype),
  }


def random_grads(params, seed):
  keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
  keys = jax.tree.unflatten(jax.tree.structure(params), list(keys))
  return jax.tree.map(
      lambda p, k: jax.random.normal(k, p.shape, p.dtype), params, keys)


@pytest.mark.parametrize(
    "proj_type,row,col",
    # (24, 16) is in=24 (rows), out=16 (cols); torch layout (16, 24) has
    # m < n, so std uses the official left projector U[:, :r] (out x r).
    [("std", None, (16, 4)),
     ("reverse_std", (4, 24), None),
     ("right", (4, 24), None),
     ("left", None, (16, 4)),
     ("full", (4, 24), (16, 4))],
)
def test_state_shapes_and_dtypes(proj_type, row, col):
  params = params_tree()
  state = galore_jax.scale_by_galore(rank=4, proj_type=proj_type).init(params)
  chex.assert_type(state.count, jnp.int32)
  chex.assert_shape(state.count, ())
  proj = state.projector["dense"]["kernel"]
  for got, want in ((proj.row, row), (proj.col, col)):
    if want is None:
      assert isinstance(got, optax.MaskedNode)
    else:
      chex.assert_shape(got, want)
      chex.assert_type(got, jnp.float32)
  # Leaves that are not projected: no projector, full-size moments.
  assert isinstance(state.projector["dense"]["bias"], optax.MaskedNode)
  assert isinstance(state.projector["norm"]["scale"], optax.MaskedNode)
  assert isinstance(state.projector["small"], optax.MaskedNode)  # 3, 4 <= 4
  adam = state.base_state
  chex.assert_shape(adam.mu["small"], (3, 4))
  chex.assert_shape(adam.mu["norm"]["scale"], (24,))
  # No zero-size arrays anywhere (Orbax cannot save them).
  assert all(x.size > 0 for x in jax.tree.leaves(state))


def test_low_rank_moment_shapes_std():
  params = params_tree()
  state = galore_jax.scale_by_galore(rank=4).init(params)
  mu = state.base_state.mu
  chex.assert_shape(mu["dense"]["kernel"], (24, 4))  # rows x r
  chex.assert_shape(mu["wide"]["kernel"], (4, 40))  # out=40 > in=8: row side
  chex.assert_shape(mu["stack"]["kernel"], (3, 24, 4))
  chex.assert_shape(state.projector["stack"]["kernel"].col, (3, 16, 4))
  chex.assert_shape(state.projector["wide"]["kernel"].row, (4, 8))


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_projectors_are_orthonormal(proj_type):
  params = params_tree()
  tx = galore_jax.scale_by_galore(rank=4, proj_type=proj_type)
  _, state = tx.update(random_grads(params, 1), tx.init(params))
  projectors = jax.tree.leaves(
      state.projector, is_leaf=lambda x: isinstance(x, projection.Projectors))
  assert len(projectors) == 3  # dense, wide, stack kernels
  for proj in projectors:
    if not isinstance(proj.row, optax.MaskedNode):
      eye = jnp.broadcast_to(jnp.eye(4), proj.row.shape[:-2] + (4, 4))
      np.testing.assert_allclose(proj.row @ jnp.swapaxes(proj.row, -1, -2),
                                 eye, atol=1e-5)
    if not isinstance(proj.col, optax.MaskedNode):
      eye = jnp.broadcast_to(jnp.eye(4), proj.col.shape[:-2] + (4, 4))
      np.testing.assert_allclose(jnp.swapaxes(proj.col, -1, -2) @ proj.col,
                                 eye, atol=1e-5)


def test_projector_spans_top_singular_subspace_with_canonical_signs():
  g = jax.random.normal(jax.random.key(3), (24, 16))
  spec = projection.leaf_spec((), g, rank=4, selected=None, dim_numbers=None,
                              proj_type="full")
  proj = projection.svd_projectors(g, spec, jnp.float32)
  u, _, vh = np.linalg.svd(np.asarray(g, np.float64))
  # Same subspaces as the float64 SVD...
  np.testing.assert_allclose(np.abs(proj.row @ u[:, :4]), np.eye(4), atol=1e-4)
  np.testing.assert_allclose(np.abs(vh[:4] @ proj.col), np.eye(4), atol=1e-4)
  # ...with each vector's largest-magnitude entry positive.
  for v in list(proj.row) + list(proj.col.T):
    assert v[jnp.argmax(jnp.abs(v))] > 0


def test_refresh_exactly_at_the_gap():
  params = {"w": jnp.zeros((24, 16))}
  gap = 3
  tx = galore_jax.scale_by_galore(rank=4, update_proj_gap=gap)
  state = tx.init(params)
  update = jax.jit(tx.update)
  prev = state.projector["w"].col
  changed = []
  for t in range(10):
    _, state = update(random_grads(params, 100 + t), state)
    cur = state.projector["w"].col
    changed.append(bool(jnp.any(cur != prev)))
    prev = cur
  assert changed == [t % gap == 0 for t in range(10)]
  assert int(state.count) == 10


def test_no_retrace_across_a_refresh():
  params = params_tree()
  tx = galore_jax.galore_adamw(1e-2, rank=4, update_proj_gap=2)
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for t in range(5):
    params, state = step(params, state, random_grads(params, t))
  assert len(traces) == 1


def test_svd_runs_only_inside_the_refresh_branch():
  """The cond predicate is unbatched, so the SVD is not hoisted out of it."""
  params = {"w": jnp.zeros((24, 16)), "stack": jnp.zeros((3, 24, 16))}
  tx = galore_jax.scale_by_galore(rank=4)
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(tx.update)(params, state).jaxpr
  top = [str(e.primitive) for e in jaxpr.eqns]
  assert "svd" not in top
  # The refresh conds; the others choose the platform's projection code.
  conds = [e for e in jaxpr.eqns if str(e.primitive) == "cond"
           and not e.params.get("branches_platforms")]
  assert len(conds) == 2
  for c in conds:
    branches = c.params["branches"]
    assert sum("svd" in str(b) for b in branches) == 1


def test_jit_equals_eager():
  params = params_tree()
  tx = galore_jax.galore_adamw(1e-2, rank=4, update_proj_gap=2,
                               weight_decay=0.1)
  s_eager = s_jit = tx.init(params)
  p_eager = p_jit = params
  update = jax.jit(tx.update)
  for t in range(4):
    g = random_grads(params, t)
    u, s_eager = tx.update(g, s_eager, p_eager)
    p_eager = optax.apply_updates(p_eager, u)
    u, s_jit = update(g, s_jit, p_jit)
    p_jit = optax.apply_updates(p_jit, u)
  chex.assert_trees_all_close(p_eager, p_jit, rtol=1e-5, atol=1e-6)


def test_stacked_leaf_equals_separate_leaves():
  stacked = {"w": jax.random.normal(jax.random.key(0), (3, 24, 16))}
  separate = {f"w{i}": stacked["w"][i] for i in range(3)}
  tx = galore_jax.galore_adamw(1e-2, rank=4, update_proj_gap=2,
                               weight_decay=0.1)
  s1, s2 = tx.init(stacked), tx.init(separate)
  p1, p2 = stacked, separate
  for t in range(5):
    g1 = random_grads(stacked, t)
    g2 = {f"w{i}": g1["w"][i] for i in range(3)}
    u1, s1 = tx.update(g1, s1, p1)
    u2, s2 = tx.update(g2, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  for i in range(3):
    np.testing.assert_allclose(p1["w"][i], p2[f"w{i}"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s1[0].projector["w"].col[i],
                               s2[0].projector[f"w{i}"].col, atol=1e-5)


def test_dim_numbers_equal_reshaped_matrix():
  """An (in, heads, head_dim) kernel with output axes (1, 2) == 2-D (in, h*d)."""
  w3 = jax.random.normal(jax.random.key(0), (24, 4, 5))
  w2 = w3.reshape(24, 20)
  dn = galore_jax.DimensionNumbers(reduction_axis=0, output_axis=(1, 2))
  tx3 = galore_jax.scale_by_galore(rank=4, dim_numbers=dn)
  tx2 = galore_jax.scale_by_galore(rank=4)
  s3, s2 = tx3.init({"w": w3}), tx2.init({"w": w2})
  for t in range(3):
    g3 = random_grads({"w": w3}, t)
    u3, s3 = tx3.update(g3, s3)
    u2, s2 = tx2.update({"w": g3["w"].reshape(24, 20)}, s2)
    np.testing.assert_allclose(u3["w"].reshape(24, 20), u2["w"], atol=1e-6)


def test_dim_numbers_batch_axis_in_the_middle_and_transposed_axes():
  """Axes (out, L, in) with batch_axis=1 == L separate (in, out) kernels."""
  w = jax.random.normal(jax.random.key(0), (16, 3, 24))
  dn = galore_jax.DimensionNumbers(reduction_axis=2, output_axis=0,
                                   batch_axis=1)
  tx = galore_jax.scale_by_galore(rank=4, dim_numbers=lambda p, x: dn)
  ref = galore_jax.scale_by_galore(rank=4)
  g = random_grads({"w": w}, 0)["w"]
  u, _ = tx.update({"w": g}, tx.init({"w": w}))
  for i in range(3):
    gi = g[:, i, :].T  # (in, out)
    ui, _ = ref.update({"w": gi}, ref.init({"w": gi}))
    np.testing.assert_allclose(u["w"][:, i, :].T, ui["w"], atol=1e-6)


def test_optax_galore_dimension_numbers_accepted():
  w = jnp.zeros((24, 4, 5))
  dn = optax.contrib.GaLoreDimensionNumbers(reduction_axis=0,
                                            output_axis=(1, 2))
  state = galore_jax.scale_by_galore(rank=4, dim_numbers={"w": dn}).init(
      {"w": w})
  chex.assert_shape(state.projector["w"].col, (20, 4))


def test_default_mask_rule_and_rank_callable():
  params = params_tree()
  # Rank 20: (24, 16) is not projected (16 <= 20) by default...
  state = galore_jax.scale_by_galore(rank=20).init(params)
  assert isinstance(state.projector["dense"]["kernel"], optax.MaskedNode)
  # ...unless masked in explicitly; then the rank is clamped to 16.
  mask = jax.tree.map(lambda x: x.ndim >= 2, params)
  state = galore_jax.scale_by_galore(rank=20, mask=mask).init(params)
  chex.assert_shape(state.projector["dense"]["kernel"].col, (16, 16))

  def rank_fn(path, leaf):
    return 2 if "stack" in jax.tree_util.keystr(path) else None

  state = galore_jax.scale_by_galore(rank=rank_fn).init(params)
  chex.assert_shape(state.projector["stack"]["kernel"].col, (3, 16, 2))
  assert isinstance(state.projector["dense"]["kernel"], optax.MaskedNode)


def test_prefix_mask():
  params = params_tree()
  mask = {"dense": True, "wide": False, "stack": False, "norm": False,
          "small": False}
  with pytest.raises(ValueError, match="fewer than 2 axes"):
    galore_jax.scale_by_galore(rank=4, mask=mask).init(params)
  mask["dense"] = {"kernel": True, "bias": False}
  state = galore_jax.scale_by_galore(rank=4, mask=mask).init(params)
  projected = [
      jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(
          state.projector,
          is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
      if not isinstance(x, optax.MaskedNode)]
  assert projected == ["['dense']['kernel'].col"]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params_stay_low_precision(dtype):
  params = params_tree(dtype)
  tx = galore_jax.galore_adamw(1e-2, rank=4, weight_decay=0.1)
  state = tx.init(params)
  for t in range(3):
    updates, state = jax.jit(tx.update)(random_grads(params, t), state, params)
    params = optax.apply_updates(params, updates)
  for x in jax.tree.leaves((params, updates)):
    assert x.dtype == dtype
  proj = state[0].projector["dense"]["kernel"].col
  assert proj.dtype == dtype
  assert bool(jnp.all(jnp.isfinite(proj.astype(jnp.float32))))


def test_projector_dtype_float32_for_bf16_params():
  params = params_tree(jnp.bfloat16)
  tx = galore_jax.scale_by_galore(rank=4, projector_dtype=jnp.float32)
  updates, state = tx.update(random_grads(params, 0), tx.init(params))
  assert state.projector["dense"]["kernel"].col.dtype == jnp.float32
  assert updates["dense"]["kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize("alias,kwargs", [
    (galore_jax.galore_adamw, dict(weight_decay=1e-4)),
    (galore_jax.galore_adam, {}),
    (galore_jax.galore_adafactor, dict(min_dim_size_to_factor=4)),
    (galore_jax.galore_lion, {}),
    (galore_jax.galore_sgd, dict(momentum=0.9)),
    (galore_jax.galore_sgd, {}),
])
def test_aliases_decrease_a_quadratic(alias, kwargs):
  k1, k2 = jax.random.split(jax.random.key(7))
  target = jax.random.normal(k1, (32, 2)) @ jax.random.normal(k2, (2, 24))
  params = {"w": jnp.zeros((32, 24)), "b": jnp.zeros((24,))}
  loss = lambda p: jnp.mean((p["w"] + p["b"] - target) ** 2)
  lr = 20.0 if alias is galore_jax.galore_sgd else 0.1
  opt = alias(lr, rank=4, update_proj_gap=10, **kwargs)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    g = jax.grad(loss)(params)
    u, state = opt.update(g, state, params)
    return optax.apply_updates(params, u), state

  l0 = loss(params)
  for _ in range(30):
    params, state = step(params, state)
  assert loss(params) < 0.75 * l0


def test_galore_sgd_without_momentum_is_the_projected_gradient():
  g = jax.random.normal(jax.random.key(0), (24, 16))
  opt = galore_jax.galore_sgd(1.0, rank=4)
  u, state = opt.update({"w": g}, opt.init({"w": g}), {"w": g})
  col = state[0].projector["w"].col
  np.testing.assert_allclose(u["w"], -(g @ col @ col.T), atol=1e-5)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right",
                                       "full"])
def test_state_bytes_equal_the_analytic_formula(proj_type):
  r, shapes = 4, [(24, 16), (16, 40), (32, 32)]  # Flax (in, out)
  params = {f"w{i}": jnp.zeros(s) for i, s in enumerate(shapes)}
  state = galore_jax.scale_by_galore(rank=r, proj_type=proj_type).init(params)
  expected = 2 * 4  # galore and adam counters (int32)
  for n_in, n_out in shapes:
    # Official sides on the torch layout (m, n) = (out, in).
    m, n = n_out, n_in
    side = {"std": "right" if m >= n else "left",
            "reverse_std": "left" if m >= n else "right",
            "left": "left", "right": "right", "full": "full"}[proj_type]
    moment = {"left": r * n, "right": m * r, "full": r * r}[side]
    proj = {"left": m * r, "right": r * n, "full": m * r + r * n}[side]
    expected += 4 * (2 * moment + proj)
  assert sum(x.nbytes for x in jax.tree.leaves(state)) == expected


def test_stacked_bf16_leaf_is_projected_one_matrix_at_a_time():
  """The refresh and the projections of a stacked bf16 leaf convert one
  matrix to float32 at a time on XLA:CPU (which computes bf16 matmuls in
  float32), and the update overwrites the gradient: the update's
  temporaries stay below half a float32 copy of the stack (they were twice
  it when the stack was converted whole)."""
  n_layers, rows, cols = 16, 256, 512
  params = {"w": jnp.zeros((n_layers, rows, cols), jnp.bfloat16)}
  tx = galore_jax.galore_adamw(1e-3, rank=32)
  state = tx.init(params)
  temp = jax.jit(tx.update, donate_argnums=(0, 1)).lower(
      params, state, params).compile().memory_analysis().temp_size_in_bytes
  assert temp < 4 * n_layers * rows * cols / 2, temp
