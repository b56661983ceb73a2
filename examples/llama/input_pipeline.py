"""Token streams for the LLaMA example: built-in corpus, files, token ids.

The default corpus is always there: the Python standard library sources of
the running interpreter, as bytes (vocabulary 256 + BOS, EOS, PAD). Files go
to validation or training by a hash of their relative path, so the split is
deterministic and never cuts a file.

Batches are random windows drawn from ``numpy.random.default_rng((seed,
position))``: the batch at a given data position is always the same, which is
what makes a resumed run bit-identical.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sysconfig
import zlib
from typing import Optional, Sequence

import numpy as np

VAL_FRACTION = 0.05


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, then BOS=256, EOS=257, PAD=258."""
  bos, eos, pad = 256, 257, 258
  vocab_size = 259

  def encode(self, data: bytes) -> np.ndarray:
    return np.frombuffer(data, np.uint8).astype(np.uint16)

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids if i < 256).decode("utf-8", "replace")


class HFTokenizer:
  """A local Hugging Face ``tokenizer.json`` (needs ``tokenizers``)."""

  def __init__(self, path: str):
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / "tokenizer.json"
    if not path.is_file():
      raise FileNotFoundError(f"--tokenizer: no tokenizer file at {path}")
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("--tokenizer needs the `tokenizers` package: pip"
                        " install tokenizers") from e
    try:
      self._tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises plain Exceptions
      raise ValueError(f"--tokenizer: {path} is not a Hugging Face"
                       f" tokenizer.json ({e})") from None
    self.vocab_size = self._tok.get_vocab_size()
    eos = next((t for t in ("</s>", "<|endoftext|>", "<eos>", "[SEP]")
                if self._tok.token_to_id(t) is not None), None)
    self.eos = None if eos is None else self._tok.token_to_id(eos)

  def encode(self, data: bytes) -> np.ndarray:
    ids = self._tok.encode(data.decode("utf-8", "replace")).ids
    return np.asarray(ids, np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids])


@dataclasses.dataclass
class Corpus:
  """Train and validation token ids, and where they came from."""
  train: np.ndarray
  val: np.ndarray
  vocab_size: int
  description: str


def stdlib_dir() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _is_val(rel_path: str) -> bool:
  return zlib.crc32(rel_path.encode()) % 1000 < VAL_FRACTION * 1000


def _read_files(root: pathlib.Path, files: Sequence[pathlib.Path], tokenizer):
  """Concatenates the tokenized files, each followed by EOS, split by file."""
  parts = {True: [], False: []}
  n_bytes = 0
  for f in files:
    data = f.read_bytes()
    if not data:
      continue
    n_bytes += len(data)
    ids = tokenizer.encode(data)
    if tokenizer.eos is not None:
      ids = np.append(ids, np.asarray([tokenizer.eos], ids.dtype))
    parts[_is_val(f.relative_to(root).as_posix())].append(ids)
  if not parts[False] and not parts[True]:
    return np.zeros(0, np.int32), np.zeros(0, np.int32), n_bytes
  if not parts[False] or not parts[True]:
    # Too few files to split by file: the last 5% of the stream validates.
    ids = np.concatenate(parts[False] + parts[True])
    cut = int(len(ids) * (1 - VAL_FRACTION))
    return ids[:cut], ids[cut:], n_bytes
  return np.concatenate(parts[False]), np.concatenate(parts[True]), n_bytes


def _text_files(root: pathlib.Path, pattern: str) -> list[pathlib.Path]:
  return sorted(p for p in root.rglob(pattern)
                if p.is_file() and "site-packages" not in p.parts
                and "__pycache__" not in p.parts)


