"""Rebuilding per-leaf state records that a container library reshaped.

``nnx.Optimizer`` stores optimizer state that mirrors the params as Flax
``State``: a NamedTuple at a param's position comes back to ``update`` as a
plain tuple after ``init``, and as a mapping keyed by field name (in sorted
order) after an update. Reading such a record by position would silently
swap its arrays; :func:`as_record` reads it by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


_REQUIRED = object()


def as_record(cls: type, entry: Any, missing: Any = _REQUIRED) -> Any:
  """``entry`` as an instance of the NamedTuple ``cls``.

  Accepts an instance, a positional tuple or list, or a mapping from field
  names to values; a field absent from the mapping (Flax drops empty nodes
  such as ``optax.MaskedNode()``) takes ``missing`` if given.
  """
  if isinstance(entry, cls):
    return entry
  fields = cls._fields
  if isinstance(entry, Mapping) or (
      hasattr(entry, "keys") and hasattr(entry, "__getitem__")):
    keys = set(entry.keys())
    if not keys <= set(fields):
      raise ValueError(
          f"cannot read a {cls.__name__} from a mapping with keys"
          f" {sorted(map(str, keys))}; expected fields {list(fields)}")
    absent = [k for k in fields if k not in keys]
    if absent and missing is _REQUIRED:
      raise ValueError(
          f"cannot read a {cls.__name__}: fields {absent} are missing from"
          f" {sorted(map(str, keys))}")
    return cls(**{k: entry[k] if k in keys else missing for k in fields})
  if isinstance(entry, (tuple, list)) and len(entry) == len(fields):
    return cls(*entry)
  raise ValueError(
      f"cannot read a {cls.__name__} (fields {list(fields)}) from {entry!r}")
