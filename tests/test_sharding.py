"""GaLore and Q-GaLore over a device mesh (8 CPU devices, see conftest.py).

State shardings follow the params and never split a rank axis; the LLaMA
example trained on a (fsdp=8) or (data=2, fsdp=4) mesh equals one device;
the subspace-iteration refresh never gathers a whole gradient.
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import galore_jax
from examples.llama import input_pipeline as data_lib
from examples.llama import main as main_lib
from examples.llama import methods as methods_lib
from examples.llama import train as train_lib

RANK = 8


def _mesh(data=2, fsdp=4):
  return jax.make_mesh((data, fsdp), ("data", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _params():
  return {"w": jnp.ones((64, 32)),          # rows >= cols: column projector
          "v": jnp.ones((32, 64)),          # rows < cols: row projector
          "s": jnp.ones((4, 32, 64)),       # stacked (L, in, out)
          "b": jnp.ones((32,))}


def _shardings(mesh):
  return {"w": NamedSharding(mesh, P("fsdp")),
          "v": NamedSharding(mesh, P("fsdp")),
          "s": NamedSharding(mesh, P(None, "fsdp")),
          "b": NamedSharding(mesh, P())}


def _specs(tree):
  return {jax.tree_util.keystr(k): tuple(v.spec) for k, v in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_conftest_gives_eight_cpu_devices():
  assert jax.device_count() == 8


def test_adamw_moments_follow_the_params():
  mesh = _mesh()
  sh = galore_jax.state_sharding(optax.adamw(1e-3), _params(),
                                 _shardings(mesh))
  for name, want in _shardings(mesh).items():
    assert sh[0].mu[name] == want and sh[0].nu[name] == want
  assert sh[0].count.spec == P()


def test_galore_state_follows_the_param_axes_and_never_splits_the_rank():
  specs = _specs(galore_jax.state_sharding(
      galore_jax.galore_adamw(1e-3, rank=RANK), _params(),
      _shardings(_mesh())))
  assert specs == {
      "[0].count": (),
      # w (64, 32) split on `in`: (out, r) column projector and (in, r)
      # moments; `out` is unsplit, so the projector takes `in`'s axis.
      "[0].projector['w'].col": ("fsdp", None),
      "[0].base_state.mu['w']": ("fsdp", None),
      "[0].base_state.nu['w']": ("fsdp", None),
      # v (32, 64) split on `in`: (r, in) row projector, (r, out) moments.
      "[0].projector['v'].row": (None, "fsdp"),
      "[0].base_state.mu['v']": (None, "fsdp"),
      "[0].base_state.nu['v']": (None, "fsdp"),
      # s (4, 32, 64): the layer axis follows, then as v.
      "[0].projector['s'].row": (None, None, "fsdp"),
      "[0].base_state.mu['s']": (None, None, "fsdp"),
      "[0].base_state.nu['s']": (None, None, "fsdp"),
      "[0].base_state.count": (),
      "[0].base_state.mu['b']": (),  # the param's own P()
      "[0].base_state.nu['b']": (),
  }


def test_q_galore_state_shardings():
  mesh = _mesh(2, 4)
  params = {"w": jnp.ones((64, 32)), "s": jnp.ones((4, 32, 64)),
            "e": jnp.ones((64, 16))}
  shardings = {"w": NamedSharding(mesh, P("fsdp")),
               "s": NamedSharding(mesh, P("fsdp")),  # split the layer axis
               "e": NamedSharding(mesh, P("fsdp"))}
  tx = galore_jax.q_galore_adamw(
      1e-3, rank=RANK, block_size=32, min_8bit_size=1,
      projection_mask={"w": True, "s": True, "e": False})
  specs = _specs(galore_jax.state_sharding(tx, params, shardings))
  # Per-layer projector codes, gap and queue follow the stacked axis.
  for field in ("codes", "scales", "zeros", "vector", "queue"):
    assert specs[f"[0].projector['s'].{field}"] == ("fsdp", None)
    assert specs[f"[0].projector['w'].{field}"] == (None,)
  assert specs["[0].projector['s'].gap"] == ("fsdp",)
  # 8-bit moments of an unprojected leaf split by row: blocks of its rows.
  assert specs["[0].base_state.mu['e'].codes"] == ("fsdp", None)
  assert specs["[0].base_state.mu['e'].absmax"] == ("fsdp",)
  # Low-rank ones split within each block, absmax whole.
  assert specs["[0].base_state.mu['w'].codes"] == (None, "fsdp")
  assert specs["[0].base_state.mu['w'].absmax"] == (None,)


def test_blocks_that_do_not_divide_split_within_blocks():
  mesh = _mesh(1, 8)
  params = {"w": jnp.ones((40, 24))}
  tx = galore_jax.adamw_8bit(1e-3, block_size=64, min_8bit_size=1)
  sh = galore_jax.state_sharding(tx, params,
                                 {"w": NamedSharding(mesh, P("fsdp"))})
  # 15 blocks of the rows do not split over 8 devices; each block's 64
  # codes do.
  assert sh[0].mu["w"].codes.spec == P(None, "fsdp")
  assert sh[0].mu["w"].absmax.spec == P(None)
  tx = galore_jax.adamw_8bit(1e-3, block_size=36, min_8bit_size=1)
  sh = galore_jax.state_sharding(tx, params,
                                 {"w": NamedSharding(mesh, P("fsdp"))})
  assert sh[0].mu["w"].codes.spec == P(None, None)  # 27 x 36: neither


@pytest.mark.parametrize("svd", ["exact", "subspace_iteration"])
@pytest.mark.parametrize("make", [
    lambda svd: optax.MultiSteps(galore_jax.galore_adamw(
        1e-3, rank=RANK, svd=svd), 2),
    lambda svd: optax.inject_hyperparams(
        galore_jax.galore_adamw,
        static_args=("rank", "svd", "power_iters", "oversample"))(
            1e-3, rank=RANK, svd=svd),
    lambda svd: optax.chain(optax.clip_by_global_norm(1.0),
                            galore_jax.q_galore_adamw(
                                1e-3, rank=RANK, min_8bit_size=1, svd=svd)),
])
def test_init_on_the_mesh_under_wrappers(make, svd):
  # The stacked leaf's refresh under MultiSteps once hung on these meshes:
  # see test_cpu_refresh_runs_one_matrix_per_linalg_call.
  tx, params, mesh = make(svd), _params(), _mesh()
  shardings = _shardings(mesh)
  sh = galore_jax.state_sharding(tx, params, shardings)
  params = jax.device_put(params, shardings)
  state = jax.jit(tx.init, out_shardings=sh)(params)
  assert jax.tree.all(jax.tree.map(
      lambda x, want: x.sharding.is_equivalent_to(want, x.ndim), state, sh))
  # No axis of length RANK is ever split (8-bit block axes aside).
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    if "codes" in str(path) or "absmax" in str(path):
      continue
    for size, entry in zip(x.shape, tuple(x.sharding.spec)):
      assert size != RANK or entry is None, path
  # And the sharded update runs.
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update, out_shardings=(shardings, sh))
  updates, state = update(grads, state, params)
  assert jax.tree.all(jax.tree.map(lambda u: bool(jnp.isfinite(u).all()),
                                   updates))


def _lapack_output_ranks(hlo_text):
  """The ranks of every output of each LAPACK custom call in ``hlo_text``."""
  calls = [line for line in hlo_text.splitlines()
           if 'custom_call_target="lapack_' in line]
  return [[len([d for d in dims.split(",") if d]) for dims in
           re.findall(r"\w+\[([\d,]*)\]", line.split(" custom-call(")[0])]
          for line in calls]


@pytest.mark.parametrize("svd", ["exact", "randomized", "subspace_iteration"])
def test_cpu_refresh_runs_one_matrix_per_linalg_call(svd):
  # jaxlib's CPU LAPACK kernels split a batch of matrices over XLA's
  # intra-op thread pool and block on it; with 8 devices every pool thread
  # ended up blocked that way and the sharded refresh of a stacked leaf
  # under MultiSteps hung. On CPU each call now gets one matrix.
  mesh = _mesh(1, 8)
  params, shardings = _params(), _shardings(mesh)
  tx = optax.MultiSteps(galore_jax.scale_by_galore(rank=RANK, svd=svd), 2)
  st = galore_jax.state_sharding(tx, params, shardings)
  update = jax.jit(tx.update, in_shardings=(shardings, st, shardings),
                   out_shardings=(shardings, st))
  state = jax.eval_shape(tx.init, params)
  ranks = _lapack_output_ranks(
      update.lower(params, state, params).compile().as_text())
  assert len(ranks) >= 3  # at least one call for each of s, w and v
  assert max(max(r) for r in ranks) == 2, ranks


def test_bad_param_shardings():
  params, mesh = _params(), _mesh()
  tx = galore_jax.galore_adamw(1e-3, rank=RANK)
  with pytest.raises(TypeError, match="NamedSharding per param"):
    galore_jax.state_sharding(tx, params, {k: P() for k in params})
  with pytest.raises(ValueError, match="tree like `params`"):
    galore_jax.state_sharding(tx, params, {"w": NamedSharding(mesh, P())})
  other = jax.make_mesh((8,), ("fsdp",))
  mixed = dict(_shardings(mesh), b=NamedSharding(other, P()))
  with pytest.raises(ValueError, match="same mesh"):
    galore_jax.state_sharding(tx, params, mixed)


def _state_bytes_per_device(tx, params, fsdp, skip="^$"):
  """Bytes of ``tx``'s state on one device of an fsdp mesh, leaving out the
  leaves whose path matches ``skip``."""
  mesh = _mesh(1, fsdp)
  sh = jax.tree.map(lambda x: NamedSharding(mesh, methods_lib.fsdp_spec(
      x.shape, fsdp)), params)
  st_sh = galore_jax.state_sharding(tx, params, sh)
  abstract = jax.tree_util.tree_flatten_with_path(
      jax.eval_shape(tx.init, params))[0]
  return sum(
      int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
      for (path, x), s in zip(abstract, jax.tree.leaves(st_sh))
      if not re.search(skip, jax.tree_util.keystr(path)))


@pytest.mark.parametrize("make,skip,slack", [
    (lambda: galore_jax.galore_adamw(1e-3, rank=32), "count", 1.0),
    # Q-GaLore's INT4 projectors are kept whole (see galore_jax.sharding),
    # and so is the 4-byte absmax of an 8-bit block whose 256 codes are
    # split: at most 4 / (256 / 8) = +12.5% at fsdp=8.
    (lambda: galore_jax.q_galore_adamw(1e-3, rank=32, min_8bit_size=1),
     r"count|\.projector", 1.125),
])
def test_state_bytes_per_device_shrink_as_one_over_fsdp(make, skip, slack):
  params = {f"l{i}": {"q": jnp.ones((128, 128)), "up": jnp.ones((128, 352)),
                      "down": jnp.ones((352, 128))} for i in range(2)}
  tx = make()
  one = _state_bytes_per_device(tx, params, 1, skip)
  for fsdp in (2, 4, 8):
    got = _state_bytes_per_device(tx, params, fsdp, skip)
    assert got <= slack * one / fsdp, (fsdp, got, one)


def test_nnx_optimizer_state_resharded():
  mesh = _mesh(1, 8)
  def init(split):
    lecun = nnx.initializers.lecun_normal()
    return nnx.with_partitioning(lecun, ("fsdp", None)) if split else lecun

  class MLP(nnx.Module):
    def __init__(self, rngs, split=True):
      self.l1 = nnx.Linear(64, 36, kernel_init=init(split), rngs=rngs)
      self.l2 = nnx.Linear(36, 8, rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.relu(self.l1(x)))

  make = lambda: galore_jax.galore_adamw(1e-2, rank=4, update_proj_gap=2)
  reference = MLP(nnx.Rngs(0), split=False)  # one device
  ref_opt = nnx.Optimizer(reference, make(), wrt=nnx.Param)
  tx = make()
  with jax.set_mesh(mesh):
    # With eager sharding (the default), nnx.Optimizer copies the kernel's
    # ("fsdp", None) onto its whole per-param state: the (out=36, r) column
    # projector cannot be split that way.
    with pytest.raises(ValueError, match="36"):
      nnx.Optimizer(MLP(nnx.Rngs(0)), make(), wrt=nnx.Param)
    # The recipe: create model and optimizer without eager sharding, then
    # place the params by their annotations and the state by state_sharding.
    with nnx.use_eager_sharding(False):
      model = MLP(nnx.Rngs(0))
      opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  params = nnx.state(model, nnx.Param)
  param_sh = nnx.get_named_sharding(params, mesh)
  nnx.update(model, jax.device_put(params, param_sh))
  sh = galore_jax.state_sharding(tx, params, param_sh, state=opt.opt_state)
  # A tree like the state, its OptVariable wrappers (count's too) kept.
  jax.tree.map(lambda x, s: None, opt.opt_state, sh)
  assert tuple(sh[0].projector["l1"]["kernel"].get_value().col.spec) == (
      None, None)  # `out` is unsplit and 36 does not split over 8: whole
  assert tuple(sh[0].base_state.mu["l1"]["kernel"].get_value().spec) == (
      "fsdp", None)  # (in=64, r)
  opt.opt_state = jax.device_put(opt.opt_state, sh)

  @nnx.jit
  def step(model, opt, x):
    opt.update(model, nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model))

  for i in range(4):
    x = jax.random.normal(jax.random.key(i), (16, 64))
    step(model, opt, x)
    step(reference, ref_opt, x)
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  want = nnx.to_pure_dict(nnx.state(reference, nnx.Param))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  split = NamedSharding(mesh, P("fsdp", None))
  mu = opt.opt_state[0].base_state.mu["l1"]["kernel"].get_value()
  kernel = nnx.state(model, nnx.Param)["l1"]["kernel"].get_value()
  assert mu.sharding.is_equivalent_to(split, 2)
  assert kernel.sharding.is_equivalent_to(split, 2)


# ---------------------------------------------------------------------------
# The LLaMA example on a mesh equals one device.

STEPS = 20


def _last_bit():
  """Scales each gradient entry by ``1 ± 2**-23`` (a fixed random sign): a
  change in its last bit, like a sum taken in another order. (One factor for
  all would not do: 8-bit codes are relative to their block's absmax.)"""

  def nudge(g, _):
    return jax.tree.map(lambda x: x * (1 + 2**-23 * jax.random.rademacher(
        jax.random.key(x.size), x.shape, x.dtype)), g)

  return optax.stateless(nudge)


def _train_llama(method, mesh_text, svd="exact", state_bits=8,
                 nudge=False):
  """``method``: an example method, or "q_galore_adamw" for that optimizer
  on float weights (the example's q_galore adds INT8 weights). ``nudge``
  changes the last bit of every gradient (see :func:`_last_bit`)."""
  example = "galore" if method == "q_galore_adamw" else method
  args = main_lib.config_from_flags([
      "--model", "llama-tiny", "--method", example, "--steps", str(STEPS),
      "--batch-size", "8", "--seq-len", "32", "--update-proj-gap", "5",
      "--svd", svd] + (["--mesh", mesh_text] if mesh_text else []))
  m = methods_lib.build(example, train_lib.build_model(args, 259), args)
  if method == "q_galore_adamw":
    # The official zero point: with float offsets, a last-bit change of the
    # gradients moves these 4-bit projectors' codes across more rounding
    # ties (1.2e-5 against this test's bound), which the mesh tolerance
    # then inherits; the sharding itself is the same for both schemes.
    m.tx = galore_jax.q_galore_adamw(
        m.schedule, rank=16, update_proj_gap=5, scale=0.25, svd=svd,
        state_bits=state_bits, projection_mask=methods_lib.target_mask(m.train),
        proj_zero_point="official")
  if nudge:
    m.tx = optax.chain(_last_bit(), m.tx)
  mesh = (methods_lib.make_mesh(methods_lib.parse_mesh(mesh_text))
          if mesh_text else None)
  where = methods_lib.placement(m, mesh)
  train, frozen, opt_state = methods_lib.init_state(m, where)
  key = jax.random.PRNGKey(0)
  if mesh is not None:
    key = jax.device_put(key, where.replicated)
  corpus = _corpus()
  tokens = data_lib.batch(corpus.train, 0, 8, 32, 0)
  step = methods_lib.compile_step(m, where, train, frozen, opt_state, key,
                                tokens)
  for i in range(STEPS):
    batch = data_lib.batch(corpus.train, i, 8, 32, 0)
    if mesh is not None:
      batch = jax.device_put(batch, where.tokens)
    train, opt_state, key, _ = step(train, frozen, opt_state, key, batch)
  if mesh is not None:  # every array really is split over the mesh
    kernel = train["layers"][0]["mlp"]["up"]["kernel"]
    kernel = getattr(kernel, "codes", kernel)
    assert len({str(s.index) for s in kernel.addressable_shards}) > 1
  params = (galore_jax.dequantize_params(train) if method == "q_galore"
            else train)
  return jax.tree.map(np.asarray, params)


_CORPUS = []


def _corpus():
  if not _CORPUS:
    _CORPUS.append(data_lib.load(verbose=False))
  return _CORPUS[0]


_RUNS = {}


def _run(method, mesh_text, svd, bits):
  key = (method, mesh_text, svd, bits)
  if key not in _RUNS:
    _RUNS[key] = _train_llama(method, mesh_text, svd, bits)
  return _RUNS[key]


def _distance(a, b):
  return np.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in
                     zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _relative(a, b):
  return _distance(a, b) / np.sqrt(sum(float(np.sum(x ** 2))
                                       for x in jax.tree.leaves(b)))


def _initial(method):
  example = "galore" if method == "q_galore_adamw" else method
  args = main_lib.config_from_flags(["--model", "llama-tiny"])
  m = methods_lib.build(example, train_lib.build_model(args, 259), args)
  return jax.tree.map(np.asarray, galore_jax.dequantize_params(m.train)
                      if method == "q_galore" else m.train)


@pytest.mark.parametrize("method,bits", [("galore", 8),
                                         ("q_galore_adamw", 32)])
@pytest.mark.parametrize("mesh_text", ["fsdp=8", "data=2,fsdp=4"])
def test_llama_tiny_on_a_mesh_equals_one_device(method, bits, mesh_text):
  want = _run(method, None, "exact", bits)
  got = _run(method, mesh_text, "exact", bits)
  assert _relative(got, want) <= 1e-5, _relative(got, want)
  assert _relative(_initial(method), want) > 1e-2  # it trained


@pytest.mark.parametrize("method,svd,bits,sensitive", [
    ("galore", "exact", 8, False),
    ("q_galore_adamw", "exact", 32, False),
    ("q_galore_adamw", "exact", 8, True),   # 8-bit moments
    ("q_galore", "exact", 8, True),         # + INT8 weights
    ("galore", "subspace_iteration", 8, True),
])
def test_one_device_runs_differ_by_a_last_bit_of_the_gradients(
    method, svd, bits, sensitive):
  """Which runs a 1e-5 match with the single-device run can hold at all.

  A sharded step sums in another order, so its gradients differ from one
  device's in the last bits (3.5e-7 relative at llama-tiny's first step).
  On one device, changing the last bit of every gradient leaves float
  states within 1e-5 after 20 steps. It already moves 8-bit moments, INT8
  weights and subspace iteration further than that: a last-bit change
  flips a code that sat on a rounding boundary, or turns Ritz vectors of
  near-equal singular values. No sharded run can match those to 1e-5.
  """
  want = _run(method, None, svd, bits)
  nudged = _train_llama(method, None, svd, bits, nudge=True)
  assert (_relative(nudged, want) > 1e-5) == sensitive, _relative(nudged, want)


@pytest.mark.parametrize("method,svd,bits", [
    ("q_galore_adamw", "exact", 8),     # 8-bit moments
    ("q_galore", "exact", 8),           # + INT8 weights, stochastic rounding
    ("galore", "subspace_iteration", 8),
])
def test_llama_tiny_on_a_mesh_within_rounding_of_one_device(method, svd,
                                                             bits):
  """The runs that a last bit moves by more than 1e-5 on one device (the
  test above) stay within a few percent of the distance they travelled."""
  want = _run(method, None, svd, bits)
  got = _run(method, "fsdp=8", svd, bits)
  travelled = _distance(want, _initial(method))
  assert _distance(got, want) <= 0.05 * travelled, (
      _distance(got, want) / travelled)


# ---------------------------------------------------------------------------
# What a refresh gathers.


def largest_all_gather(hlo_text: str) -> int:
  """Elements of the largest all-gather result in compiled HLO text."""
  sizes = [0]
  for dims in re.findall(r"= \w+\[([\d,]*)\][^ ]* all-gather(?:-start)?\(",
                         hlo_text):
    sizes.append(int(np.prod([int(d) for d in dims.split(",") if d])))
  return max(sizes)


def _update_hlo(svd, make=galore_jax.galore_adamw):
  mesh = _mesh(1, 8)
  params = {"up": jnp.ones((64, 176)), "down": jnp.ones((176, 64))}
  shardings = jax.tree.map(
      lambda x: NamedSharding(mesh, methods_lib.fsdp_spec(x.shape, 8)), params)
  tx = make(1e-3, rank=16, svd=svd)
  st = galore_jax.state_sharding(tx, params, shardings)
  update = jax.jit(tx.update, in_shardings=(shardings, st, shardings),
                   out_shardings=(shardings, st))
  state = jax.eval_shape(tx.init, params)
  return update.lower(params, state, params).compile().as_text()


@pytest.mark.parametrize("make", [galore_jax.galore_adamw,
                                  galore_jax.q_galore_adamw])
def test_subspace_iteration_refresh_never_gathers_a_gradient(make):
  full = 64 * 176
  exact = largest_all_gather(_update_hlo("exact", make))
  assert exact >= full  # the full SVD needs the whole gradient
  for svd in ("subspace_iteration", "randomized"):
    got = largest_all_gather(_update_hlo(svd, make))
    assert got < full, (svd, got)
    assert got <= 176 * (16 + 8)  # at most an m x (rank + oversample) basis


# ---------------------------------------------------------------------------
# The example's --mesh flag.


def test_parse_mesh():
  assert methods_lib.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
  assert methods_lib.parse_mesh("fsdp=8") == {"data": 1, "fsdp": 8}
  for bad in ("tp=8", "fsdp=8,fsdp=1", "fsdp", "fsdp=0", "fsdp=two"):
    with pytest.raises(ValueError):
      methods_lib.parse_mesh(bad)


@pytest.mark.parametrize("argv,msg", [
    (["--mesh", "model=8"], "--mesh: expected axes"),
    (["--mesh", "data=3,fsdp=1", "--batch-size", "16"],
     "must be divisible by the mesh's data=3"),
    (["--coordinator", "localhost:1234"], "--coordinator needs --distributed"),
    (["--distributed", "--num-processes", "0"],
     "--num-processes must be >= 1"),
    (["--distributed", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be in [0, --num-processes)"),
    (["--distributed"], "--distributed needs a --mesh"),
])
def test_bad_mesh_flags(argv, msg, capsys):
  with pytest.raises(SystemExit) as e:
    main_lib.main(["--model", "llama-tiny", "--steps", "1"] + argv)
  assert e.value.code == 2
  assert msg in capsys.readouterr().err


def test_mesh_needs_the_device_count(tmp_path, capsys):
  code = main_lib.main(["--model", "llama-tiny", "--steps", "1", "--mesh",
                         "fsdp=4", "--out", str(tmp_path), "--no-progress"])
  assert code == 2
  assert "needs 4 devices, there are 8" in capsys.readouterr().err


def test_stacked_layers_with_accumulation_train_on_a_mesh(tmp_path):
  # The command that hung before the refresh's CPU linalg went one matrix
  # at a time: stacked kernels, the exact SVD under optax.MultiSteps.
  assert main_lib.main([
      "--model", "llama-tiny", "--method", "galore", "--svd", "exact",
      "--scan-layers", "--grad-accum", "2", "--mesh", "data=2,fsdp=4",
      "--steps", "4", "--update-proj-gap", "2", "--batch-size", "8",
      "--seq-len", "32", "--eval-every", "4", "--eval-batches", "1",
      "--out", str(tmp_path), "--no-progress"]) == 0


def _free_port():
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def _two_processes(out, args, interrupt_at=None):
  """Runs the example as 2 processes of 4 CPU devices each (gloo); with
  ``interrupt_at``, Ctrl-C reaches process 1 alone once process 0 prints
  that text. Returns both exit codes and process 0's output."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="4",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "examples.llama.train", "--distributed",
       "--coordinator", f"localhost:{port}", "--num-processes", "2",
       "--process-id", str(i), "--out", str(out)] + args,
      cwd=pathlib.Path(__file__).parents[1], env=env, text=True,
      stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
      stderr=subprocess.STDOUT if i == 0 else None)
      for i in range(2)]
  # A hang (say, processes stopping after different steps) fails the test.
  watchdog = threading.Timer(300, lambda: [p.kill() for p in procs])
  watchdog.start()
  lead = []
  try:
    for line in procs[0].stdout:
      lead.append(line)
      if interrupt_at is not None and interrupt_at in line:
        procs[1].send_signal(signal.SIGINT)
        interrupt_at = None
    codes = [p.wait() for p in procs]
  finally:
    watchdog.cancel()
  return codes, "".join(lead)


def test_two_processes_train_like_one_and_resume_together(tmp_path):
  """--distributed: 2 processes of 4 CPU devices train as one process with
  8 devices does, on the same mesh. A Ctrl-C that reaches one process only
  stops both after the same step, and --resume continues exactly."""
  args = ["--model", "llama-tiny", "--method", "galore", "--svd", "exact",
          "--mesh", "data=2,fsdp=4", "--steps", "30", "--update-proj-gap",
          "7", "--batch-size", "8", "--seq-len", "32", "--eval-every", "10",
          "--save-every", "10", "--eval-batches", "2", "--no-progress"]
  codes, log = _two_processes(tmp_path / "two", args,
                              interrupt_at="step 10:")
  assert codes == [130, 130], log
  stopped = re.search(r"saved step (\d+)", log)
  assert stopped and 10 < int(stopped.group(1)) < 30, log
  codes, log = _two_processes(tmp_path / "two", args + ["--resume"])
  assert codes == [0, 0], log
  assert f"resumed from step {stopped.group(1)}" in log
  assert main_lib.main(args + ["--out", str(tmp_path / "one")]) == 0

  def records(run):
    lines = (tmp_path / run / "galore" / "metrics.jsonl").read_text()
    return [json.loads(x) for x in lines.splitlines()]

  one, two = records("one"), records("two")
  assert [r["step"] for r in two] == [r["step"] for r in one]
  assert len(one) == 33  # 30 train losses, 3 validation losses
  np.testing.assert_allclose([r.get("loss", r.get("val_loss")) for r in two],
                             [r.get("loss", r.get("val_loss")) for r in one],
                             rtol=1e-5)


def test_two_processes_train_layerwise_like_one(tmp_path):
  """--distributed --layerwise: the micro-batches of a step are placed over
  both processes' devices and the run matches one 8-device process."""
  args = ["--model", "llama-tiny", "--method", "galore", "--layerwise",
          "--grad-accum", "2", "--mesh", "data=2,fsdp=4", "--steps", "4",
          "--update-proj-gap", "2", "--batch-size", "8", "--seq-len", "32",
          "--eval-every", "4", "--eval-batches", "1", "--no-progress"]
  codes, log = _two_processes(tmp_path / "two", args)
  assert codes == [0, 0], log
  assert main_lib.main(args + ["--out", str(tmp_path / "one")]) == 0

  def losses(run):
    lines = (tmp_path / run / "galore" / "metrics.jsonl").read_text()
    return [r.get("loss", r.get("val_loss"))
            for r in map(json.loads, lines.splitlines())]

  assert len(losses("one")) == 5  # 4 train losses, 1 validation loss
  np.testing.assert_allclose(losses("two"), losses("one"), rtol=1e-5)


def test_fsdp_spec_splits_the_largest_divisible_axis():
  assert methods_lib.fsdp_spec((64, 176), 8) == P(None, "fsdp")
  assert methods_lib.fsdp_spec((2, 64, 176), 8) == P(None, None, "fsdp")
  assert methods_lib.fsdp_spec((259, 64), 8) == P(None, "fsdp")
  assert methods_lib.fsdp_spec((7,), 8) == P()
  assert methods_lib.fsdp_spec((64, 176), 1) == P()


# Official names on the torch layout (out, in): "right" is the row side of
# the (in, out) kernel, "left" its column side.
@pytest.mark.parametrize("proj_type,side", [("right", "row"), ("left", "col")])
def test_square_kernel_float_moments_follow_the_declared_side(proj_type, side):
  """A square kernel's (r, n) and (n, r) moments have the same axis lengths
  apart from the rank: the projector's side, declared by its state type,
  says which param axis the moment keeps."""
  mesh = _mesh(1, 8)
  params = {"w": jnp.ones((32, 32))}
  shardings = {"w": NamedSharding(mesh, P("fsdp"))}  # split `in`
  for tx in (galore_jax.galore_adamw(1e-3, rank=RANK, proj_type=proj_type),
             galore_jax.q_galore_adamw(1e-3, rank=RANK, proj_type=proj_type,
                                       state_bits=32, proj_group_size=32)):
    specs = _specs(galore_jax.state_sharding(tx, params, shardings))
    # row: (r, out) borrows `in`'s devices; col: (in, r) keeps them.
    want = (None, "fsdp") if side == "row" else ("fsdp", None)
    assert specs["[0].base_state.mu['w']"] == want, (tx, specs)


def test_a_state_for_a_transposed_kernel_is_refused():
  tx = galore_jax.q_galore_adamw(1e-3, rank=RANK, proj_group_size=32,
                                 min_8bit_size=1)
  state = tx.init({"w": jnp.ones((64, 32))})  # projected on its columns
  with pytest.raises(ValueError, match="transposed"):
    tx.update({"w": jnp.ones((32, 64))}, state, {"w": jnp.ones((32, 64))})


def test_state_types_declare_their_layout():
  """GaLore's, Q-GaLore's and 8-bit Adam's states say where their arrays
  lie (galore_jax.layout); state_sharding reads it, not the shapes."""
  from galore_jax import layout
  params = {"w": jnp.ones((64, 32))}
  for tx in (galore_jax.galore_adamw_8bit(1e-3, rank=RANK, min_8bit_size=1),
             galore_jax.q_galore_adamw(1e-3, rank=RANK, proj_group_size=32,
                                       min_8bit_size=1)):
    state = jax.eval_shape(tx.init, params)[0]
    assert layout.declares(state) and layout.declares(state.base_state)
    views = {(jax.tree_util.DictKey("w"),):
             layout.own_view((64, 32), param="w")}
    got = state.layout(views, lambda sub, v: sub.layout(v, None))
    codes = got.base_state.mu["w"]
    # The (64, r) moment of the column-projected w: 8-bit blocks of a view
    # whose rows follow w's axis 0 (then 1) and whose rank is its own; the
    # shape record (64,) follows the rows.
    assert all(isinstance(b, layout.Blocks) and b.of.axes == ((0, 1), ())
               and b.of.param == "w" for b in (codes.codes, codes.absmax))
    assert codes.rows == layout.View((64,), ((0, 1),), "w")
