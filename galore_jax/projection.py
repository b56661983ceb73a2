"""Low-rank gradient projection: which leaves, which axes, which side, the SVD.

A projected leaf is viewed as a stack of matrices ``G`` of shape
``batch + (rows, cols)``: ``rows`` are the reduction (input) axes and ``cols``
the output axes, so a Flax ``(in, out)`` kernel is ``rows=in, cols=out``. The
official GaLore works on the torch layout ``Gᵀ`` (out, in); every side rule
below is stated in that layout, so a Flax model projects onto exactly the
subspace the official code would pick for the same layer, square attention
kernels included.

Two projectors, stored as the official code stores them (this is also the
row-major layout Q-GaLore's group quantisation runs over):

* ``row``, shape ``batch + (r, rows)``: the official *right* projector
  ``Q = Vh[:r]`` of the torch matrix. ``R = row @ G`` is ``(r, cols)`` and
  ``G ≈ rowᵀ @ R``.
* ``col``, shape ``batch + (cols, r)``: the official *left* projector
  ``P = U[:, :r]`` of the torch matrix. ``R = G @ col`` is ``(rows, r)`` and
  ``G ≈ R @ colᵀ``.

``proj_type`` picks them with ``M = cols`` (out) and ``N = rows`` (in):

=============  ============  ===========
proj_type      M >= N        M < N
=============  ============  ===========
std            row           col
reverse_std    col           row
right          row           row
left           col           col
full           row and col   row and col
=============  ============  ===========

``std`` projects the smaller dimension (moments ``r x max(M, N)``).
``optax.contrib.galore`` projects the larger one: it equals ``reverse_std``
on non-square matrices (and ``std`` on square ones).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from galore_jax import _inplace
from galore_jax import _pytrees
from galore_jax import _validation
from galore_jax.layout import normalize_path

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")

KeyPath = tuple[Any, ...]
Axes = Union[int, Sequence[int]]


@dataclasses.dataclass(frozen=True)
class DimensionNumbers:
  """Which axes of a leaf form the matrix, and which are batch axes.

  Attributes:
    reduction_axis: axis or axes of the input (row) dimension.
    output_axis: axis or axes of the output (column) dimension.
    batch_axis: axes that index independent matrices, each with its own
      projector (stacked scan layers). ``None``: every axis not named above.

  The default, ``DimensionNumbers()``, reads the last two axes as
  ``(in, out)`` and any leading axes as batch axes, so a stacked
  ``(L, in, out)`` kernel gets L projectors. ``optax.contrib``'s
  ``GaLoreDimensionNumbers`` is accepted wherever this class is.
  """

  reduction_axis: Axes = -2
  output_axis: Axes = -1
  batch_axis: Axes | None = None


def _is_dim_numbers(x: Any) -> bool:
  return isinstance(x, DimensionNumbers) or (
      hasattr(x, "reduction_axis") and hasattr(x, "output_axis")
  )


class Projectors(NamedTuple):
  """The projectors of one leaf; an unused side is an ``optax.MaskedNode``."""

  row: Any
  col: Any


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  """Static description of how one leaf is projected (hashable)."""

  shape: tuple[int, ...]
  perm: tuple[int, ...]  # to batch + reduction + output axes
  batch_shape: tuple[int, ...]
  reduction_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  rank: int
  use_row: bool
  use_col: bool

  @property
  def rows(self) -> int:
    return math.prod(self.reduction_shape)

  @property
  def cols(self) -> int:
    return math.prod(self.output_shape)

  @property
  def low_rank_shape(self) -> tuple[int, ...]:
    rows = self.rank if self.use_row else self.rows
    cols = self.rank if self.use_col else self.cols
    return self.batch_shape + (rows, cols)

  @property
  def projector_shapes(self) -> Projectors:
    r = self.rank
    return Projectors(
        row=self.batch_shape + (r, self.rows) if self.use_row else None,
        col=self.batch_shape + (self.cols, r) if self.use_col else None,
    )


# ---------------------------------------------------------------------------
# Matrix view of a leaf.


def to_matrix(x: jax.Array, spec: LeafSpec) -> jax.Array:
  """``x`` as ``batch + (rows, cols)``; a no-op reshape for default axes."""
  if spec.perm != tuple(range(len(spec.perm))):
    x = jnp.transpose(x, spec.perm)
  return x.reshape(spec.batch_shape + (spec.rows, spec.cols))


def from_matrix(x: jax.Array, spec: LeafSpec) -> jax.Array:
  """Inverse of :func:`to_matrix`."""
  x = x.reshape(spec.batch_shape + spec.reduction_shape + spec.output_shape)
  if spec.perm != tuple(range(len(spec.perm))):
    x = jnp.transpose(x, np.argsort(spec.perm))
  return x


# ---------------------------------------------------------------------------
# Projection arithmetic.


def _t(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _per_matrix(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn``, a LAPACK-backed linear-algebra call, one matrix at a time on CPU.

  jaxlib's CPU kernels split a batch of matrices over XLA's intra-op thread
  pool and block until every piece is done. With several CPU devices each
  device's program may itself be running on a pool thread; once every thread
  waits that way, the pieces queued behind them never run and the step hangs
  (8 host devices, a stacked leaf, the refresh under ``optax.MultiSteps``).
  A single matrix runs inline, so on CPU the batch is a ``lax.map`` loop
  (no slower in total on one device: ``benchmarks/cpu_linalg.py``); other
  platforms keep the batched call. All arguments share the batch axes (all
  but the last two).
  """

  def call(*xs):
    if math.prod(xs[0].shape[:-2]) <= 1:
      return fn(*xs)
    return jax.lax.platform_dependent(*xs, cpu=functools.partial(
        map_matrices, fn), default=fn)

  return call


