"""Batches gathered by index from images in host memory (`config.data.dataset = "arrays"`).

No decoding and no tf.data: a batch is a gather from the uint8 array plus one batched crop +
resize + flip (`resample`), made in a background thread a few steps ahead. Order: the
global order of `order` (the same batches on any process count); augmentation: draws keyed
by (epoch seed, position in the epoch). So batch `step` is a pure function of (config, step):
the state is just the step, and it resumes exactly on any process count.
"""

import concurrent.futures

import numpy as np

from mae_jax.data import arrays as arrays_lib
from mae_jax.data import order, resample
from mae_jax.imaging import normalize

AHEAD = 3  # batches prepared ahead of the one asked for

def _finish(images, ship_uint8, channels):
  """uint8 (B, S, S, 1 or 3) -> `channels` (grey repeated to 3), uint8 or float32 normalised."""
  if images.shape[-1] != channels:
    images = np.repeat(images, 3, axis=-1)
  return images if ship_uint8 else normalize(images)


class ArrayBatches:
  """Endless training batches of `arrays` for this process: dict(images, index, label)."""

  def __init__(self, arrays, config, *, process_index, process_count, start_step=0):
    data = config.data
    arrays_lib.check_augment(data)
    arrays_lib.check_channels(config.model.in_chans, arrays)
    self.arrays = arrays
    self.global_batch = config.batch_size
    self.process_index, self.process_count = process_index, process_count
    order.local_batch(config.batch_size, process_count)
    self.seed, self.size = config.seed, config.model.img_size
    self.crop, self.scale, self.ratio = data.crop, tuple(data.crop_scale), tuple(data.crop_ratio)
    self.hflip, self.antialias, self.ship_uint8 = data.hflip, data.antialias, data.ship_uint8
    self.channels = config.model.in_chans
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="array_batches")
    self._ahead, self._epochs = {}, {}
    self.step = start_step

  def __iter__(self):
    return self

  def state(self):
    return {"step": self.step, "process_index": self.process_index,
            "process_count": self.process_count}

  def restore(self, state):
    """Continue with batch `state["step"]` (saved on any process count)."""
    self.step = int(state["step"])
    self._ahead = {s: f for s, f in self._ahead.items() if s >= self.step}

  def _epoch(self, epoch):
    """(permutation, epoch seed) of `epoch`, the same on every process (the last few kept)."""
    if epoch not in self._epochs:
      seed = order.epoch_seed(self.seed, 0, epoch)
      self._epochs = {e: v for e, v in self._epochs.items() if e >= epoch - 1}
      self._epochs[epoch] = order.epoch_permutation(seed, len(self.arrays)), seed
    return self._epochs[epoch]

  def _boxes(self, seed, slots, height, width):
    if self.crop == "random_resized":
      return resample.random_resized_boxes(resample.uniforms(seed, slots, 40), height, width,
                                           self.scale, self.ratio)
    if self.crop == "fixed_size":
      return resample.fixed_size_boxes(resample.uniforms(seed ^ 1, slots, 2), height, width)
    return resample.center_boxes(len(slots), height, width)

  def batch(self, step):
    """This process's share of global batch `step` (pure: no iterator state)."""
    positions = order.step_positions(step, self.global_batch, self.process_index,
                                     self.process_count)
    total = len(self.arrays)
    epochs, slots = positions // total, positions % total
    images, labels = [], []
    for epoch in np.unique(epochs):  # a batch may span two epochs
      part = epochs == epoch
      permutation, seed = self._epoch(int(epoch))
      ids = permutation[slots[part]]
      source = self.arrays.images[ids]
      flip = (resample.uniforms(seed ^ 2, slots[part], 1)[:, 0] < 0.5) if self.hflip else None
      boxes = self._boxes(seed, slots[part], *source.shape[1:3])
      images.append(resample.crop_resize(source, boxes, self.size, flip=flip,
                                         antialias=self.antialias))
      labels.append(np.zeros(len(ids), np.int64) - 1 if self.arrays.labels is None
                    else self.arrays.labels[ids])
    images = np.concatenate(images) if len(images) > 1 else images[0]
    return {"images": _finish(images, self.ship_uint8, self.channels),
            "index": order.int32_ids(positions),
            "label": np.concatenate(labels).astype(np.int32)}

  def __next__(self):
    for s in range(self.step, self.step + AHEAD + 1):
      if s not in self._ahead:
        self._ahead[s] = self._pool.submit(self.batch, s)
    out = self._ahead.pop(self.step).result()
    self.step += 1
    return out


def eval_batches(arrays, config, *, subset=None, process_index, process_count):
  """One pass over this process's contiguous share of `arrays` (or of its examples `subset`,
  in that order): the evaluation transform; `valid` False and `index` -1 on the padding that
  gives every process the same number of batches (`create_eval_iterator`'s contract)."""
  data = config.data
  arrays_lib.check_channels(config.model.in_chans, arrays)
  ids = np.arange(len(arrays)) if subset is None else np.asarray(subset, np.int64)
  batch = order.local_batch(config.batch_size, process_count)
  start, end = order.process_range(len(ids), process_index, process_count)
  per_process = -(-len(ids) // process_count)
  size = config.model.img_size
  for first in range(0, -(-per_process // batch) * batch, batch):
    where = np.arange(start + first, start + first + batch)
    valid = where < end
    picked = ids[np.where(valid, where, start)] if end > start else np.zeros(batch, np.int64)
    images = resample.eval_resize(arrays.images[picked], size, antialias=data.antialias,
                                  fraction=data.eval_crop)
    labels = (np.full(batch, -1) if arrays.labels is None else arrays.labels[picked])
    yield {"images": _finish(images, data.ship_uint8, config.model.in_chans),
           "label": np.where(valid, labels, -1).astype(np.int32), "valid": valid,
           "index": np.where(valid, where, -1).astype(np.int32)}


def preview_images(data, count, size, channels=3):
  """The first `count` evaluation images (the training images when there are none), under
  the evaluation transform, normalised float32 (count, S, S, 3): what the pictures show."""
  found = (arrays_lib.eval_arrays(data) if data.get("eval_arrays")
           else arrays_lib.train_arrays(data))
  picked = found.images[np.arange(count) % len(found)]
  resized = resample.eval_resize(picked, size, antialias=data.antialias, fraction=data.eval_crop)
  return _finish(resized, False, channels)
