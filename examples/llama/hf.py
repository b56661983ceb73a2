"""Hugging Face LLaMA checkpoints: read into the NNX model, and written.

:func:`load_into` reads ``config.json`` and ``model.safetensors`` (or the
shards listed in ``model.safetensors.index.json``); :func:`save` writes a
trained model as ``config.json`` + ``model.safetensors`` that
``transformers.LlamaForCausalLM.from_pretrained`` and :func:`load_into`
both load. NumPy alone: no torch, no network. HF stores a Linear weight as
``(out, in)``; a Flax kernel is its transpose.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from galore_jax import lora
from examples.llama import models as model_lib

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
CHECKPOINT_FILES = ("config.json", "model.safetensors",
                    "model.safetensors.index.json")


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """``{name: array}`` of one ``.safetensors`` file (the documented format:
  an 8-byte little-endian header size, a JSON header, raw tensor bytes)."""
  raw = path.read_bytes()
  (size,) = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8:8 + size])
  header.pop("__metadata__", None)
  out = {}
  for name, info in header.items():
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype"
                       f" {info['dtype']}")
    begin, end = info["data_offsets"]
    buf = raw[8 + size + begin:8 + size + end]
    out[name] = np.frombuffer(buf, _DTYPES[info["dtype"]]).reshape(
        info["shape"])
  return out


def read_config(directory: str | pathlib.Path) -> model_lib.Config:
  """The :class:`~examples.llama.models.Config` of an HF ``config.json``;
  its recipe rank is ``hidden / 4``, as in the GaLore paper's configs."""
  path = pathlib.Path(directory) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"--init-from: no config.json in {directory}")
  c = json.loads(path.read_text())
  if c.get("model_type", "llama") != "llama":
    raise ValueError(f"--init-from: {path} is a {c['model_type']!r} model,"
                     " not a LLaMA")
  if c.get("rope_scaling"):
    raise ValueError(f"--init-from: rope_scaling {c['rope_scaling']!r} is"
                     " not supported")
  theta = c.get("rope_theta", (c.get("rope_parameters") or {}).get(
      "rope_theta", 10000.0))
  return model_lib.Config(
      hidden=c["hidden_size"], intermediate=c["intermediate_size"],
      heads=c["num_attention_heads"], layers=c["num_hidden_layers"],
      vocab=c["vocab_size"], kv_heads=c.get("num_key_value_heads"),
      tie_embeddings=bool(c.get("tie_word_embeddings", False)),
      rope_theta=float(theta), norm_eps=float(c.get("rms_norm_eps", 1e-6)),
      rank=max(1, c["hidden_size"] // 4))  # the paper's rank: hidden / 4


def read_weights(directory: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint, single-file or sharded."""
  directory = pathlib.Path(directory)
  index = directory / "model.safetensors.index.json"
  if index.is_file():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif (directory / "model.safetensors").is_file():
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(f"--init-from: no model.safetensors (or index)"
                            f" in {directory}")
  weights = {}
  for f in files:
    weights.update(read_safetensors(directory / f))
  return weights


def _hf_layer_names(i: int) -> dict[tuple[str, ...], tuple[str, bool]]:
  """Our path inside block ``i`` -> (HF name, transpose)."""
  p = f"model.layers.{i}."
  names = {("attn", n, "kernel"): (f"{p}self_attn.{n}_proj.weight", True)
           for n in ("q", "k", "v", "o")}
  names.update({("mlp", n, "kernel"): (f"{p}mlp.{n}_proj.weight", True)
                for n in ("gate", "up", "down")})
  names[("attn_norm", "scale")] = (f"{p}input_layernorm.weight", False)
  names[("mlp_norm", "scale")] = (f"{p}post_attention_layernorm.weight", False)
  return names


def _set(tree: dict, path: tuple, value: np.ndarray, name: str):
  node = tree
  for k in path[:-1]:
    node = node[k]
  want = tuple(node[path[-1]].shape)
  if value.shape != want:
    raise ValueError(f"--init-from: {name} has shape {value.shape}, the model"
                     f" expects {want}")
  node[path[-1]][...] = value


def load_into(model: model_lib.Llama, directory: str | pathlib.Path) -> None:
  """Overwrites ``model``'s params with the checkpoint's (in place).

  Raises:
    ValueError: a missing tensor, a shape mismatch, or tensors left over.
  """
  weights = read_weights(directory)
  cfg = model.cfg
  state = nnx.state(model, nnx.Param)
  params = jax.tree.map(np.array, nnx.to_pure_dict(state))  # writable
  used = set()

  def take(name, transpose):
    if name not in weights:
      raise ValueError(f"--init-from: tensor {name!r} is missing from"
                       f" {directory}")
    used.add(name)
    w = np.asarray(weights[name], np.float32)
    return w.T if transpose else w

  _set(params, ("embed", "embedding"), take("model.embed_tokens.weight",
                                            False), "embed_tokens")
  _set(params, ("norm", "scale"), take("model.norm.weight", False), "norm")
  if not cfg.tie_embeddings:
    _set(params, ("lm_head", "kernel"), take("lm_head.weight", True),
         "lm_head")
  elif "lm_head.weight" in weights:  # HF may store the tied copy too
    if not np.array_equal(weights["lm_head.weight"],
                          weights["model.embed_tokens.weight"]):
      raise ValueError("--init-from: lm_head.weight differs from the"
                       " embedding, but the model ties them: tensors not"
                       " used by this model: ['lm_head.weight']")
    used.add("lm_head.weight")
  for i in range(cfg.layers):
    for path, (name, transpose) in _hf_layer_names(i).items():
      w = take(name, transpose)
      if model.scan_layers:
        stacked = params["layers"]
        for k in path[:-1]:
          stacked = stacked[k]
        full = stacked[path[-1]]
        if full.shape[1:] != w.shape:
          raise ValueError(f"--init-from: {name} has shape {w.shape}, the"
                           f" model expects {full.shape[1:]}")
        full[i] = w
      else:
        _set(params["layers"][i], path, w, name)
  extra = sorted(set(weights) - used - {
      n for n in weights if n.endswith("rotary_emb.inv_freq")})
  if extra:
    raise ValueError(f"--init-from: tensors not used by this model: {extra[:5]}"
                     f"{' ...' if len(extra) > 5 else ''}")
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(model, state)


# ---------------------------------------------------------------------------
# Writing.


def write_safetensors(path: str | pathlib.Path,
                      tensors: dict[str, np.ndarray]) -> None:
  """Writes ``tensors`` as one ``.safetensors`` file (the format
  :func:`read_safetensors` reads; the header padded to 8 bytes, metadata
  ``{"format": "pt"}`` as transformers writes it), through a temporary
  file renamed into place."""
  path = pathlib.Path(path)
  header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
  for name, x in tensors.items():
    x = np.ascontiguousarray(x)
    if x.dtype not in _NAMES:
      raise ValueError(f"tensor {name!r} has unsupported dtype {x.dtype}")
    blobs.append(x.tobytes())
    header[name] = {"dtype": _NAMES[x.dtype], "shape": list(x.shape),
                    "data_offsets": [offset, offset + len(blobs[-1])]}
    offset += len(blobs[-1])
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for blob in blobs:
      f.write(blob)
  os.replace(tmp, path)


def hf_config(cfg: model_lib.Config, dtype: str = "F32",
              max_positions: int = 2048) -> dict:
  """The ``config.json`` of a ``LlamaForCausalLM`` of shape ``cfg``
  (``dtype``: the weights' safetensors dtype); :func:`read_config` reads it
  back to ``cfg``'s shape."""
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "hidden_size": cfg.hidden, "intermediate_size": cfg.intermediate,
      "num_attention_heads": cfg.heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "num_hidden_layers": cfg.layers, "head_dim": cfg.head_dim,
      "vocab_size": cfg.vocab, "hidden_act": "silu",
      "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
      "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": max_positions,
      "attention_bias": False, "mlp_bias": False,
      "torch_dtype": _TORCH_DTYPES.get(dtype, "float32"),
  }


def check_target(directory: str | pathlib.Path) -> None:
  """Raises ``FileExistsError`` if ``directory`` is a file or already holds
  a checkpoint, which :func:`save` would overwrite."""
  directory = pathlib.Path(directory)
  if directory.exists() and not directory.is_dir():
    raise FileExistsError(f"--save-hf: {directory} is a file, not a"
                          " directory")
  held = [f for f in CHECKPOINT_FILES if (directory / f).exists()]
  if held:
    raise FileExistsError(
        f"--save-hf: {directory} already holds a checkpoint ({held[0]});"
        " choose a new directory, nothing there is overwritten")


def hf_tensors(params: dict, cfg: model_lib.Config,
               scan_layers: bool) -> dict[str, np.ndarray]:
  """``{HF name: array}`` of a float params pure dict of the model
  (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``): the inverse of
  :func:`load_into`'s mapping."""
  p = jax.tree.map(np.asarray, params)
  out = {"model.embed_tokens.weight": p["embed"]["embedding"]}
  for i in range(cfg.layers):
    for path, (name, transpose) in _hf_layer_names(i).items():
      node = p["layers"] if scan_layers else p["layers"][i]
      for k in path:
        node = node[k]
      w = node[i] if scan_layers else node
      out[name] = w.T if transpose else w
  out["model.norm.weight"] = p["norm"]["scale"]
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = p["lm_head"]["kernel"].T
  return out


def save(model: nnx.Module, directory: str | pathlib.Path, *,
         max_positions: int = 2048) -> pathlib.Path:
  """Writes ``model`` to ``directory`` as ``config.json`` +
  ``model.safetensors`` in its params' dtype.

  A LoRA / QLoRA model is saved merged (``W + (alpha / r) A B``, a quantized
  base dequantized; :func:`galore_jax.lora.merge` on a copy) and frozen
  params are saved as params: the checkpoint is a plain LLaMA. The weights
  are written before ``config.json``, each through a temporary file.

  Args:
    model: a :class:`~examples.llama.models.Llama`, possibly converted by
      :func:`galore_jax.lora.apply` or :func:`galore_jax.lora.freeze`,
      with float params (dequantize INT8 ones first).
    directory: created if missing; must not hold a checkpoint already.
    max_positions: the config's ``max_position_embeddings``.

  Returns:
    ``directory``.

  Raises:
    FileExistsError: ``directory`` already holds a checkpoint.
  """
  directory = pathlib.Path(directory)
  check_target(directory)
  graphdef, state = nnx.split(model)
  plain = lora.merge(nnx.merge(graphdef, state))  # the caller's stays
  params = nnx.to_pure_dict(nnx.state(plain, nnx.Param))
  tensors = hf_tensors(params, plain.cfg, plain.scan_layers)
  dtype = _NAMES[np.dtype(tensors["model.embed_tokens.weight"].dtype)]
  directory.mkdir(parents=True, exist_ok=True)
  write_safetensors(directory / "model.safetensors", tensors)
  config = json.dumps(hf_config(plain.cfg, dtype, max_positions), indent=2)
  tmp = directory / f".config.json.tmp-{os.getpid()}"
  tmp.write_text(config + "\n")
  os.replace(tmp, directory / "config.json")
  return directory
