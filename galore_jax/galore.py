"""GaLore: gradient low-rank projection as an Optax gradient transformation."""

from __future__ import annotations

import functools

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from galore_jax import _validation
from galore_jax import layout
from galore_jax import projection

Rank = int | Callable[[tuple, Any], Optional[int]]


class GaLoreState(NamedTuple):
  """State of :func:`scale_by_galore`.

  Attributes:
    count: int32 step counter; the projectors refresh when
      ``count % update_proj_gap == 0``.
    projector: a tree like the params: :class:`~galore_jax.projection.Projectors`
      for projected leaves, ``optax.MaskedNode()`` for the others.
    base_state: state of the ``base`` transform, run on the low-rank
      gradients of projected leaves and the full gradients of the others.
  """

  count: jax.Array
  projector: optax.Params
  base_state: optax.OptState

  def layout(self, views, recurse):
    """Where each array lies along its param's axes (see
    :mod:`galore_jax.layout`): a ``row`` projector ``batch + (r, in)``
    follows ``in``, a ``col`` one ``batch + (out, r)`` follows ``out``; the
    base state is laid out along the low-rank gradients it was made for."""
    return subspace_layout(self, views, recurse, projection.Projectors,
                           _projectors_layout)


def subspace_layout(state, views: dict, recurse, entry_type: type,
                    entry_layout):
  """The layout of a ``(count, projector, base_state)`` state.

  ``entry_layout(view, entry) -> (entry layout, low-rank view)`` lays out
  one projected leaf's projector entry (an ``entry_type``) given its param's
  view, and gives the view of the low-rank gradient its base optimizer saw
  in the param's place; ``base_state`` is laid out along those
  (:func:`layout.low_rank`).
  """
  low = dict(views)

  def entry(path, x):
    if isinstance(x, optax.MaskedNode):
      return x
    if not isinstance(x, entry_type):
      # A record a container library reshaped (a tuple or mapping): its
      # arrays, and the moments of its leaf, are replicated.
      for n in range(len(path)):
        if path[:n] in low:
          low[path[:n]] = None
      return layout.replicated(np.shape(x))
    out, low[path] = entry_layout(views.get(path), x)
    return out

  projector = layout.by_path(
      state.projector, entry,
      is_leaf=lambda x: isinstance(x, (entry_type, optax.MaskedNode)))
  return type(state)(
      count=layout.replicated_tree(state.count),
      projector=projector,
      base_state=recurse(state.base_state, low))


def _projectors_layout(view, proj):
  """GaLore's :class:`~galore_jax.projection.Projectors` of one leaf, with
  the view of its low-rank gradient. A leaf whose matrix view is not its
  last two axes (custom ``dim_numbers`` that move or merge axes) has
  projectors of other shapes: they, and its moments, are replicated."""
  replicate = lambda: (layout.replicated_tree(proj), None)
  if view is None or not isinstance(proj, projection.Projectors) or (
      len(view.shape) < 2):
    return replicate()
  *batch, rows, cols = view.shape
  row, col = (not isinstance(x, optax.MaskedNode) for x in proj)
  r_row = np.shape(proj.row)[-2] if row else None
  r_col = np.shape(proj.col)[-1] if col else None
  if (row and np.shape(proj.row) != (*batch, r_row, rows)) or (
      col and np.shape(proj.col) != (*batch, cols, r_col)):
    return replicate()
  side = lambda name, on: (
      layout.projector(view, name, np.shape(getattr(proj, name))) if on
      else optax.MaskedNode())
  return (projection.Projectors(row=side("row", row), col=side("col", col)),
          layout.low_rank(view, row, col, r_row or r_col))


def _check_projector_dtype(projector_dtype):
  if projector_dtype is None:
    return None
  try:
    dtype = jnp.dtype(projector_dtype)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        "`projector_dtype` must be None or a floating dtype, got"
        f" {projector_dtype!r}"
    )
  return dtype


