r"""Time one MAE pre-training step (compile + steady state) at a real model size.

  python benchmarks/train_step.py --size=vit_b --batch=2 --steps=5
  python benchmarks/train_step.py --size=vit_l --batch=64 --compile_only \
      --variants='remat=none;remat=dots_saveable;remat=full'   # XLA memory analysis only

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
from mae_jax import flops, preload, sharding
from mae_jax import steps as steps_lib


def measure(size, batch, steps, dtype, mesh_shape=(-1, 1, 1), overrides="", compile_only=False):
  """Compile and time the sharded train step exactly as `mae_jax.train` runs it."""
  config = base.sized_config(size, f"batch_size={batch},total_steps={steps + 1},warmup_steps=1")
  config.model.dtype = dtype
  if overrides:
    base.apply_args(config, overrides)
  config.mesh.update(dict(zip(sharding.MESH_AXES, mesh_shape)))
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(batch, mesh)
  built = steps_lib.build(config, mesh, steps + 1, 1)
  state, static = built.init_fn()
  rng = np.random.default_rng(0)
  batch_data = sharding.global_batch(
      {"images": rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8),
       "index": np.arange(batch, dtype=np.int32)}, mesh)
  start = time.perf_counter()
  compiled = built.step_fn.lower(state, static, batch_data).compile()
  compile_s = time.perf_counter() - start
  temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
  result = dict(size=size, batch=batch, dtype=dtype, mesh=tuple(mesh.shape.values()),
                compile_s=compile_s, temp_mib=temp_mib, devices=mesh.size, config=overrides,
                step_s=float("nan"), img_s=float("nan"), tflops=float("nan"),
                loss=float("nan"))
  if compile_only:
    return result
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
  result.update(step_s=step_s, img_s=img_s,
                tflops=img_s * flops.train_flops_per_image(config.model) / 1e12,
                loss=float(metrics["loss"]))
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="vit_b", choices=["tiny", "vit_b", "vit_l", "vit_h"])
  parser.add_argument("--batch", type=int, default=2, help="global batch")
  parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
  parser.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16")
  parser.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes (-1 = the rest)")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="peak TFLOP/s of one device (e.g. 989 for H100 SXM bf16): adds MFU")
  parser.add_argument("--variants", default="",
                      help="';'-separated config overrides, one row each (e.g. 'remat=full')")
  parser.add_argument("--compile_only", action="store_true",
                      help="compile and report XLA's memory analysis; run no step")
  args = parser.parse_args()
  mesh = tuple(int(x) for x in args.mesh.split(","))
  rows = [measure(args.size, args.batch, args.steps, args.dtype, mesh, v, args.compile_only)
          for v in (args.variants.split(";") if args.variants else [""])]
  print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} jax {jax.__version__} "
        f"{jax.devices()[0].device_kind} x{jax.device_count()}; {preload.allocator()}")
  print("| size | batch | dtype | config | mesh | compile s | XLA temp MiB | s/step | img/s | "
        "model TFLOP/s | MFU | loss |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    mfu = (f"{100 * r['tflops'] / (r['devices'] * args.peak_tflops):.1f}%"
           if args.peak_tflops else "n/a")
    print(f"| {r['size']} | {r['batch']} | {r['dtype']} | {r['config'] or '-'} | {r['mesh']} | "
          f"{r['compile_s']:.1f} | {r['temp_mib']:.0f} | {r['step_s']:.3f} | {r['img_s']:.3g} | "
          f"{r['tflops']:.3f} | {mfu} | {r['loss']:.4f} |")


if __name__ == "__main__":
  preload.reexec_with_tcmalloc()  # as `python -m mae_jax.main` runs (MAE_JAX_TCMALLOC=0: glibc)
  main()