def map_matrices(fn: Callable[..., Any], *xs: Any, out: Any = None) -> Any:
  """``fn`` on each matrix of ``xs`` in turn, its outputs stacked back.

  Every array leaf of the trees ``xs`` shares the batch axes (all but the
  last two); ``fn`` takes one matrix of each. The loop is
  :func:`galore_jax._inplace.map_slices`: one matrix is sliced (and, on
  XLA:CPU, converted to float32) at a time, never the whole stack; the
  results are written into ``out`` if given (see there).
  """
  batch = jax.tree.leaves(xs)[0].shape[:-2]
  flat = lambda t: jax.tree.map(
      lambda x: x.reshape((-1,) + x.shape[len(batch):]), t)
  out = _inplace.map_slices(fn, *flat(xs),
                            out=None if out is None else flat(out))
  return jax.tree.map(lambda o: o.reshape(batch + o.shape[1:]), out)


_svd = _per_matrix(lambda a: jnp.linalg.svd(a, full_matrices=False))
_eigh = _per_matrix(jnp.linalg.eigh)
_qr = _per_matrix(jnp.linalg.qr)
_cholesky = _per_matrix(jnp.linalg.cholesky)
_solve_lower = _per_matrix(
    lambda low, b: jax.scipy.linalg.solve_triangular(low, b, lower=True))


def _one_matrix_at_a_time_on_cpu(fn: Callable[..., jax.Array], out=None):
  """``fn(x, proj)`` of matrix views; a stack of them one matrix at a time
  on CPU (:func:`map_matrices`, writing into ``out`` if given) when an
  operand or ``out`` is bf16 (or another sub-32-bit float), where a batched
  matmul would convert whole stacks to float32; one batched call
  otherwise."""

  def call(x, proj):
    narrow = any(jnp.dtype(a.dtype).itemsize < 4
                 for a in jax.tree.leaves((x, proj, out)))
    if math.prod(x.shape[:-2]) <= 1 or not narrow:
      return fn(x, proj)
    cpu = lambda x, proj: map_matrices(fn, x, proj, out=out)
    return jax.lax.platform_dependent(x, proj, cpu=cpu, default=fn)

  return call


