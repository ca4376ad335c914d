import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from flax import nnx

import mae_jax
from conftest import official_sincos_table, write_pth
from mae_jax import checkpointing, convert
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


# ------------------------------------------------------------ whole files <-> Orbax (the CLI)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BLOCK = {"norm1.weight": (1,), "norm1.bias": (1,), "attn.qkv.weight": (3, 1),
          "attn.qkv.bias": (3,), "attn.proj.weight": (1, 1), "attn.proj.bias": (1,),
          "norm2.weight": (1,), "norm2.bias": (1,), "mlp.fc1.weight": (4, 1),
          "mlp.fc1.bias": (4,), "mlp.fc2.weight": (1, 4), "mlp.fc2.bias": (1,)}  # x width


def official_shapes(d, depth, p, grid, d_dec=None, dec_depth=0, classes=0, fc_norm=False):
  """{key: shape} of an official MAE / ViT checkpoint, written from SPEC section 2."""
  tokens = 1 + grid * grid

  def block(prefix, w):
    return {f"{prefix}.{k}": tuple(m * w for m in mult) for k, mult in _BLOCK.items()}

  shapes = {"cls_token": (1, 1, d), "pos_embed": (1, tokens, d),
            "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,)}
  for i in range(depth):
    shapes.update(block(f"blocks.{i}", d))
  norm = "fc_norm" if fc_norm else "norm"
  shapes.update({f"{norm}.weight": (d,), f"{norm}.bias": (d,)})
  if d_dec:
    shapes.update({"mask_token": (1, 1, d_dec), "decoder_embed.weight": (d_dec, d),
                   "decoder_embed.bias": (d_dec,), "decoder_pos_embed": (1, tokens, d_dec),
                   "decoder_norm.weight": (d_dec,), "decoder_norm.bias": (d_dec,),
                   "decoder_pred.weight": (p * p * 3, d_dec), "decoder_pred.bias": (p * p * 3,)})
    for i in range(dec_depth):
      shapes.update(block(f"decoder_blocks.{i}", d_dec))
  if classes:
    shapes.update({"head.weight": (classes, d), "head.bias": (classes,)})
  return shapes


def random_official(shapes, seed=0, sincos=True):
  """Random float32 weights; the position tables are the official sin-cos ones if `sincos`."""
  rng = np.random.default_rng(seed)
  sd = {k: rng.standard_normal(s, np.float32) for k, s in shapes.items()}
  for key in ("pos_embed", "decoder_pos_embed"):
    if sincos and key in sd:
      _, tokens, width = sd[key].shape
      side = int(round((tokens - 1) ** 0.5))
      sd[key] = official_sincos_table(width, side, side)[None].astype(np.float32)
  return sd


def _read_pth(path):
  import torch
  loaded = torch.load(path, map_location="cpu", weights_only=True)
  assert set(loaded) == {"model"}
  return {k: v.numpy() for k, v in loaded["model"].items()}


def _assert_bit_identical(got, want):
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert got[key].dtype == value.dtype, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_official_vit_b_round_trip_bit_identical(tmp_path):
  pytest.importorskip("torch")
  shapes = official_shapes(768, 12, 16, 14, d_dec=512, dec_depth=8)
  sd = random_official(shapes)
  pth = write_pth(tmp_path / "mae_vit_b.pth", sd)
  convert.main(["--input", pth, "--output", str(tmp_path / "ours")])
  mc = checkpointing.restore(tmp_path / "ours")[0]["config"].model  # JSON only: no model build
  assert (mc.embed_dim, mc.depth, mc.num_heads, mc.patch_size, mc.img_size) == (768, 12, 12, 16, 224)
  assert (mc.decoder_embed_dim, mc.decoder_depth, mc.decoder_num_heads) == (512, 8, 16)
  # the official float32 sin-cos tables equal ours bit for bit: nothing kept aside
  assert not (tmp_path / "ours" / checkpointing.CHECKPOINT_DIR / "0" / convert.EXTRAS_ITEM).exists()
  convert.main(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "back.pth")])
  back = _read_pth(tmp_path / "back.pth")
  assert {k: v.shape for k, v in back.items()} == shapes  # what models_mae loads strictly
  _assert_bit_identical(back, sd)


