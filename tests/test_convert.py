import numpy as np
import pytest
from flax import nnx

from mae_jax import convert
from mae_jax import model as model_lib


@pytest.fixture
def model(tiny_config):
  return model_lib.MAE(tiny_config.model, rngs=nnx.Rngs(0))


def _randomised(state_dict, seed=1):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in state_dict.items()}


def test_official_keys_and_layouts(model):
  sd = convert.official_state_dict(model)
  d, d_dec, p = 32, 32, 8
  assert sd["cls_token"].shape == (1, 1, d) and sd["pos_embed"].shape == (1, 17, d)
  assert sd["patch_embed.proj.weight"].shape == (d, 3, p, p)
  assert sd["blocks.1.attn.qkv.weight"].shape == (3 * d, d)
  assert sd["blocks.0.mlp.fc1.weight"].shape == (4 * d, d)
  assert sd["blocks.0.norm1.weight"].shape == (d,)
  assert sd["mask_token"].shape == (1, 1, d_dec)
  assert sd["decoder_pred.weight"].shape == (p * p * 3, d_dec)
  assert sd["decoder_pos_embed"].shape == (1, 17, d_dec)
  assert len(sd) == 2 + 2 + 12 * 2 + 2 + 1 + 2 + 1 + 12 + 2 + 2


def test_numpy_dict_round_trip_and_outputs(model, tiny_config):
  sd = _randomised(convert.official_state_dict(model))
  loaded = convert.load_pytorch({"model": sd}, tiny_config.model)
  back = convert.official_state_dict(loaded)
  for key, value in sd.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  # the torch conv weight (D, C, p, p) acts on patches in (row, col, chan) order
  images = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
  tokens = np.asarray(loaded.patch_embed(images))
  w, b = sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"]
  patch = images[0, 8:16, 16:24]  # grid row 1, col 2 -> token 1 * 4 + 2
  want = np.einsum("dcpq,pqc->d", w, patch) + b
  np.testing.assert_allclose(tokens[0, 6], want, rtol=1e-4, atol=1e-4)


def test_bare_state_dict_accepted(model, tiny_config):
  sd = convert.official_state_dict(model)
  loaded = convert.load_pytorch(sd, tiny_config.model)
  assert model_lib.count_params(loaded) == model_lib.count_params(model)


def test_missing_and_extra_keys_named(model, tiny_config):
  sd = convert.official_state_dict(model)
  del sd["blocks.0.attn.qkv.bias"]
  sd["head.weight"] = np.zeros((10, 32), np.float32)
  with pytest.raises(KeyError, match=r"fine-tuned.*missing key\(s\) \['blocks.0.attn.qkv.bias'\]"
                                     r".*unexpected key\(s\) \['head.weight'\]"):
    convert.load_pytorch(sd, tiny_config.model)
  encoder_only = {k: v for k, v in convert.official_state_dict(model).items()
                  if not k.startswith(("decoder", "mask_token"))}
  with pytest.raises(KeyError, match="encoder-only"):
    convert.load_pytorch(encoder_only, tiny_config.model)


def test_shape_mismatch_names_key_and_shapes(model, tiny_config):
  sd = convert.official_state_dict(model)
  sd["blocks.1.mlp.fc2.weight"] = np.zeros((32, 64), np.float32)
  with pytest.raises(ValueError, match=r"'blocks.1.mlp.fc2.weight' has shape \(32, 64\) but the "
                                       r"model expects \(32, 128\)"):
    convert.load_pytorch(sd, tiny_config.model)


def test_not_a_checkpoint(tmp_path, tiny_config):
  with pytest.raises(ValueError, match="expected a state dict"):
    convert.load_pytorch([1, 2], tiny_config.model)
  with pytest.raises(FileNotFoundError, match="no checkpoint file"):
    convert.load_pytorch(str(tmp_path / "missing.pth"), tiny_config.model)
  pytest.importorskip("torch")
  junk = tmp_path / "junk.pth"
  junk.write_text("not a checkpoint")
  with pytest.raises(ValueError, match="junk.pth is not a PyTorch checkpoint"):
    convert.load_pytorch(str(junk), tiny_config.model)


def test_pth_file_with_bfloat16_tensors(tmp_path, model, tiny_config):
  torch = pytest.importorskip("torch")
  sd = convert.official_state_dict(model)
  path = tmp_path / "bf16.pth"
  torch.save({"model": {k: torch.from_numpy(np.array(v)).bfloat16() for k, v in sd.items()}}, path)
  loaded = convert.load_pytorch(str(path), tiny_config.model)
  got = convert.official_state_dict(loaded)["blocks.0.attn.qkv.weight"]
  np.testing.assert_allclose(got, sd["blocks.0.attn.qkv.weight"], rtol=1e-2, atol=1e-2)


def test_hf_names_round_trip(model):
  sd = convert.official_state_dict(model)
  hf = convert.official_to_hf(sd)
  assert "vit.layers.1.attention.q_proj.weight" in hf and "decoder.decoder_pred.bias" in hf
  assert hf["vit.layers.0.attention.k_proj.weight"].shape == (32, 32)
  back = convert.hf_to_official(hf)
  assert sorted(back) == sorted(sd)
  for key in sd:
    np.testing.assert_array_equal(back[key], sd[key], err_msg=key)