def project(g: jax.Array, proj: Projectors, spec: LeafSpec) -> jax.Array:
  """Low-rank coordinates of the matrix view ``g`` (see module docstring)."""

  def one(g, proj):
    if spec.use_row:
      g = jnp.matmul(proj.row, g)
    if spec.use_col:
      g = jnp.matmul(g, proj.col)
    return g

  return _one_matrix_at_a_time_on_cpu(one)(g, proj)


def project_back(r: jax.Array, proj: Projectors, spec: LeafSpec, *,
                 scale: Any = 1, dtype: Any = None,
                 out: Any = None) -> jax.Array:
  """Full-space matrix of the low-rank ``r``: ``rowᵀ r`` / ``r colᵀ``, times
  ``scale``, cast to ``dtype`` (default: the product's) matrix by matrix.

  ``out``: a buffer of the result's shape and dtype (the gradient the
  update replaces) that a stack of matrices is written into on CPU; XLA
  reuses it when nothing else reads it, and copies it otherwise.
  """

  def one(r, proj):
    if spec.use_row:
      r = jnp.matmul(_t(proj.row), r)
    if spec.use_col:
      r = jnp.matmul(r, _t(proj.col))
    return (r * scale).astype(dtype or r.dtype)

  return _one_matrix_at_a_time_on_cpu(one, out)(r, proj)


def canonical_signs(v: jax.Array) -> jax.Array:
  """Flips each vector (last axis) so its largest-magnitude entry is > 0.

  Singular vectors are defined up to sign, and LAPACK, cuSOLVER and torch
  pick different ones. Fixing the sign makes the subspace coordinates, and so
  the optimizer moments carried across refreshes, the same on every backend.
  """
  idx = jnp.argmax(jnp.abs(v), axis=-1, keepdims=True)
  sign = jnp.sign(jnp.take_along_axis(v, idx, axis=-1))
  return v * jnp.where(sign == 0, 1, sign).astype(v.dtype)


def _top_singular_vectors(g: jax.Array, spec: LeafSpec, dtype) -> Projectors:
  """:func:`svd_projectors` of one matrix ``g``."""
  u, _, vh = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
  r = spec.rank
  row = col = optax.MaskedNode()
  if spec.use_row:
    row = canonical_signs(_t(u[:, :r])).astype(dtype)
  if spec.use_col:
    col = _t(canonical_signs(vh[:r, :])).astype(dtype)
  return Projectors(row=row, col=col)


def svd_projectors(g: jax.Array, spec: LeafSpec, dtype) -> Projectors:
  """Top-``rank`` singular vectors of the matrix view ``g``, float32 SVD.

  ``row`` holds the leading left singular vectors of ``g`` as rows (``U[:, :r]ᵀ``),
  ``col`` the leading right singular vectors as columns (``Vh[:r]ᵀ``), both
  sign-canonical and cast to ``dtype``. A stacked ``g`` (leading batch axes)
  is decomposed one matrix at a time, each matrix's factors cut to the rank
  before the next: the full ``U`` and ``Vh`` of one matrix are the most
  ever held, never those of every layer (nor a float32 copy of the whole
  stacked gradient).
  """
  if not g.shape[:-2]:
    return _top_singular_vectors(g, spec, dtype)
  return map_matrices(lambda a: _top_singular_vectors(a, spec, dtype), g)


SVD_METHODS = ("exact", "randomized", "subspace_iteration")
# Power iterations by default: each reaches >= 0.99x the exact SVD's captured
# gradient energy on the LLaMA example's gradients (tests/test_refresh.py).
DEFAULT_POWER_ITERS = {"exact": 0, "randomized": 1, "subspace_iteration": 2}


