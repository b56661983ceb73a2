"""NumPy port of the official GaLore (galore-torch 1.0): the test oracle.

Follows ``galore_torch/galore_projector.py`` and ``galore_torch/adamw.py``
(REFERENCE.md §1) line by line, on torch-layout weights ``(out, in)``, in
float64. The one deliberate change: singular vectors get canonical signs
(largest-magnitude entry positive), because LAPACK, cuSOLVER and torch pick
signs arbitrarily and GaLore's moments, kept across refreshes, depend on them.
"""

from __future__ import annotations

import math

import numpy as np


def canonical(v: np.ndarray) -> np.ndarray:
  """Flips each row of ``v`` so its largest-magnitude entry is positive."""
  idx = np.argmax(np.abs(v), axis=-1)
  sign = np.sign(v[np.arange(v.shape[0]), idx])
  sign[sign == 0] = 1
  return v * sign[:, None]


class Projector:
  """``GaLoreProjector``: ``project(grad, iter)`` and ``project_back``."""

  def __init__(self, rank, update_proj_gap=200, scale=1.0, proj_type="std"):
    self.rank, self.gap, self.scale, self.proj_type = (
        rank, update_proj_gap, scale, proj_type)
    self.ortho = None

  def _orth(self, g, kind):
    u, _, vh = np.linalg.svd(g.astype(np.float64), full_matrices=False)
    if kind == "right":
      return canonical(vh[: self.rank, :])                  # (r, n)
    if kind == "left":
      return canonical(u[:, : self.rank].T).T               # (m, r)
    return [canonical(u[:, : self.rank].T).T, canonical(vh[: self.rank, :])]

  def _side(self, g):
    m, n = g.shape
    return {
        "std": "right" if m >= n else "left",
        "reverse_std": "left" if m >= n else "right",
        "right": "right",
        "left": "left",
        "full": "full",
    }[self.proj_type]

  def project(self, g, it):
    side = self._side(g)
    if self.ortho is None or it % self.gap == 0:
      self.ortho = self._orth(g, side)
    if side == "right":
      return g @ self.ortho.T
    if side == "left":
      return self.ortho.T @ g
    return self.ortho[0].T @ g @ self.ortho[1].T

  def project_back(self, r, g_shape):
    side = self._side(np.empty(g_shape))
    if side == "right":
      out = r @ self.ortho
    elif side == "left":
      out = self.ortho @ r
    else:
      out = self.ortho[0] @ r @ self.ortho[1]
    return out * self.scale


class GaLoreAdamW:
  """``galore_torch.GaLoreAdamW`` (HF AdamW, ``correct_bias=True``).

  ``params``: list of float64 arrays (torch layout), updated in place.
  ``galore``: list of dicts (rank, update_proj_gap, scale, proj_type) or None
  per param (None: plain AdamW).
  """

  projector_cls = Projector

  def __init__(self, params, galore, lr, betas=(0.9, 0.999), eps=1e-6,
               weight_decay=0.0):
    self.params = params
    self.galore = galore
    self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
    self.state = [dict(step=0) for _ in params]

  def step(self, grads):
    b1, b2 = self.betas
    for p, grad, cfg, state in zip(self.params, grads, self.galore, self.state):
      if cfg is not None:
        if "projector" not in state:
          state["projector"] = self.projector_cls(**cfg)
        grad = state["projector"].project(grad, state["step"])
      if "exp_avg" not in state:
        state["exp_avg"] = np.zeros_like(grad)
        state["exp_avg_sq"] = np.zeros_like(grad)
      state["step"] += 1
      m = state["exp_avg"] = b1 * state["exp_avg"] + (1 - b1) * grad
      v = state["exp_avg_sq"] = b2 * state["exp_avg_sq"] + (1 - b2) * grad**2
      denom = np.sqrt(v) + self.eps
      t = state["step"]
      step_size = self.lr * math.sqrt(1 - b2**t) / (1 - b1**t)
      norm_grad = m / denom
      if cfg is not None:
        norm_grad = state["projector"].project_back(norm_grad, p.shape)
      p -= step_size * norm_grad
      if self.wd > 0.0:
        p -= self.lr * self.wd * p
