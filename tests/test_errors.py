"""Every bad input gives a clear error naming the argument and the value."""

import inspect

import jax
import jax.numpy as jnp
import optax
import pytest

import galore_jax

PARAMS = {"w": jnp.zeros((24, 16)), "b": jnp.zeros((16,))}


@pytest.mark.parametrize("rank", [0, -3, 2.5, "8", True, None])
def test_rank_not_a_positive_int(rank):
  with pytest.raises((ValueError, TypeError), match="`rank`.*" + "positive"):
    galore_jax.scale_by_galore(rank=rank)


def test_rank_as_array_points_to_static_args():
  with pytest.raises(TypeError, match="static_args=\\('rank',\\)"):
    galore_jax.scale_by_galore(rank=jnp.asarray(4))


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", True])
def test_rank_callable_returning_garbage(bad):
  tx = galore_jax.scale_by_galore(rank=lambda path, leaf: bad)
  with pytest.raises(ValueError, match=r"`rank` callable .* got .*\['b'\]"):
    tx.init(PARAMS)


@pytest.mark.parametrize("gap", [0, -5, 1.5])
def test_update_proj_gap(gap):
  with pytest.raises(ValueError, match=f"`update_proj_gap`.*{gap}"):
    galore_jax.scale_by_galore(update_proj_gap=gap)


def test_update_proj_gap_not_a_number():
  with pytest.raises(TypeError, match="`update_proj_gap`.*'200'"):
    galore_jax.scale_by_galore(update_proj_gap="200")


def test_unknown_proj_type_lists_valid_ones():
  with pytest.raises(ValueError, match="`proj_type` must be one of .*'std'.*"
                     "'reverse_std'.*'left'.*'right'.*'full'.*got 'svd'"):
    galore_jax.scale_by_galore(proj_type="svd")


def test_base_not_a_transform():
  with pytest.raises(TypeError, match="`base`"):
    galore_jax.scale_by_galore(base=optax.adam)


@pytest.mark.parametrize("dtype", [jnp.int8, "complex"])
def test_projector_dtype(dtype):
  with pytest.raises(ValueError, match="`projector_dtype`"):
    galore_jax.scale_by_galore(projector_dtype=dtype)


@pytest.mark.parametrize("dn,match", [
    (galore_jax.DimensionNumbers(reduction_axis=3), "reduction_axis 3"),
    (galore_jax.DimensionNumbers(reduction_axis=0, output_axis=0),
     "disjoint"),
    (galore_jax.DimensionNumbers(reduction_axis=0, output_axis=1,
                                 batch_axis=1), "disjoint"),
    (galore_jax.DimensionNumbers(reduction_axis=(), output_axis=1),
     "non-empty"),
])
def test_dim_numbers_that_do_not_fit(dn, match):
  tx = galore_jax.scale_by_galore(rank=4, dim_numbers={"w": dn, "b": None})
  with pytest.raises(ValueError, match=f"`dim_numbers`.*{match}|"
                     f"`dim_numbers`.*\\['w'\\]"):
    tx.init(PARAMS)


def test_dim_numbers_on_a_vector():
  dn = galore_jax.DimensionNumbers(reduction_axis=0, output_axis=0)
  tx = galore_jax.scale_by_galore(rank=4, dim_numbers={"w": None, "b": dn})
  with pytest.raises(ValueError, match=r"`dim_numbers`.*\['b'\].*\(16,\)"):
    tx.init(PARAMS)


def test_dim_numbers_entry_of_wrong_type():
  tx = galore_jax.scale_by_galore(rank=4, dim_numbers={"w": (0, 1), "b": None})
  with pytest.raises(ValueError, match="`dim_numbers` does not match"):
    tx.init(PARAMS)


def test_mask_structure_not_matching_params():
  tx = galore_jax.scale_by_galore(rank=4, mask={"w": True, "c": False})
  with pytest.raises(ValueError, match=r"`mask` does not match.*\['b'\]"):
    tx.init(PARAMS)
  tx = galore_jax.scale_by_galore(
      rank=4, mask={"w": True, "b": False, "extra": True})
  with pytest.raises(ValueError, match=r"`mask` does not match.*\['extra'\]"):
    tx.init(PARAMS)


