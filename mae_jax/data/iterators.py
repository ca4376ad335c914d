"""The batching, resumable iterators: bundled photos (numpy) and tf.data sources.

Every random draw is keyed by (seed, process, epoch, position in the epoch), so the
stream of a process is a pure function of those and the iterator position (`state()`:
step, epoch, position, skip count) restores to the exact next batch. Batches ship uint8
(normalised on device) or float32 normalised with ImageNet mean/std.
"""

import concurrent.futures
import functools
import logging

import numpy as np

from mae_jax.data import array_batches, arrays, order, sources
from mae_jax.data.crops import CROPS, fixed_size_crop_box, random_resized_crop_box
from mae_jax.data.photos import BUNDLED, bundled_photos
from mae_jax.data.tf_setup import discard, tf_modules
from mae_jax.data.transforms import eval_transform, pretrain_transform
from mae_jax.imaging import center_crop, normalize, resize

log = logging.getLogger(__name__)

# config.data fields of the fine-tuning augmentation (absent in older configs: off).
AUGMENT_FIELDS = ("rand_augment_ops", "rand_augment_magnitude", "rand_augment_std",
                  "random_erasing")


class PhotoBatches:
  """Endless pre-training batches from the bundled photos.

  `batch_size` is the global batch; each batch holds this process's share: `images`
  (B, S, S, 3) (float32 normalised, or uint8 with `ship_uint8`) and `index` (B,) int32
  global example ids (step * batch_size + offset + i). Example `id` is a pure function of
  (seed, id); `state()` / `restore()` carry the step.
  """

  def __init__(self, batch_size, image_size, *, seed=0, scale=(0.2, 1.0),
               ratio=(3 / 4, 4 / 3), hflip=True, crop="random_resized",
               ship_uint8=False, start_step=0, process_index=0, process_count=1):
    self.photos = bundled_photos()
    self.global_batch = batch_size
    self.batch_size = order.local_batch(batch_size, process_count)
    self.offset = process_index * self.batch_size
    self.image_size, self.seed = image_size, seed
    self.scale, self.ratio, self.hflip, self.crop = tuple(scale), tuple(ratio), hflip, crop
    self.ship_uint8 = ship_uint8
    self.step = start_step
    self._centers = None  # the photos' centre crops, made on first use

  def __iter__(self):
    return self

  def state(self):
    return {"step": self.step}

  def restore(self, state):
    self.step = int(state["step"])

  def augment(self, rng, photo):
    """One pre-training view of `photo`: crop (random-resized, fixed-size or centre) + flip."""
    if self.crop == "random_resized":
      view = resize(photo, self.image_size,
                    random_resized_crop_box(rng, *photo.shape[:2], self.scale, self.ratio))
    elif self.crop == "fixed_size":
      view = resize(photo, self.image_size, fixed_size_crop_box(rng, *photo.shape[:2]))
    else:
      view = center_crop(photo, self.image_size)
    return self._flip(rng, view)

  def _flip(self, rng, view):
    return view[:, ::-1] if self.hflip and rng.random() < 0.5 else view

  def _view(self, rng, which):
    """`augment` of photo `which`; a centre crop (the same for every view) is resized once."""
    if self.crop != "center":
      return self.augment(rng, self.photos[which])
    if self._centers is None:
      self._centers = [center_crop(p, self.image_size) for p in self.photos]
    return self._flip(rng, self._centers[which])

  def __next__(self):
    ids = self.step * self.global_batch + self.offset + np.arange(self.batch_size)
    views = []
    for i in ids:
      rng = np.random.default_rng([self.seed, int(i)])
      views.append(self._view(rng, rng.integers(len(self.photos))))
    images = np.stack(views)
    self.step += 1
    return {"images": images if self.ship_uint8 else normalize(images), "index": order.int32_ids(ids)}



