"""Reading and writing weight files: `.pth` (torch, `weights_only=True` only), `.safetensors`.

torch and safetensors are imported only when a file of theirs is read or written.
"""

import argparse
import os
import re

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


def _first_line(error):
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


def _refused(message):
  """What torch's weights_only unpickler refused, e.g. `mypackage.MyClass`; None if no object.

  A file that is no pickle at all (text, a truncated download) fails in the same
  unpickler with "Unsupported operand": that is not a refused object.
  """
  if "Weights only load failed" not in message:
    return None
  found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
  if found:
    return found.group(1)
  detail = message.split("WeightsUnpickler error:")[-1].strip()
  if detail.startswith("Unsupported operand"):
    return None
  # Other refusals ("Trying to call reduce for unrecognized function ...") name the object
  # in their first sentence; torch's advice after it is dropped.
  return _first_line(detail).split(". Please")[0].strip() or "an object torch does not allow"


def _load_pth(path):
  """`torch.load(weights_only=True)` that also reads official training checkpoints.

  `util/misc.save_model` stores its command-line `args` as an argparse.Namespace
  beside the weights; that class (plain attributes, no code) is the only one
  allowed. torch's own refusal text is many lines and suggests
  `weights_only=False` (arbitrary code); we give one line that names the class.
  """
  import torch  # pylint: disable=import-outside-toplevel
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # torch raises many types here
    refused = _refused(str(e))
    if refused:
      raise ValueError(f"{path} holds Python objects that weights_only=True refuses ({refused}); "
                       "re-save it as {'model': state_dict} with torch.save") from None
    reason = str(e).split("WeightsUnpickler error:")[-1]  # past torch's weights_only=False advice
    raise ValueError(f"{path} is not a PyTorch checkpoint readable with weights_only=True: "
                     f"{type(e).__name__}: {_first_line(reason)}") from e


def read_state_dict(path_or_state_dict):
  """A bare state dict from a `.pth` / `.bin` / `.safetensors` path, `{'model': sd}` or a dict.

  Official training checkpoints (`{'model', 'optimizer', 'epoch', 'scaler', 'args'}`)
  are read too; only their `model` is kept.
  """
  source = path_or_state_dict
  if isinstance(source, (str, os.PathLike)):
    if not os.path.isfile(source):
      raise FileNotFoundError(f"no checkpoint file at {source}")
    if os.fspath(source).endswith(".safetensors"):
      return _read_safetensors(source)
    try:
      import torch  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError as e:
      raise ImportError(f"reading {source} needs PyTorch (pip install torch==2.13.0); or pass "
                        "a dict of numpy arrays instead of a path") from e
    source = _load_pth(source)
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
