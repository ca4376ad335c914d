"""The tf.data pipelines: real TFDS imagenet2012 prepared from fake ILSVRC tars of real JPEGs,
image folders with broken files, per-process shards, augmentation against numpy / PIL,
exact resume, clear errors, and the training loop on `tfds.testing.mock_data`."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from mae_jax import checkpointing, imaging, train
from mae_jax import data as ip
from mae_jax.data import transforms

tf, tfds = transforms.tf_modules()

SYNSETS = ("n01440764", "n02105855", "n04596742")  # label ids 0, 230, 999 in labels.txt
PER_CLASS = 3


def _photo(i):
  return ip.bundled_photos()[(0, 5, 4, 15)[i]]  # astronaut, coffee, chelsea, rocket: all distinct


def _train_view(k, i):
  """Train image i of class k: a crop of photo k (landscape, portrait or square)."""
  top, left, h, w = [(0, 0, 300, 400), (40, 10, 400, 300), (10, 60, 320, 320)][i]
  return _photo(k)[top:top + h, left:left + w]


def _val_view(i):
  return _photo(i)[:330, :460]


def _jpeg(array, mode="RGB", fmt="JPEG"):
  buf = io.BytesIO()
  Image.fromarray(array).convert(mode).save(buf, fmt, quality=92)
  return buf.getvalue()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _labels_file(name):
  with open(os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012", name)) as f:
    return f.read().split()


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
  """A manual_dir in the ILSVRC layout (a tar of per-synset tars, a flat val tar), prepared
  by the real imagenet2012 builder. Class k's images are crops of photo k; val image i
  is photo i."""
  root = tmp_path_factory.mktemp("imagenet")
  manual, data_dir = root / "manual", root / "data"
  manual.mkdir()
  with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as outer:
    for k, synset in enumerate(SYNSETS):
      inner_buf = io.BytesIO()
      with tarfile.open(fileobj=inner_buf, mode="w") as inner:
        for i in range(PER_CLASS):
          _add(inner, f"{synset}_{i + 1}.JPEG", _jpeg(_train_view(k, i)))
      _add(outer, f"{synset}.tar", inner_buf.getvalue())
  with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val:
    for i in range(4):
      _add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(_val_view(i)))
  return str(manual), str(data_dir)


def _config(tiny_config, imagenet=None, **data):
  config = tiny_config
  if imagenet:
    config.data.update(dataset="imagenet2012", manual_dir=imagenet[0], data_dir=imagenet[1])
  config.data.update(shuffle_buffer=16, **data)
  config.batch_size = 4
  return config


def _nearest(image, references):
  """The key of the reference picture closest to `image` (mean absolute difference)."""
  return min(references, key=lambda k: np.abs(image.astype(float) - references[k]).mean())


def _eval_reference(photo, size):
  """PIL: shorter side to size*256/224 (bicubic), then the central size x size crop."""
  h, w = photo.shape[:2]
  short = round(size * 256 / 224)
  new = (round(w * short / min(h, w)), round(h * short / min(h, w)))
  big = np.asarray(Image.fromarray(photo).resize(new, Image.BICUBIC)).astype(float)
  top, left = (new[1] - size) // 2, (new[0] - size) // 2
  return big[top:top + size, left:left + size]


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_imagenet2012_prepared_from_manual_tars_and_read(tiny_config, imagenet, file_format):
  """Prepared by the real builder as TFRecord (read in order) or ArrayRecord (by index)."""
  data_dir = imagenet[1] + ("" if file_format == "tfrecord" else "_array_record")
  config = _config(tiny_config, (imagenet[0], data_dir), file_format=file_format)
  assert "to be prepared" in ip.check_data(config)
  batches = ip.create_pretrain_iterator(config, process_index=0, process_count=1)
  assert os.path.exists(os.path.join(data_dir, "imagenet2012", "5.1.0", "dataset_info.json"))
  how = ("TFRecord, read in order per process" if file_format == "tfrecord"
         else "ArrayRecord, one global order")
  assert ip.check_data(config) == f"imagenet2012 train: {3 * PER_CLASS} examples ({how})"
  assert isinstance(batches.source, ip.random_access.ArrayRecordSource) == (
      file_format == "array_record")
  names = _labels_file("labels.txt")
  want = {names.index(s) for s in SYNSETS}
  labels = []
  for _ in range(5):  # 20 examples: crosses two epochs of 9
    batch = next(batches)
    assert batch["images"].shape == (4, 32, 32, 3) and batch["images"].dtype == np.uint8
    assert batch["index"].dtype == np.int32 and batch["label"].dtype == np.int32
    labels += batch["label"].tolist()
  assert set(labels) == want and batches.state()["epoch"] == 2 and batches.skipped == 0
  assert np.bincount(labels[:9], minlength=1000)[sorted(want)].tolist() == [PER_CLASS] * 3

  # labels belong to the right images: class k is made of photo k; val image i is photo i,
  # labelled with line i of TFDS's validation_labels.txt
  val_names = _labels_file("validation_labels.txt")
  for split, refs in [
      ("train", {(names.index(s), i): _eval_reference(_train_view(k, i), 32)
                 for k, s in enumerate(SYNSETS) for i in range(PER_CLASS)}),
      ("validation", {(names.index(val_names[i]), i): _eval_reference(_val_view(i), 32)
                      for i in range(4)})]:
    seen = []
    for batch in ip.create_eval_iterator(config, split=split, process_index=0, process_count=1):
      for image, label in zip(batch["images"][batch["valid"]], batch["label"][batch["valid"]]):
        want_label, which = _nearest(image, refs)
        assert label == want_label, split
        assert np.abs(image - refs[want_label, which]).mean() < 2  # eval transform ~ PIL
        seen.append((want_label, which))
    assert sorted(seen) == sorted(refs)  # every image once


def test_processes_read_disjoint_parts_covering_the_split(tiny_config, imagenet, tmp_path):
  config = _config(tiny_config, imagenet)
  ip.tfds_builder(config.data, prepare=True)
  for count in (2, 3):
    parts = []
    for index in range(count):
      source = ip.make_source(config, "train", index, count)
      parts.append([bytes(x) for x, _ in source.records(7).as_numpy_iterator()])
      assert len(parts[-1]) == source.num_examples
    flat = [x for p in parts for x in p]
    assert len(flat) == len(set(flat)) == 9  # disjoint, and together the whole split
    assert sorted(map(len, parts)) == sorted(len(p) for p in np.array_split(np.arange(9), count))

  # the iterators of two processes: half the global batch each, disjoint global ids
  config.batch_size = 4
  a, b = (ip.create_pretrain_iterator(config, process_index=i, process_count=2) for i in (0, 1))
  for step in range(3):
    ia, ib = next(a)["index"], next(b)["index"]
    np.testing.assert_array_equal(np.concatenate([ia, ib]), np.arange(4) + 4 * step)
  with pytest.raises(ValueError, match="batch_size=4 .* not divisible by the 3 processes"):
    ip.create_pretrain_iterator(config, process_index=0, process_count=3)


def _write_folder(root):
  """Real photos as JPEGs, plus a grayscale and a CMYK JPEG, a PNG named .JPEG,
  a truncated JPEG and a file of garbage; one class per special case."""
  files = {}
  for i in range(4):
    files[f"rgb/{i}.jpg"] = _jpeg(_photo(i)[:300, :400])
  files["gray/0.JPEG"] = _jpeg(_photo(1)[:300, :400], "L")
  files["cmyk/0.JPEG"] = _jpeg(_photo(2)[:300, :400], "CMYK")
  files["png/0.JPEG"] = _jpeg(_photo(3)[:300, :400], fmt="PNG")
  files["zbad/truncated.jpg"] = _jpeg(_photo(0)[:300, :400])[:3000]
  files["zbad/garbage.jpeg"] = b"\xff\xd8\xff" + bytes(range(256)) * 20
  files["rgb/notes.txt"] = b"not an image, ignored"
  for name, data in files.items():
    os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
    with open(os.path.join(root, name), "wb") as f:
      f.write(data)
  return files


def test_image_folder_decodes_gray_cmyk_png_and_skips_broken_files(tiny_config, tmp_path):
  files = _write_folder(tmp_path)
  config = _config(tiny_config, dataset="image_folder", folder=str(tmp_path), crop="center",
                   hflip=False)
  config.batch_size = 2
  assert ip.check_data(config) == f"9 images in 5 classes under {tmp_path}"
  classes = ["cmyk", "gray", "png", "rgb", "zbad"]
  batches = ip.create_pretrain_iterator(config, process_index=0, process_count=1)
  seen = []
  for _ in range(14):  # 28 examples: four epochs of 7 readable images
    batch = next(batches)
    for image, label in zip(batch["images"], batch["label"]):
      name = classes[label]
      assert name != "zbad" and image.shape == (32, 32, 3) and image.dtype == np.uint8
      seen.append(name)
      if name == "gray":
        assert (image == image[..., :1]).all()  # R == G == B
      elif name != "rgb":  # CMYK and PNG decoded to the right RGB picture (PIL reference)
        ref = imaging.center_crop(imaging.load_image(io.BytesIO(files[f"{name}/0.JPEG"])), 32)
        assert np.abs(image.astype(float) - ref).mean() < 4, name
  assert sorted(set(seen)) == ["cmyk", "gray", "png", "rgb"] and seen.count("rgb") == 16
  state = batches.state()
  # every record before the position was either returned or skipped (2 broken per epoch)
  assert state["epoch"] == 3 and state["skipped"] + 28 == 3 * 9 + state["position"]
  assert 6 <= state["skipped"] <= 8 and batches.skipped == state["skipped"]


def test_crop_box_statistics_match_numpy_reference():
  def boxes(h, w, n, **kw):
    ds = tf.data.Dataset.range(n).map(
        lambda i: tf.stack(transforms.random_resized_box(
            tf, h, w, tf.stack([tf.constant(5, tf.int64), i]), **kw)))
    return next(ds.batch(n).as_numpy_iterator())

  h, w = 300, 400
  got = boxes(h, w, 4000, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
  rng = np.random.default_rng(0)
  ref = np.array([ip.random_resized_crop_box(rng, h, w) for _ in range(4000)])
  for b in (got, ref):
    frac, aspect = b[:, 2] * b[:, 3] / (h * w), b[:, 3] / b[:, 2]
    assert frac.min() >= 0.2 - 0.01 and frac.max() <= 1.0 and frac.max() > 0.95
    assert aspect.min() >= 0.75 - 0.02 and aspect.max() <= 4 / 3 + 0.02
    assert (b[:, 0] >= 0).all() and (b[:, 0] + b[:, 2] <= h).all()
    assert (b[:, 1] >= 0).all() and (b[:, 1] + b[:, 3] <= w).all()
  frac_got, frac_ref = (b[:, 2] * b[:, 3] / (h * w) for b in (got, ref))
  # same distribution as the torchvision-style numpy sampler (std error ~0.004)
  assert abs(frac_got.mean() - frac_ref.mean()) < 0.02
  assert abs(frac_got.std() - frac_ref.std()) < 0.02
  # where every draw fits: area fraction uniform on scale, log-aspect uniform on log(ratio)
  side = 2000
  got = boxes(side, side, 4000, scale=(0.2, 0.5), ratio=(3 / 4, 4 / 3))
  frac, log_aspect = got[:, 2] * got[:, 3] / side ** 2, np.log(got[:, 3] / got[:, 2])
  assert abs(frac.mean() - 0.35) < 0.005 and abs(frac.std() - 0.3 / 12 ** 0.5) < 0.005
  assert abs(log_aspect.mean()) < 0.01
  assert abs(log_aspect.std() - 2 * np.log(4 / 3) / 12 ** 0.5) < 0.01


class _TableRng:
  """Hands the numpy sampler the TF sampler's (4, 10) uniforms, in the order it asks for them.

  TF draws rows (area, log-aspect, top, left) x 10 tries at once; the numpy sampler draws
  area and aspect per try, then top and left of the first crop that fits.
  """

  def __init__(self, u):
    self.u, self.draws, self.positions = np.asarray(u, np.float64), 0, 0

  def uniform(self, lo, hi):
    value = lo + (hi - lo) * self.u[self.draws % 2, self.draws // 2]
    self.draws += 1
    return value

  def integers(self, lo, hi):
    row, attempt = 2 + self.positions, (self.draws - 1) // 2
    self.positions += 1
    return min(lo + int(np.floor(self.u[row, attempt] * (hi - lo))), hi - 1)


def test_numpy_and_tf_crop_samplers_draw_the_same_boxes():
  # One sampler's logic, two implementations (the bundled photos must not need TF): fed the
  # same uniforms, both give the same box, over shapes where the ten tries mostly succeed,
  # often fail (extreme aspect) and always fail (the centred fallback).
  cases = [((300, 400), (0.2, 1.0)), ((224, 224), (0.08, 1.0)), ((40, 1000), (0.2, 1.0)),
           ((1000, 50), (0.5, 1.0)), ((100, 400), (5.0, 5.0))]
  ratio = (3 / 4, 4 / 3)
  total, same, far = 0, 0, 0
  for (h, w), scale in cases:
    for i in range(300):
      seed = tf.constant([11, i], tf.int64)
      got = [int(v) for v in transforms.random_resized_box(tf, h, w, seed, scale, ratio)]
      u = tf.random.stateless_uniform([4, 10], seed).numpy()
      want = list(ip.random_resized_crop_box(_TableRng(u), h, w, scale, ratio))
      total += 1
      same += got == want
      far += max(abs(a - b) for a, b in zip(got, want)) > 1
  # float32 (TF) vs float64 (numpy) arithmetic may round a side length differently when a
  # value lands within ~1e-5 of .5: at most a handful of 1-pixel differences.
  assert far == 0 and same >= total - 3, (same, total, far)


def test_flip_rate_bicubic_and_normalisation_against_numpy():
  photo = _photo(0)[:300, :400]
  encoded = tf.constant(_jpeg(photo))
  decoded = tf.io.decode_jpeg(encoded).numpy()  # the reference sees the same JPEG pixels

  def views(n, **kw):
    ds = tf.data.Dataset.range(n).map(lambda i: ip.pretrain_transform(
        encoded, tf.stack([tf.constant(1, tf.int64), i]), size=64, **kw))
    return next(ds.batch(n).as_numpy_iterator())

  plain = views(1, crop="center", hflip=False)[0]
  reference = imaging.center_crop(decoded, 64).astype(float)  # PIL bicubic with antialiasing
  assert np.abs(plain - reference).mean() < 1.0 and np.abs(plain - reference).max() < 25
  flipped = views(400, crop="center", hflip=True)
  is_flip = np.array([np.array_equal(v, plain[:, ::-1]) for v in flipped])
  assert all(is_flip[i] or np.array_equal(v, plain) for i, v in enumerate(flipped))
  assert 170 <= is_flip.sum() <= 230  # ~50% (binomial sd 10)
  floats = views(8, ship_uint8=False)
  np.testing.assert_allclose(floats, imaging.normalize(views(8)), rtol=1e-5, atol=1e-5)
  # ablations: fixed-size crop is a square of 224/256 of the shorter side; jitter changes colours
  fixed = views(1, crop="fixed_size", hflip=False)[0]
  assert fixed.shape == (64, 64, 3) and not np.array_equal(fixed, plain)
  jitter = views(4, crop="center", hflip=False, color_jitter=0.4)
  assert all(np.abs(j.astype(float) - plain).mean() > 1 for j in jitter)
  # without antialiasing: TF's plain bicubic of the same square, aliased when shrinking 5x
  fast = views(1, crop="center", hflip=False, antialias=False)[0]
  square = decoded[:, 50:350]
  plain_tf = np.round(tf.image.resize(square, [64, 64], method="bicubic").numpy()).clip(0, 255)
  assert np.abs(fast - plain_tf).max() <= 1 and np.abs(fast - reference).mean() > 2


def test_eval_transform_matches_pil():
  photo = _photo(2)[:330, :460]
  got = ip.eval_transform(tf.constant(_jpeg(photo)), size=64).numpy()
  decoded = tf.io.decode_jpeg(_jpeg(photo)).numpy()
  assert np.abs(got - _eval_reference(decoded, 64)).mean() < 1.0


@pytest.mark.parametrize("dataset", ["imagenet2012", "image_folder"])
def test_resume_from_checkpoint_gives_the_exact_next_batch(tiny_config, imagenet, tmp_path,
                                                            dataset):
  if dataset == "image_folder":
    _write_folder(tmp_path / "images")
    config = _config(tiny_config, dataset=dataset, folder=str(tmp_path / "images"))
  else:
    config = _config(tiny_config, imagenet)
  config.batch_size = 4
  run = ip.create_pretrain_iterator(config, process_index=1, process_count=2)
  states, batches = [], []
  for _ in range(9):  # several epochs of this process's 4-5 examples
    states.append(run.state())
    batches.append(next(run))
  params = {"w": np.zeros(2, np.float32)}
  for step in (3, 7):  # the state travels in the checkpoint's JSON meta, as train.py saves it
    checkpointing.save(str(tmp_path / "ckpt"), step, params, None, {"data": states[step]}, config)
    meta = checkpointing.restore(str(tmp_path / "ckpt"), step)[0]["meta"]
    resumed = ip.create_pretrain_iterator(config, process_index=1, process_count=2)
    resumed.restore(json.loads(json.dumps(meta["data"])))
    for want in batches[step:step + 2]:
      got = next(resumed)
      for key in ("images", "index", "label"):
        np.testing.assert_array_equal(got[key], want[key])
  # the order and crops change from epoch to epoch, and with the seed
  assert not np.array_equal(batches[0]["images"], batches[5]["images"])
  config.seed = 1
  assert not np.array_equal(next(ip.create_pretrain_iterator(
      config, process_index=1, process_count=2))["images"], batches[0]["images"])


def test_bad_inputs_fail_with_one_clear_error(tiny_config, imagenet, tmp_path):
  missing = str(tmp_path / "nowhere")
  cases = [
      (dict(dataset="imagenet2012", data_dir=missing), FileNotFoundError,
       f"data_dir={missing} does not exist.*ILSVRC2012_img_train.tar.*tfds build imagenet2012"),
      (dict(dataset="imagenet2012", data_dir=str(tmp_path)), FileNotFoundError,
       f"imagenet2012 is not prepared: no dataset_info.json in {tmp_path}/imagenet2012/5.1.0.*"
       "--manual_dir"),
      (dict(dataset="imagenet2012", data_dir=str(tmp_path), manual_dir=str(tmp_path)),
       FileNotFoundError, "manual_dir=.* lacks \\['ILSVRC2012_img_train.tar'"),
      (dict(dataset="imagenette", data_dir=str(tmp_path)), FileNotFoundError,
       "imagenette is not prepared.*tfds build imagenette"),
      (dict(dataset="imagenet2013"), ValueError, "config.data.dataset='imagenet2013' is unknown"),
      (dict(dataset="image_folder", folder=missing), FileNotFoundError,
       f"folder={missing} does not exist.*root/<class>/<image>"),
      (dict(dataset="image_folder", folder=str(tmp_path)), FileNotFoundError,
       f"folder={tmp_path} holds no images"),
      (dict(crop="random"), ValueError, "config.data.crop='random'"),
  ]
  for data, error, message in cases:
    config = tiny_config.copy_and_resolve_references()
    config.data.update(data)
    with pytest.raises(error, match=message):
      ip.check_data(config)
  # several processes never prepare one data_dir together
  config = _config(tiny_config.copy_and_resolve_references(), imagenet)
  config.data.data_dir = str(tmp_path / "fresh")
  assert "to be prepared" in ip.check_data(config)
  with pytest.raises(FileNotFoundError, match="2 processes cannot prepare it together.*tfds build"):
    ip.create_pretrain_iterator(config, process_index=0, process_count=2)


def test_mock_data_drives_the_training_loop(tiny_config, imagenet, tmp_path, monkeypatch):
  """flax-examples style: the real loop on `tfds.testing.mock_data` (random JPEGs of random
  sizes) for imagenet2012, using the metadata (splits) of the prepared tiny copy."""
  config = _config(tiny_config, imagenet)
  ip.tfds_builder(config.data, prepare=True)
  config.update(batch_size=8, total_steps=6, warmup_steps=2, log_every=3, num_preview_images=2)
  # mock_data fakes the file system process-wide while a dataset opens (`as_dataset`, on the
  # main thread here): any checkpoint file access in the background at that moment goes to its
  # fake root. So: saves on the main thread, no probes (their datasets would overlap a save), and
  # no background sweep of interrupted saves (orbax lists the directory in a thread when the
  # manager opens; CI once lost that race). The workdir is new, there is nothing to sweep.
  config.checkpoint.async_save = False
  config.evals.fewshot.every_steps = config.evals.knn.every_steps = 0
  manager = checkpointing.manager
  monkeypatch.setattr(checkpointing, "manager",
                      lambda *a, **k: manager(*a, **{**k, "writer": False}))
  with tfds.testing.mock_data(num_examples=20, data_dir=imagenet[1],
                              policy=tfds.testing.MockPolicy.USE_FILES):
    state, history = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 6 and [s for s, _ in history] == [3, 6]
  assert all(np.isfinite(loss) for _, loss in history)
  meta = checkpointing.restore(str(tmp_path), 6)[0]["meta"]
  assert meta["data"]["step"] == 6 and meta["data"]["epoch"] == 2 and meta["data"]["position"] == 8


def test_finished_iterators_are_deleted_off_the_calling_thread():
  """`tf_setup.discard`: the last reference goes in the reaper thread (deleting a tf.data
  iterator can wait for its autotune thread's next wake-up, tens of seconds at an epoch end)."""
  import threading  # pylint: disable=import-outside-toplevel
  from mae_jax.data import tf_setup  # pylint: disable=import-outside-toplevel
  deleted = threading.Event()
  where = []

  class Tracked:
    def __del__(self):
      where.append(threading.current_thread().name)
      deleted.set()

  box = [Tracked()]
  tf_setup.discard(box)
  del box
  assert deleted.wait(10) and where == ["tf_iterator_reaper"]