def check_svd(svd: Any, power_iters: Any, oversample: Any) -> str:
  """Validates the refresh method and its static settings."""
  if svd not in SVD_METHODS:
    raise ValueError(f"`svd` must be one of {', '.join(map(repr, SVD_METHODS))}"
                     f", got {svd!r}")
  if svd == "exact":
    return svd  # the other settings are unused
  # Both use the range finder (subspace iteration for its first refresh).
  _validation.static("power_iters", power_iters, "an int")
  _validation.static("oversample", oversample, "an int")
  if not isinstance(oversample, int) or isinstance(oversample, bool) or (
      oversample < 0):
    raise ValueError(f"`oversample` must be an int >= 0, got {oversample!r}")
  if not isinstance(power_iters, int) or isinstance(power_iters, bool) or (
      power_iters < (1 if svd == "subspace_iteration" else 0)):
    low = 1 if svd == "subspace_iteration" else 0
    raise ValueError(f"`power_iters` must be an int >= {low} for svd={svd!r},"
                     f" got {power_iters!r}")
  return svd


# The shift of shifted Cholesky-QR (Fukaya et al. 2020), relative to
# trace(yᵀy): large enough that the float32 Cholesky factorization of any
# nonzero y's Gram matrix is defined.
_SHIFT = 1e-4


def _condition(y: jax.Array) -> jax.Array:
  """A well-conditioned basis of the span of the float32 ``m x k`` ``y``.

  One shifted Cholesky-QR pass, ``y L⁻ᵀ`` with ``L Lᵀ = yᵀ y + s I`` and
  ``s = 1e-4 trace(yᵀ y)``: a Gram matmul, a ``k x k`` Cholesky factor and a
  triangular solve, several times cheaper than Householder QR. Singular values
  ``sigma`` become ``sigma / sqrt(sigma^2 + s)``: directions above ``sqrt(s)``
  come out orthonormal, the rest keep their direction at a smaller scale,
  and ``y = 0`` gives 0. Between power iterations, where only the span and
  its conditioning matter, that is enough.
  """
  c = jnp.matmul(_t(y), y)
  s = _SHIFT * jnp.trace(c, axis1=-2, axis2=-1)[..., None, None] + 1e-30
  low = _cholesky(c + s * jnp.eye(y.shape[-1], dtype=y.dtype))
  return _t(_solve_lower(low, _t(y)))


def _unit_scale(g: jax.Array) -> jax.Array:
  """``g`` divided by its largest magnitude, per matrix (0 stays 0).

  Singular vectors do not depend on the scale, but the range finders' Gram
  matrices grow as its fourth power: entries near 1e9 overflow float32
  (and near 1e-10 underflow) without this.
  """
  peak = jnp.max(jnp.abs(g), axis=(-2, -1), keepdims=True)
  return g / jnp.where(peak > 0, peak, 1.0)


def _orthonormal(y: jax.Array) -> jax.Array:
  """An orthonormal basis of ``y``'s columns (Householder QR: always
  orthonormal, rank-deficient ``y`` included)."""
  return _qr(y)[0]


def _ritz_projectors(a: jax.Array, q: jax.Array, spec: LeafSpec, dtype,
                     left: bool) -> Projectors:
  """Top-``rank`` singular vectors of ``a`` within the orthonormal basis ``q``.

  ``q`` (``rows(a) x k``) spans, approximately, the leading left singular
  subspace of ``a``, which is ``g`` (``left=True``) or ``gᵀ``. With
  :math:`B = a^\top q`, the eigenvectors :math:`W` of the ``k x k`` Gram
  matrix :math:`B^\top B = q^\top a a^\top q` rotate ``q`` to the singular
  vectors :math:`q W` (Rayleigh-Ritz), sorted by decreasing singular value and
  sign-canonical like :func:`svd_projectors`. When both sides are projected,
  the other side's vectors come from a small SVD of :math:`B^\top` instead.
  """
  r = spec.rank
  b = jnp.matmul(_t(a), q)  # cols(a) x k
  if spec.use_row and spec.use_col:
    w, _, vh = _svd(_t(b))
    u_r, v_r = jnp.matmul(q, w[..., :, :r]), _t(vh[..., :r, :])
  else:
    _, w = _eigh(jnp.matmul(_t(b), b))  # ascending eigenvalues
    u_r, v_r = jnp.matmul(q, w[..., :, ::-1][..., :, :r]), None
  if not left:  # a = gᵀ: its left vectors are g's right ones
    u_r, v_r = v_r, u_r
  row = col = optax.MaskedNode()
  if spec.use_row:
    row = canonical_signs(_t(u_r)).astype(dtype)
  if spec.use_col:
    col = _t(canonical_signs(_t(v_r))).astype(dtype)
  return Projectors(row=row, col=col)