def test_mask_entries_not_bools():
  tx = galore_jax.scale_by_galore(rank=4, mask={"w": "yes", "b": False})
  with pytest.raises(TypeError, match=r"`mask` entries must be bools.*'yes'"):
    tx.init(PARAMS)


def test_mask_selecting_a_vector():
  tx = galore_jax.scale_by_galore(rank=4, mask={"w": True, "b": True})
  with pytest.raises(ValueError, match=r"`mask` selects.*\['b'\].*\(16,\)"):
    tx.init(PARAMS)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64])
def test_integer_or_complex_params(dtype):
  tx = galore_jax.galore_adamw(1e-3, rank=4)
  with pytest.raises(TypeError, match=r"floating-point.*\['w'\].*"
                     + jnp.dtype(dtype).name):
    tx.init({"w": jnp.zeros((24, 16), dtype)})


def test_weight_decay_and_momentum_ranges():
  with pytest.raises(ValueError, match="`weight_decay`.*-0.1"):
    galore_jax.galore_adamw(1e-3, weight_decay=-0.1)
  with pytest.raises(ValueError, match="`momentum`.*1.5"):
    galore_jax.galore_sgd(1e-3, momentum=1.5)


def test_hf_eps_with_incompatible_options():
  with pytest.raises(ValueError, match="`hf_eps=True`.*nesterov=True"):
    galore_jax.galore_adamw(1e-3, hf_eps=True, nesterov=True)


def test_state_for_other_params():
  tx = galore_jax.scale_by_galore(rank=4, proj_type="full")
  state = tx.init({"w": jnp.zeros((24, 16))})
  other = galore_jax.scale_by_galore(rank=4)
  with pytest.raises(ValueError, match=r"projector state with shapes \(row, "
                     r"col\) = \(\(4, 24\), \(16, 4\)\) does not match"):
    other.update({"w": jnp.zeros((24, 16))}, state)
  # Same number of projectors, other side: caught too, not deep in a matmul.
  state = galore_jax.scale_by_galore(rank=4, proj_type="reverse_std").init(
      {"w": jnp.zeros((24, 16))})
  with pytest.raises(ValueError, match=r"\(\(4, 24\), None\) does not "
                     r"match.*needs \(None, \(16, 4\)\)"):
    other.update({"w": jnp.zeros((24, 16))}, state)


# A state initialised for a (64, 32) kernel, updated with a (32, 64) one. The
# 8-bit codes have the same shapes either way; their `rows` record tells.
TRANSPOSED = {
    "adamw_8bit": lambda: galore_jax.adamw_8bit(1e-3, min_8bit_size=1),
    "scale_by_adam_8bit": lambda: galore_jax.scale_by_adam_8bit(
        min_8bit_size=1),
    "scale_by_adam_hf": galore_jax.scale_by_adam_hf,
    "galore_adamw": lambda: galore_jax.galore_adamw(1e-3, rank=8),
    "galore_adamw_8bit": lambda: galore_jax.galore_adamw_8bit(
        1e-3, rank=8, min_8bit_size=1),
    "galore_lion": lambda: galore_jax.galore_lion(1e-3, rank=8),
    "galore_sgd": lambda: galore_jax.galore_sgd(1e-3, rank=8, momentum=0.9),
    "q_galore_adamw": lambda: galore_jax.q_galore_adamw(
        1e-3, rank=8, proj_group_size=32, min_8bit_size=1),
    # Leaves too small to project: the base transform's own state.
    "galore_adamw, not projected": lambda: galore_jax.galore_adamw(
        1e-3, rank=128),
    "galore_adamw_8bit, not projected": lambda: galore_jax.galore_adamw_8bit(
        1e-3, rank=128, min_8bit_size=1),
    "q_galore_adamw, not projected": lambda: galore_jax.q_galore_adamw(
        1e-3, rank=128, proj_group_size=32, min_8bit_size=1),
    "q_galore_adamw 32-bit, not projected": lambda: galore_jax.q_galore_adamw(
        1e-3, rank=128, proj_group_size=32, state_bits=32),
}


