"""Images in host memory (data.dataset="arrays"): the batched resampler against TF's resize,
the global order on 1 / 2 / 3 processes, exact resume on another process count, the eval pass,
and bad files as one clear error."""

import gzip
import math
import re

import numpy as np
import pytest

from mae_jax import cli, data, imaging
from mae_jax.data import array_batches, arrays, resample


def _tf_view(tf, image, box, size, flip, antialias):
  """The tf.data pipeline's crop then resize (tf.image.resize bicubic), rounded to uint8."""
  top, left, h, w = (int(b) for b in box)
  out = tf.image.resize(image[top:top + h, left:left + w].astype(np.float32), [size, size],
                        method="bicubic", antialias=antialias).numpy()
  out = np.clip(np.round(out), 0, 255).astype(np.uint8)
  return out[:, ::-1] if flip else out


@pytest.mark.parametrize("height,width,size,antialias", [
    (28, 28, 28, True), (40, 30, 16, True), (40, 30, 16, False), (20, 25, 48, True)])
def test_batched_crop_resize_flip_matches_tf_resize(height, width, size, antialias):
  tf, _ = data.tf_setup.tf_modules()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (32, height, width, 3), dtype=np.uint8)
  u = resample.uniforms(5, np.arange(32), 40)
  boxes = resample.random_resized_boxes(u, height, width, (0.2, 1.0), (3 / 4, 4 / 3))
  flip = u[:, 0] < 0.5
  ours = resample.crop_resize(images, boxes, size, flip=flip, antialias=antialias)
  ref = np.stack([_tf_view(tf, images[i], [b[i] for b in boxes], size, flip[i], antialias)
                  for i in range(32)])
  diff = np.abs(ours.astype(int) - ref)
  assert diff.max() <= 1 and diff.mean() < 1e-3  # float32 rounding ties only


@pytest.mark.parametrize("fraction", [224 / 256, 1.0, 0.5])
def test_eval_resize_matches_the_tf_eval_transform(fraction):
  tf, _ = data.tf_setup.tf_modules()
  rng = np.random.default_rng(1)
  for height, width, size in ((28, 28, 28), (37, 50, 24)):
    images = rng.integers(0, 256, (8, height, width, 3), dtype=np.uint8)
    ours = resample.eval_resize(images, size, fraction=fraction)
    ref = np.stack([data.eval_transform(tf.io.encode_png(im), size=size,
                                        fraction=fraction).numpy() for im in images])
    assert np.abs(ours.astype(int) - ref).max() <= 1


def test_eval_crop_one_keeps_the_whole_image():
  """data.eval_crop=1.0 at the image's own size is the identity; 224/256 drops the border."""
  images = np.random.default_rng(2).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
  np.testing.assert_array_equal(resample.eval_resize(images, 28, fraction=1.0), images)
  zoomed = resample.eval_resize(images, 28)  # 28 -> 32 px, the central 28
  assert np.abs(zoomed.astype(int) - images).mean() > 20


def _torchvision_box(draws, height, width, scale, ratio):
  """torchvision's RandomResizedCrop.get_params written out, fed `draws` (40,) in [0, 1)."""
  area = height * width
  for t in range(10):
    target = area * (scale[0] + (scale[1] - scale[0]) * draws[t])
    aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0]))
                      * draws[10 + t])
    w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      return (min(int(draws[20 + t] * (height - h + 1)), height - h),
              min(int(draws[30 + t] * (width - w + 1)), width - w), h, w)
  in_ratio = width / height
  w, h = width, height
  if in_ratio < ratio[0]:
    h = round(width / ratio[0])
  elif in_ratio > ratio[1]:
    w = round(height * ratio[1])
  return (height - h) // 2, (width - w) // 2, h, w


def test_random_resized_boxes_follow_torchvision_and_uniforms_are_uniform():
  u = resample.uniforms(3, np.arange(4000), 40)
  assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
  assert np.array_equal(u[100:200], resample.uniforms(3, np.arange(100, 200), 40))
  assert not np.array_equal(u[:100], resample.uniforms(4, np.arange(100), 40))
  for height, width, scale, ratio in ((28, 28, (0.2, 1.0), (3 / 4, 4 / 3)),
                                      (10, 60, (0.9, 1.0), (3 / 4, 4 / 3))):  # fallbacks
    boxes = np.stack(resample.random_resized_boxes(u, height, width, scale, ratio), 1)
    ref = np.array([_torchvision_box(d, height, width, scale, ratio) for d in u])
    assert np.array_equal(boxes, ref)


