"""The reconstruction picture and its CLI, on a briefly pre-trained tiny model."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import write_pth
from mae_jax import cli, convert, imaging, visualize
from mae_jax import data as mae_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMG, PATCH, GRID, GAP = 32, 8, 4, 2


def _photo_files(tmp_path):
  """Two bundled photos as files of different formats and sizes."""
  photos = mae_data.bundled_photos()
  paths = [str(tmp_path / "chelsea.jpg"), str(tmp_path / "rocket.png")]
  Image.fromarray(photos[mae_data.BUNDLED_PHOTOS.index("chelsea.png")]).save(paths[0],
                                                                                   quality=95)
  Image.fromarray(photos[mae_data.BUNDLED_PHOTOS.index("rocket.jpg")]).save(paths[1])
  return paths


def _panel(picture, scale, row, col):
  """Panel (row, col) of a grid picture, at the model resolution."""
  top, left = GAP + row * (IMG + GAP), GAP + col * (IMG + GAP)
  small = picture[::scale, ::scale]  # nearest-neighbour upscaling by `scale`
  return small[top:top + IMG, left:left + IMG]


def _patches(image):
  return image.reshape(GRID, PATCH, GRID, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(
      GRID * GRID, -1)


def test_cli_png_visible_patches_equal_input(tmp_path, trained_workdir):
  paths = _photo_files(tmp_path)
  out = tmp_path / "grid.png"
  run = subprocess.run([sys.executable, "-m", "mae_jax.visualize",
                        f"--checkpoint={trained_workdir}", "--images", *paths,
                        f"--out={out}", "--seed=3"], cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-2000:]
  picture = np.asarray(Image.open(out))
  scale = 224 // IMG
  assert picture.shape == (scale * (2 * (IMG + GAP) + GAP), scale * (4 * (IMG + GAP) + GAP), 3)
  again, mask = visualize.main([f"--checkpoint={trained_workdir}", "--images", *paths,
                                f"--out={tmp_path / 'again.png'}", "--seed=3"])
  np.testing.assert_array_equal(again, picture)  # the CLI's mask is this one
  assert mask.shape == (2, GRID * GRID) and (mask.sum(1) == 12).all()
  gray = imaging.denormalize(imaging.normalize(np.full(3, round(255 * visualize.MASKED_GRAY),
                                                       np.uint8)))
  for row, path in enumerate(paths):
    original = imaging.center_crop(imaging.load_image(path), IMG)
    np.testing.assert_array_equal(_panel(picture, scale, row, 0), original)
    visible = mask[row] == 0
    want = _patches(original)[visible]
    for col in (1, 3):  # masked, and reconstruction + visible
      np.testing.assert_array_equal(_patches(_panel(picture, scale, row, col))[visible], want)
    masked = _patches(_panel(picture, scale, row, 1))[~visible].reshape(-1, 3)
    assert np.abs(masked.astype(int) - gray.astype(int)).max() <= 1
    recon = _patches(_panel(picture, scale, row, 2))
    assert not np.array_equal(recon[visible], want)  # the model's own output, not a copy


def test_samplers_and_mask_ratio(trained_workdir):
  loaded = convert.load_any(trained_workdir, require_decoder=True)
  images = mae_data.preview_images(2, IMG)
  _, grid_mask = visualize.render(loaded.model, images, sampler="grid")
  kept = (grid_mask == 0).reshape(2, GRID, GRID)
  expected = np.zeros((GRID, GRID), bool)
  expected[::2, ::2] = True  # one of every 2x2
  assert (kept == expected).all()
  _, block_mask = visualize.render(loaded.model, images, sampler="block", mask_ratio=0.5, seed=1)
  assert (block_mask.sum(1) == 8).all()
  picture, random_mask = visualize.render(loaded.model, images, mask_ratio=0.25)
  assert (random_mask.sum(1) == 4).all() and picture.shape == (2 * 34 + 2, 4 * 34 + 2, 3)
  assert loaded.model.config.mask_ratio == 0.75  # the loaded model itself is unchanged
  with pytest.raises(ValueError, match="grid masking keeps one patch per 2x2 cell"):
    visualize.render(loaded.model, images, sampler="grid", mask_ratio=0.5)


def test_needs_a_decoder(tmp_path, trained_workdir, capsys):
  pytest.importorskip("torch")
  sd = convert.official_state_dict(convert.load_any(trained_workdir).model)
  finetuned = {k: v for k, v in sd.items() if not k.startswith(convert.DECODER_PREFIXES)}
  finetuned.update({"head.weight": np.zeros((10, 32), np.float32),
                    "head.bias": np.zeros(10, np.float32)})
  pth = write_pth(tmp_path / "finetuned.pth", finetuned)
  out = tmp_path / "grid.png"
  with pytest.raises(SystemExit):
    cli.run_cli(visualize.main, [f"--checkpoint={pth}", f"--out={out}", "--num_heads=4"])
  err = capsys.readouterr().err
  assert "finetuned.pth is a fine-tuned classifier (head / fc_norm, no MAE decoder)" in err
  assert "reconstructions need the MAE decoder" in err
  encoder_only = {k: v for k, v in finetuned.items() if not k.startswith("head.")}
  pth = write_pth(tmp_path / "encoder.pth", encoder_only)
  with pytest.warns(UserWarning, match="freshly initialised"):
    convert.main(["--input", pth, "--output", str(tmp_path / "converted"), "--num_heads=4",
                  "--decoder_embed_dim=32", "--decoder_depth=1", "--decoder_num_heads=4"])
  with pytest.raises(ValueError, match=r"encoder.pth, an encoder-only pre-trained file .*"
                                       r"decoder is freshly initialised"):
    visualize.main([f"--checkpoint={tmp_path / 'converted'}", f"--out={out}"])
  assert not out.exists()


def test_pth_with_decoder_works_directly(tmp_path, trained_workdir):
  pytest.importorskip("torch")
  loaded = convert.load_any(trained_workdir)
  pth = write_pth(tmp_path / "mae.pth", convert.official_state_dict(loaded.model))
  picture, _ = visualize.main([f"--checkpoint={pth}", "--num_images=2", "--num_heads=4",
                               "--decoder_num_heads=4", "--scale=1",
                               f"--out={tmp_path / 'g.png'}"])
  images = mae_data.preview_images(2, IMG)
  want, _ = visualize.render(loaded.model, images)
  np.testing.assert_array_equal(picture, want)


def _hand_psnr(pixels, filled, removed_patches):
  """PSNR (dB) over the pixels of the listed (image, row, col) patches, looped by hand."""
  total, count = 0.0, 0
  for b, row, col in removed_patches:
    for y in range(row * 2, row * 2 + 2):
      for x in range(col * 2, col * 2 + 2):
        for c in range(pixels.shape[-1]):
          total += (filled[b][y, x, c] - pixels[b][y, x, c]) ** 2
          count += 1
  return 10 * np.log10(1.0 / (total / count))


@pytest.mark.parametrize("norm_pix,channels", [(False, 3), (True, 3), (True, 1)])
def test_masked_psnr_against_a_hand_computation(norm_pix, channels):
  """Masked-patch PSNR and the mean-colour oracle's on 2 random 4x4 images, 2 px patches."""
  from mae_jax import pictures
  rng = np.random.default_rng(0)
  pixels = rng.uniform(0.05, 0.95, (2, 4, 4, channels))     # [0, 1], inside the clip range
  mean, std = ((imaging.IMAGENET_MEAN, imaging.IMAGENET_STD) if channels == 3 else
               (np.float32([0.449]), np.float32([0.226])))
  images = (pixels - mean) / std
  pred = rng.normal(0, 0.3, (2, 4, 4 * channels)).astype(np.float32)
  mask = np.array([[1, 0, 1, 1], [0, 1, 0, 0]], np.float32)
  removed = [(b, i // 2, i % 2) for b in range(2) for i in range(4) if mask[b, i]]
  filled_model, filled_oracle = [p.copy() for p in pixels], [p.copy() for p in pixels]
  for b, row, col in removed:
    block = pixels[b][row * 2:row * 2 + 2, col * 2:col * 2 + 2]
    guess = pred[b, row * 2 + col].reshape(2, 2, channels)  # (row, col, chan) in a patch
    if norm_pix:  # the patch's own mean / unbiased variance, in normalised space
      target = images[b][row * 2:row * 2 + 2, col * 2:col * 2 + 2]
      guess = guess * np.sqrt(target.var(ddof=1) + 1e-6) + target.mean()
    guess = np.clip(guess * std + mean, 0, 1)
    filled_model[b][row * 2:row * 2 + 2, col * 2:col * 2 + 2] = guess
    filled_oracle[b][row * 2:row * 2 + 2, col * 2:col * 2 + 2] = block.mean(axis=(0, 1))
  model_db, oracle_db = pictures.masked_psnr(images, pred, mask, 2, norm_pix)
  np.testing.assert_allclose(model_db, _hand_psnr(pixels, filled_model, removed), atol=1e-4)
  np.testing.assert_allclose(oracle_db, _hand_psnr(pixels, filled_oracle, removed), atol=1e-4)
  assert pictures.psnr(0.01) == pytest.approx(20.0)
  picture = pictures.grid_image(pictures.reconstruction_panels(images, pred, mask, 2, norm_pix))
  assert picture.shape == (2 * 6 + 2, 4 * 6 + 2, 3)  # RGB whatever the channels