@pytest.mark.parametrize("name", sorted(TRANSPOSED))
def test_a_state_for_a_transposed_kernel_is_refused(name):
  tx = TRANSPOSED[name]()
  state = tx.init({"w": jnp.ones((64, 32))})
  other = {"w": jnp.ones((32, 64))}
  with pytest.raises(ValueError, match="initialised for other params"):
    tx.update(other, state, other)
  # A state for these shapes passes the same checks.
  tx.update(other, tx.init(other), other)


def test_an_8bit_state_for_a_reshaped_leaf_is_refused():
  """Same size and block count, other shape: (64, 32) against (2048,)."""
  tx = galore_jax.adamw_8bit(1e-3, min_8bit_size=1)
  state = tx.init({"w": jnp.ones((64, 32))})
  flat = {"w": jnp.ones((2048,))}
  with pytest.raises(ValueError, match=r"moments of parameter \['w'\].*"
                     r"update of shape \(2048,\)"):
    tx.update(flat, state, flat)


def test_a_layerwise_state_for_other_blocks_is_refused():
  """A state for 3 layers would be sliced out of range (clamped, silently)
  by a 4-layer model; an outer state for transposed params is refused too."""
  from galore_jax import layerwise
  embed = lambda o, b: b["x"] @ o["w_in"]
  block = lambda p, x: x + jnp.tanh(x @ p["w"])
  head = lambda o, x, b: jnp.mean((x @ o["w_out"] - b["y"]) ** 2)
  outer = {"w_in": jnp.ones((4, 8)), "w_out": jnp.ones((8, 1))}
  lw = layerwise.layerwise_step(embed, block, head, optax.adamw(1e-2))
  state = lw.init(outer, {"w": jnp.ones((3, 8, 8))})
  batch = {"x": jnp.ones((1, 5, 4)), "y": jnp.zeros((1, 5, 1))}
  with pytest.raises(ValueError, match="LayerwiseState.blocks.*other params"):
    lw.step(outer, {"w": jnp.ones((4, 8, 8))}, state, batch)
  other = lw.init({"w_in": jnp.ones((8, 4)), "w_out": jnp.ones((8, 1))},
                  {"w": jnp.ones((3, 8, 8))})
  with pytest.raises(ValueError, match="LayerwiseState.outer.*other params"):
    lw.step(outer, {"w": jnp.ones((3, 8, 8))},
            state._replace(outer=other.outer), batch)


# --- Q-GaLore ---------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True, "4"])
def test_q_galore_proj_bits(bits):
  with pytest.raises(ValueError, match=r"`proj_bits` must be an int in 2\.\.8"):
    galore_jax.scale_by_q_galore(proj_bits=bits)
  with pytest.raises(ValueError, match=r"`proj_bits` must be an int in 2\.\.8"):
    galore_jax.q_galore_adamw(1e-3, proj_bits=bits)


@pytest.mark.parametrize("size", [0, -256, 1.5, None])
def test_q_galore_proj_group_size(size):
  with pytest.raises(ValueError, match="`proj_group_size` must be a positive"):
    galore_jax.scale_by_q_galore(proj_group_size=size)


@pytest.mark.parametrize("cos", [-1.01, 1.5, float("nan")])
def test_q_galore_cos_threshold(cos):
  with pytest.raises(ValueError, match=r"`cos_threshold` must be in \[-1, 1\]"):
    galore_jax.scale_by_q_galore(cos_threshold=cos)


@pytest.mark.parametrize("gamma", [0.5, 0, -2])
def test_q_galore_gamma_proj(gamma):
  with pytest.raises(ValueError, match=r"`gamma_proj` must be in \[1, inf\]"):
    galore_jax.q_galore_adamw(1e-3, gamma_proj=gamma)


@pytest.mark.parametrize("queue", [0, -1, 2.0])
def test_q_galore_queue_size(queue):
  with pytest.raises(ValueError, match="`queue_size` must be a positive int"):
    galore_jax.scale_by_q_galore(queue_size=queue)