class TfBatches:
  """Endless pre-training batches from a source, one tf.data pipeline per epoch.

  A batch holds this process's share of the global batch: `images` (B, S, S, 3) uint8 (or
  float32 normalised), `index` (B,) int32 global example ids (step * global batch +
  process offset + i), `label` (B,) int32. Epochs run into each other (nothing dropped);
  unreadable images are dropped and counted (`skipped`). Position = (epoch, records of the
  epoch this process consumed). With a `global_order` source (image folders) one epoch
  order and its augmentation are pure functions of (seed, epoch), and each process takes
  its slots of every global batch: the global batches do not depend on the process count
  (while every image is readable), and a run resumes on another process count at the same
  place. Otherwise (TFDS) each process reads its own share in an order keyed by (seed,
  process, epoch). Either way `restore(state())` continues with the exact next batch. The
  next epoch's pipeline is built and filled in a background thread while this one runs, and
  a finished epoch's iterator is deleted in another (`tf_setup.discard`), so an epoch
  boundary costs the training thread nothing.
  """

  def __init__(self, source, config, *, process_index, process_count, start_step=0):
    data = config.data
    self.source = source
    self.global_batch = config.batch_size
    self.batch_size = order.local_batch(config.batch_size, process_count)
    self.process_index, self.process_count = process_index, process_count
    self.seed = config.seed
    self.transform = functools.partial(
        pretrain_transform, size=sources.image_size(config), crop=data.crop,
        scale=tuple(data.crop_scale), ratio=tuple(data.crop_ratio), hflip=data.hflip,
        color_jitter=data.color_jitter, antialias=data.antialias, ship_uint8=data.ship_uint8,
        **{k: data[k] for k in AUGMENT_FIELDS if k in data})
    self.parallel = data.num_parallel_calls
    self._warm = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="next_epoch")
    self._log_skips_at = 1
    self.restore(self._position_of(start_step))

  def _position_of(self, step):
    """The state at `step`, assuming no unreadable records so far."""
    if not self.source.global_order:
      epoch, position = divmod(step * self.batch_size, self.source.num_examples)
    else:  # this process's first example of `step`, and its rank among the epoch's kept ones
      epoch, slot = divmod(step * self.global_batch + self.process_index * self.batch_size,
                           self.source.total_examples)
      position = int(np.searchsorted(self._kept(epoch), slot))
    return {"step": step, "epoch": epoch, "position": position, "skipped": 0}

  def _kept(self, epoch):
    """Positions in epoch `epoch`'s global order that fall in this process's batch slots."""
    total = self.source.total_examples
    slots = (epoch * total + np.arange(total)) % self.global_batch
    return np.flatnonzero(slots // self.batch_size == self.process_index)

  def __iter__(self):
    return self

  def state(self):
    return {"step": self.step, "epoch": self.epoch, "position": self.position,
            "skipped": self.skipped, "process_index": self.process_index,
            "process_count": self.process_count}

  def restore(self, state):
    """Continue from `state()`: the pipeline restarts at that exact record."""
    if state.get("process_count", self.process_count) != self.process_count:
      if self.source.global_order:
        log.warning("data state saved with %s processes, restored with %d: continuing the "
                    "global order at step %s (exact unless images were skipped)",
                    state["process_count"], self.process_count, state["step"])
        state = self._position_of(int(state["step"]))
      else:
        log.warning("data state saved with %s processes, restored with %d: each process now "
                    "reads another part of the data, not the saved order",
                    state["process_count"], self.process_count)
    self.step, self.epoch = int(state["step"]), int(state["epoch"])
    self.position, self.skipped = int(state["position"]), int(state["skipped"])
    if hasattr(self, "_current"):  # pipelines of the position left behind
      box = [self._current, self._next]
      self._current = self._next = None
      discard(box)
    self._current = self._open(self.epoch, self.position)
    self._next = self._prefetch(self.epoch + 1)
    self._pending = None  # the part of a fetched chunk not yet returned

  def dataset(self, epoch, position=0):
    """Epoch `epoch` from record `position` on, in chunks of up to B: image, label, pos."""
    tf, _ = tf_modules()
    parallel = tf.data.AUTOTUNE if self.parallel < 0 else self.parallel
    if self.source.global_order:  # augmentation keyed by the position in the global order
      epoch_seed = order.epoch_seed(self.seed, 0, epoch)
      kept = self._kept(epoch)
      records = self.source.records_at(self.source.epoch_order(epoch_seed)[kept])
      keys = tf.data.Dataset.from_tensor_slices(kept.astype(np.int64))
    else:
      epoch_seed = order.epoch_seed(self.seed, self.process_index, epoch)
      records, keys = self.source.records(epoch_seed), tf.data.Dataset.counter()

    def load(numbered, key):
      pos, (payload, label) = numbered
      seed = tf.stack([tf.constant(epoch_seed, tf.int64), key])
      encoded, label = self.source.load(payload, label)
      return {"image": self.transform(encoded, seed), "label": tf.cast(label, tf.int32),
              "pos": pos}

    ds = tf.data.Dataset.zip(records.enumerate(), keys).skip(position)
    ds = ds.map(load, num_parallel_calls=parallel, deterministic=True)
    ds = ds.ignore_errors()  # corrupt / truncated / not an image: dropped, counted by `pos` gaps
    ds = ds.batch(self.batch_size).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    cardinality = int(records.cardinality())
    return ds.with_options(options), cardinality if cardinality >= 0 else self.source.num_examples

  def _open(self, epoch, position):
    ds, size = self.dataset(epoch, position)
    return ds.as_numpy_iterator(), size

  def _prefetch(self, epoch):
    """A future of (iterator, size, first chunk) of epoch `epoch`, filled in a background
    thread (its prefetch buffer keeps filling after the first chunk). A random-access
    source's pipeline is built there too; a TFDS `as_dataset` call stays on this thread
    (`tfds.testing.mock_data` fakes the file system process-wide while it runs)."""
    built = None if self.source.global_order else self.dataset(epoch, 0)

    def build():
      ds, size = built or self.dataset(epoch, 0)
      it = ds.as_numpy_iterator()
      return it, size, next(it, None)
    return self._warm.submit(build)

  def _chunk(self):
    """The next chunk of decoded examples, moving on to the next epoch when one ends."""
    while True:
      if self._pending is not None:
        chunk, self._pending = self._pending, None
        return chunk
      chunk = next(self._current[0], None)
      if chunk is not None:
        return chunk
      self._count_skips(self._current[1] - self.position)  # unreadable records at the end
      it, size, first = self._next.result()
      box = [self._current]  # the finished epoch's iterator, deleted off this thread
      self.epoch, self.position, self._current = self.epoch + 1, 0, (it, size)
      discard(box)
      self._pending = first
      if self._pending is None:
        raise RuntimeError(f"epoch {self.epoch} of {self.source.describe()} has no readable "
                           f"image on process {self.process_index}")
      self._next = self._prefetch(self.epoch + 1)

  def _count_skips(self, count):
    if count > 0:
      self.skipped += count
      if self.skipped >= self._log_skips_at:
        log.warning("skipped %d unreadable images so far (corrupt, truncated or not an image) "
                    "in %s", self.skipped, self.source.describe())
        self._log_skips_at = 2 * self.skipped

  def __next__(self):
    parts, need = [], self.batch_size
    while need:
      chunk = self._chunk()
      part = {k: v[:need] for k, v in chunk.items()}
      if len(chunk["pos"]) > need:
        self._pending = {k: v[need:] for k, v in chunk.items()}
      pos = part["pos"]
      self._count_skips(int(pos[-1]) + 1 - self.position - len(pos))
      self.position = int(pos[-1]) + 1
      parts.append(part)
      need -= len(pos)
    batch = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts])
                                             for k in parts[0]}
    ids = (self.step * self.global_batch + self.process_index * self.batch_size
           + np.arange(self.batch_size))
    self.step += 1
    return {"images": batch["image"], "index": order.int32_ids(ids), "label": batch["label"]}