def test_encoder_only_file_fresh_decoder_with_warning(tmp_path):
  pytest.importorskip("torch")
  shapes = official_shapes(32, 2, 8, 4)  # the tiny test size: compiled ops are reused
  sd = random_official(shapes, seed=3)
  pth = write_pth(tmp_path / "enc.pth", sd)
  with pytest.warns(UserWarning, match=r"enc.pth has no decoder_blocks\.0\.\*, "
                                       r"decoder_embed\.\{bias,weight\}.*mask_token"):
    convert.main(["--input", pth, "--output", str(tmp_path / "ours"), "--num_heads=4",
                  "--decoder_embed_dim=32", "--decoder_depth=1", "--decoder_num_heads=4"])
  loaded = mae_jax.load(tmp_path / "ours")
  assert loaded.model.config.decoder_depth == 1 and loaded.model.config.num_heads == 4
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  ref = convert.load_pytorch(convert.official_state_dict(loaded.model) | sd,
                             loaded.model.config)
  np.testing.assert_array_equal(loaded.encode(images), ref.encoder(ref.embed(images)))
  convert.main(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "back.pth")])
  _assert_bit_identical(_read_pth(tmp_path / "back.pth"), sd)  # the fresh decoder is not exported
  convert.main(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "full.pth"),
                "--include_fresh"])
  assert set(_read_pth(tmp_path / "full.pth")) == set(
      official_shapes(32, 2, 8, 4, d_dec=32, dec_depth=1))


def test_finetuned_file_keeps_head_fc_norm_and_trained_table(tmp_path):
  pytest.importorskip("torch")
  shapes = official_shapes(32, 2, 8, 4, classes=10, fc_norm=True)
  sd = random_official(shapes, seed=4, sincos=False)  # a fine-tuned (trained) pos_embed
  pth = write_pth(tmp_path / "ft.pth", sd)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    convert.main(["--input", pth, "--output", str(tmp_path / "ours"), "--num_heads=4",
                  "--decoder_embed_dim=32", "--decoder_depth=1", "--decoder_num_heads=4"])
  messages = " ".join(str(w.message) for w in caught)
  assert "pos_embed differs from the fixed 2-D sin-cos table" in messages
  assert "norm.{bias,weight}" in messages and "decoder_pred" in messages
  convert.main(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "back.pth")])
  _assert_bit_identical(_read_pth(tmp_path / "back.pth"), sd)


_TINY_FLAGS = ["--num_heads=4", "--decoder_embed_dim=32", "--decoder_depth=1",
               "--decoder_num_heads=4"]


def _finetuned_file(tmp_path, seed):
  """A fine-tuned official file (head, fc_norm, trained pos_embed) and its state dict."""
  sd = random_official(official_shapes(32, 2, 8, 4, classes=10, fc_norm=True), seed=seed,
                       sincos=False)
  return write_pth(tmp_path / "ft.pth", sd), sd


def test_finetuned_extras_are_a_checkpoint_item_not_a_side_file(tmp_path):
  pytest.importorskip("torch")
  pth, sd = _finetuned_file(tmp_path, seed=6)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # fresh decoder, trained table: tested above
    convert.main(["--input", pth, "--output", str(tmp_path / "ours"), *_TINY_FLAGS])
  assert os.listdir(tmp_path / "ours") == [checkpointing.CHECKPOINT_DIR]  # no side file
  extras = checkpointing.restore_arrays(tmp_path / "ours", 0, convert.EXTRAS_ITEM)
  assert sorted(extras) == ["fc_norm", "head", "pos_embed"]
  np.testing.assert_array_equal(extras["head"]["weight"], sd["head.weight"])
  assert checkpointing.restore_arrays(tmp_path / "ours", 0, "no_such_item") is None
  convert.main(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "back.pth")])
  _assert_bit_identical(_read_pth(tmp_path / "back.pth"), sd)


