#!/usr/bin/env python3
r"""Back-of-the-envelope numbers for a pre-training run before it is launched (the README's table).

  python3 launch/estimate.py                     # ViT-H/14, 1600 epochs of ImageNet, 40% MFU
  python3 launch/estimate.py --config=configs/vit_l.py --epochs=800 --mfu=0.3

img/s = MFU x devices x peak FLOP/s / training FLOPs per image (mae_jax.flops: matmuls +
attention, forward + backward = 3 x forward); wall time = the schedule's images / img/s; one
checkpoint = float32 parameters + AdamW's two float32 moments; save time = its size / the
stated bandwidth to the bucket (async saves overlap it with training).
"""

import argparse
import functools
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

IMAGENET_TRAIN = 1_281_167
# name: (JAX devices, device kind as jax reports it; its peak comes from mae_jax.flops)
TARGETS = {
    "TPU v5p-128 (64 chips)": (64, "TPU v5p"),
    "2 x 8 H100 SXM": (16, "NVIDIA H100 80GB HBM3"),
}


@functools.lru_cache
def trainable_params(model_fields):
  """Trainable parameters of the MAE with these (sorted) config.model items, built abstractly."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from mae_jax import model  # pylint: disable=import-outside-toplevel
  abstract = nnx.eval_shape(lambda: model.MAE(dict(model_fields), rngs=nnx.Rngs(0)))
  return model.count_params(nnx.state(abstract, nnx.Param))


def estimate(config, devices, device_kind, mfu, epochs, examples, bandwidth_gb_s):
  """{img_per_s, hours, checkpoint_gb, save_s, ...} of `config` on `devices` x `device_kind`."""
  from mae_jax import flops  # pylint: disable=import-outside-toplevel
  flops_per_image = flops.train_flops_per_image(config.model)
  peak = flops.peak_flops(device_kind)
  img_per_s = mfu * devices * peak / flops_per_image
  steps = epochs * (examples // config.batch_size)  # as train.schedule_steps counts them
  images = steps * config.batch_size
  params = trainable_params(tuple(sorted(dict(config.model).items())))
  checkpoint_bytes = 3 * 4 * params  # params + AdamW mu + nu, float32
  return dict(gflop_per_image=flops_per_image / 1e9, peak_tflops=peak / 1e12, devices=devices,
              img_per_s=img_per_s, steps=steps, images=images, hours=images / img_per_s / 3600,
              params_m=params / 1e6, checkpoint_gb=checkpoint_bytes / 1e9,
              save_s=checkpoint_bytes / 1e9 / bandwidth_gb_s)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/vit_h.py", help="config file (+ :args)")
  parser.add_argument("--mfu", type=float, default=0.4, help="model-FLOP utilisation (0.4)")
  parser.add_argument("--epochs", type=int, default=1600)
  parser.add_argument("--examples", type=int, default=IMAGENET_TRAIN,
                      help="examples per epoch (ImageNet-1k train: 1,281,167)")
  parser.add_argument("--bandwidth", type=float, default=1.0,
                      help="GB/s from the workers to the bucket during a save (1.0)")
  a = parser.parse_args(argv)
  path, _, arg = a.config.partition(":")
  module = importlib.import_module(os.path.splitext(os.path.normpath(path))[0].replace(os.sep, "."))
  config = module.get_config(arg or None)
  print(f"| setup | peak TFLOP/s (bf16) | img/s at {a.mfu:.0%} MFU | {a.epochs} epochs | one "
        f"checkpoint | save at {a.bandwidth:g} GB/s |")
  print("|---|---|---|---|---|---|")
  for name, (devices, kind) in TARGETS.items():
    e = estimate(config, devices, kind, a.mfu, a.epochs, a.examples, a.bandwidth)
    print(f"| {name} | {devices} x {e['peak_tflops']:g} | "
          f"{e['img_per_s']:,.0f} | {e['hours']:.1f} h | {e['checkpoint_gb']:.2f} GB | "
          f"{e['save_s']:.1f} s |")
  print(f"\n{e['gflop_per_image']:.1f} GFLOP per training image, {e['params_m']:.1f}M trainable "
        f"parameters, {e['steps']:,} steps of {config.batch_size} = {e['images']:,} images")


if __name__ == "__main__":
  main()