def _coded_images(count, side):
  """Images whose pixels spell their index (channel 0: i % 256, channel 1: i // 256)."""
  images = np.zeros((count, side, side, 3), np.uint8)
  images[..., 0] = (np.arange(count) % 256)[:, None, None]
  images[..., 1] = (np.arange(count) // 256)[:, None, None]
  return images


def _decode(images):
  return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)


@pytest.fixture
def coded_npz(tmp_path):
  path = tmp_path / "coded.npz"
  np.savez(path, images=_coded_images(50, 32), labels=np.arange(50) % 5)
  return str(path)


def _config(tiny_config, path, crop="center", hflip=False):
  config = tiny_config
  config.data.update(dataset="arrays", arrays=path, crop=crop, hflip=hflip)
  config.batch_size = 12
  return config


def _global_batches(config, steps, process_count, start=0):
  source = arrays.train_arrays(config.data)
  its = [array_batches.ArrayBatches(source, config, process_index=p, process_count=process_count,
                                    start_step=start) for p in range(process_count)]
  out = []
  for _ in range(steps):
    parts = [next(it) for it in its]
    out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
  return out, its


def test_global_batches_do_not_depend_on_the_process_count_and_cover_each_epoch(
    tiny_config, coded_npz):
  config = _config(tiny_config, coded_npz)
  one, _ = _global_batches(config, 9, 1)  # 108 examples: two epochs of 50 and a bit
  for count in (2, 3):
    other, _ = _global_batches(config, 9, count)
    for a, b in zip(one, other):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  ids = np.concatenate([_decode(b["images"]) for b in one])
  for epoch in (0, 1):
    assert sorted(ids[50 * epoch:50 * (epoch + 1)]) == list(range(50))
  assert not np.array_equal(ids[:50], ids[50:100])  # a new order every epoch
  labels = np.concatenate([b["label"] for b in one])
  np.testing.assert_array_equal(labels, ids % 5)
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in one]), np.arange(108))


def test_augmented_batches_resume_exactly_on_another_process_count(tiny_config, coded_npz):
  config = _config(tiny_config, coded_npz, crop="random_resized", hflip=True)
  config.model.img_size = 24
  full, _ = _global_batches(config, 8, 3)
  for before, after in ((2, 3), (3, 1)):
    _, its = _global_batches(config, 5, before)
    state = its[0].state()
    assert state["step"] == 5
    fresh = [array_batches.ArrayBatches(arrays.train_arrays(config.data), config,
                                        process_index=p, process_count=after)
             for p in range(after)]
    for it in fresh:
      it.restore(state)
    for step in range(5, 8):
      parts = [next(it) for it in fresh]
      np.testing.assert_array_equal(np.concatenate([p["images"] for p in parts]),
                                    full[step]["images"])
  assert full[0]["images"].shape == (12, 24, 24, 3) and full[0]["images"].dtype == np.uint8


def test_eval_pass_counts_every_example_once_on_any_process_count(tiny_config, tmp_path):
  images = _coded_images(23, 32)
  np.save(tmp_path / "eval.npy", images)
  np.save(tmp_path / "eval_labels.npy", np.arange(23) % 4)
  config = _config(tiny_config, str(tmp_path / "eval.npy"))
  config.data.update(eval_arrays=str(tmp_path / "eval.npy"),
                     eval_labels=str(tmp_path / "eval_labels.npy"))
  config.batch_size = 6
  for count in (1, 2, 3):
    seen, lengths = [], []
    for p in range(count):
      batches = list(data.create_eval_iterator(config, process_index=p, process_count=count))
      lengths.append(len(batches))
      for b in batches:
        valid = b["valid"]
        assert (b["index"][~valid] == -1).all() and (b["label"][~valid] == -1).all()
        seen.append(b["index"][valid])
        ref = resample.eval_resize(images[b["index"][valid]], 32)
        np.testing.assert_array_equal(b["images"][valid], ref)
        np.testing.assert_array_equal(b["label"][valid], b["index"][valid] % 4)
    assert len(set(lengths)) == 1
    assert sorted(np.concatenate(seen)) == list(range(23))