@pytest.mark.parametrize("state_bits", [4, 16, 0, True, "8"])
def test_q_galore_state_bits(state_bits):
  with pytest.raises(ValueError, match="`state_bits` must be 8 or 32"):
    galore_jax.q_galore_adamw(1e-3, state_bits=state_bits)


def test_q_galore_two_sided_projection_is_refused():
  with pytest.raises(ValueError, match="Q-GaLore projects one side.*'full'"):
    galore_jax.scale_by_q_galore(proj_type="full")
  with pytest.raises(ValueError, match="`proj_type` must be one of"):
    galore_jax.scale_by_q_galore(proj_type="diagonal")


def test_q_galore_hf_eps_needs_float_moments():
  with pytest.raises(ValueError, match="`hf_eps=True` needs `state_bits=32`"):
    galore_jax.q_galore_adamw(1e-3, hf_eps=True)


def test_q_galore_state_for_other_settings():
  params = {"w": jnp.zeros((48, 32))}
  state = galore_jax.scale_by_q_galore(rank=4, proj_bits=8).init(params)
  other = galore_jax.scale_by_q_galore(rank=4, proj_bits=4)
  with pytest.raises(ValueError, match="Q-GaLore projector state with shapes"
                     ".*does not match a leaf of shape \\(48, 32\\)"):
    other.update(params, state)


def test_q_galore_rank_and_gap_rules_are_galore_s():
  with pytest.raises(ValueError, match="`rank` must be a positive int"):
    galore_jax.scale_by_q_galore(rank=0)
  with pytest.raises(ValueError, match=r"`update_proj_gap` must be in"):
    galore_jax.scale_by_q_galore(update_proj_gap=0)


@pytest.mark.parametrize("make", [
    lambda: galore_jax.adamw_8bit(1e-2),
    lambda: galore_jax.adamw_8bit(1e-2, min_8bit_size=0),
    lambda: galore_jax.galore_adamw(1e-2, rank=2),
    lambda: galore_jax.galore_adamw_8bit(1e-2, rank=2),
    lambda: galore_jax.q_galore_adamw(1e-2, rank=2),
    lambda: galore_jax.galore_adafactor(1e-2, rank=2),
])
def test_complex_params_are_a_clear_type_error(make):
  """optax.adamw supports complex params; ours refuse them by name rather
  than drop the imaginary part."""
  params = {"w": jnp.ones((8, 4), jnp.complex64), "b": jnp.ones(4)}
  tx = make()
  with pytest.raises(TypeError, match=r"floating-point params.*\['w'\].*"
                     "complex64"):
    tx.update(params, tx.init(params), params)
  real = jax.tree.map(jnp.real, params)
  with pytest.raises(TypeError, match="complex64"):  # complex gradients too
    tx.update(params, tx.init(real), real)


MIXED = {
    "galore_adamw": lambda: galore_jax.galore_adamw(1e-2, rank=2),
    "galore_adamw_subspace": lambda: galore_jax.galore_adamw(
        1e-2, rank=2, svd="subspace_iteration"),
    "galore_adamw_8bit": lambda: galore_jax.galore_adamw_8bit(
        1e-2, rank=2, min_8bit_size=0),
    "galore_lion": lambda: galore_jax.galore_lion(1e-3, rank=2),
    "galore_sgd": lambda: galore_jax.galore_sgd(1e-2, rank=2, momentum=0.9),
    "galore_adafactor": lambda: galore_jax.galore_adafactor(
        1e-2, rank=2, min_dim_size_to_factor=2),
    "q_galore_adamw": lambda: galore_jax.q_galore_adamw(
        1e-2, rank=2, proj_group_size=16, min_8bit_size=0),
    "adamw_8bit": lambda: galore_jax.adamw_8bit(1e-2, min_8bit_size=0),
}


@pytest.mark.parametrize("name", sorted(MIXED))
@pytest.mark.parametrize("params_dtype,grads_dtype", [
    (jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32)])
