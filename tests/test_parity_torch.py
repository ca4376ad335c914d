"""Parity with an independent PyTorch implementation of the official MAE.

HuggingFace transformers' ViTMAEForPreTraining computes the official model once
built with exact gelu and LayerNorm eps 1e-6. We give it random weights (biases
and norms perturbed too), fill its sin-cos tables (transformers 5.x leaves them
at zero when built from a config), save an official-format `.pth`, import it
with `load_pytorch` and compare loss, pred and mask for the same images and noise.
"""

import numpy as np
import pytest

from conftest import official_sincos_table
from mae_jax import convert

torch = pytest.importorskip("torch", reason="parity tests need torch==2.13.0 (pip install -e '.[test]')")
transformers = pytest.importorskip("transformers", reason="parity tests need transformers==5.23.0")

CASES = {  # name: (img_size, patch, D, depth, heads, D_dec, dec_depth, dec_heads)
    "p16": (64, 16, 96, 2, 3, 64, 2, 4),
    "p14": (56, 14, 96, 2, 3, 64, 2, 4),
}


def _hf_model(img, patch, d, depth, heads, d_dec, dec_depth, dec_heads, norm_pix, seed):
  config = transformers.ViTMAEConfig(
      image_size=img, patch_size=patch, num_channels=3, hidden_size=d, num_hidden_layers=depth,
      num_attention_heads=heads, intermediate_size=4 * d, decoder_hidden_size=d_dec,
      decoder_num_hidden_layers=dec_depth, decoder_num_attention_heads=dec_heads,
      decoder_intermediate_size=4 * d_dec, hidden_act="gelu", layer_norm_eps=1e-6,
      qkv_bias=True, norm_pix_loss=norm_pix, mask_ratio=0.75,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  torch.manual_seed(seed)
  model = transformers.ViTMAEForPreTraining(config).eval()
  grid = img // patch
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "position_embeddings" in name or "decoder_pos_embed" in name:
        continue
      param.add_(0.05 * torch.randn_like(param))  # non-trivial biases and norms too
    model.vit.embeddings.position_embeddings.copy_(
        torch.from_numpy(official_sincos_table(d, grid, grid)[None]).float())
    model.decoder.decoder_pos_embed.copy_(
        torch.from_numpy(official_sincos_table(d_dec, grid, grid)[None]).float())
  return model


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_pred_mask_match_pytorch(tmp_path, case, norm_pix):
  img, patch, d, depth, heads, d_dec, dec_depth, dec_heads = CASES[case]
  hf = _hf_model(*CASES[case], norm_pix, seed=1)
  assert float(hf.vit.embeddings.position_embeddings.abs().sum()) > 0  # the HF zero-table trap

  official = convert.hf_to_official(hf.state_dict())
  path = tmp_path / "mae_official.pth"
  torch.save({"model": {k: torch.as_tensor(np.asarray(v)) for k, v in official.items()}}, path)

  model_config = dict(img_size=img, patch_size=patch, in_chans=3, embed_dim=d, depth=depth,
                      num_heads=heads, decoder_embed_dim=d_dec, decoder_depth=dec_depth,
                      decoder_num_heads=dec_heads, mlp_ratio=4.0, norm_pix_loss=norm_pix,
                      mask_ratio=0.75)
  ours = convert.load_pytorch(str(path), model_config)

  rng = np.random.default_rng(0)
  images = rng.normal(size=(4, img, img, 3)).astype(np.float32)  # already normalised
  noise = rng.random((4, (img // patch) ** 2)).astype(np.float32)
  with torch.no_grad():
    out = hf(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
             noise=torch.from_numpy(noise))
  loss, pred, mask = ours(images, noise=noise)

  ref_loss = float(out.loss)
  assert abs(float(loss) - ref_loss) / abs(ref_loss) < 1e-5, (float(loss), ref_loss)
  np.testing.assert_array_equal(np.asarray(mask), out.mask.numpy())
  np.testing.assert_allclose(np.asarray(pred), out.logits.numpy(), rtol=1e-4, atol=2e-5)
  # and back: our weights exported in official form equal the file we imported
  exported = convert.official_state_dict(ours)
  assert sorted(exported) == sorted(official)
  for key, value in official.items():
    np.testing.assert_array_equal(exported[key], np.asarray(value), err_msg=key)


# Through files and Orbax: HF's own writer -> `python -m mae_jax.convert` -> mae_jax.load,
# compared with HF on the same noise, then exported back and read by HF's own reader.
ORBAX_CASES = {  # name: (img_size, patch, D, depth, heads, D_dec, dec_depth, dec_heads)
    "vit_b16": (224, 16, 768, 12, 12, 512, 8, 16),
    "p14": (224, 14, 256, 2, 4, 128, 1, 4),
}


def _relative_error(got, want):
  return float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))


@pytest.mark.parametrize("case", sorted(ORBAX_CASES))
def test_hf_files_orbax_parity_and_round_trip(tmp_path, case):
  import mae_jax
  img, patch = ORBAX_CASES[case][:2]
  hf = _hf_model(*ORBAX_CASES[case], norm_pix=True, seed=2)
  hf.save_pretrained(tmp_path / "hf_in")  # model.safetensors + config.json (heads, norm_pix)
  convert.main(["--input", str(tmp_path / "hf_in"), "--output", str(tmp_path / "ours")])
  loaded = mae_jax.load(tmp_path / "ours")
  assert loaded.model.config.num_heads == ORBAX_CASES[case][4]  # read from config.json

  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, img, img, 3)).astype(np.float32)
  noise = rng.random((2, (img // patch) ** 2)).astype(np.float32)
  with torch.no_grad():
    out = hf(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
             noise=torch.from_numpy(noise))
  loss, pred, mask = loaded.model(images, noise=noise)
  loss_err = abs(float(loss) - float(out.loss)) / abs(float(out.loss))
  pred_err = _relative_error(pred, out.logits.numpy())
  print(f"{case}: loss rel err {loss_err:.2e}, pred rel err {pred_err:.2e}")
  assert loss_err < 1e-5 and pred_err < 1e-5, (loss_err, pred_err)
  np.testing.assert_array_equal(np.asarray(mask), out.mask.numpy())

  convert.main(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "hf_out"),
                "--format=hf"])
  again, info = transformers.ViTMAEForPreTraining.from_pretrained(
      tmp_path / "hf_out", output_loading_info=True)
  assert not any(info.values()), info  # no missing / unexpected / mismatched keys
  want, got = hf.state_dict(), again.state_dict()
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert torch.equal(got[key], value), key  # bit-identical, sin-cos tables included
