import argparse

import numpy as np
import pytest

from mae_jax.weights import files

torch = pytest.importorskip("torch")


class Custom:
  """A class a checkpoint must not be allowed to carry (its pickle could run code)."""

  def __init__(self, value):
    self.value = value


def _model_tensors():
  return {"cls_token": torch.randn(1, 1, 8), "blocks.0.attn.qkv.weight": torch.randn(24, 8),
          "norm.bias": torch.zeros(8)}


def test_official_training_checkpoint_keeps_only_the_model(tmp_path):
  model = _model_tensors()
  path = tmp_path / "checkpoint-799.pth"
  # What the official util/misc.save_model writes.
  torch.save({"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
              "epoch": 3, "scaler": {}, "args": argparse.Namespace(lr=1e-3, model="mae")}, path)
  with pytest.raises(Exception, match="Weights only load failed"):
    torch.load(path, weights_only=True)  # why the allow-list is needed
  state_dict = files.read_state_dict(str(path))
  assert sorted(state_dict) == sorted(model)
  for key, tensor in model.items():
    assert isinstance(state_dict[key], np.ndarray) and state_dict[key].dtype == np.float32
    np.testing.assert_array_equal(state_dict[key], tensor.numpy())
  with pytest.raises(Exception, match="Weights only load failed"):
    torch.load(path, weights_only=True)  # the allow-list did not outlive the call


def test_other_python_objects_are_refused_in_one_line(tmp_path):
  path = tmp_path / "custom.pth"
  torch.save({"model": _model_tensors(), "args": argparse.Namespace(lr=1e-3),
              "extra": Custom(3)}, path)
  with pytest.raises(ValueError) as caught:
    files.read_state_dict(str(path))
  message = str(caught.value)
  assert message == (f"{path} holds Python objects that weights_only=True refuses "
                     f"({__name__}.Custom); re-save it as {{'model': state_dict}} with torch.save")
  assert "weights_only=False" not in message and "\n" not in message


def test_not_a_checkpoint_is_one_line(tmp_path):
  path = tmp_path / "text.pth"
  path.write_text("not a checkpoint")
  with pytest.raises(ValueError, match="text.pth is not a PyTorch checkpoint readable with "
                                       "weights_only=True: UnpicklingError: "
                                       "Unsupported operand") as caught:
    files.read_state_dict(str(path))
  assert "\n" not in str(caught.value) and "weights_only=False" not in str(caught.value)