def test_grads_of_another_float_dtype_than_the_params(name, params_dtype,
                                                      grads_dtype):
  """As optax.adamw: bf16 gradients of float32 params (mixed precision), or
  the reverse, across a refresh (gap 1)."""
  key = jax.random.key(0)
  params = {"w": jax.random.normal(key, (16, 8)).astype(params_dtype),
            "b": jnp.ones(8, params_dtype)}
  tx = MIXED[name]()
  state = tx.init(params)
  step = jax.jit(tx.update)
  for t in range(3):
    grads = jax.tree.map(
        lambda x: jax.random.normal(jax.random.fold_in(key, t), x.shape
                                    ).astype(grads_dtype), params)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
  for x in jax.tree.leaves(params):
    assert x.dtype == params_dtype and bool(jnp.all(jnp.isfinite(x)))


HARMFUL = [  # (factory, kwargs, the argument the error names)
    (galore_jax.galore_adamw, dict(scale=-1.0), "scale"),
    (galore_jax.galore_adamw, dict(scale=0.0), "scale"),
    (galore_jax.galore_adamw, dict(b1=1.0), "b1"),
    (galore_jax.galore_adamw, dict(b2=1.0), "b2"),
    (galore_jax.galore_adamw, dict(eps=-1e-8), "eps"),
    (galore_jax.galore_adamw, dict(eps_root=-1.0), "eps_root"),
    (galore_jax.galore_adamw, dict(update_proj_gap=2**31), "update_proj_gap"),
    (galore_jax.galore_adamw, dict(learning_rate=-1e-3), "learning_rate"),
    (galore_jax.galore_adamw, dict(learning_rate=float("nan")),
     "learning_rate"),
    (galore_jax.galore_adamw, dict(weight_decay=-0.1), "weight_decay"),
    (galore_jax.galore_adam, dict(b2=1.0), "b2"),
    (galore_jax.galore_adamw_8bit, dict(b1=1.0), "b1"),
    (galore_jax.galore_lion, dict(b1=1.0), "b1"),
    (galore_jax.galore_lion, dict(b2=1.5), "b2"),
    (galore_jax.galore_sgd, dict(momentum=1.0), "momentum"),
    (galore_jax.galore_adafactor, dict(decay_rate=0.0), "decay_rate"),
    (galore_jax.galore_adafactor, dict(clipping_threshold=0.0),
     "clipping_threshold"),
    (galore_jax.galore_adafactor, dict(momentum=1.0), "momentum"),
    (galore_jax.q_galore_adamw, dict(update_proj_gap=2**31),
     "update_proj_gap"),
    (galore_jax.q_galore_adamw, dict(scale=-0.25), "scale"),
    (galore_jax.q_galore_adamw, dict(b1=1.0), "b1"),
    (galore_jax.q_galore_adamw, dict(b2=1.0, state_bits=32), "b2"),
    (galore_jax.q_galore_adamw, dict(learning_rate=-1.0), "learning_rate"),
    (galore_jax.adamw_8bit, dict(b2=1.0), "b2"),
    (galore_jax.adamw_8bit, dict(learning_rate=-1.0), "learning_rate"),
    (galore_jax.scale_by_adam_8bit, dict(b1=-0.1), "b1"),
    (galore_jax.scale_by_adam_hf, dict(b2=1.0), "b2"),
    (galore_jax.scale_by_galore, dict(scale=-1.0), "scale"),
    (galore_jax.scale_by_q_galore, dict(update_proj_gap=2**31),
     "update_proj_gap"),
]


@pytest.mark.parametrize("factory,kwargs,name", HARMFUL,
                         ids=[f"{f.__name__}-{n}" for f, _, n in HARMFUL])
def test_harmful_hyperparameters_are_refused(factory, kwargs, name):
  """Values optax accepts but that reverse the updates, give NaN or wrap
  around: refused at construction, naming the argument and its range."""
  kw = dict(kwargs)
  if "learning_rate" in inspect.signature(factory).parameters:
    kw.setdefault("learning_rate", 1e-2)
  with pytest.raises(ValueError, match=f"`{name}` must be"):
    factory(**kw)