def _defaults(process_index, process_count):
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return process_index, process_count


def create_pretrain_iterator(config, *, start_step=0, process_index=None, process_count=None):
  """The pre-training iterator `config.data` asks for, for this process's share of the batch.

  `__next__` gives dict(images, index[, label]); `state()` is JSON-serialisable and
  `restore(state)` continues with the exact next batch.
  """
  process_index, process_count = _defaults(process_index, process_count)
  data = config.data
  order.local_batch(config.batch_size, process_count)
  if data.crop not in CROPS:
    raise ValueError(f"config.data.crop={data.crop!r}: expected one of {CROPS}")
  if data.dataset == BUNDLED:
    return PhotoBatches(config.batch_size, sources.image_size(config), seed=config.seed,
                        scale=data.crop_scale, ratio=data.crop_ratio, hflip=data.hflip,
                        crop=data.crop, ship_uint8=data.ship_uint8, start_step=start_step,
                        process_index=process_index, process_count=process_count)
  if data.dataset == arrays.ARRAYS:
    source = arrays.train_arrays(data)
    log.info("data: %s in host memory, process %d/%d", source.description, process_index,
             process_count)
    return array_batches.ArrayBatches(source, config, process_index=process_index,
                                      process_count=process_count, start_step=start_step)
  source = sources.make_source(config, data.split, process_index, process_count)
  log.info("data: %s split %r, %d of %d examples on process %d/%d", data.dataset, data.split,
           source.num_examples, source.total_examples, process_index, process_count)
  return TfBatches(source, config, process_index=process_index, process_count=process_count,
                   start_step=start_step)