def scale_by_galore(
    rank: Rank = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    base: Optional[optax.GradientTransformation] = None,
    *,
    mask: Any = None,
    dim_numbers: Any = None,
    projector_dtype: Any = None,
    svd: str = "exact",
    power_iters: Optional[int] = None,
    oversample: int = 8,
    seed: int = 0,
    stagger: bool = False,
    on_refresh: str = "keep",
) -> optax.GradientTransformation:
  r"""Runs ``base`` on gradients projected to a low-rank subspace (GaLore).

  For a projected leaf with matrix view :math:`G_t` and projectors refreshed
  from the SVD of the gradient every ``update_proj_gap`` steps,

  .. math::
    R_t = \mathrm{proj}(G_t), \quad N_t = \mathrm{base}(R_t), \quad
    u_t = \mathrm{scale} \cdot \mathrm{proj}^{-1}(N_t),

  with ``proj`` one of :math:`Q G` (``row``), :math:`G P` (``col``) or
  :math:`Q G P` (``full``); see :mod:`galore_jax.projection` for the sides of
  each ``proj_type``. The ``base`` moments stay in the subspace and are kept
  as they are when it changes, as in the official implementation. Other
  leaves go through ``base`` in full space, unscaled.

  Args:
    rank: projection rank, an int or a callable ``(path, leaf) -> int |
      None`` (None: do not project). Clamped to the matrix's smaller side for
      leaves selected by ``mask``.
    update_proj_gap: refresh the projectors when ``count % update_proj_gap
      == 0`` (steps 0, K, 2K, ...).
    scale: factor applied to the back-projected updates.
    proj_type: one of ``"std"`` (default, official), ``"reverse_std"``,
      ``"left"``, ``"right"``, ``"full"``.
    base: a gradient-only transform (it is given no params), run inside the
      subspace. Default ``optax.scale_by_adam()``.
    mask: which leaves to project: a pytree of bools with the params'
      structure (or a prefix of it), or a callable ``params -> pytree``.
      Default (None): every leaf with ndim >= 2 whose two matrix dimensions
      both exceed the rank.
    dim_numbers: a :class:`~galore_jax.projection.DimensionNumbers` for every
      leaf, a pytree of them (None entries: do not project), or a callable
      ``(path, leaf) -> DimensionNumbers | None``. Default: the last two axes
      are ``(in, out)``, leading axes are batch axes with one projector each.
    projector_dtype: dtype of the stored projectors. Default: the gradient's
      dtype, as official. The SVD always runs in float32.
    svd: how a refresh finds the top singular vectors. ``"exact"``
      (default, official): a full SVD. ``"randomized"``: a Gaussian range
      finder with ``rank + oversample`` columns and ``power_iters`` power
      iterations (the Gaussian comes from ``seed`` and the step count, so
      runs and resumes repeat). ``"subspace_iteration"``: warm-started from
      the current projector, ``power_iters`` multiplications by
      :math:`G G^\top`; the first refresh (step 0) is the randomized one.
      Neither runs a full SVD, so on a sharded gradient neither gathers it
      whole onto one device. Both end with a QR of an ``m x k`` matrix and
      the eigendecomposition of a ``k x k`` one (Rayleigh-Ritz). See
      :func:`galore_jax.projection.range_projectors`.
    power_iters: power iterations of the non-exact methods; default 1 for
      ``"randomized"``, 2 for ``"subspace_iteration"``.
    oversample: extra columns of the randomized range finder.
    seed: seed of the randomized range finder.
    stagger: spread the refreshes over the gap: the ``i``-th of ``n``
      projected leaves refreshes when ``count % update_proj_gap == i *
      update_proj_gap // n`` (and at step 0, to start), so no step
      recomputes every projector at once. A stacked ``(L, in, out)`` leaf
      refreshes its ``L`` projectors together.
    on_refresh: what happens to ``base``'s moments (float ``mu`` / ``nu``
      fields, as in ``optax.scale_by_adam``) of a leaf whose projectors
      changed. ``"keep"`` (default, official): nothing. ``"reset"``: they
      restart from zero. ``"transport"``: they are carried into the new
      basis, :math:`m \leftarrow R m` and :math:`v \leftarrow (R \odot R)
      v` with :math:`R = P_{new}^\top P_{old}` (``row`` side; the ``col``
      side acts on columns), the second moment clipped at 0: exact for
      :math:`m` within the old subspace, and for :math:`v` the variance of
      :math:`R g` when the old coordinates are uncorrelated.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`GaLoreState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from galore_jax import scale_by_galore
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros((32,))}
    >>> tx = optax.chain(scale_by_galore(rank=8, update_proj_gap=10),
    ...                  optax.scale_by_learning_rate(1e-2))
    >>> state = tx.init(params)
    >>> state[0].projector["w"].col.shape  # std projects the smaller side, out
    (32, 8)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state)
    >>> jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)
    True

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, ICML 2024.
  """
  projection.check_rank(rank)
  _validation.concrete_number(
      "update_proj_gap", update_proj_gap, low=1, high=2**30, integer=True)
  projector_dtype = _check_projector_dtype(projector_dtype)
  find = projection.finder(svd, power_iters, oversample, seed)
  _validation.boolean("stagger", stagger)
  rule = ProjectorRule(
      init=functools.partial(_init_projectors, projector_dtype),
      update=functools.partial(_refresh_projectors, find, update_proj_gap,
                               stagger),
      dtype=lambda leaf_dtype: projector_dtype or leaf_dtype,
      read=_read_projectors)
  return scale_by_subspace(
      rule, rank=rank, scale=scale, proj_type=proj_type, base=base, mask=mask,
      dim_numbers=dim_numbers, state_type=GaLoreState, on_refresh=on_refresh)