def range_projectors(
    g: jax.Array,
    spec: LeafSpec,
    dtype,
    *,
    start: jax.Array | None = None,
    key: jax.Array | None = None,
    power_iters: int = 1,
    oversample: int = 0,
) -> Projectors:
  r"""Projectors from a few matmuls instead of a full SVD.

  Finds an orthonormal basis :math:`Q` of the projected side's leading
  singular subspace of the float32 matrix view ``g``, then takes the
  singular vectors of the small matrix :math:`Q^\top G` (Rayleigh-Ritz).

  * ``key`` given (randomized range finder, Halko et al. 2011):
    :math:`Q_0 = \mathrm{orth}(G\Omega)` for a Gaussian :math:`\Omega` with
    ``rank + oversample`` columns.
  * ``start`` given (subspace iteration): :math:`Q_0 = S`, the current
    singular vectors (``rows x r`` or ``cols x r``, orthonormal).

  Then ``power_iters`` times :math:`Q \leftarrow \mathrm{orth}(G G^\top Q)`
  (or :math:`G^\top G` for the right side), and the top ``rank``
  eigenvectors :math:`W` of the ``k x k`` matrix
  :math:`Q^\top G G^\top Q` give the singular vectors :math:`Q W`.

  ``g`` is first divided by its largest magnitude, so the result does not
  depend on the gradient's scale (float32 Gram matrices of entries near
  1e9 would overflow).

  The cost is ``2 power_iters + 1`` products of ``g`` with a ``k``-column
  matrix (one more with a key), a shifted Cholesky-QR between iterations,
  one Householder QR of an ``m x k`` matrix and a ``k x k``
  eigendecomposition, against a full SVD's ``O(m n min(m, n))``.
  """
  g = _unit_scale(g.astype(jnp.float32))
  left = spec.use_row  # the side whose basis is found; both: the left one
  a = g if left else _t(g)  # find a left basis of `a`
  if start is not None:
    y = start.astype(jnp.float32)  # orthonormal already
  else:
    k = min(spec.rank + oversample, a.shape[-1], a.shape[-2])
    omega = jax.random.normal(key, a.shape[:-2] + (a.shape[-1], k),
                              jnp.float32)
    y = jnp.matmul(a, omega)
  for i in range(power_iters):
    q = y if (i == 0 and start is not None) else _condition(y)
    y = jnp.matmul(a, jnp.matmul(_t(a), q))
  q = _orthonormal(y)
  return _ritz_projectors(a, q, spec, dtype, left)


class Finder(NamedTuple):
  """How a refresh finds a leaf's top singular vectors (static settings).

  Made by :func:`finder`, which validates them; shared by GaLore and
  Q-GaLore, so both refresh the same way.

  Attributes:
    svd: ``"exact"``, ``"randomized"`` or ``"subspace_iteration"``.
    power_iters: power iterations of the non-exact methods.
    oversample: extra columns of the randomized range finder.
    seed: seed of the randomized range finder's Gaussian.
  """

  svd: str
  power_iters: int
  oversample: int
  seed: int

  def find(self, g: jax.Array, spec: LeafSpec, dtype, count: jax.Array,
           start: Callable[[], jax.Array] | None = None) -> Projectors:
    """New projectors of the matrix view ``g`` at step ``count``.

    ``"exact"``: :func:`svd_projectors`. ``"randomized"``:
    :func:`range_projectors` with a Gaussian from ``seed`` folded with
    ``count`` (runs and resumes repeat). ``"subspace_iteration"``:
    :func:`range_projectors` warm-started from ``start()``, the current
    singular vectors as columns (:func:`current_basis`), except at step 0,
    where there is none yet and the randomized finder runs.
    """
    if self.svd == "exact":
      return svd_projectors(g, spec, dtype)
    randomized = lambda: range_projectors(
        g, spec, dtype, key=jax.random.fold_in(jax.random.key(self.seed),
                                               count),
        power_iters=self.power_iters, oversample=self.oversample)
    if self.svd == "randomized":
      return randomized()
    warm = lambda: range_projectors(g, spec, dtype, start=start(),
                                    power_iters=self.power_iters)
    return jax.lax.cond(count == 0, randomized, warm)


