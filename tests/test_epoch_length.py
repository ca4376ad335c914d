"""The epoch length (`config.data.num_train_examples`) comes from the data unless a config sets it:
the bundled photos, an image folder's images, a TFDS split's info (sub-splits included)."""

import os

import numpy as np
import pytest
from PIL import Image

from configs import classify_base, vit_b, vit_h, vit_l
from mae_jax import tasks, train
from mae_jax.data import sources
from mae_jax.tasks import classify, pretrain

IMAGENET_SPLITS = {"train": 1_281_167, "validation": 50_000}


@pytest.fixture(scope="module")
def imagenet_metadata(tmp_path_factory):
  """A TFDS data_dir holding only imagenet2012's dataset_info.json (the real split sizes, no
  records): what `builder.info` reads, without the 150 GB."""
  _, tfds = sources.tf_modules()
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  splits = [tfds.core.SplitInfo(
      name=name, shard_lengths=[count], num_bytes=0,
      filename_template=tfds.core.ShardedFileTemplate(
          data_dir=builder.data_dir, dataset_name=builder.name, split=name,
          filetype_suffix="tfrecord"))
            for name, count in IMAGENET_SPLITS.items()]
  builder.info.set_splits(tfds.core.SplitDict(splits))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
  return data_dir


def _folder(root, counts):
  """root/<class k>/<i>.png with counts[k] tiny images (and a file that is no image)."""
  for k, count in enumerate(counts):
    os.makedirs(root / f"class{k}")
    for i in range(count):
      Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / f"class{k}" / f"{i}.png")
  (root / "class0" / "notes.txt").write_text("not an image")
  return str(root)


def _pretrain(tiny_config, **data):
  config = tiny_config
  config.data.update(num_train_examples=-1, **data)
  return config


def test_default_is_from_the_data():
  assert vit_b.get_config().data.num_train_examples == -1


def test_bundled_photos_count(tiny_config):
  config = _pretrain(tiny_config)
  description = pretrain.TASK.check(config)
  assert config.data.num_train_examples == 18
  assert description.endswith("; epoch = 18 examples (the bundled photos)"), description


def test_image_folder_count_and_schedule(tiny_config, tmp_path):
  config = _pretrain(tiny_config, dataset="image_folder", folder=_folder(tmp_path, [3, 4]))
  config.batch_size, config.total_steps, config.warmup_steps = 2, -1, -1
  config.epochs, config.warmup_epochs = 5, 1
  description = tasks.get(config).check(config)
  assert config.data.num_train_examples == 7
  assert description.endswith("epoch = 7 examples (counted in the image folder)"), description
  assert train.schedule_steps(config) == (5 * 3, 1 * 3)  # 7 // 2 = 3 steps per epoch


def test_explicit_setting_wins(tiny_config, tmp_path):
  config = _pretrain(tiny_config, dataset="image_folder", folder=_folder(tmp_path, [3, 4]))
  config.data.num_train_examples = 10_000
  description = pretrain.TASK.check(config)
  assert config.data.num_train_examples == 10_000
  assert description.endswith(
      "epoch = 10,000 examples (set by config.data.num_train_examples)"), description


@pytest.mark.parametrize("module", [vit_b, vit_l, vit_h], ids=lambda m: m.__name__)
def test_imagenet_recipes_get_the_imagenet_epoch(module, imagenet_metadata):
  config = module.get_config()
  config.data.update(dataset="imagenet2012", data_dir=imagenet_metadata)
  description = pretrain.TASK.check(config)
  assert config.data.num_train_examples == 1_281_167
  assert description.endswith(
      "epoch = 1,281,167 examples (TFDS split info of imagenet2012 train)"), description
  per_epoch = 1_281_167 // 4096
  assert train.schedule_steps(config) == (800 * per_epoch, 40 * per_epoch)


@pytest.mark.parametrize("split,count", [("train[:10%]", 128_117), ("train[:1000]", 1000),
                                         ("train+validation", 1_331_167)])
def test_tfds_sub_split_count(tiny_config, imagenet_metadata, split, count):
  config = _pretrain(tiny_config, dataset="imagenet2012", data_dir=imagenet_metadata,
                     split=split)
  description = pretrain.TASK.check(config)
  assert config.data.num_train_examples == count
  assert description.endswith(f"epoch = {count:,} examples (TFDS split info of imagenet2012 "
                              f"{split})"), description


def test_classify_shares_the_count(tmp_path):
  config = classify_base.finetune_config("tiny")
  config.model.update(img_size=32, patch_size=8)
  config.data.update(dataset="image_folder", folder=_folder(tmp_path, [2, 3]))
  description = classify.TASK.check(config)
  assert (config.data.num_train_examples, config.classifier.num_classes) == (5, 2)
  assert description.endswith("2 classes; epoch = 5 examples (counted in the image folder)")


def test_unpreparable_split_names_the_setting(tiny_config, tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
    (manual / name).write_bytes(b"")
  config = _pretrain(tiny_config, dataset="imagenet2012", data_dir=str(tmp_path / "data"),
                     manual_dir=str(manual))
  os.makedirs(tmp_path / "data")
  with pytest.raises(FileNotFoundError, match="2 processes cannot prepare it together.*"
                     "set config.data.num_train_examples"):
    sources.fill_epoch_length(config, process_count=2)


def test_batch_larger_than_the_epoch_is_a_clear_error(tiny_config):
  config = _pretrain(tiny_config)  # 18 bundled photos
  config.batch_size, config.total_steps = 32, -1
  pretrain.TASK.check(config)
  with pytest.raises(ValueError, match="0 steps per epoch.*num_train_examples=18"):
    train.schedule_steps(config)