def stagger_phase(position: tuple[int, int], update_proj_gap: Any,
                  stagger: bool) -> Any:
  """The step, within each gap, at which a leaf refreshes.

  ``position = (i, n)``: the leaf is the ``i``-th of ``n`` projected leaves.
  0 without ``stagger``; with it, ``i * update_proj_gap // n``, so the ``n``
  leaves spread their refreshes evenly over the gap.
  """
  if not stagger:
    return 0
  index, total = position
  return (index * update_proj_gap) // total


def refresh_due(count: jax.Array, gap: Any, phase: Any = 0) -> jax.Array:
  """Whether a leaf refreshes at step ``count``: every ``gap`` steps from its
  ``phase`` (:func:`stagger_phase`), and at step 0, where every leaf starts.

  ``gap`` may be an array (Q-GaLore's per-layer gaps): the result then has
  its shape.
  """
  return ((count - phase) % gap == 0) | (count == 0)


def _init_projectors(projector_dtype, x, spec):
  return projection.zero_projectors(spec, projector_dtype or x.dtype)


def _read_projectors(entry, spec, dtype):
  del dtype
  return projection.as_projectors(entry, spec)


def _refresh_projectors(find, update_proj_gap, stagger, g2, entry, spec,
                        count, position):
  """GaLore's rule: every projector of the leaf refreshes together when due.

  The new projectors keep the stored ones' dtype (set from the params at
  init), whatever the gradients' dtype.
  """
  proj = projection.as_projectors(entry, spec)
  due = refresh_due(count, update_proj_gap,
                    stagger_phase(position, update_proj_gap, stagger))
  dtype = jax.tree.leaves(proj)[0].dtype
  proj = jax.lax.cond(
      due,
      lambda: find.find(g2, spec, dtype, count,
                        start=lambda: projection.current_basis(proj, spec)),
      lambda: proj)
  return proj, proj


class ProjectorRule(NamedTuple):
  """How a projected leaf stores, refreshes and reads its projectors.

  The building block of :func:`scale_by_galore` and
  ``galore_jax.scale_by_q_galore``: both are :func:`scale_by_subspace` with
  their own rule.

  Attributes:
    init: ``(leaf, spec) -> entry``, the leaf's projector state (arrays, or
      ``optax.MaskedNode``); ``leaf`` has the param's shape and dtype.
    update: ``(g, entry, spec, count, position) -> (projectors, entry)``:
      given the matrix view ``g`` of the gradient (``batch + (rows, cols)``),
      the current entry, the step count and ``position = (index, total)``
      of this leaf among the projected leaves, the float
      :class:`~galore_jax.projection.Projectors` to use this step and the new
      entry. Runs under ``jit``: refresh with ``lax.cond``.
    dtype: ``leaf dtype -> dtype`` of the projectors ``update`` returns.
    read: ``(entry, spec, dtype) -> projectors``, the float projectors an
      entry holds now (needed by ``on_refresh`` other than ``"keep"``).
  """

  init: Callable[[Any, projection.LeafSpec], Any]
  update: Callable[..., tuple[projection.Projectors, Any]]
  dtype: Callable[[Any], Any]
  read: Optional[Callable[..., projection.Projectors]] = None


