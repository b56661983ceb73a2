"""The README's quickstart runs and trains."""

import pathlib
import re

import galore_jax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_and_decreases_the_loss():
  code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
  scope = {}
  exec(compile(code, str(README), "exec"), scope)  # pylint: disable=exec-used
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
