"""Random-access sources (image folders, TFDS prepared as ArrayRecord): the global batches do
not depend on the process count, and a mid-epoch state resumes on another process count."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mae_jax import data as mae_data
from mae_jax.imaging import center_crop


class MaeTinyPhotos(tfds.core.GeneratorBasedBuilder):
  """19 small photos in two classes, as a real TFDS builder writes them (PNG-encoded)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, supervised_keys=("image", "label"),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(19), "validation": self._generate_examples(7)}

  def _generate_examples(self, count):
    photos = mae_data.bundled_photos()
    for i in range(count):
      yield i, {"image": center_crop(photos[i % len(photos)], 40), "label": i % 2}


def prepare_tiny_photos(data_dir, file_format="array_record"):
  """`MaeTinyPhotos` prepared in `data_dir` (dataset name "mae_tiny_photos")."""
  builder = MaeTinyPhotos(data_dir=str(data_dir), file_format=file_format)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      verify_ssl=False))
  return builder

BATCH = 12
STEPS = 5  # 60 examples: 3+ epochs of 19, so epoch boundaries fall mid-batch


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """19 small photos in two classes (19 is prime: no process count divides it)."""
  root = tmp_path_factory.mktemp("images")
  photos = mae_data.bundled_photos()
  for i in range(19):
    os.makedirs(root / f"c{i % 2}", exist_ok=True)
    Image.fromarray(center_crop(photos[i % len(photos)], 40)).save(root / f"c{i % 2}/{i}.png")
  return root


@pytest.fixture(scope="module")
def array_record(tmp_path_factory):
  """The same 19 photos as a TFDS dataset prepared as ArrayRecord."""
  return prepare_tiny_photos(tmp_path_factory.mktemp("tfds")).data_dir.split("/mae_tiny_photos")[0]


@pytest.fixture(params=["image_folder", "array_record"])
def config(request, tiny_config, folder, array_record):
  tiny_config.batch_size = BATCH
  tiny_config.data.update(num_parallel_calls=1)
  if request.param == "image_folder":
    tiny_config.data.update(dataset="image_folder", folder=str(folder))
  else:
    tiny_config.data.update(dataset="mae_tiny_photos", data_dir=array_record,
                            file_format="array_record")
  return tiny_config


def _iterators(config, count, start_step=0):
  return [mae_data.create_pretrain_iterator(config, process_index=i, process_count=count,
                                            start_step=start_step) for i in range(count)]


def _global_batch(iterators):
  """The processes' shares of one step, concatenated in process order."""
  parts = [next(it) for it in iterators]
  return {k: np.concatenate([p[k] for p in parts]) for k in ("images", "label", "index")}


def _assert_same(a, b, where):
  for key in ("images", "label", "index"):
    np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key} at {where}")


def test_global_batches_equal_for_1_2_and_3_processes(config):
  """Same images (bit for bit, augmentation included), labels and ids on any process count."""
  runs = {count: _iterators(config, count) for count in (1, 2, 3)}
  seen = []
  for step in range(STEPS):
    reference = _global_batch(runs[1])
    for count in (2, 3):
      _assert_same(_global_batch(runs[count]), reference, f"step {step}, {count} processes")
    seen.append(reference["images"])
  # the views differ (random crops of 19 photos), so the comparison is not of a constant stream
  assert len({img.tobytes() for img in np.concatenate(seen)}) > 50
  np.testing.assert_array_equal(reference["index"], np.arange((STEPS - 1) * BATCH, STEPS * BATCH))


def test_one_process_order_is_the_order_before_the_global_slicing(config):
  """For one process the global order is the earlier per-process order (old runs resume)."""
  from mae_jax.data import order  # pylint: disable=import-outside-toplevel
  batches = _iterators(config, 1)[0]
  labels = np.concatenate([next(batches)["label"] for _ in range(3)])  # 36 = epoch 0 + 17
  order0 = np.random.default_rng(order.epoch_seed(config.seed, 0, 0)).permutation(19)
  order1 = np.random.default_rng(order.epoch_seed(config.seed, 0, 1)).permutation(19)
  # folder: the listing's labels; ArrayRecord: the labels of the records, by index
  source = batches.source
  all_labels = (source.all_labels if config.data.dataset == "image_folder" else
                np.array([source.records_by_index[i]["label"] for i in range(19)]))
  np.testing.assert_array_equal(labels, all_labels[np.r_[order0, order1[:17]]])


@pytest.mark.parametrize("saved_count,resumed_count", [(2, 2), (2, 3), (3, 1)])
def test_resume_mid_epoch_on_any_process_count_continues_the_global_order(
    config, saved_count, resumed_count):
  """Resumed from the saved states of step 4 (mid-epoch), the next batches are unchanged."""
  reference = _iterators(config, 1)
  saved = _iterators(config, saved_count)
  for _ in range(4):
    _global_batch(reference)
    _global_batch(saved)
  states = [it.state() for it in saved]
  assert all(0 < s["position"] for s in states)  # mid-epoch on every process
  resumed = _iterators(config, resumed_count)
  for i, it in enumerate(resumed):
    it.restore(states[i] if resumed_count == saved_count else states[0])
  for step in range(4, 7):
    _assert_same(_global_batch(resumed), _global_batch(reference), f"step {step}")


def test_start_step_without_a_saved_state_lands_on_the_same_batches(config):
  reference = _iterators(config, 1)
  for _ in range(5):
    _global_batch(reference)
  late = _iterators(config, 3, start_step=5)
  for step in range(5, 8):
    _assert_same(_global_batch(late), _global_batch(reference), f"step {step}")


def test_array_record_asked_of_a_tfrecord_dataset_or_a_missing_dir_is_one_clear_error(
    tiny_config, tmp_path):
  from mae_jax import cli  # pylint: disable=import-outside-toplevel
  prepare_tiny_photos(tmp_path / "tfrecord", file_format="tfrecord")
  tiny_config.data.update(dataset="mae_tiny_photos", data_dir=str(tmp_path / "tfrecord"),
                          file_format="array_record")
  with pytest.raises(cli.USER_ERRORS, match=r"config.data.file_format='array_record' but "
                     r"mae_tiny_photos in \S+ is prepared as \['tfrecord'\]: prepare it with "
                     r"`tfds build mae_tiny_photos --file_format=array_record"):
    mae_data.check_data(tiny_config)
  tiny_config.data.file_format = "auto"  # a TFRecord dataset stays readable, in order
  assert "TFRecord, read in order per process" in mae_data.check_data(tiny_config)
  tiny_config.data.update(data_dir=str(tmp_path / "nope"), file_format="array_record")
  with pytest.raises(cli.USER_ERRORS, match=r"config.data.data_dir=\S+nope does not exist"):
    mae_data.check_data(tiny_config)
  tiny_config.data.update(data_dir=str(tmp_path / "tfrecord"), file_format="arrayrecord")
  with pytest.raises(cli.USER_ERRORS, match=r"config.data.file_format='arrayrecord': expected"):
    mae_data.check_data(tiny_config)