def scale_by_subspace(
    rule: ProjectorRule,
    *,
    rank: Rank,
    scale: float,
    proj_type: str,
    base: Optional[optax.GradientTransformation],
    mask: Any,
    dim_numbers: Any,
    state_type: Callable[..., Any] = GaLoreState,
    on_refresh: str = "keep",
) -> optax.GradientTransformation:
  """Runs ``base`` in the subspaces that ``rule`` maintains, per leaf.

  Shared by every GaLore variant: resolves which leaves are projected and how
  (``rank``, ``mask``, ``dim_numbers``, ``proj_type``, see
  :func:`scale_by_galore`), projects their gradients, runs ``base`` on the
  low-rank tree (other leaves in full space, unscaled), maps the result back
  and multiplies it by ``scale``. The state is ``state_type(count,
  projector, base_state)``, ``projector`` holding ``rule``'s entries.

  Returns:
    An ``optax.GradientTransformation``.
  """
  projection.check_rank(rank)
  # A negative scale reverses every projected update.
  _validation.concrete_number("scale", scale, low=0, low_open=True)
  projection.check_proj_type(proj_type)
  if base is None:
    base = optax.scale_by_adam()
  if not isinstance(base, optax.GradientTransformation):
    raise TypeError(
        f"`base` must be an optax.GradientTransformation, got {base!r}"
    )

  check_on_refresh(on_refresh)
  if on_refresh != "keep" and rule.read is None:
    raise ValueError(f"on_refresh={on_refresh!r} needs a rule that can read"
                     " its current projectors")

  def resolve(tree):
    return projection.resolve_specs(
        tree, rank=rank, mask=mask, dim_numbers=dim_numbers,
        proj_type=proj_type)

  def init_fn(params):
    leaves, treedef, specs = resolve(params)
    entries, low_rank = _unzip(map(functools.partial(_init_leaf, rule),
                                   leaves, specs), 2)
    base_state = base.init(treedef.unflatten(low_rank))
    if on_refresh != "keep":
      _moment_fields(base_state, treedef, on_refresh)  # fails early if none
    return state_type(
        count=jnp.zeros([], jnp.int32),
        projector=treedef.unflatten(entries),
        base_state=base_state,
    )

  def update_fn(updates, state, params=None):
    del params
    grads, treedef, specs = resolve(updates)
    entries = treedef.flatten_up_to(state.projector)
    project = functools.partial(_project_leaf, rule, on_refresh, state.count)
    low_rank, projectors, new_entries, moves = _unzip(
        map(project, grads, entries, specs, _positions(specs)), 4)

    base_state = state.base_state
    _validation.shaped_like(
        f"{state_type.__name__}.base_state", base_state,
        jax.eval_shape(base.init, treedef.unflatten(low_rank)))
    if on_refresh != "keep":
      base_state = _move_moments(base_state, treedef, moves, on_refresh)
    low_updates, base_state = base.update(
        treedef.unflatten(low_rank), base_state, None)
    low_updates = treedef.flatten_up_to(low_updates)

    out = map(functools.partial(_project_back_leaf, scale), grads,
              low_updates, projectors, specs)
    return treedef.unflatten(list(out)), state_type(
        count=optax.safe_int32_increment(state.count),
        projector=treedef.unflatten(new_entries),
        base_state=base_state,
    )

  return optax.GradientTransformation(init_fn, update_fn)


def _unzip(rows, n: int) -> tuple[list, ...]:
  """Per-leaf ``n``-tuples as ``n`` lists (``n`` empty lists for no leaves)."""
  rows = list(rows)
  return tuple(map(list, zip(*rows))) if rows else ([],) * n