def _idx(path, array, dtype_byte=0x08):
  header = bytes([0, 0, dtype_byte, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())
  return str(path)


def test_idx_images_take_their_sibling_labels_and_grey_becomes_three_channels(
    tiny_config, tmp_path):
  grey = np.random.default_rng(0).integers(0, 256, (30, 32, 32), dtype=np.uint8)
  images = _idx(tmp_path / "train-images-idx3-ubyte.gz", grey)
  _idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(30) % 3)
  config = _config(tiny_config, images)
  assert data.check_data(config) == f"30 32x32x1 images, 3 classes from {images}"
  assert data.dataset_info(config) == (30, 3)
  batch = next(data.create_pretrain_iterator(config, process_index=0, process_count=1))
  assert batch["images"].shape == (12, 32, 32, 3)
  np.testing.assert_array_equal(batch["images"][..., 0], batch["images"][..., 2])
  ids = batch["label"]  # the centre crop of a 32 px image to 32 px is the image itself
  assert set(ids) <= {0, 1, 2}


@pytest.mark.parametrize("what,message", [
    ("missing", r"config.data.arrays=\S+nope.npy does not exist; expected uint8 images"),
    ("text", r"config.data.arrays=\S+text.npy: cannot be read as an array"),
    ("float", r"config.data.arrays=\S+float.npy: holds float32 images of shape \(4, 8, 8\); "
              "expected uint8 images"),
    ("shape", r"config.data.arrays=\S+flat.npy: holds uint8 images of shape \(4, 5\)"),
    ("count", r"config.data.labels=\S+labels.npy: holds 3 labels but \S+ok.npy holds 4 images"),
    ("negative", r"config.data.labels=\S+neg.npy: holds the label -1: expected labels >= 0"),
    ("no_eval", r"config.data.eval_arrays=\S+nope.npz does not exist"),
    ("jitter", r"config.data.color_jitter=0.4: config.data.dataset='arrays' does crops and "
               "flips only"),
])
def test_bad_arrays_are_one_clear_error(tiny_config, tmp_path, what, message):
  np.save(tmp_path / "ok.npy", np.zeros((4, 8, 8), np.uint8))
  np.save(tmp_path / "float.npy", np.zeros((4, 8, 8), np.float32))
  np.save(tmp_path / "flat.npy", np.zeros((4, 5), np.uint8))
  np.save(tmp_path / "labels.npy", np.zeros(3, np.int64))
  np.save(tmp_path / "neg.npy", np.array([0, 1, -1, 2]))
  (tmp_path / "text.npy").write_text("not an array")
  images = {"missing": "nope.npy", "text": "text.npy", "float": "float.npy",
            "shape": "flat.npy"}.get(what, "ok.npy")
  config = _config(tiny_config, str(tmp_path / images))
  config.data.update(labels=str(tmp_path / {"count": "labels.npy", "negative": "neg.npy"}[what])
                     if what in ("count", "negative") else "",
                     eval_arrays=str(tmp_path / "nope.npz") if what == "no_eval" else "",
                     color_jitter=0.4 if what == "jitter" else 0.0)
  with pytest.raises(cli.USER_ERRORS) as caught:
    data.check_data(config)
  assert re.search(message, str(caught.value)), caught.value


def test_probe_sets_of_arrays_are_fixed_disjoint_and_from_the_eval_arrays(tiny_config, tmp_path):
  from mae_jax.evaluators import probe_sets  # pylint: disable=import-outside-toplevel
  np.savez(tmp_path / "train.npz", images=_coded_images(60, 32), labels=np.arange(60) % 3)
  np.savez(tmp_path / "test.npz", images=_coded_images(20, 32), labels=np.arange(20) % 3)
  config = _config(tiny_config, str(tmp_path / "train.npz"))
  entry = config.evals.knn
  entry.update(train_examples=13, eval_examples=11)
  held = probe_sets.resolve(config, "knn", entry)
  (which, train_ids), (eval_which, eval_ids) = held.train.subset, held.evals.subset
  assert (which, eval_which, len(train_ids), len(eval_ids)) == ("train", "train", 13, 11)
  assert not set(train_ids) & set(eval_ids) and held.num_classes == 3
  config.data.eval_arrays = str(tmp_path / "test.npz")
  named = probe_sets.resolve(config, "knn", entry)
  assert named.evals.subset[0] == "eval" and set(named.evals.subset[1]) <= set(range(20))
  batches = list(data.create_eval_iterator(config, subset=named.evals.subset, process_index=0,
                                           process_count=1))
  got = np.concatenate([b["images"][b["valid"]] for b in batches])
  np.testing.assert_array_equal(_decode(got), named.evals.subset[1])


