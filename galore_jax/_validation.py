"""Argument checks shared by the transforms: clear errors at construction.

Values that ``optax.inject_hyperparams`` may turn into traced arrays are checked
only when they are concrete; a tracer is accepted as it is.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import numpy as np


def is_tracer(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def static(name: str, value: Any, what: str) -> None:
  """Raises a clear error if a shape-setting argument is an array/tracer."""
  if is_tracer(value) or isinstance(value, jax.Array):
    raise TypeError(
        f"`{name}` must be {what}, got {value!r}. It sets shapes, so it is"
        " static: with optax.inject_hyperparams pass"
        f" static_args=('{name}', ...)."
    )


def boolean(name: str, value: Any) -> bool:
  """Returns ``value`` if it is a Python bool (a static switch)."""
  if not isinstance(value, bool):
    raise TypeError(f"`{name}` must be a bool, got {value!r}")
  return value


def positive_int(name: str, value: Any) -> int:
  """Returns ``value`` if it is a positive Python/NumPy int (not a bool)."""
  static(name, value, "a positive int")
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, numbers.Integral
  ) or value < 1:
    raise ValueError(f"`{name}` must be a positive int, got {value!r}")
  return int(value)


def concrete_number(name: str, value: Any, *, low=None, high=None,
                    low_open=False, high_open=False, integer=False) -> None:
  """Checks a (possibly array-valued, possibly traced) scalar hyperparameter."""
  if is_tracer(value) or callable(value):
    return
  arr = np.asarray(value)
  if arr.shape != () or arr.dtype.kind not in "biuf" or arr.dtype == bool:
    raise TypeError(f"`{name}` must be a real number, got {value!r}")
  x = arr.item()
  if integer and arr.dtype.kind == "f" and x != int(x):
    raise ValueError(f"`{name}` must be an integer, got {value!r}")
  bad_low = low is not None and (x <= low if low_open else x < low)
  bad_high = high is not None and (x >= high if high_open else x > high)
  if bad_low or bad_high or not np.isfinite(x):
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    interval = (("(" if low_open else "[") + f"{lo}, {hi}"
                + (")" if high_open else "]"))
    raise ValueError(f"`{name}` must be in {interval}, got {value!r}")


def floating(path: str, dtype: Any) -> None:
  """Raises the transforms' TypeError for a non-float (e.g. complex) leaf."""
  if not jax.numpy.issubdtype(dtype, jax.numpy.floating):
    raise TypeError(
        "galore_jax transforms need floating-point params; parameter"
        f" {path} has dtype {np.dtype(dtype)}")


def floating_tree(tree: Any) -> None:
  """:func:`floating` for every leaf of ``tree``."""
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    floating(jax.tree_util.keystr(path), x.dtype)


def learning_rate(value: Any) -> None:
  """A concrete learning rate must be finite and >= 0 (a negative one
  climbs the loss); schedules and traced values pass."""
  concrete_number("learning_rate", value, low=0)


def adam(b1: Any, b2: Any, eps: Any) -> None:
  """Adam's decays in [0, 1) (1 divides by a zero bias correction) and a
  non-negative ``eps``."""
  concrete_number("b1", b1, low=0, high=1, high_open=True)
  concrete_number("b2", b2, low=0, high=1, high_open=True)
  concrete_number("eps", eps, low=0)