def _cli_error(capsys, argv):
  with pytest.raises(SystemExit) as exit_info:
    convert.run_cli(convert.main, argv)
  assert exit_info.value.code == 2
  return capsys.readouterr().err


def _nothing_written(folder, output_name):
  return not [n for n in os.listdir(folder) if n.startswith((output_name, "." + output_name))]


def test_bad_inputs_clear_errors_nothing_written(tmp_path, capsys):
  pytest.importorskip("torch")
  shapes = official_shapes(32, 2, 8, 4, d_dec=32, dec_depth=1)
  good = random_official(shapes)
  out = str(tmp_path / "out")
  cases = {
      "missing": ({k: v for k, v in good.items() if k != "blocks.1.attn.proj.bias"},
                  r"missing.pth: checkpoint does not match the model: 1 missing key\(s\) "
                  r"\['blocks.1.attn.proj.bias'\], 0 unexpected"),
      "extra": (good | {"blocks.0.attn.rel_pos": np.zeros(3, np.float32)},
                r"extra.pth: .*1 unexpected key\(s\) \['blocks.0.attn.rel_pos'\]"),
      "shape": (good | {"blocks.1.mlp.fc2.bias": np.zeros(33, np.float32)},
                r"shape.pth: checkpoint key 'blocks.1.mlp.fc2.bias' has shape \(33,\) but "
                r"the model expects \(32,\)"),
      "noise": ({"weights": np.zeros(3, np.float32)},
                r"noise.pth is not an MAE / ViT checkpoint: it has no 'cls_token'"),
  }
  for name, (sd, message) in cases.items():
    err = _cli_error(capsys, ["--input", write_pth(tmp_path / f"{name}.pth", sd),
                              "--output", out, "--num_heads=4"])
    assert re.search(message, err), (name, err)
    assert _nothing_written(tmp_path, "out"), name
  (tmp_path / "text.pth").write_text("not a checkpoint")
  err = _cli_error(capsys, ["--input", str(tmp_path / "text.pth"), "--output", out])
  assert "text.pth is not a PyTorch checkpoint readable with weights_only=True" in err
  (tmp_path / "text.safetensors").write_text("not a checkpoint")
  err = _cli_error(capsys, ["--input", str(tmp_path / "text.safetensors"), "--output", out])
  assert "text.safetensors is not a readable safetensors file" in err
  assert _nothing_written(tmp_path, "out")
  os.makedirs(out)
  err = _cli_error(capsys, ["--input", write_pth(tmp_path / "ok.pth", good), "--output", out,
                            "--num_heads=4"])
  assert "out exists; pass --overwrite" in err and os.listdir(out) == []


def test_cli_subprocess_import_and_error_exit(tmp_path):
  pytest.importorskip("torch")
  sd = random_official(official_shapes(32, 1, 8, 4, d_dec=32, dec_depth=1))
  pth = write_pth(tmp_path / "m.pth", sd)
  run = lambda *a: subprocess.run([sys.executable, "-m", "mae_jax.convert", *a], cwd=ROOT,
                                  capture_output=True, text=True)
  ok = run("--input", pth, "--output", str(tmp_path / "ours"), "--num_heads=4",
           "--decoder_num_heads=2", "--norm_pix_loss=false")
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "assumed (override with flags): mask_ratio=0.75" in ok.stdout
  mc = mae_jax.load(tmp_path / "ours").model.config
  assert (mc.num_heads, mc.decoder_num_heads, mc.norm_pix_loss) == (4, 2, False)
  bad = run("--input", str(tmp_path / "missing.pth"), "--output", str(tmp_path / "x"))
  assert bad.returncode == 2 and "error: no checkpoint file at" in bad.stderr
  assert "Traceback" not in bad.stderr
