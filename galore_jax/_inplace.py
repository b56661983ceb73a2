"""Updating slices of large buffers in place inside XLA loops.

A loop that reads a slice of a carried buffer, computes its new value and
writes it back with ``dynamic_update_slice`` should update the buffer in
place. XLA's fusion may instead recompute the new value inside the fusion
that writes another buffer, reading a buffer after it was overwritten; then
it copies whole buffers at every iteration. Computing the new slices inside
a ``lax.cond`` branch prevents that: a branch is never fused with what is
outside it (``optimization_barrier`` does not stop fusion on CPU).
:func:`update_chunks` is that loop over the chunks of flat buffers.

A loop that reads slices of a loop-invariant stacked array (``lax.map``,
``lax.scan`` over ``xs``) meets another hazard on XLA:CPU, which computes
bf16 matmuls and many bf16 elementwise ops in float32: it converts the
*whole* stack to float32 before the loop (its bf16 normalization turns the
slice of a bf16 array into a slice of its float32 copy, and loop-invariant
code motion hoists that copy). :func:`map_slices` carries the stack through
the loop instead, so one slice is converted at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

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


def map_slices(fn: Callable[..., Any], *xs: Any, out: Any = None) -> Any:
  """``lax.map(lambda a: fn(*a), xs)``, each slice converted only in its turn.

  The trees ``xs`` share their leading axis; ``fn`` takes one slice of each
  and returns a tree of arrays, stacked along a new leading axis. The inputs
  ride in the ``fori_loop``'s carry through an ``optimization_barrier``, so
  no copy or conversion of a whole input is hoisted out of the loop, and the
  outputs are written in place, slice by slice: into ``out`` if given (a
  tree of the outputs' stacked shapes and dtypes, such as the gradient an
  update replaces: XLA reuses its buffers when nothing else reads them, and
  copies them otherwise), else into new buffers.

  Examples:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _inplace
    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> _inplace.map_slices(lambda r: r.sum(), x).tolist()
    [1.0, 5.0, 9.0]
  """
  n = jax.tree.leaves(xs)[0].shape[0]
  if out is None and n == 0:
    return jax.tree.map(lambda o: jnp.zeros((0,) + o.shape, o.dtype),
                        jax.eval_shape(fn, *jax.tree.map(
                            lambda x: jnp.zeros(x.shape[1:], x.dtype), xs)))
  if out is None:
    first = jax.tree.map(lambda x: x[0], xs)
    out = jax.tree.map(lambda o: jnp.zeros((n,) + o.shape, o.dtype),
                       jax.eval_shape(fn, *first))

  def body(i, carry):
    xs, out = carry
    xs = jax.lax.optimization_barrier(xs)
    new = fn(*jax.tree.map(
        lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False), xs))
    out = jax.tree.map(
        lambda o, v: jax.lax.dynamic_update_index_in_dim(o, v, i, 0), out, new)
    return xs, out

  return jax.lax.fori_loop(0, n, body, (xs, out))[1]


def update_chunks(
    fn: Callable[..., Sequence[jax.Array]],
    arrays: Sequence[jax.Array],
    spans: int | Sequence[int],
    *,
    key: Optional[jax.Array] = None,
) -> tuple[jax.Array, ...]:
  """Applies ``fn`` chunk by chunk along axis 0, writing back in place.

  Chunk ``c`` of ``arrays[i]`` is its rows ``[c * spans[i], (c + 1) *
  spans[i])``. ``fn`` takes chunk ``c`` of every array (then a PRNG key, if
  ``key`` is given) and returns the new chunk ``c`` of the first
  ``len(result)`` arrays, same shapes and dtypes; the other arrays are only
  read. The full chunks (as many as every array holds) run in a
  ``fori_loop`` whose body is :func:`unfused`, so each result overwrites its
  chunk in place and the temporaries are one chunk's; the rows left over (in
  any array) go through one more, shorter call. When an array is shorter
  than one chunk, ``fn`` is called once on the whole arrays. Arrays of
  exactly one chunk go through a loop of one iteration (with ``fold_in(key,
  0)``): a caller that wants a plain call there checks for it first.

  Args:
    fn: ``fn(*chunks[, key]) -> new chunks`` of the leading arrays.
    arrays: the arrays, updated ones first.
    spans: rows of each array per chunk (one int: the same for all).
    key: optional PRNG key: chunk ``c`` gets ``fold_in(key, c)``, the rows
      left over ``fold_in(key, full)`` (``full`` the number of full chunks),
      the single call on whole arrays ``key`` itself.

  Returns:
    The updated arrays, a tuple of ``len(result)`` arrays.

  Examples:
    >>> import jax.numpy as jnp
    >>> from galore_jax import _inplace
    >>> double, = _inplace.update_chunks(lambda a: (2 * a,), [jnp.arange(5)], 2)
    >>> double.tolist()  # chunks [0, 1], [2, 3] in a loop, then [4]
    [0, 2, 4, 6, 8]
  """
  arrays = tuple(arrays)
  if isinstance(spans, int):
    spans = (spans,) * len(arrays)
  spans = tuple(spans)
  full = min(a.shape[0] // s for a, s in zip(arrays, spans))
  if full == 0:
    return tuple(fn(*arrays) if key is None else fn(*arrays, key))

  def chunk_fn(c, *chunks):
    if key is None:
      return tuple(fn(*chunks))
    return tuple(fn(*chunks, jax.random.fold_in(key, c)))

  def compute(c, *arrays):
    return chunk_fn(c, *(jax.lax.dynamic_slice_in_dim(a, c * s, s)
                         for a, s in zip(arrays, spans)))

  written = len(jax.eval_shape(compute, 0, *arrays))
  read = arrays[written:]

  def body(c, carry):
    new = unfused(c >= 0, compute, c, *carry, *read)
    return tuple(jax.lax.dynamic_update_slice_in_dim(a, x, c * s, 0)
                 for a, x, s in zip(carry, new, spans))

  carry = jax.lax.fori_loop(0, full, body, arrays[:written])
  starts = [full * s for s in spans]
  if any(a.shape[0] > start for a, start in zip(arrays, starts)):
    new = chunk_fn(full, *(a[start:] for a, start
                           in zip(carry + read, starts)))
    carry = tuple(a.at[start:].set(x)
                  for a, x, start in zip(carry, new, starts))
  return carry
