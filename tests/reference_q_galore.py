"""NumPy port of the official Q-GaLore projector (q-galore-torch 1.0): the oracle.

Follows ``GaLoreProjector`` of ``q_galore_torch`` with ``quant=True``
(REFERENCE.md §2): ``proj_type='std'`` only, the projector quantized
group-wise (asymmetric min-max, zero point) over its row-major flattening and
dequantized when used, and the layer-adaptive gap driven by a FIFO of cosine
similarities between consecutive first singular vectors. As in
``reference_galore``, singular vectors get canonical signs; the SVD runs in
float64 and, as the official code, the projector is quantized in float32.
"""

from __future__ import annotations

import numpy as np

from tests import reference_galore


def quantize(w, n_bit, group_size):
  """``_quantize``: returns (codes, scales, zeros, shape), float32 math."""
  shape = w.shape
  w = w.astype(np.float32).reshape(-1, group_size)
  max_int = 2**n_bit - 1
  hi = w.max(axis=1, keepdims=True)
  lo = w.min(axis=1, keepdims=True)
  scales = (np.maximum(hi - lo, np.float32(1e-5)) / np.float32(max_int)
            ).astype(np.float32)
  zeros = np.clip(-np.round(lo / scales), 0, max_int).astype(np.float32)
  codes = np.clip(np.round(w / scales) + zeros, 0, max_int).astype(np.uint8)
  return codes.reshape(shape), scales, zeros, shape


def dequantize(codes, scales, zeros, shape):
  q = codes.reshape(scales.shape[0], -1).astype(np.float32)
  return (scales * (q - zeros)).reshape(shape)


def cosine(a, b, eps=1e-8):
  """``F.cosine_similarity(a, b, dim=0).item()``."""
  return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), eps))


class QProjector:
  """``q_galore_torch.GaLoreProjector(quant=True)``, ``proj_type='std'``."""

  def __init__(self, rank, update_proj_gap=200, scale=1.0, proj_type="std",
               n_bit=4, group_size=256, cos_threshold=0.4, gamma_proj=2,
               queue_size=5):
    assert proj_type == "std"
    self.rank, self.update_proj_gap, self.scale = rank, update_proj_gap, scale
    self.n_bit, self.group_size = n_bit, group_size
    self.cos_threshold, self.gamma_proj = cos_threshold, gamma_proj
    self.queue_size, self.queue = queue_size, []
    self.past_ortho_vector = None
    self.ortho = None  # (codes, scales, zeros, shape)
    self.svd_count = 0
    self.refresh_steps = []

  def _orth(self, g, kind):
    u, _, vh = np.linalg.svd(g.astype(np.float64), full_matrices=False)
    if kind == "right":
      return reference_galore.canonical(vh[: self.rank, :])          # (r, n)
    return reference_galore.canonical(u[:, : self.rank].T).T         # (m, r)

  def _side(self, shape):
    return "right" if shape[0] >= shape[1] else "left"

  def project(self, g, it):
    side = self._side(g.shape)
    if self.ortho is None or it % self.update_proj_gap == 0:
      mat = self._orth(g, side).astype(np.float32)
      self.svd_count += 1
      self.refresh_steps.append(it)
      vec = (mat[:1, :] if side == "right" else mat[:, :1]).flatten()
      if self.past_ortho_vector is not None:
        if len(self.queue) == self.queue_size:
          self.queue.pop(0)
        self.queue.append(cosine(self.past_ortho_vector, vec))
        if (len(self.queue) == self.queue_size
            and sum(self.queue) / self.queue_size >= self.cos_threshold):
          self.update_proj_gap = int(self.update_proj_gap * self.gamma_proj)
      self.past_ortho_vector = vec.copy()
      self.ortho = quantize(mat, self.n_bit, self.group_size)
    mat = dequantize(*self.ortho).astype(np.float64)
    return g @ mat.T if side == "right" else mat.T @ g

  def project_back(self, r, g_shape):
    mat = dequantize(*self.ortho).astype(np.float64)
    out = r @ mat if self._side(g_shape) == "right" else mat @ r
    return out * self.scale


class QGaLoreAdamW(reference_galore.GaLoreAdamW):
  """GaLore's HF AdamW with the Q-GaLore projector (float32 moments)."""

  projector_cls = QProjector
