"""Updating slices of large buffers in place inside XLA loops.

A loop that reads a slice of a carried buffer, computes its new value and
writes it back with ``dynamic_update_slice`` should update the buffer in
place. XLA's fusion may instead recompute the new value inside the fusion
that writes another buffer, reading a buffer after it was overwritten; then
it copies whole buffers at every iteration. Computing the new slices inside
a ``lax.cond`` branch prevents that: a branch is never fused with what is
outside it (``optimization_barrier`` does not stop fusion on CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def unfused(pred: jax.Array, fn: Callable[..., Any], *args: Any) -> Any:
  """``fn(*args)`` as a computation of its own.

  Args:
    pred: a boolean scalar that is true but not a compile-time constant
      (e.g. ``i >= 0`` for a loop index ``i``), so XLA keeps the branch.
    fn: the computation; it may slice the (stacked) arrays in ``args``
      itself, which then are read in place rather than copied in.
    *args: its operands.

  Returns:
    ``fn(*args)``.
  """
  out = jax.eval_shape(fn, *args)
  zeros = lambda *_: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), out)
  return jax.lax.cond(pred, fn, zeros, *args)
