"""Argument checks shared by the transforms: clear errors at construction,
and at update for a state that does not fit the updates.

Values that ``optax.inject_hyperparams`` may turn into traced arrays are checked
only when they are concrete; a tracer is accepted as it is.
"""

from __future__ import annotations

import collections
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


def state_for_other_params(what: str, detail: str) -> ValueError:
  """The error for a state that does not fit the updates it is given."""
  return ValueError(f"{what}: {detail}: was the state initialised for other"
                    " params (a transposed kernel?) or settings?")


def like_updates(what: str, updates: Any, *moments: Any) -> None:
  """Each tree in ``moments`` (mirroring ``updates``) holds arrays of the
  updates' shapes: a state initialised for other params is refused."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
  for tree in moments:
    for (path, u), m in zip(flat, treedef.flatten_up_to(tree)):
      if np.shape(m) != np.shape(u):
        raise state_for_other_params(
            what, f"the state of parameter {jax.tree_util.keystr(path)} has"
            f" shape {np.shape(m)}, its update {np.shape(u)}")


def shaped_like(what: str, state: Any, expected: Any) -> None:
  """``state``'s arrays have the shapes of ``expected`` (the state ``init``
  makes for the update's shapes), or a clear ``ValueError``.

  Trees of one structure are compared array by array. A state whose records
  a container library rebuilt (Flax NNX hands a NamedTuple back as a mapping
  sorted by field name) is compared as a multiset of shapes, so the
  reordering is not mistaken for a state of other params.
  """
  shape = lambda x: tuple(np.shape(x))
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  if jax.tree.structure(state) == jax.tree.structure(expected):
    for (path, x), y in zip(flat, jax.tree.leaves(expected)):
      if shape(x) != shape(y):
        raise state_for_other_params(
            what, f"its array {jax.tree_util.keystr(path)} has shape"
            f" {shape(x)}, where updates of these shapes need {shape(y)}")
    return
  got = collections.Counter(shape(x) for _, x in flat)
  want = collections.Counter(map(shape, jax.tree.leaves(expected)))
  if got != want:
    extra = [f"{jax.tree_util.keystr(path)} {shape(x)}" for path, x in flat
             if shape(x) in got - want]
    missing = sorted((want - got).elements())
    raise state_for_other_params(
        what, f"it holds arrays {', '.join(extra)} where updates of these"
        f" shapes need arrays of shapes {missing}")
