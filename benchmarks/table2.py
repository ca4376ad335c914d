r"""Paper Table 2: step time with mask tokens in the encoder vs the visible patches only.

  PYTHONPATH=. python benchmarks/table2.py --sizes=vit_l --batch=2 --steps=3
  PYTHONPATH=. python benchmarks/table2.py --sizes=vit_l,vit_h --batch=1 --steps=2

For each size: the full sharded training step of `mae_jax.train` (forward, backward,
AdamW) of the baseline (mask tokens in the encoder, decoder depth 8) and of the MAE with
decoder depth 8 and 1 (encoder on the visible 25%). The rows alternate over --rounds
rounds (the median step time of each configuration over all its rounds), and the table
shows the measured speed-up over the baseline next to the analytic FLOP ratio
(`mae_jax.flops`) and the paper's wall-clock ratio (128 TPU v3 cores). JAX only (no TF).
"""

import argparse
import platform
import time

import jax
import numpy as np

from benchmarks.train_step import measure
from configs import base
from mae_jax import flops, preload

BASELINE = "model.mask_tokens_in_encoder=True,model.decoder_depth=8"
ROWS = (("w/ [M], dec 8", BASELINE), ("dec 8", "model.decoder_depth=8"),
        ("dec 1", "model.decoder_depth=1"))
PAPER = {("vit_l", "dec 8"): 2.8, ("vit_l", "dec 1"): 3.7, ("vit_h", "dec 8"): 3.5,
         ("vit_h", "dec 1"): 4.1}


def analytic_flops(size, overrides):
  config = base.sized_config(size)
  base.apply_args(config, overrides)
  return flops.train_flops_per_image(config.model)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="vit_l", help="comma-separated: vit_b, vit_l, vit_h")
  parser.add_argument("--batch", type=int, default=2, help="global batch (1-2 is enough for ratios)")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per row")
  parser.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16")
  args = parser.parse_args()
  times, compile_s = {}, {}
  for size in args.sizes.split(","):
    for round_ in range(args.rounds):
      for name, overrides in ROWS:
        start = time.perf_counter()
        r = measure(size, args.batch, args.steps, args.dtype, overrides=overrides)
        times.setdefault((size, name), []).append(r["step_s"])
        compile_s[size, name] = r["compile_s"]
        print(f"round {round_ + 1}/{args.rounds} {size} {name}: {r['step_s']:.3f} s/step "
              f"(compile {r['compile_s']:.1f} s, {time.perf_counter() - start:.0f} s in all)",
              flush=True)
  print(f"\n# {time.strftime('%Y-%m-%d')} {platform.node()} jax {jax.__version__} "
        f"{jax.devices()[0].device_kind} x{jax.device_count()}, batch {args.batch}, "
        f"{args.dtype}, median of {args.rounds} x {args.steps} steps")
  print("| size | encoder | compile s | s/step | GFLOP/img (analytic) | speed-up measured | "
        "analytic FLOP ratio | paper |")
  print("|---|---|---|---|---|---|---|---|")
  for size in args.sizes.split(","):
    base_s = float(np.median(times[size, ROWS[0][0]]))
    base_flops = analytic_flops(size, BASELINE)
    for name, overrides in ROWS:
      step_s = float(np.median(times[size, name]))
      gflop = analytic_flops(size, overrides)
      paper = PAPER.get((size, name))
      print(f"| {size} | {name} | {compile_s[size, name]:.1f} | {step_s:.3f} | {gflop / 1e9:.1f} | "
            f"{base_s / step_s:.2f}x | {base_flops / gflop:.2f}x | "
            f"{f'{paper}x' if paper else ('1x' if name == ROWS[0][0] else '-')} |")


if __name__ == "__main__":
  preload.reexec_with_tcmalloc()  # as `python -m mae_jax.main` runs (MAE_JAX_TCMALLOC=0: glibc)
  main()