def _init_leaf(rule: ProjectorRule, x, spec):
  """One leaf's ``(projector entry, zero low-rank gradient)`` for ``init``;
  a leaf that is not projected: ``(MaskedNode, x)``."""
  if spec is None:
    return optax.MaskedNode(), x
  dtype = jnp.promote_types(x.dtype, rule.dtype(x.dtype))
  return rule.init(x, spec), jnp.zeros(spec.low_rank_shape, dtype)


def _project_back_leaf(scale, g, u, proj, spec):
  """The full-space update of one leaf from its low-rank update ``u``."""
  if spec is None:
    return u
  # The update is written over the gradient (on CPU, for bf16 stacks).
  full = projection.project_back(u, proj, spec, scale=scale, dtype=g.dtype,
                                 out=projection.to_matrix(g, spec))
  return projection.from_matrix(full, spec)


def _positions(specs: list) -> list:
  """``(i, n)`` for the ``i``-th of the ``n`` projected leaves, else None."""
  total = sum(spec is not None for spec in specs)
  out, index = [], 0
  for spec in specs:
    out.append(None if spec is None else (index, total))
    index += spec is not None
  return out


def _project_leaf(rule: ProjectorRule, on_refresh: str, count, g, entry,
                  spec, position):
  """One leaf's ``(low-rank gradient, projectors, new entry, basis move)``.

  A leaf that is not projected passes through in full space, with no
  projectors and a ``MaskedNode`` entry.
  """
  if spec is None:
    return g, None, optax.MaskedNode(), None
  g2 = projection.to_matrix(g, spec)
  old = None if on_refresh == "keep" else rule.read(entry, spec, jnp.float32)
  proj, entry = rule.update(g2, entry, spec, count, position)
  move = None if old is None else _basis_change(old, proj, spec)
  return projection.project(g2, proj, spec), proj, entry, move


ON_REFRESH = ("keep", "reset", "transport")


def check_on_refresh(on_refresh: Any) -> str:
  if on_refresh not in ON_REFRESH:
    raise ValueError(f"`on_refresh` must be one of"
                     f" {', '.join(map(repr, ON_REFRESH))}, got {on_refresh!r}")
  return on_refresh


def _basis_change(old: projection.Projectors, new: projection.Projectors,
                  spec: projection.LeafSpec):
  """``(rot_row, rot_col, refreshed)`` taking old coordinates to new ones.

  ``rot_row = new_row old_rowᵀ`` (``r x r``) acts on the rows of the
  low-rank coordinates, ``rot_col = new_colᵀ old_col`` on their columns;
  ``refreshed`` (one bool per batch matrix) is False where the projectors
  did not change, and there the rotations are exactly the identity.
  """
  f32 = lambda x: x.astype(jnp.float32)
  eye = jnp.eye(spec.rank, dtype=jnp.float32)
  changed, rots = [], []
  for side in ("row", "col"):
    if not (spec.use_row if side == "row" else spec.use_col):
      rots.append(None)
      continue
    o, n = f32(getattr(old, side)), f32(getattr(new, side))
    changed.append(jnp.any(o != n, axis=(-2, -1)))
    rots.append(jnp.matmul(n, jnp.swapaxes(o, -1, -2)) if side == "row"
                else jnp.matmul(jnp.swapaxes(n, -1, -2), o))
  refreshed = functools.reduce(jnp.logical_or, changed)
  keep = lambda rot: None if rot is None else jnp.where(
      refreshed[..., None, None], rot, eye)
  return keep(rots[0]), keep(rots[1]), refreshed


def _moment_fields(base_state: Any, treedef, on_refresh: str) -> list:
  """Paths to the ``mu`` / ``nu`` fields of ``base_state`` that hold float
  moments with the low-rank tree's structure."""
  found = []

  def visit(node, path):
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      for name in node._fields:
        child = getattr(node, name)
        if name in ("mu", "nu") and jax.tree.structure(child) == treedef:
          if all(jnp.issubdtype(x.dtype, jnp.floating)
                 for x in jax.tree.leaves(child)):
            found.append(path + (name,))
            continue
        visit(child, path + (name,))
    elif isinstance(node, (tuple, list)):
      for i, child in enumerate(node):
        visit(child, path + (i,))

  visit(base_state, ())
  if not found:
    raise ValueError(
        f"on_refresh={on_refresh!r} moves the base optimizer's moments, but"
        " its state has no float `mu` / `nu` fields shaped like the"
        " projected gradients (e.g. 8-bit moments); use a float Adam base or"
        " on_refresh='keep'")
  return found


