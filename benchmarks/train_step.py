r"""Time one MAE pre-training step (compile + steady state) at a real model size.

  python benchmarks/train_step.py --size=vit_b --batch=2 --steps=5

Prints a table: compile seconds, seconds/step, images/s and achieved model
TFLOP/s from SPEC.md's training FLOPs per image (mask 0.75, 224 px). Uses only
JAX (no TensorFlow), so it also runs on the GPU machines.
"""

import argparse
import functools
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from mae_jax import train

# SPEC.md section 1: forward + backward GFLOP per 224 px image at mask 0.75.
TRAIN_GFLOP_PER_IMAGE = {"vit_b": 58.7, "vit_l": 124.5, "vit_h": 291.4}


def measure(size, batch, steps, dtype):
  config = base.sized_config(size, f"batch_size={batch},total_steps={steps + 1},warmup_steps=1")
  config.model.dtype = dtype
  model_config = train.model_lib.model_config(config.model)
  tx, schedule = train.make_optimizer(config, steps + 1, 1)
  graphdef, static, state = train.create_train_state(config, tx)
  rng = np.random.default_rng(0)
  batch_data = {"images": jnp.asarray(rng.normal(size=(batch, 224, 224, 3)), jnp.float32),
                "index": jnp.arange(batch, dtype=jnp.int32)}
  step_fn = jax.jit(functools.partial(train.train_step, graphdef, tx, schedule, model_config),
                    donate_argnums=0)
  start = time.perf_counter()
  compiled = step_fn.lower(state, static, batch_data).compile()
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
  return dict(size=size, batch=batch, dtype=dtype, compile_s=compile_s, step_s=step_s,
              img_s=img_s, tflops=img_s * TRAIN_GFLOP_PER_IMAGE[size] / 1e3,
              loss=float(metrics["loss"]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="vit_b", choices=sorted(TRAIN_GFLOP_PER_IMAGE))
  parser.add_argument("--batch", type=int, default=2, help="global batch")
  parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
  parser.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16")
  args = parser.parse_args()
  r = measure(args.size, args.batch, args.steps, args.dtype)
  print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} jax {jax.__version__} "
        f"{jax.devices()[0].device_kind} x{jax.device_count()}")
  print("| size | batch | dtype | compile s | s/step | img/s | model TFLOP/s | loss |")
  print("|---|---|---|---|---|---|---|---|")
  print(f"| {r['size']} | {r['batch']} | {r['dtype']} | {r['compile_s']:.1f} | "
        f"{r['step_s']:.3f} | {r['img_s']:.2f} | {r['tflops']:.3f} | {r['loss']:.4f} |")


if __name__ == "__main__":
  main()
