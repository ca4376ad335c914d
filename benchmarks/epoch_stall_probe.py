r"""Per-step wait of the pre-training input iterator around epoch boundaries.

  python benchmarks/epoch_stall_probe.py --folder=/tmp/fmnist/train --steps=1200
  python benchmarks/epoch_stall_probe.py --sleep=0.3 --watchdog=2

Times every `next(it)` of `create_pretrain_iterator(fmnist_pretrain config)`; prints the
waits of the steps within +-3 of each epoch boundary and the overall median / p99 / max.
`--sleep` mimics a busy training step between batches. `--watchdog=S` prints every thread's
Python stack (and a `py-spy dump --native` if py-spy is installed) when one `next` has waited
S seconds: that is how the 20-55 s boundary stalls were traced to the deletion of the
finished epoch's tf.data iterator (benchmarks/RESULTS.md, "Input stalls at epoch boundaries").
"""

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout
from configs import fmnist_pretrain  # noqa: E402
from mae_jax import data as ip  # noqa: E402

GDB = False


def watchdog(threshold, busy):
  """Dump all stacks when one `next` has been running `threshold` seconds."""
  import traceback
  spy = shutil.which("py-spy")
  while True:
    time.sleep(0.2)
    started, step = busy.get("since"), busy.get("step")
    if started is None or busy.get("dumped") == step:
      continue
    if time.perf_counter() - started > threshold:
      busy["dumped"] = step
      print(f"\n=== watchdog: step {step} waiting {time.perf_counter() - started:.1f}s ===",
            flush=True)
      names = {t.ident: t.name for t in threading.enumerate()}
      for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
          continue
        print(f"--- thread {names.get(ident, ident)}", flush=True)
        traceback.print_stack(frame, limit=12)
      if GDB and shutil.which("gdb"):  # native stacks of every thread (TF's C++ threads too)
        out = subprocess.run(["gdb", "-p", str(os.getpid()), "-batch", "-ex",
                              "thread apply all bt 25"], capture_output=True, text=True,
                             timeout=120)
        with open("/tmp/epoch_stall_gdb.txt", "w") as f:
          f.write(out.stdout)
        print("gdb stacks -> /tmp/epoch_stall_gdb.txt", flush=True)
      elif spy:
        out = subprocess.run([spy, "dump", "--native", "--pid", str(os.getpid())],
                             capture_output=True, text=True, timeout=60)
        print(out.stdout[-6000:], out.stderr[-1000:], flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--folder", default="/tmp/fmnist/train")
  p.add_argument("--steps", type=int, default=1200)
  p.add_argument("--sleep", type=float, default=0.0, help="seconds of 'training' per step")
  p.add_argument("--watchdog", type=float, default=0.0)
  p.add_argument("--gdb", action="store_true", help="watchdog: gdb native stacks, not py-spy")
  p.add_argument("--parallel", type=int, default=None, help="override data.num_parallel_calls")
  p.add_argument("--batch", type=int, default=None)
  args = p.parse_args()

  config = fmnist_pretrain.get_config(f"folder={args.folder}")
  if args.parallel is not None:
    config.data.num_parallel_calls = args.parallel
  if args.batch:
    config.batch_size = args.batch
  global GDB
  GDB = args.gdb
  busy = {}
  if args.watchdog:
    threading.Thread(target=watchdog, args=(args.watchdog, busy), daemon=True).start()

  start = time.perf_counter()
  it = ip.create_pretrain_iterator(config, process_index=0, process_count=1)
  print(f"iterator created in {time.perf_counter() - start:.2f}s; {it.source.total_examples} "
        f"images, batch {it.global_batch}, {it.source.total_examples / it.global_batch:.1f} "
        f"steps/epoch; sleep {args.sleep}s", flush=True)
  waits, epochs = [], []
  for step in range(args.steps):
    busy["step"], busy["since"] = step, time.perf_counter()
    t = time.perf_counter()
    batch = next(it)
    waits.append(time.perf_counter() - t)
    busy["since"] = None
    epochs.append(it.epoch)
    assert batch["images"].shape[0] == it.batch_size
    if args.sleep:
      time.sleep(args.sleep)
  waits = np.array(waits)
  boundaries = [s for s in range(1, len(epochs)) if epochs[s] != epochs[s - 1]]
  print("\nboundary steps (epoch switch inside next() of step):", boundaries)
  for b in boundaries:
    lo, hi = max(0, b - 3), min(len(waits), b + 4)
    row = " ".join(f"{s}:{waits[s]:.3f}" for s in range(lo, hi))
    print(f"  epoch {epochs[b - 1]}->{epochs[b]} @ {b}: {row}")
  print(f"\nall {len(waits)} steps: median {np.median(waits):.3f}s  p99 "
        f"{np.percentile(waits, 99):.3f}s  max {waits.max():.3f}s at step {waits.argmax()} "
        f"(epoch {epochs[waits.argmax()]}); total {waits.sum():.1f}s waiting")
  top = np.argsort(waits)[::-1][:8]
  print("slowest steps:", ", ".join(f"{s}:{waits[s]:.2f}s" for s in sorted(top)))


if __name__ == "__main__":
  main()