def _move(x, move, second: bool, on_refresh: str):
  rot_row, rot_col, refreshed = move
  if on_refresh == "reset":
    return jnp.where(refreshed[..., None, None], jnp.zeros_like(x), x)
  sq = (lambda r: r * r) if second else (lambda r: r)

  def transport():
    m = x.astype(jnp.float32)
    if rot_row is not None:
      m = jnp.matmul(sq(rot_row), m)
    if rot_col is not None:
      m = jnp.matmul(m, jnp.swapaxes(sq(rot_col), -1, -2))
    if second:
      m = jnp.maximum(m, 0.0)
    return m.astype(x.dtype)

  # Steps without a refresh skip the matmuls (the rotations are I there).
  return jax.lax.cond(jnp.any(refreshed), transport, lambda: x)


def _move_moments(base_state, treedef, moves, on_refresh: str):
  """``base_state`` with the moments of every leaf taken to its new basis
  (``transport``) or zeroed (``reset``) where its projectors changed."""
  for path in _moment_fields(base_state, treedef, on_refresh):
    second = path[-1] == "nu"

    def get(node, p=path):
      for k in p:
        node = getattr(node, k) if isinstance(k, str) else node[k]
      return node

    leaves = treedef.flatten_up_to(get(base_state))
    moved = [x if mv is None else _move(x, mv, second, on_refresh)
             for x, mv in zip(leaves, moves)]
    base_state = _replace(base_state, path, treedef.unflatten(moved))
  return base_state


def _replace(node, path, value):
  if not path:
    return value
  k, rest = path[0], path[1:]
  if isinstance(k, str):
    return node._replace(**{k: _replace(getattr(node, k), rest, value)})
  items = list(node)
  items[k] = _replace(items[k], rest, value)
  return type(node)(items) if isinstance(node, list) else tuple(items)


def scale_by_adam_hf(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
  r"""Adam as Hugging Face's ``AdamW`` (and so the official GaLore) computes it.

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
    u_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
          \frac{m_t}{\sqrt{v_t} + \epsilon}.

  It equals ``optax.scale_by_adam`` with :math:`\epsilon` replaced by
  :math:`\epsilon / \sqrt{1-\beta_2^t}`: a different update whenever
  :math:`\sqrt{\hat v_t}` is not large against :math:`\epsilon`, which is
  the common case for small gradients early in training. The state is
  ``optax.ScaleByAdamState``.

  Args:
    b1, b2: moment decay rates.
    eps: added to :math:`\sqrt{v_t}` before the bias correction.
    mu_dtype: optional dtype of the first moment.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from galore_jax import scale_by_adam_hf
    >>> tx = scale_by_adam_hf(eps=1e-6)
    >>> u, _ = tx.update({"w": jnp.full(3, 1e-3)}, tx.init({"w": jnp.zeros(3)}))
    >>> float(u["w"][0])  # optax.scale_by_adam(eps=1e-6) gives 0.999
    0.9693...

  References:
    Wolf et al., `Transformers <https://arxiv.org/abs/1910.03771>`_, 2020
    (``transformers.AdamW``, ``correct_bias=True``).
  """
  _validation.adam(b1, b2, eps)

  def init_fn(params):
    return optax.ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None):
    del params
    _validation.like_updates("scale_by_adam_hf", updates, state.mu, state.nu)
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_int32_increment(state.count)
    t = count.astype(jnp.float32)
    step = jnp.sqrt(1 - b2**t) / (1 - b1**t)
    updates = jax.tree.map(
        lambda m, v: (step * m / (jnp.sqrt(v) + eps)).astype(m.dtype), mu, nu)
    return updates, optax.ScaleByAdamState(
        count=count, mu=optax.tree.cast(mu, mu_dtype), nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)