def test_per_class_subset_is_the_idx_folder_subset(tiny_config, tmp_path):
  """data.per_class=4 trains on exactly the images `python -m mae_jax.data.idx --per_class=4`
  writes as a folder: 4 of each class, the epoch is 12 examples; too many per class or a
  folder dataset is a clear error."""
  from mae_jax.data import idx  # pylint: disable=import-outside-toplevel
  grey = _coded_images(30, 32)[..., 0]
  labels = np.arange(30) % 3
  images = _idx(tmp_path / "train-images-idx3-ubyte.gz", grey)
  _idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
  idx.write_image_folder(images, str(tmp_path / "train-labels-idx1-ubyte.gz"),
                         str(tmp_path / "folder"), per_class=4)
  written = sorted(int(p.stem) for p in (tmp_path / "folder").glob("*/*.png"))
  config = _config(tiny_config, images)
  config.data.per_class = 4
  assert data.check_data(config).startswith("12 images (4 per class, seed 0) of 30 32x32x1")
  assert data.dataset_info(config) == (12, 3)
  subset = arrays.train_arrays(config.data)
  np.testing.assert_array_equal(subset.images, grey[written][..., None])
  np.testing.assert_array_equal(subset.labels, labels[written])
  assert np.bincount(subset.labels).tolist() == [4, 4, 4]
  config.data.per_class = 11
  with pytest.raises(cli.USER_ERRORS, match=r"per_class=11 of 30 32x32x1 images, 3 classes "
                                            r"from \S+: class 0 has 10 examples"):
    data.check_data(config)
  config.data.update(per_class=4, dataset="image_folder", folder=str(tmp_path / "folder"))
  with pytest.raises(cli.USER_ERRORS, match=r"per_class=4 is read by dataset='arrays' only"):
    data.check_data(config)


def test_pictures_of_arrays_show_the_first_evaluation_images(tiny_config, tmp_path):
  """The preview images of an in-memory pre-training: the first eval images under the
  evaluation transform (the training images when there are no eval images)."""
  np.savez(tmp_path / "train.npz", images=_coded_images(10, 32), labels=np.arange(10) % 2)
  np.savez(tmp_path / "test.npz", images=_coded_images(5, 32)[::-1].copy())
  config = _config(tiny_config, str(tmp_path / "train.npz"))
  shown = array_batches.preview_images(config.data, 3, 32)
  assert shown.shape == (3, 32, 32, 3) and shown.dtype == np.float32
  np.testing.assert_array_equal(imaging.denormalize(shown)[:, 0, 0, 0], [0, 1, 2])
  config.data.eval_arrays = str(tmp_path / "test.npz")
  shown = array_batches.preview_images(config.data, 7, 32)  # wraps around the 5 images
  np.testing.assert_array_equal(imaging.denormalize(shown)[:, 0, 0, 0], [4, 3, 2, 1, 0, 4, 3])


def test_one_grey_channel_for_grey_arrays_only(tiny_config, tmp_path):
  """model.in_chans=1 on grey arrays: 1-channel batches, normalised with the grey mean / std
  (the means of ImageNet's RGB ones); RGB arrays or another source with in_chans=1: an error."""
  grey = _coded_images(24, 32)[..., 0]  # image i: every pixel i
  images = _idx(tmp_path / "train-images-idx3-ubyte.gz", grey)
  config = _config(tiny_config, images)
  config.model.in_chans = 1
  config.data.ship_uint8 = False
  data.check_data(config)
  batch = next(data.create_pretrain_iterator(config, process_index=0, process_count=1))
  assert batch["images"].shape == (12, 32, 32, 1)
  pixels = (batch["images"] * 0.226 + 0.449) * 255  # centre crop 32 -> 32: the image itself
  ids = np.round(pixels[:, 0, 0, 0])
  np.testing.assert_allclose(pixels, np.broadcast_to(ids[:, None, None, None], pixels.shape),
                             atol=1e-3)
  assert len(set(ids)) == 12 and set(ids) <= set(range(24))
  np.save(tmp_path / "rgb.npy", _coded_images(4, 32))
  config.data.arrays = str(tmp_path / "rgb.npy")
  with pytest.raises(cli.USER_ERRORS, match=r"in_chans=1: 4 32x32x3 images, no labels from "
                                            r"\S+rgb.npy are RGB: expected in_chans=3$"):
    data.check_data(config)
  config.data.update(dataset="bundled_photos")
  with pytest.raises(cli.USER_ERRORS, match=r"in_chans=1: dataset='bundled_photos' delivers "
                                            r"RGB images"):
    data.check_data(config)
