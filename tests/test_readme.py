"""The quickstarts run and train: the README's GaLore and Q-GaLore blocks,
the first blocks of docs/lora.md and docs/layerwise.md."""

import jax

import galore_jax
from tests.test_docs import DOCS
from tests.test_docs import README
from tests.test_docs import run_block


def test_quickstart_runs_and_decreases_the_loss():
  scope = run_block(README, 0)
  params, opt_state = scope["params"], scope["opt_state"]
  state = opt_state[0]
  assert isinstance(state, galore_jax.GaLoreState)
  # torch layout (512, 784): m < n, so std keeps the official left projector.
  assert state.projector["w1"].col.shape == (512, 128)
  first = float(scope["loss_fn"](scope["params"], scope["x"], scope["y"]))
  for _ in range(5):
    params, opt_state, loss = scope["train_step"](params, opt_state,
                                                  scope["x"], scope["y"])
  assert float(loss) < first


def test_q_galore_quickstart_runs_and_decreases_the_loss():
  scope = run_block(README, 1)
  qparams, opt_state = scope["qparams"], scope["opt_state"]
  assert isinstance(qparams["w1"], galore_jax.QuantizedArray)
  assert isinstance(opt_state[0], galore_jax.QGaLoreState)
  assert opt_state[0].projector["w1"].codes.shape == (512 * 64 // 2,)  # int4
  first = float(scope["loss_fn"](galore_jax.dequantize_params(qparams),
                                 scope["x"], scope["y"]))
  for t in range(5):
    qparams, opt_state, loss = scope["train_step"](
        qparams, opt_state, scope["x"], scope["y"],
        jax.random.key(10 + t))
  assert float(loss) < first


def test_lora_quickstart_trains_and_merges():
  from flax import nnx
  scope = run_block(DOCS / "lora.md", 0)
  model = scope["model"]
  assert all(type(layer) is nnx.Linear for layer in model.layers
             if isinstance(layer, nnx.Module))
  assert type(model.layers[0].kernel) is nnx.Param
  assert bool(jax.numpy.isfinite(scope["loss"]))


def test_layerwise_quickstart_trains_with_per_layer_state():
  scope = run_block(DOCS / "layerwise.md", 0)
  state = scope["state"]
  assert isinstance(state, galore_jax.LayerwiseState)
  assert int(state.count) == 3
  # One GaLore state per layer: (L, r, in) projectors of the (256, 512) w.
  assert state.blocks[0].projector["w"].row.shape == (4, 64, 256)
  lw, batch, step = scope["lw"], scope["batch"], scope["step"]
  outer, blocks = scope["outer"], scope["blocks"]
  before = float(lw.loss(outer, blocks, batch))
  for _ in range(5):
    outer, blocks, state, _ = step(outer, blocks, state, batch)
  assert float(lw.loss(outer, blocks, batch)) < before