def finder(svd: str = "exact", power_iters: int | None = None,
           oversample: int = 8, seed: int = 0) -> Finder:
  """A validated :class:`Finder`; ``power_iters=None`` takes the method's
  default (:data:`DEFAULT_POWER_ITERS`)."""
  if power_iters is None:
    power_iters = DEFAULT_POWER_ITERS.get(svd, 1)
  check_svd(svd, power_iters, oversample)
  _validation.concrete_number("seed", seed, integer=True)
  return Finder(svd, power_iters, oversample, seed)


def current_basis(proj: Projectors, spec: LeafSpec) -> jax.Array:
  """The current singular vectors of the side :func:`range_projectors`
  iterates on, as columns (its ``start``)."""
  return _t(proj.row) if spec.use_row else proj.col


def as_projectors(entry: Any, spec: LeafSpec) -> Projectors:
  """Rebuilds a leaf's :class:`Projectors`, checking the shapes.

  State trees may come back with their containers changed (``nnx.Optimizer``
  hands ``update`` a plain tuple, or a mapping by field name, where ``init``
  returned the NamedTuple); see :func:`galore_jax._pytrees.as_record`.
  """
  if isinstance(entry, (tuple, list)) and not isinstance(entry, Projectors):
    # Positional: only the used sides survive as arrays, row before col.
    arrays = jax.tree.leaves(entry)
    entry = Projectors(
        row=arrays[0] if spec.use_row and arrays else optax.MaskedNode(),
        col=arrays[-1] if spec.use_col and arrays else optax.MaskedNode())
  proj = _pytrees.as_record(Projectors, entry,
                            missing=optax.MaskedNode())
  got = [getattr(proj, side, None) for side in ("row", "col")]
  got = [None if isinstance(a, optax.MaskedNode) or a is None
         or not hasattr(a, "shape") else tuple(a.shape) for a in got]
  if got != list(spec.projector_shapes):
    raise ValueError(
        f"projector state with shapes (row, col) = {tuple(got)} does not"
        f" match the projection of a leaf of shape {spec.shape}, which"
        f" needs {tuple(spec.projector_shapes)}: was the state initialised"
        " for other params or another proj_type?"
    )
  return Projectors(
      row=proj.row if spec.use_row else optax.MaskedNode(),
      col=proj.col if spec.use_col else optax.MaskedNode(),
  )


def zero_projectors(spec: LeafSpec, dtype) -> Projectors:
  shapes = spec.projector_shapes
  make = lambda s: optax.MaskedNode() if s is None else jnp.zeros(s, dtype)
  return Projectors(row=make(shapes.row), col=make(shapes.col))


# ---------------------------------------------------------------------------
# Which leaves are projected, and how: resolved statically from shapes.