def load(data: Optional[str] = None, tokenizer: Optional[str] = None,
         verbose: bool = True) -> Corpus:
  """The token streams of ``--data`` (default: the stdlib sources).

  Args:
    data: None (the running Python's standard library ``*.py`` files), a
      text file, a directory of text files (all files, recursively), or a
      ``.bin`` (uint16, as nanoGPT writes) / ``.npy`` file of token ids.
    tokenizer: a local HF ``tokenizer.json`` (or a directory holding one);
      default: bytes.
    verbose: print what was read.

  Returns:
    A :class:`Corpus`.

  Raises:
    FileNotFoundError, ValueError: a missing or empty path, or ids that do
      not fit the tokenizer's vocabulary.
  """
  tok = ByteTokenizer() if tokenizer is None else HFTokenizer(tokenizer)
  if data is None:
    root = stdlib_dir()
    files = _text_files(root, "*.py")
    if not files:
      raise FileNotFoundError(f"no *.py files under the stdlib dir {root}")
    train, val, n_bytes = _read_files(root, files, tok)
    what = f"Python {sysconfig.get_python_version()} stdlib at {root}"
  else:
    path = pathlib.Path(os.path.expanduser(data))
    if not path.exists():
      raise FileNotFoundError(f"--data: {path} does not exist")
    if path.suffix in (".bin", ".npy") and path.is_file():
      try:
        ids = (np.load(path, allow_pickle=False) if path.suffix == ".npy"
               else np.fromfile(path, np.uint16))
      except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"--data: {path} is not a readable token-id file"
                         f" ({type(e).__name__}: {e})") from None
      if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"--data: {path} must hold a 1-D integer array of"
                         f" token ids, got {ids.dtype} {ids.shape}")
      if ids.size and ids.min() < 0:
        raise ValueError(f"--data: {path} holds negative token ids")
      cut = int(len(ids) * (1 - VAL_FRACTION))
      train, val, n_bytes = ids[:cut], ids[cut:], path.stat().st_size
      if tokenizer is None and ids.size:
        tok.vocab_size = int(ids.max()) + 1  # ids, not bytes
      files = [path]
      what = f"token ids from {path}"
    else:
      root = path if path.is_dir() else path.parent
      files = _text_files(path, "*") if path.is_dir() else [path]
      if not files:
        raise ValueError(f"--data: no files under {path}")
      train, val, n_bytes = _read_files(root, files, tok)
      what = f"text from {path}"
  if len(train) == 0 or len(val) == 0:
    raise ValueError(f"--data: {data or 'the stdlib'} holds no tokens to"
                     " train and validate on")
  top = max(int(train.max()), int(val.max()))
  if top >= tok.vocab_size:
    raise ValueError(f"token id {top} is outside the vocabulary"
                     f" ({tok.vocab_size}); pass --tokenizer")
  desc = (f"{what}: {len(files)} files, {n_bytes:,} bytes -> {len(train):,}"
          f" train / {len(val):,} val tokens, vocab {tok.vocab_size}")
  if verbose:
    print(desc, flush=True)
  return Corpus(train.astype(np.int32), val.astype(np.int32), tok.vocab_size,
                desc)


def _check_length(ids: np.ndarray, seq_len: int, name: str):
  if len(ids) < seq_len + 1:
    raise ValueError(f"the {name} split has {len(ids)} tokens, fewer than"
                     f" --seq-len + 1 = {seq_len + 1}")


def batch(ids: np.ndarray, position: int, batch_size: int, seq_len: int,
          seed: int) -> np.ndarray:
  """``(batch_size, seq_len + 1)`` random windows: batch ``position``."""
  _check_length(ids, seq_len, "train")
  rng = np.random.default_rng((seed, position))
  starts = rng.integers(0, len(ids) - seq_len, batch_size)
  return np.stack([ids[s:s + seq_len + 1] for s in starts])


def eval_batches(ids: np.ndarray, n_batches: int, batch_size: int,
                 seq_len: int) -> np.ndarray:
  """``(n, batch_size, seq_len + 1)`` windows evenly spaced over ``ids``."""
  _check_length(ids, seq_len, "validation")
  n = n_batches * batch_size
  starts = np.linspace(0, len(ids) - seq_len - 1, n).astype(np.int64)
  windows = np.stack([ids[s:s + seq_len + 1] for s in starts])
  return windows.reshape(n_batches, batch_size, seq_len + 1)
