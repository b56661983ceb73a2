"""MNIST from an ``mnist.npz``, a directory of IDX files, or the mirrors.

``load(path)`` accepts

* an ``.npz`` with ``x_train (60000, 28, 28) uint8``, ``y_train``,
  ``x_test``, ``y_test`` (the common ``mnist.npz`` layout), or
* a directory with the four IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``), each gzipped (``.gz``) or not.

With no path, ``~/.cache/galore_jax/mnist`` is used, and filled by
downloading the gzipped IDX files from the public mirrors when there is a
network. Downloads are verified against the SHA-256 of the genuine MNIST
arrays, so a corrupt or altered file is never used.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import urllib.error
import urllib.request
import zipfile
import zlib
from typing import NamedTuple, Optional

import numpy as np

DEFAULT_DIR = pathlib.Path("~/.cache/galore_jax/mnist")
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
           "https://storage.googleapis.com/cvdf-datasets/mnist/")
FILES = {"x_train": "train-images-idx3-ubyte",
         "y_train": "train-labels-idx1-ubyte",
         "x_test": "t10k-images-idx3-ubyte",
         "y_test": "t10k-labels-idx1-ubyte"}
SHAPES = {"x_train": (60000, 28, 28), "y_train": (60000,),
          "x_test": (10000, 28, 28), "y_test": (10000,)}
# SHA-256 of each genuine array's uint8 bytes (C order).
SHA256 = {
    "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}


class MNIST(NamedTuple):
  """uint8 images ``(N, 28, 28)`` and uint8 labels ``(N,)``."""
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


class DataError(ValueError):
  """A missing, corrupt or mis-shaped MNIST file."""


def _check(arrays: dict, source: str) -> MNIST:
  for name in FILES:
    a = arrays[name]
    if a.dtype != np.uint8:
      raise DataError(f"{source}: {name} has dtype {a.dtype}, expected uint8")
    rows = len(arrays["x_" + name.split("_")[1]])
    want = (rows, 28, 28) if name.startswith("x") else (rows,)
    if a.shape != want or not rows:
      raise DataError(f"{source}: {name} has shape {a.shape}, expected"
                      f" {want} (images N x 28 x 28, labels N)")
    if name.startswith("y") and a.max() > 9:
      raise DataError(f"{source}: {name} holds label {a.max()}, expected"
                      " 0..9")
  return MNIST(**{k: arrays[k] for k in FILES})


def load_npz(path: str | os.PathLike) -> MNIST:
  try:
    with np.load(path) as f:
      missing = [k for k in FILES if k not in f]
      if missing:
        raise DataError(f"{path}: missing keys {missing}; an mnist.npz holds"
                        f" {', '.join(FILES)}")
      arrays = {k: f[k] for k in FILES}
  except (OSError, ValueError, zlib.error, EOFError, zipfile.BadZipFile,
          KeyError) as e:  # a truncated archive raises BadZipFile
    if isinstance(e, DataError):
      raise
    raise DataError(f"{path}: not a readable .npz ({e})") from e
  return _check(arrays, str(path))


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """One IDX file (gzipped or not): magic ``0x0000 08 ndim``, big-endian
  uint32 dims, then uint8 data."""
  path = pathlib.Path(path)
  try:
    raw = (gzip.decompress(path.read_bytes()) if path.suffix == ".gz"
           else path.read_bytes())
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path}: cannot read ({e})") from e
  if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
    raise DataError(f"{path}: not an IDX file of uint8 (bad magic"
                    f" {raw[:4].hex()})")
  ndim = raw[3]
  dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(dims)):
    raise DataError(f"{path}: header says {dims} = {int(np.prod(dims))}"
                    f" values, the file holds {data.size}")
  return data.reshape(dims)


def _idx_path(directory: pathlib.Path, stem: str) -> Optional[pathlib.Path]:
  for name in (stem, stem + ".gz"):
    if (directory / name).is_file():
      return directory / name
  return None


def load_idx_dir(directory: str | os.PathLike) -> MNIST:
  directory = pathlib.Path(directory)
  paths = {k: _idx_path(directory, stem) for k, stem in FILES.items()}
  missing = [FILES[k] for k, p in paths.items() if p is None]
  if missing:
    raise DataError(f"{directory}: missing IDX files {missing} (gzipped or"
                    " not)")
  return _check({k: read_idx(p) for k, p in paths.items()}, str(directory))


def verify(data: MNIST) -> None:
  """Raises unless every array is the genuine MNIST's (SHA-256)."""
  for name, want in SHA256.items():
    got = hashlib.sha256(np.ascontiguousarray(getattr(data, name))).hexdigest()
    if got != want:
      raise DataError(f"{name} does not match the genuine MNIST (sha256"
                      f" {got[:12]}..., expected {want[:12]}...)")


def download(directory: pathlib.Path, timeout: float = 30.0) -> MNIST:
  """Fetches the four gzipped IDX files from the first mirror that answers,
  verifies them, and keeps them in ``directory``."""
  directory.mkdir(parents=True, exist_ok=True)
  errors = []
  for mirror in MIRRORS:
    try:
      for stem in FILES.values():
        target = directory / (stem + ".gz")
        if not target.is_file():
          with urllib.request.urlopen(mirror + stem + ".gz",
                                      timeout=timeout) as r:
            blob = r.read()
          tmp = target.with_suffix(".part")
          tmp.write_bytes(blob)
          tmp.replace(target)
      data = load_idx_dir(directory)
      verify(data)
      return data
    except (urllib.error.URLError, OSError, DataError) as e:
      errors.append(f"{mirror}: {e}")
      for stem in FILES.values():  # never keep a bad or partial download
        (directory / (stem + ".gz")).unlink(missing_ok=True)
  raise DataError(
      "MNIST is not available: no local copy and the download failed\n  "
      + "\n  ".join(errors) + f"\nPut mnist.npz or the four IDX files"
      f" ({', '.join(FILES.values())}, .gz or not) in {directory}, or pass"
      " --data PATH")


def load(path: Optional[str | os.PathLike] = None) -> MNIST:
  """MNIST from ``path`` (an ``.npz`` or an IDX directory), or the cache.

  Raises:
    DataError: a missing path, a corrupt or mis-shaped file, or no data and
      no network.
  """
  if path is None:
    directory = DEFAULT_DIR.expanduser()
    if (directory / "mnist.npz").is_file():
      return load_npz(directory / "mnist.npz")
    if directory.is_dir() and all(_idx_path(directory, s) for s in
                                  FILES.values()):
      return load_idx_dir(directory)
    return download(directory)
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    if (path / "mnist.npz").is_file():
      return load_npz(path / "mnist.npz")
    return load_idx_dir(path)
  if path.is_file():
    return load_npz(path)
  raise DataError(f"--data: {path} does not exist (an mnist.npz or a"
                  " directory of the four IDX files)")