def _keystr(path: KeyPath) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def per_leaf(
    spec_tree: Any,
    paths: Sequence[KeyPath],
    params: Any,
    name: str,
    is_leaf: Callable[[Any], bool],
) -> list[Any]:
  """One entry of ``spec_tree`` per parameter path, optax prefix convention.

  ``spec_tree`` is a pytree whose structure is a prefix of the params' (or a
  callable ``params -> pytree``); entries are matched by key path, which also
  lets a tree built from plain arrays apply to a tree of Flax ``Param`` nodes.
  """
  if callable(spec_tree) and not is_leaf(spec_tree):
    spec_tree = spec_tree(params)
  entries = jax.tree_util.tree_flatten_with_path(spec_tree, is_leaf=is_leaf)[0]
  table = {normalize_path(p): v for p, v in entries}
  used, out = set(), []
  for path in paths:
    for k in range(len(path), -1, -1):
      if path[:k] in table:
        out.append(table[path[:k]])
        used.add(path[:k])
        break
    else:
      raise ValueError(
          f"`{name}` does not match the params: no entry for parameter"
          f" {_keystr(path)}. Its structure must be a prefix of the params'"
          f" (entries at: {sorted(_keystr(p) for p in table)})."
      )
  unused = sorted(_keystr(p) for p in set(table) - used)
  if unused:
    raise ValueError(
        f"`{name}` does not match the params: entries {unused} name no"
        " parameter."
    )
  return out


def _axes(value: Axes, ndim: int, what: str, path: KeyPath, shape) -> tuple:
  axes = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
  out = []
  for a in axes:
    if not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim:
      raise ValueError(
          f"`dim_numbers` {what} {value!r} does not fit parameter"
          f" {_keystr(path)} of shape {shape}"
      )
    out.append(int(a) % ndim)
  return tuple(out)


def _split_axes(dn: Any, path: KeyPath, shape: tuple[int, ...]):
  ndim = len(shape)
  if ndim < 2:
    raise ValueError(
        f"`dim_numbers` {dn!r} given for parameter {_keystr(path)} of shape"
        f" {shape}: a projected leaf needs at least 2 axes"
    )
  red = _axes(dn.reduction_axis, ndim, "reduction_axis", path, shape)
  out = _axes(dn.output_axis, ndim, "output_axis", path, shape)
  batch_axis = getattr(dn, "batch_axis", None)
  if batch_axis is None:
    batch = tuple(a for a in range(ndim) if a not in red + out)
  else:
    batch = _axes(batch_axis, ndim, "batch_axis", path, shape)
  named = batch + red + out
  if not red or not out or sorted(named) != list(range(ndim)):
    raise ValueError(
        f"`dim_numbers` {dn!r} does not fit parameter {_keystr(path)} of"
        f" shape {shape}: reduction {red}, output {out} and batch {batch} axes"
        " must be non-empty (batch may be empty), disjoint, and cover every"
        " axis"
    )
  return batch, red, out


def _sides(proj_type: str, rows: int, cols: int) -> tuple[bool, bool]:
  """(use_row, use_col) of the official rule, with M = cols, N = rows."""
  big_out = cols >= rows
  return {
      "std": (big_out, not big_out),
      "reverse_std": (not big_out, big_out),
      "right": (True, False),
      "left": (False, True),
      "full": (True, True),
  }[proj_type]


def check_proj_type(proj_type: Any) -> str:
  if proj_type not in PROJ_TYPES:
    raise ValueError(
        f"`proj_type` must be one of {PROJ_TYPES}, got {proj_type!r}"
    )
  return proj_type


def check_rank(rank: Any) -> None:
  if callable(rank):
    return
  if _validation.is_tracer(rank) or hasattr(rank, "shape"):
    raise TypeError(
        f"`rank` must be a positive int or a callable (path, leaf) -> int |"
        f" None, got {rank!r}. It sets shapes, so it is static: with"
        " optax.inject_hyperparams pass static_args=('rank',)."
    )
  _validation.positive_int("rank", rank)


