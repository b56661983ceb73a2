"""How an optimizer state's arrays lie along its params' axes.

A transform whose state is not param-shaped declares where each state array
axis lies, so that :func:`galore_jax.state_sharding` can shard the state
like the params without guessing from shapes. The vocabulary:

* :class:`View`: an array, and for each of its axes the param axes it
  follows, in order of preference (an empty tuple: an axis of its own, such
  as a rank axis, never split). A param's own view follows axis ``i`` with
  axis ``i``; GaLore's ``(r, out)`` moment of an ``(in, out)`` kernel is
  ``View((r, out), ((), (1, 0)))``: its second axis follows ``out``, or
  borrows the devices that split ``in`` when ``out`` is not split.
* :class:`Blocks`: one part (``"codes"`` or ``"absmax"``) of the blockwise
  8-bit codes of an array laid out as a view, flattened row-major into
  blocks.

A state type declares its layout with a method ``layout(self, views,
recurse)``: ``views`` maps each param path (a tuple of keys) to the
:class:`View` of the param (or of what the transform was given in its
place, e.g. GaLore's low-rank gradients for its base optimizer); it returns
a tree like ``self`` whose leaves are :class:`View` or :class:`Blocks`, and
calls ``recurse(substate, views)`` for a sub-state laid out along other
views. Arrays of states that declare nothing (optax's own) follow the
optax convention: a state array at a param's path with the param's shape is
laid out as the param; any other is replicated.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import numpy as np

KeyPath = tuple


class View(NamedTuple):
  """An array's shape and, per axis, the param axes it may follow.

  Attributes:
    shape: the array's shape.
    axes: one tuple of param axes per array axis, preferred first; ``()``:
      the axis follows none.
    param: what the view belongs to, set by the code that builds the first
      views (opaque here: derived views keep it).
  """

  shape: tuple[int, ...]
  axes: tuple[tuple[int, ...], ...]
  param: Any = None

  def derive(self, shape: tuple[int, ...],
             axes: tuple[tuple[int, ...], ...]) -> "View":
    """Another array laid out along the same param."""
    return View(tuple(shape), tuple(map(tuple, axes)), self.param)


class Blocks(NamedTuple):
  """One part of the blockwise codes of an array laid out as ``of``.

  Attributes:
    of: the view of the array before it was flattened into blocks.
    codes_shape: ``(blocks, block_size)``.
    part: ``"codes"`` (``(blocks, block_size)``) or ``"absmax"``
      (``(blocks,)``).
  """

  of: View
  codes_shape: tuple[int, int]
  part: str


def is_layout(x: Any) -> bool:
  return isinstance(x, (View, Blocks))


def own_view(shape: tuple[int, ...], param: Any = None) -> View:
  """The view of a param itself: axis ``i`` follows axis ``i``."""
  return View(tuple(shape), tuple((i,) for i in range(len(shape))), param)


def replicated(shape: tuple[int, ...]) -> View:
  """An array that follows no param axis (counts, keys, hyperparameters)."""
  return View(tuple(shape), ((),) * len(shape), None)


def replicated_tree(tree: Any) -> Any:
  """:func:`replicated` for every array of ``tree``, its containers kept."""
  return jax.tree.map(lambda x: replicated(np.shape(x)), tree)


def declares(node: Any) -> bool:
  """Whether ``node``'s type declares its layout (a ``layout`` method)."""
  return callable(getattr(type(node), "layout", None)) and isinstance(
      node, tuple)


def normalize_path(path: KeyPath) -> KeyPath:
  """Drops a trailing ``.value`` key (a Flax NNX ``Variable`` node).

  ``nnx.Optimizer`` hands ``init`` a tree of ``Param`` nodes but ``update``
  the plain arrays, and keeps its state in ``OptVariable`` nodes; without
  this, paths would differ between them.
  """
  path = tuple(path)
  while path and isinstance(path[-1], jax.tree_util.GetAttrKey) and (
      path[-1].name == "value"):
    path = path[:-1]
  return path


def by_path(tree: Any, fn: Callable[[KeyPath, Any], Any],
            is_leaf: Callable[[Any], bool]) -> Any:
  """``jax.tree_util.tree_map_with_path`` with normalized paths
  (:func:`normalize_path`), so a state's per-param paths match the params'."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: fn(normalize_path(path), x), tree, is_leaf=is_leaf)


def low_rank(view: View, row: bool, col: bool,
             rank: int | None = None) -> View:
  """The view of a projected matrix (GaLore's low-rank gradient and moments).

  ``row``: ``batch + (r, cols)``, its last axis following ``cols`` (or
  borrowing the devices that split ``rows``); ``col``: ``batch + (rows,
  r)``; both: ``batch + (r, r)``, an axis of its own. ``rank=None`` leaves
  the rank's length unknown (``None`` in ``shape``): a state array matches
  the view whatever its length there.
  """
  *batch, rows, cols = view.shape
  *batch_axes, row_axes, col_axes = view.axes
  if row and col:
    shape, axes = (rank, rank), ((), ())
  elif row:
    shape, axes = (rank, cols), ((), col_axes + row_axes)
  else:
    shape, axes = (rows, rank), (row_axes + col_axes, ())
  return view.derive(tuple(batch) + shape, tuple(batch_axes) + axes)


def projector(view: View, side: str, shape: tuple[int, ...]) -> View:
  """The view of a GaLore projector of ``view``'s matrix: ``row`` ``batch +
  (r, rows)`` follows ``rows``, ``col`` ``batch + (cols, r)`` follows
  ``cols``, each borrowing the other matrix axis's devices when unsplit."""
  *batch_axes, row_axes, col_axes = view.axes
  axes = (((), row_axes + col_axes) if side == "row"
          else (col_axes + row_axes, ()))
  return view.derive(shape, tuple(batch_axes) + axes)


def per_layer(view: View, shape: tuple[int, ...]) -> View:
  """A per-layer array of a stacked leaf (its ``batch`` leading axes are
  the layers'): the batch axes follow the param's, the rest are its own."""
  nb = len(view.shape) - 2
  return view.derive(shape, view.axes[:nb] + ((),) * (len(shape) - nb))


def matches(view: View, shape: tuple[int, ...]) -> bool:
  """Whether an array of ``shape`` is laid out as ``view`` (``None`` in the
  view's shape matches any length)."""
  return len(shape) == len(view.shape) and all(
      v is None or v == s for v, s in zip(view.shape, shape))
