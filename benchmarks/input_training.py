r"""Does the input keep up with training? Fashion-MNIST pre-training with real input vs the
same compiled step on one fixed batch (compute only), and the training loop's waits for a
batch across epoch boundaries.

  python benchmarks/input_training.py --sources=arrays,image_folder,array_record --examples=12800 \
      --rounds=4 --window=60

For each source: the config of `configs/fmnist_pretrain.py` on the first `--examples`
training images (so an epoch is examples / 256 steps and several boundaries fall inside the
run), the step dispatched as `mae_jax.train` does (one step in flight while the host fetches
the next batch). Windows of `--window` steps alternate between real input and the fixed
batch, `--rounds` of each; the table gives img/s of both (medians over the windows), their
ratio, the host's wait for `next(batches)` per step (median / max) and the longest step
interval within 2 steps of an epoch boundary against the median step. Needs Debian's
dataset-fashion-mnist; the image folder (PNG) and the ArrayRecord TFDS copy are written once
under --work.
"""

import argparse
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout
from configs import fmnist_pretrain  # noqa: E402
from mae_jax import preload, sharding  # noqa: E402
from mae_jax import steps as steps_lib  # noqa: E402
from mae_jax.data import idx  # noqa: E402


def prepare(work, examples):
  """(images .npy path, image folder) of the first `examples` Fashion-MNIST training images."""
  os.makedirs(work, exist_ok=True)
  images = idx.read_idx(fmnist_pretrain.idx_file("train", "images"))[:examples]
  labels = idx.read_idx(fmnist_pretrain.idx_file("train", "labels"))[:examples]
  npz = os.path.join(work, f"train{examples}.npz")
  if not os.path.exists(npz):
    np.savez(npz, images=images, labels=labels)
  folder = os.path.join(work, f"train{examples}")
  if not os.path.isdir(folder):
    from PIL import Image  # pylint: disable=import-outside-toplevel
    for label in range(10):
      os.makedirs(os.path.join(folder, str(label)), exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
      Image.fromarray(image, mode="L").save(os.path.join(folder, str(label), f"{i:05d}.png"))
  return npz, folder


def prepare_array_record(work, npz):
  """The same images as a TFDS dataset prepared as ArrayRecord (PNG-encoded records)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class FmnistBench(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, supervised_keys=("image", "label"),
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(28, 28, 1), encoding_format="png"),
              "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      with np.load(npz) as f:
        for i, (image, label) in enumerate(zip(f["images"], f["labels"])):
          yield i, {"image": image[..., None], "label": int(label)}

  data_dir = os.path.join(work, "tfds_" + os.path.basename(npz)[:-4])
  builder = FmnistBench(data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    tfds.disable_progress_bar()
    builder.download_and_prepare()
  return data_dir


def make_config(source, npz, folder, steps, work):
  arg = f"total_steps={steps},warmup_steps=10"
  if source == "image_folder":
    arg += f",folder={folder}"
  config = fmnist_pretrain.get_config(arg)
  if source == "arrays":
    config.data.update(arrays=npz, eval_arrays="")
  if source == "array_record":
    config.data.update(dataset="fmnist_bench", data_dir=prepare_array_record(work, npz),
                       file_format="array_record")
  config.data.num_train_examples = -1
  for entry in config.evals.values():
    entry.every_steps = 0
  config.mesh.data = 1
  return config


def input_only(source, npz, folder, args):
  """img/s of the iterator alone (nothing else running): `--batches` batches after 3."""
  config = make_config(source, npz, folder, 100, args.work)
  from mae_jax.data import iterators  # pylint: disable=import-outside-toplevel
  batches = iterators.create_pretrain_iterator(config, process_index=0, process_count=1)
  for _ in range(3):
    next(batches)
  start = time.perf_counter()
  for _ in range(args.batches):
    next(batches)
  return args.batches * config.batch_size / (time.perf_counter() - start)


def run(source, npz, folder, args):
  steps = 2 * args.rounds * args.window + 5
  config = make_config(source, npz, folder, steps, args.work)
  mesh = sharding.make_mesh(config.mesh)
  built = steps_lib.build(config, mesh, steps, 10)
  state, static = built.init_fn()
  batches = built.task.train_batches(config, 0)
  fixed = sharding.global_batch(next(batches), mesh)
  compiled = built.step_fn.lower(state, static, fixed).compile()
  for _ in range(3):  # warm-up: pipeline filled, caches hot
    state, metrics = compiled(state, static, sharding.global_batch(next(batches), mesh))
  jax.block_until_ready(metrics["loss"])
  per_epoch = len(batches.arrays) if source == "arrays" else batches.source.total_examples
  real, compute, waits, intervals, boundary = [], [], [], [], []
  for round_index in range(args.rounds):
    for kind in ("real", "compute"):
      start, last, in_flight = time.perf_counter(), None, None
      for _ in range(args.window):
        if kind == "real":
          step = batches.step
          t0 = time.perf_counter()
          batch = sharding.global_batch(next(batches), mesh)
          waits.append((time.perf_counter() - t0, round_index, step))
        else:
          batch = fixed
        state, metrics = compiled(state, static, batch)
        if in_flight is not None:  # as mae_jax.intervals: wait for the step before this one
          jax.block_until_ready(in_flight)
          now = time.perf_counter()
          if kind == "real" and last is not None:
            intervals.append(now - last)
            # the examples of a step within 2 of this one change epoch: a boundary
            near = {(s * config.batch_size) // per_epoch for s in range(step - 3, step + 2)}
            if len(near) > 1:
              boundary.append(now - last)
          last = now
        in_flight = metrics["loss"]
      jax.block_until_ready(in_flight)
      rate = args.window * config.batch_size / (time.perf_counter() - start)
      (real if kind == "real" else compute).append(rate)
  longest = max(waits)
  return dict(source=source, real=np.median(real), compute=np.median(compute),
              wait_p50=np.median([w[0] for w in waits]), wait_max=longest[0],
              wait_where=f"round {longest[1]}, step {longest[2]}", step_p50=np.median(intervals),
              step_max=max(intervals), boundary_max=max(boundary) if boundary else float("nan"),
              boundaries=batches.step * config.batch_size // per_epoch,  # crossed by real input
              per_core=np.median(real) / os.cpu_count())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sources", default="arrays,image_folder,array_record")
  parser.add_argument("--examples", type=int, default=12_800, help="training images used")
  parser.add_argument("--rounds", type=int, default=4, help="windows of each kind")
  parser.add_argument("--window", type=int, default=60, help="steps per window")
  parser.add_argument("--work", default="/tmp/fmnist_input_bench")
  parser.add_argument("--input_only", action="store_true",
                      help="only the iterator's img/s per host core, no training")
  parser.add_argument("--batches", type=int, default=40, help="--input_only: timed batches")
  args = parser.parse_args()
  npz, folder = prepare(args.work, args.examples)
  if args.input_only:
    print("| source | input img/s (iterator alone) | per host core |\n|---|---|---|")
    for source in args.sources.split(","):
      rate = input_only(source, npz, folder, args)
      print(f"| {source} | {rate:.0f} | {rate / os.cpu_count():.0f} |", flush=True)
    return
  print(f"{time.strftime('%Y-%m-%d')}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {preload.allocator()}; Fashion-MNIST "
        f"first {args.examples:,} images, batch 256; {args.rounds} x {args.window} steps each; "
        f"load average {os.getloadavg()[0]:.1f}")
  print("| source | img/s real input | img/s compute only | ratio | next() wait p50 / max (s) "
        "| step p50 / max (s) | max step near a boundary (s), boundaries | training img/s per core |")
  print("|---|---|---|---|---|---|---|---|")
  for source in args.sources.split(","):
    r = run(source, npz, folder, args)
    print(f"| {source} | {r['real']:.0f} | {r['compute']:.0f} | {r['real'] / r['compute']:.3f} "
          f"| {r['wait_p50']:.4f} / {r['wait_max']:.3f} ({r['wait_where']}) | {r['step_p50']:.3f} / "
          f"{r['step_max']:.3f} | {r['boundary_max']:.3f}, {r['boundaries']} | "
          f"{r['per_core']:.0f} |", flush=True)


if __name__ == "__main__":
  preload.reexec_with_tcmalloc()  # as `python -m mae_jax.main` runs
  main()