def leaf_spec(
    path: KeyPath,
    leaf: Any,
    *,
    rank: int | Callable[[KeyPath, Any], int | None],
    selected: bool | None,
    dim_numbers: Any,
    proj_type: str,
) -> LeafSpec | None:
  """The static projection plan of one leaf, or None if it is not projected.

  Args:
    path: normalised key path of the leaf.
    leaf: the array (or anything with ``shape`` and ``dtype``).
    rank: an int, or a callable ``(path, leaf) -> int | None``.
    selected: True/False from ``mask``; None applies the default rule (ndim
      >= 2 and both matrix dims > rank).
    dim_numbers: this leaf's :class:`DimensionNumbers`, or None (default axes
      if ndim >= 2, otherwise not projectable).
    proj_type: one of :data:`PROJ_TYPES`.
  """
  shape = tuple(leaf.shape)
  dtype = jnp.dtype(leaf.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    _validation.floating(_keystr(path), dtype)
  if selected is False:
    return None
  r = rank(path, leaf) if callable(rank) else rank
  if r is None:
    return None
  if isinstance(r, (bool, np.bool_)) or not isinstance(
      r, (int, np.integer)
  ) or r < 1:
    raise ValueError(
        f"`rank` callable must return a positive int or None, got {r!r} for"
        f" parameter {_keystr(path)}"
    )
  if dim_numbers is None:
    if len(shape) < 2:
      if selected:
        raise ValueError(
            f"`mask` selects parameter {_keystr(path)} of shape {shape} for"
            " projection, but it has fewer than 2 axes"
        )
      return None
    dim_numbers = DimensionNumbers()
  batch, red, out = _split_axes(dim_numbers, path, shape)
  spec_shape = lambda axes: tuple(shape[a] for a in axes)
  rows, cols = math.prod(spec_shape(red)), math.prod(spec_shape(out))
  if selected is None and not (rows > r and cols > r):
    return None
  use_row, use_col = _sides(proj_type, rows, cols)
  return LeafSpec(
      shape=shape,
      perm=batch + red + out,
      batch_shape=spec_shape(batch),
      reduction_shape=spec_shape(red),
      output_shape=spec_shape(out),
      rank=min(int(r), rows, cols),
      use_row=use_row,
      use_col=use_col,
  )


def _is_mask_leaf(x: Any) -> bool:
  return x is None or isinstance(x, (bool, np.bool_))


def _is_dn_leaf(x: Any) -> bool:
  return x is None or _is_dim_numbers(x)


def _check_mask_entry(path: KeyPath, value: Any) -> bool | None:
  if value is None or isinstance(value, (bool, np.bool_)):
    return None if value is None else bool(value)
  raise TypeError(
      f"`mask` entries must be bools, got {value!r} for parameter"
      f" {_keystr(path)}"
  )


def resolve_specs(
    tree: Any,
    *,
    rank: Any,
    mask: Any,
    dim_numbers: Any,
    proj_type: str,
) -> tuple[list[Any], jax.tree_util.PyTreeDef, list[LeafSpec | None]]:
  """Flattens ``tree`` and returns ``(leaves, treedef, specs)``.

  ``specs[i]`` is the :class:`LeafSpec` of leaf i, or None for a leaf that
  goes through the base transform in full space. Everything here depends on
  shapes only, so ``init`` and every trace of ``update`` agree.
  """
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [normalize_path(p) for p, _ in with_path]
  leaves = [x for _, x in with_path]
  if mask is None:
    masks = [None] * len(leaves)
  else:
    masks = [
        _check_mask_entry(p, m)
        for p, m in zip(
            paths, per_leaf(mask, paths, tree, "mask", _is_mask_leaf)
        )
    ]
  if dim_numbers is None:
    dns = [None] * len(leaves)
  elif _is_dim_numbers(dim_numbers):
    dns = [dim_numbers if jnp.ndim(x) >= 2 else None for x in leaves]
  elif callable(dim_numbers):
    dns = [dim_numbers(p, x) for p, x in zip(paths, leaves)]
  else:
    dns = per_leaf(dim_numbers, paths, tree, "dim_numbers", _is_dn_leaf)
  for p, dn in zip(paths, dns):
    if dn is not None and not _is_dim_numbers(dn):
      raise TypeError(
          f"`dim_numbers` entries must be DimensionNumbers or None, got"
          f" {dn!r} for parameter {_keystr(p)}"
      )
  specs = [
      leaf_spec(p, x, rank=rank, selected=m, dim_numbers=dn,
                proj_type=proj_type)
      for p, x, m, dn in zip(paths, leaves, masks, dns)
  ]
  return leaves, treedef, specs
