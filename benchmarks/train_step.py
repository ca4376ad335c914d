r"""Time one MAE pre-training step (compile + steady state) at a real model size.

  python benchmarks/train_step.py --size=vit_b --batch=2 --steps=5

Prints a table: compile seconds, seconds/step, images/s, achieved model TFLOP/s
from SPEC.md's training FLOPs per image (mask 0.75, 224 px) and, with
--peak_tflops, MFU. It runs the sharded step of `mae_jax.train` (--mesh
data,fsdp,tensor) on uint8 batches normalised on device. Uses only JAX (no
TensorFlow), so it also runs on the GPU machines.
"""

import argparse
import platform
import time

import jax
import numpy as np

from configs import base
from mae_jax import sharding, train

# SPEC.md section 1: forward + backward GFLOP per 224 px image at mask 0.75.
TRAIN_GFLOP_PER_IMAGE = {"vit_b": 58.7, "vit_l": 124.5, "vit_h": 291.4}


def measure(size, batch, steps, dtype, mesh_shape=(-1, 1, 1)):
  """Compile and time the sharded train step exactly as `mae_jax.train` runs it."""
  config = base.sized_config(size, f"batch_size={batch},total_steps={steps + 1},warmup_steps=1")
  config.model.dtype = dtype
  config.mesh.update(dict(zip(sharding.MESH_AXES, mesh_shape)))
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(batch, mesh)
  built = train.build(config, mesh, steps + 1, 1)
  state, static = built.init_fn()
  rng = np.random.default_rng(0)
  batch_data = sharding.global_batch(
      {"images": rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8),
       "index": np.arange(batch, dtype=np.int32)}, mesh)
  start = time.perf_counter()
  compiled = built.step_fn.lower(state, static, batch_data).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, static, batch_data)  # warm-up step
  jax.block_until_ready(metrics["loss"])
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, static, batch_data)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  img_s = batch / step_s
  return dict(size=size, batch=batch, dtype=dtype, mesh=tuple(mesh.shape.values()),
              compile_s=compile_s, step_s=step_s, img_s=img_s,
              tflops=img_s * TRAIN_GFLOP_PER_IMAGE[size] / 1e3, loss=float(metrics["loss"]),
              devices=mesh.size)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="vit_b", choices=sorted(TRAIN_GFLOP_PER_IMAGE))
  parser.add_argument("--batch", type=int, default=2, help="global batch")
  parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
  parser.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16")
  parser.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes (-1 = the rest)")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="peak TFLOP/s of one device (e.g. 989 for H100 SXM bf16): adds MFU")
  args = parser.parse_args()
  r = measure(args.size, args.batch, args.steps, args.dtype,
              tuple(int(x) for x in args.mesh.split(",")))
  print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} jax {jax.__version__} "
        f"{jax.devices()[0].device_kind} x{jax.device_count()}")
  mfu = (f"{100 * r['tflops'] / (r['devices'] * args.peak_tflops):.1f}%"
         if args.peak_tflops else "n/a")
  print("| size | batch | dtype | mesh | compile s | s/step | img/s | model TFLOP/s | MFU | loss |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  print(f"| {r['size']} | {r['batch']} | {r['dtype']} | {r['mesh']} | {r['compile_s']:.1f} | "
        f"{r['step_s']:.3f} | {r['img_s']:.2f} | {r['tflops']:.3f} | {mfu} | {r['loss']:.4f} |")


if __name__ == "__main__":
  main()
