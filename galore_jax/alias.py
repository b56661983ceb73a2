"""The optimizers: GaLore and Q-GaLore transforms chained with weight decay
and the learning rate.

Each alias is a short ``optax.chain`` of a ``scale_by_*`` transform
(:func:`galore_jax.galore.scale_by_galore`,
:func:`galore_jax.q_galore.scale_by_q_galore`), decoupled weight decay in full
space and the learning rate, as ``optax/_src/alias.py`` builds its
optimizers. :func:`forwards_options` gives every alias every keyword option
of its transform from one place.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from galore_jax import _validation
from galore_jax import adam_8bit
from galore_jax import galore
from galore_jax import q_galore


def forwards_options(transform: Callable[..., Any],
                     exclude: tuple[str, ...] = ("mask",)):
  """Makes an alias take every keyword-only option of ``transform``.

  The options are read once, from ``transform``'s signature (its projection
  and refresh settings: ``dim_numbers``, ``svd``, ``stagger``,
  ``on_refresh``, ...), appended to the alias's own signature as
  keyword-only arguments with ``transform``'s defaults, and handed to the
  alias as one dict, ``options``, to pass on. A new option of ``transform``
  so reaches every alias, and ``inspect.signature`` (hence
  ``optax.inject_hyperparams`` and the API reference) shows all of them.
  Options the alias names itself (and ``exclude``) are left to the alias.
  """
  shared = [p for p in inspect.signature(transform).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
            and p.name not in exclude]

  def wrap(alias):
    own = [p for p in inspect.signature(alias).parameters.values()
           if p.name != "options"]
    names = {p.name for p in own}
    extra = [p for p in shared if p.name not in names]
    signature = inspect.Signature(own + extra)

    @functools.wraps(alias)
    def wrapped(*args, **kwargs):
      try:
        bound = signature.bind(*args, **kwargs)
      except TypeError as e:
        raise TypeError(f"{alias.__name__}(): {e}") from None
      bound.apply_defaults()
      arguments = dict(bound.arguments)
      options = {p.name: arguments.pop(p.name) for p in extra}
      return alias(**arguments, options=options)

    wrapped.__signature__ = signature
    return wrapped

  return wrap


def _with_decay(learning_rate, weight_decay, mask,
                tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` -> decoupled weight decay (full space, ``mask``) -> ``-lr``."""
  _validation.learning_rate(learning_rate)
  _validation.concrete_number("weight_decay", weight_decay, low=0)
  return optax.chain(
      tx,
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


@forwards_options(galore.scale_by_galore)
def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: galore.Rank = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    projection_mask: Any = None,
    mu_dtype: Any = None,
    nesterov: bool = False,
    hf_eps: bool = False,
    options: dict,
) -> optax.GradientTransformation:
  r"""AdamW with its moments in GaLore's low-rank subspace.

  ``scale_by_galore(base=scale_by_adam)``, then decoupled weight decay in full
  space (``mask`` as in ``optax.adamw``), then the learning rate:

  .. math::
    p_{t+1} = p_t - \eta_t \left(\mathrm{scale}\cdot
      \mathrm{proj}^{-1}\!\left(\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}
      \right) + \lambda p_t\right).

  The official GaLoreAdamW (HF AdamW) divides by :math:`\sqrt{v_t} + \epsilon`
  before bias correction: pass ``hf_eps=True`` (:func:`scale_by_adam_hf`) to
  reproduce it. It also decays the already-updated weight, a difference of
  order :math:`\eta^2\lambda` per step that is not reproduced.

  Args:
    learning_rate: a scalar or an optax schedule.
    rank, update_proj_gap, scale, proj_type: see :func:`scale_by_galore`.
    b1, b2, eps, eps_root, mu_dtype, nesterov: see ``optax.scale_by_adam``.
    weight_decay: decoupled weight decay, applied in full space.
    mask: weight-decay mask (``optax.adamw``'s convention).
    projection_mask: which leaves to project (``scale_by_galore``'s ``mask``).
    dim_numbers, projector_dtype, svd, power_iters, oversample, seed,
      stagger, on_refresh: keyword-only, every option of
      :func:`scale_by_galore` but ``base`` and ``mask``.
    hf_eps: use the HF/official eps placement (:func:`scale_by_adam_hf`);
      then ``eps_root`` and ``nesterov`` must keep their defaults.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from galore_jax import galore_adamw
    >>> params = {"w": jnp.ones((64, 32))}
    >>> opt = galore_adamw(1e-2, rank=4, update_proj_gap=50, weight_decay=0.1)
    >>> state = opt.init(params)
    >>> loss = lambda p: jnp.sum(jnp.sin(p["w"]) ** 2)
    >>> grads = jax.grad(loss)(params)
    >>> updates, state = opt.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < loss({"w": jnp.ones((64, 32))}))
    True

  References:
    Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, 2024.
    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  _validation.adam(b1, b2, eps)
  _validation.concrete_number("eps_root", eps_root, low=0)
  if not hf_eps:
    base = optax.scale_by_adam(
        b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
        nesterov=nesterov)
  elif nesterov or (
      not _validation.is_tracer(eps_root) and float(eps_root) != 0.0):
    raise ValueError(
        "`hf_eps=True` reproduces HF AdamW, which has no `eps_root` or"
        f" `nesterov`; got eps_root={eps_root!r}, nesterov={nesterov!r}")
  else:
    base = galore.scale_by_adam_hf(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)
  return _with_decay(learning_rate, weight_decay, mask, galore.scale_by_galore(
      rank, update_proj_gap, scale, proj_type, base, mask=projection_mask,
      **options))


@forwards_options(galore.scale_by_galore)
def galore_adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    rank: galore.Rank = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    projection_mask: Any = None,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    options: dict,
) -> optax.GradientTransformation:
  """:func:`galore_adamw` with blockwise 8-bit moments (the paper's 8-bit GaLore).

  The base is :func:`~galore_jax.scale_by_adam_8bit`, for the low-rank
  moments of projected leaves and the full-space moments of the others.

  Args:
    learning_rate: a scalar or an optax schedule.
    rank, update_proj_gap, scale, proj_type: see :func:`scale_by_galore`.
    b1, b2, eps, block_size, min_8bit_size: see
      :func:`~galore_jax.scale_by_adam_8bit`.
    weight_decay, mask: decoupled weight decay and its mask.
    projection_mask: which leaves to project (``scale_by_galore``'s ``mask``).
    dim_numbers, projector_dtype, svd, power_iters, oversample, seed,
      stagger, on_refresh: keyword-only, every option of
      :func:`scale_by_galore` but ``base`` and ``mask``.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from galore_jax import galore_adamw_8bit
    >>> opt = galore_adamw_8bit(1e-2, rank=16)
    >>> state = opt.init({"w": jnp.ones((512, 256))})
    >>> state[0].base_state.mu["w"].codes.shape  # (16, 512) moment, 8-bit
    (32, 256)

  References:
    Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, 2024.
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, 2022.
  """
  base = adam_8bit.scale_by_adam_8bit(
      b1, b2, eps, block_size=block_size, min_8bit_size=min_8bit_size)
  return _with_decay(learning_rate, weight_decay, mask, galore.scale_by_galore(
      rank, update_proj_gap, scale, proj_type, base, mask=projection_mask,
      **options))


@forwards_options(galore.scale_by_galore)
def galore_adam(
    learning_rate: optax.ScalarOrSchedule,
    rank: galore.Rank = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    projection_mask: Any = None,
    mu_dtype: Any = None,
    nesterov: bool = False,
    hf_eps: bool = False,
    options: dict,
) -> optax.GradientTransformation:
  """Adam with its moments in GaLore's subspace; :func:`galore_adamw` without decay.

  Args:
    learning_rate: a scalar or an optax schedule.
    rank, update_proj_gap, scale, proj_type: see :func:`scale_by_galore`.
    b1, b2, eps, eps_root, mu_dtype, nesterov, hf_eps: see
      :func:`galore_adamw`.
    projection_mask: which leaves to project (``scale_by_galore``'s ``mask``).
    dim_numbers, projector_dtype, svd, power_iters, oversample, seed,
      stagger, on_refresh: keyword-only, every option of
      :func:`scale_by_galore` but ``base`` and ``mask``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from galore_jax import galore_adam
    >>> opt = galore_adam(1e-3, rank=4)
    >>> state = opt.init({"w": jnp.ones((16, 8))})
  """
  return galore_adamw(
      learning_rate, rank, update_proj_gap, scale, proj_type, b1, b2, eps,
      eps_root, weight_decay=0.0, projection_mask=projection_mask,
      mu_dtype=mu_dtype, nesterov=nesterov, hf_eps=hf_eps, **options)


@forwards_options(galore.scale_by_galore)
def galore_adafactor(
    learning_rate: optax.ScalarOrSchedule,
    rank: galore.Rank = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    decay_rate: float = 0.8,
    clipping_threshold: Optional[float] = 1.0,
    min_dim_size_to_factor: int = 128,
    eps: float = 1e-30,
    momentum: Optional[float] = None,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    projection_mask: Any = None,
    options: dict,
) -> optax.GradientTransformation:
  """Adafactor with its factored second moment in GaLore's subspace.

  Inside the subspace: ``optax.scale_by_factored_rms`` (row/column factored
  second moment of the low-rank gradient), update clipping by block RMS, and
  optional momentum; then decoupled weight decay and the learning rate.

  Args:
    learning_rate: a scalar or an optax schedule.
    rank, update_proj_gap, scale, proj_type: see :func:`scale_by_galore`.
    decay_rate, min_dim_size_to_factor, eps: see
      ``optax.scale_by_factored_rms`` (``eps`` is its ``epsilon``).
    clipping_threshold: clip each update to this block RMS (None: off).
    momentum: optional first-moment decay, in the subspace.
    weight_decay, mask: decoupled weight decay and its mask.
    projection_mask: which leaves to project (``scale_by_galore``'s ``mask``).
    dim_numbers, projector_dtype, svd, power_iters, oversample, seed,
      stagger, on_refresh: keyword-only, every option of
      :func:`scale_by_galore` but ``base`` and ``mask``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from galore_jax import galore_adafactor
    >>> opt = galore_adafactor(1e-2, rank=4, min_dim_size_to_factor=4)
    >>> state = opt.init({"w": jnp.ones((16, 8))})

  References:
    Shazeer and Stern, `Adafactor <https://arxiv.org/abs/1804.04235>`_, 2018.
  """
  # It decides which axes are factored, so it sets the state's shapes.
  _validation.positive_int("min_dim_size_to_factor", min_dim_size_to_factor)
  _validation.concrete_number("decay_rate", decay_rate, low=0, high=1,
                              low_open=True)
  _validation.concrete_number("eps", eps, low=0)
  if clipping_threshold is not None:
    _validation.concrete_number("clipping_threshold", clipping_threshold,
                                low=0, low_open=True)
  if momentum is not None:
    _validation.concrete_number("momentum", momentum, low=0, high=1,
                                high_open=True)
  factored = optax.scale_by_factored_rms(
      decay_rate=decay_rate, min_dim_size_to_factor=min_dim_size_to_factor,
      epsilon=eps)
  # It reads only the params' shapes and dtypes, which inside the subspace are
  # those of the low-rank gradients (scale_by_galore gives its base no params).
  parts = [optax.GradientTransformation(
      factored.init, lambda g, s, params=None: factored.update(g, s, g))]
  if clipping_threshold is not None:
    parts.append(optax.clip_by_block_rms(clipping_threshold))
  if momentum is not None:
    parts.append(optax.trace(decay=momentum))
  return _with_decay(learning_rate, weight_decay, mask, galore.scale_by_galore(
      rank, update_proj_gap, scale, proj_type, optax.chain(*parts),
      mask=projection_mask, **options))


@forwards_options(galore.scale_by_galore)
def galore_lion(
    learning_rate: optax.ScalarOrSchedule,
    rank: galore.Rank = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 1e-3,
    mask: Any = None,
    *,
    projection_mask: Any = None,
    mu_dtype: Any = None,
    options: dict,
) -> optax.GradientTransformation:
  """Lion with its momentum in GaLore's subspace (``optax.lion``'s defaults).

  Args:
    learning_rate: a scalar or an optax schedule.
    rank, update_proj_gap, scale, proj_type: see :func:`scale_by_galore`.
    b1, b2, mu_dtype: see ``optax.scale_by_lion``.
    weight_decay, mask: decoupled weight decay and its mask.
    projection_mask: which leaves to project (``scale_by_galore``'s ``mask``).
    dim_numbers, projector_dtype, svd, power_iters, oversample, seed,
      stagger, on_refresh: keyword-only, every option of
      :func:`scale_by_galore` but ``base`` and ``mask``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from galore_jax import galore_lion
    >>> opt = galore_lion(1e-4, rank=4)
    >>> state = opt.init({"w": jnp.ones((16, 8))})

  References:
    Chen et al., `Symbolic Discovery of Optimization Algorithms
    <https://arxiv.org/abs/2302.06675>`_, 2023.
  """
  _validation.concrete_number("b1", b1, low=0, high=1, high_open=True)
  _validation.concrete_number("b2", b2, low=0, high=1, high_open=True)
  base = optax.scale_by_lion(b1=b1, b2=b2, mu_dtype=mu_dtype)
  return _with_decay(learning_rate, weight_decay, mask, galore.scale_by_galore(
      rank, update_proj_gap, scale, proj_type, base, mask=projection_mask,
      **options))


@forwards_options(galore.scale_by_galore)
def galore_sgd(
    learning_rate: optax.ScalarOrSchedule,
    rank: galore.Rank = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    momentum: Optional[float] = None,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    mask: Any = None,
    *,
    projection_mask: Any = None,
    options: dict,
) -> optax.GradientTransformation:
  """SGD (optionally with momentum, kept in GaLore's subspace).

  Without momentum the base has no state; the update is the gradient's
  projection onto the subspace, mapped back.

  Args:
    learning_rate: a scalar or an optax schedule.
    rank, update_proj_gap, scale, proj_type: see :func:`scale_by_galore`.
    momentum, nesterov: see ``optax.trace`` (None: no momentum).
    weight_decay, mask: decoupled weight decay and its mask.
    projection_mask: which leaves to project (``scale_by_galore``'s ``mask``).
    dim_numbers, projector_dtype, svd, power_iters, oversample, seed,
      stagger, on_refresh: keyword-only, every option of
      :func:`scale_by_galore` but ``base`` and ``mask``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from galore_jax import galore_sgd
    >>> opt = galore_sgd(1e-2, rank=4, momentum=0.9)
    >>> state = opt.init({"w": jnp.ones((16, 8))})
  """
  if momentum is None:
    base = optax.identity()
  else:
    _validation.concrete_number("momentum", momentum, low=0, high=1,
                                high_open=True)
    base = optax.trace(decay=momentum, nesterov=nesterov)
  return _with_decay(learning_rate, weight_decay, mask, galore.scale_by_galore(
      rank, update_proj_gap, scale, proj_type, base, mask=projection_mask,
      **options))


def _in_float32(base: optax.GradientTransformation):
  """``base`` with float32 state whatever the gradients' dtype; its updates
  are cast back to each gradient's dtype."""
  f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)

  def init_fn(params):
    return base.init(f32(params))

  def update_fn(updates, state, params=None):
    out, state = base.update(f32(updates), state, None)
    return jax.tree.map(lambda u, g: u.astype(g.dtype), out, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


@forwards_options(q_galore.scale_by_q_galore)
def q_galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: galore.Rank = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_bits: int = 4,
    proj_group_size: int = 256,
    cos_threshold: float = 0.4,
    gamma_proj: float = 2,
    queue_size: int = 5,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    state_bits: int = 8,
    mask: Any = None,
    *,
    projection_mask: Any = None,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    hf_eps: bool = False,
    options: dict,
) -> optax.GradientTransformation:
  r"""AdamW in Q-GaLore's quantized, lazily refreshed subspaces.

  ``scale_by_q_galore`` with an Adam base (8-bit moments for
  ``state_bits=8``, float32 for ``state_bits=32``), then decoupled weight
  decay in full space, then the learning rate. Leaves that are not projected
  (embeddings, norms, biases) get the same Adam in full space, 8-bit too when
  ``state_bits=8`` (above ``min_8bit_size`` elements), as in the official
  Q-GaLore, which runs bitsandbytes' ``AdamW8bit`` over every parameter.

  Args:
    learning_rate: a scalar or an optax schedule.
    rank, update_proj_gap, scale, proj_bits, proj_group_size, cos_threshold,
      gamma_proj, queue_size: see :func:`scale_by_q_galore`.
    b1, b2, eps: Adam's parameters.
    weight_decay: decoupled weight decay, applied in full space.
    state_bits: 8 (blockwise 8-bit moments, :func:`scale_by_adam_8bit`) or
      32 (float32 moments).
    mask: weight-decay mask (``optax.adamw``'s convention).
    projection_mask: which leaves to project (``scale_by_q_galore``'s
      ``mask``).
    block_size, min_8bit_size: see :func:`scale_by_adam_8bit`.
    hf_eps: with ``state_bits=32``, the HF/official GaLore eps placement
      (:func:`~galore_jax.scale_by_adam_hf`).
    dim_numbers, proj_type, proj_zero_point, svd, power_iters, oversample,
      seed, stagger, on_refresh: keyword-only, every option of
      :func:`scale_by_q_galore` but ``base`` and ``mask`` (``on_refresh``
      other than ``"keep"`` needs ``state_bits=32``).

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from galore_jax import q_galore_adamw
    >>> params = {"w": jnp.ones((256, 128)), "b": jnp.zeros((128,))}
    >>> opt = q_galore_adamw(1e-2, rank=16, update_proj_gap=50)
    >>> state = opt.init(params)
    >>> loss = lambda p: jnp.sum(jnp.sin(p["w"] + p["b"]) ** 2)
    >>> updates, state = opt.update(jax.grad(loss)(params), state, params)
    >>> bool(loss(optax.apply_updates(params, updates)) < loss(params))
    True

  References:
    Zhang et al., `Q-GaLore <https://arxiv.org/abs/2407.08296>`_, 2024.
  """
  _validation.static("state_bits", state_bits, "8 or 32")
  if state_bits not in (8, 32) or isinstance(state_bits, bool):
    raise ValueError(f"`state_bits` must be 8 or 32, got {state_bits!r}")
  _validation.learning_rate(learning_rate)
  _validation.adam(b1, b2, eps)
  _validation.concrete_number("weight_decay", weight_decay, low=0)
  if state_bits == 8:
    if hf_eps:
      raise ValueError(
          "`hf_eps=True` needs `state_bits=32`: the 8-bit moments follow"
          " bitsandbytes, whose eps placement is optax's")
    base = adam_8bit.scale_by_adam_8bit(
        b1, b2, eps, block_size=block_size, min_8bit_size=min_8bit_size)
  elif hf_eps:
    base = _in_float32(galore.scale_by_adam_hf(b1=b1, b2=b2, eps=eps))
  else:
    base = _in_float32(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
  return optax.chain(
      q_galore.scale_by_q_galore(
          rank, update_proj_gap, scale, base, proj_bits=proj_bits,
          proj_group_size=proj_group_size, cos_threshold=cos_threshold,
          gamma_proj=gamma_proj, queue_size=queue_size,
          mask=projection_mask, **options),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
