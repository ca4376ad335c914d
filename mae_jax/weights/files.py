"""Reading and writing weight files: `.pth` (torch, `weights_only=True` only), `.safetensors`.

torch and safetensors are imported only when a file of theirs is read or written.
"""

import os

import numpy as np


def as_numpy(value, key):
  """A torch tensor or array-like -> numpy (non-float32 tensors as float32)."""
  if hasattr(value, "detach"):  # a torch.Tensor; no torch import needed otherwise
    value = value.detach().cpu()
    if not value.dtype.is_floating_point or value.element_size() != 4:
      value = value.float()
    return value.numpy()
  if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "__array__"):
    return np.asarray(value)
  raise TypeError(f"checkpoint entry {key!r} is a {type(value).__name__}, not an array")


def _read_safetensors(path):
  try:
    from safetensors.numpy import load_file
  except ImportError as e:
    raise ImportError(f"reading {path} needs safetensors (pip install safetensors)") from e
  try:
    return load_file(path)
  except Exception as e:  # safetensors raises its own error types
    raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def read_state_dict(path_or_state_dict):
  """A bare state dict from a `.pth` / `.bin` / `.safetensors` path, `{'model': sd}` or a dict."""
  source = path_or_state_dict
  if isinstance(source, (str, os.PathLike)):
    if not os.path.isfile(source):
      raise FileNotFoundError(f"no checkpoint file at {source}")
    if os.fspath(source).endswith(".safetensors"):
      return _read_safetensors(source)
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"reading {source} needs PyTorch (pip install torch==2.13.0); or pass "
                        "a dict of numpy arrays instead of a path") from e
    try:
      source = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:
      raise ValueError(f"{source} is not a PyTorch checkpoint readable with "
                       f"weights_only=True: {e}") from e
  if not isinstance(source, dict):
    raise ValueError(f"expected a state dict or {{'model': state_dict}}, got "
                     f"{type(source).__name__}")
  if "model" in source and isinstance(source["model"], dict):
    source = source["model"]
  return {key: as_numpy(value, key) for key, value in source.items()}


def source_name(path_or_state_dict):
  """What to call `path_or_state_dict` in messages."""
  if isinstance(path_or_state_dict, (str, os.PathLike)):
    return os.fspath(path_or_state_dict)
  return "state dict"


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("writing .pth files needs PyTorch (pip install torch==2.13.0)") from e
  return torch


def write_pth(state_dict, path):
  """Save numpy arrays as an official-format `.pth`: `{'model': state_dict}` of tensors."""
  torch = _torch()
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}  # writable copies
  torch.save({"model": tensors}, path)


def write_safetensors(state_dict, path):
  """Save numpy arrays as a `.safetensors` file with torch-style metadata."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path,
            metadata={"format": "pt"})