def create_eval_iterator(config, *, split=None, files=None, subset=None, process_index=None,
                         process_count=None):
  """One pass over this process's share of `split` (default `data.eval_split`) in order.

  Eval transform (shorter side to 256, centre 224, scaled to the image size). Batches
  hold `images`, `label`, `valid` (False on padding) and `index` (the example's position in
  the whole split, -1 on padding); every process yields the same number of batches, the
  last ones padded. `files` = (paths, labels, classes) reads those image files instead
  (a fixed subset of an image folder). Arrays (`data.dataset="arrays"`): `data.eval_arrays`,
  or `subset` = ("train" | "eval", example ids) of the training / evaluation arrays.
  """
  process_index, process_count = _defaults(process_index, process_count)
  data = config.data
  if data.dataset == BUNDLED:
    raise ValueError(f"config.data.dataset={BUNDLED!r} has no evaluation split")
  if data.dataset == arrays.ARRAYS:
    which, ids = subset or ("eval", None)
    source = arrays.train_arrays(data) if which == "train" else arrays.eval_arrays(data)
    return array_batches.eval_batches(source, config, subset=ids, process_index=process_index,
                                      process_count=process_count)
  tf, _ = tf_modules()
  batch = order.local_batch(config.batch_size, process_count)
  if files is not None:
    source = sources.FolderSource(data.folder, process_index, process_count, files=files)
  elif data.dataset == sources.FOLDER and data.get("eval_folder"):
    source = sources.FolderSource(data.eval_folder, process_index, process_count)
  else:
    source = sources.make_source(config, split or data.eval_split, process_index, process_count)
  per_process = -(-source.total_examples // process_count)
  num_batches = -(-per_process // batch)
  size = sources.image_size(config)

  def load(position, record):
    encoded, label = source.load(*record)
    image = eval_transform(encoded, size=size, antialias=data.antialias,
                           ship_uint8=data.ship_uint8, fraction=data.eval_crop)
    return {"images": image, "label": tf.cast(label, tf.int32), "valid": True,
            "index": tf.cast(position + source.start, tf.int32)}

  pad = {"images": tf.zeros([size, size, 3], tf.uint8 if data.ship_uint8 else tf.float32),
         "label": tf.constant(-1, tf.int32), "valid": False, "index": tf.constant(-1, tf.int32)}
  ds = source.records(0, shuffle=False).enumerate()
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors().concatenate(tf.data.Dataset.from_tensors(pad).repeat())
  ds = ds.take(num_batches * batch).batch(batch).prefetch(tf.data.AUTOTUNE)
  return _deleted_off_thread(ds.as_numpy_iterator())


def _deleted_off_thread(iterator):
  """Yield from `iterator`, then delete it in the background (`tf_setup.discard`)."""
  box = [iterator]
  del iterator
  try:
    yield from box[0]
  finally:
    discard(box)
