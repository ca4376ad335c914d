r"""Few-shot and k-NN probes during MAE pre-training on Fashion-MNIST: the curve, and its cost.

  python benchmarks/probe_curve.py   # the full run: ~40 min on 2 idle CPU cores, ~75 when shared

1. idx files -> image folders WORK/train (60k) and WORK/test (10k), skipped when present.
2. step 0: the probes of the randomly initialised encoder (`python -m mae_jax.evaluate
   --random_init`: the same config and seed as the run, so exactly the run's initial state).
3. pre-training (configs/fmnist_pretrain.py, labels unused) with the probes every --every
   steps: 10-shot (of 1/5/10/25, 3 seeds) and k-NN (k 20) on 2,000 train images, evaluated
   on 1,000 images of the test split.
4. the same pre-training without probes for --baseline_steps: training img/s without them.
5. a linear probe of the final checkpoint (configs/fmnist_classify.py mode=linprobe, the
   whole 10k test split), to compare with the last probe values.

Writes --png (default benchmarks/probe_curve.png) and WORK/probe_curve.json, and prints a
markdown table for benchmarks/RESULTS.md. Runs in one process (no ~1.5 minute idle at exit
as with `python -m mae_jax.main` on this machine, see RESULTS.md). A smoke test:
  python benchmarks/probe_curve.py --steps=20 --every=10 --baseline_steps=20 --batch_size=64 \
      --per_class=100 --train_examples=300 --eval_examples=200 --linprobe_steps=0 \
      --work=/tmp/fmnist_smoke --png=/tmp/fmnist_smoke/probe_curve.png
"""

import argparse
import json
import os
import shutil
import sys
import time

import jax
import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import fmnist_classify, fmnist_pretrain  # noqa: E402
from mae_jax import cli, summaries, train  # noqa: E402
from mae_jax.data import idx  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FEW, KNN = "fewshot/10shot", "knn/top1"


def convert(fashion, work, per_class):
  """WORK/train (all, or per_class per class) and WORK/test image folders from the idx files."""
  name = "train" if per_class is None else f"train_{per_class}"
  for split, out, count in (("train", name, per_class), ("t10k", "test", None)):
    start = time.perf_counter()
    n = idx.write_image_folder(os.path.join(fashion, f"{split}-images-idx3-ubyte.gz"),
                               os.path.join(fashion, f"{split}-labels-idx1-ubyte.gz"),
                               os.path.join(work, out), per_class=count)
    print(f"== {n} images in {os.path.join(work, out)} ({time.perf_counter() - start:.0f}s)")
  return os.path.join(work, name), os.path.join(work, "test")


def pretrain_config(args, folder, test, steps, probes):
  config = fmnist_pretrain.get_config(
      f"folder={folder},eval_folder={test},total_steps={steps},"
      f"warmup_steps={max(1, steps // 20)}")
  for name in ("fewshot", "knn"):
    config.evals[name].update(every_steps=args.every if probes else 0,
                              train_examples=args.train_examples,
                              eval_examples=args.eval_examples)
  config.checkpoint.every_steps = steps  # only the final checkpoint: comparable timings
  if args.batch_size:
    config.batch_size = args.batch_size
  config.log_every = min(config.log_every, max(1, args.every // 4))  # same in both runs
  return config


def scalars(workdir):
  """{tag: [(step, value, wall_time)]} of a run's TensorBoard events."""
  out = {}
  folder = os.path.join(workdir, "tensorboard")
  for name in sorted(os.listdir(folder)):
    for event in summaries.read_events(os.path.join(folder, name)):
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value, event.wall_time))
  return out


def training_rate(logged, batch_size):
  """img/s over the run from its first to its last log line (compile excluded; the periodic
  probe passes in between included), and the seconds the probes took in that window."""
  loss = logged["loss"]
  (first, _, t0), (last, _, t1) = loss[0], loss[-1]
  evals = sum(v for s, v, _ in logged.get("eval_seconds", []) if first < s < last)
  return (last - first) * batch_size / (t1 - t0), t1 - t0, evals


def draw(path, curves, random_init, linprobe, steps, eval_examples):
  """A PNG line chart: accuracy vs step, step 0 = random init; linear probe as a dashed line."""
  width, height, left, right, top, bottom = 900, 560, 70, 230, 40, 60
  img = Image.new("RGB", (width, height), "white")
  d = ImageDraw.Draw(img)
  values = [v for c in curves.values() for _, v in c] + list(random_init.values())
  values += [linprobe] if linprobe is not None else []
  lo, hi = max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.05)
  x = lambda s: left + (width - left - right) * s / max(steps, 1)
  y = lambda v: top + (height - top - bottom) * (hi - v) / max(hi - lo, 1e-6)
  d.rectangle([left, top, width - right, height - bottom], outline="black")
  for i in range(6):
    v = lo + (hi - lo) * i / 5
    d.line([left - 4, y(v), left, y(v)], fill="black")
    d.text((8, y(v) - 6), f"{v:.2f}", fill="black")
    s = round(steps * i / 5)
    d.line([x(s), height - bottom, x(s), height - bottom + 4], fill="black")
    d.text((x(s) - 12, height - bottom + 8), str(s), fill="black")
  d.text(((width - right) // 2 - 20, height - 22), "pre-training step", fill="black")
  d.text((left, 12), f"Fashion-MNIST: probes of the frozen MAE encoder (eval: {eval_examples:,} "
         "test images; step 0 = random init)", fill="black")
  colours = {FEW: (31, 119, 180), KNN: (214, 39, 40)}
  legend = top + 10
  for tag, curve in curves.items():
    points = [(0, random_init[tag])] + [(s, v) for s, v in curve]
    d.line([(x(s), y(v)) for s, v in points], fill=colours[tag], width=2)
    for s, v in points:
      r = 4
      d.ellipse([x(s) - r, y(v) - r, x(s) + r, y(v) + r], outline=colours[tag],
                fill="white" if s == 0 else colours[tag])
    d.line([width - right + 15, legend + 6, width - right + 45, legend + 6], fill=colours[tag],
           width=2)
    label = "10-shot (lstsq)" if tag == FEW else "k-NN (k=20)"
    d.text((width - right + 52, legend), label, fill="black")
    legend += 22
  if linprobe is not None:
    for s in range(0, steps, max(steps // 60, 1) * 2):
      d.line([x(s), y(linprobe), x(min(s + max(steps // 60, 1), steps)), y(linprobe)],
             fill=(44, 160, 44), width=2)
    d.line([width - right + 15, legend + 6, width - right + 45, legend + 6], fill=(44, 160, 44),
           width=2)
    d.text((width - right + 52, legend), "linear probe of the", fill="black")
    d.text((width - right + 52, legend + 14), "final checkpoint (10k)", fill="black")
    legend += 36
  d.text((width - right + 15, legend + 6), "o = random init (step 0)", fill="black")
  img.save(path)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--work", default="/tmp/fmnist", help="image folders and runs/")
  parser.add_argument("--fashion", default="/usr/share/datasets/fashion-mnist")
  parser.add_argument("--steps", type=int, default=2000, help="pre-training steps")
  parser.add_argument("--every", type=int, default=200, help="probe interval (steps)")
  parser.add_argument("--baseline_steps", type=int, default=400,
                      help="steps of the run without probes (its img/s)")
  parser.add_argument("--train_examples", type=int, default=2000)
  parser.add_argument("--eval_examples", type=int, default=1000)
  parser.add_argument("--linprobe_steps", type=int, default=250, help="0: no linear probe")
  parser.add_argument("--per_class", type=int, help="pre-train on this many images per class")
  parser.add_argument("--batch_size", type=int, help="default: the config's (256)")
  parser.add_argument("--png", default=os.path.join(HERE, "probe_curve.png"))
  args = parser.parse_args(argv)
  cli.setup_logging()
  # The runs compile the same step and feature functions: compile once, reuse from disk.
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.work, "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  t_start = time.perf_counter()
  folder, test = convert(args.fashion, args.work, args.per_class)
  runs = os.path.join(args.work, "probe_runs")
  for name in ("probed", "baseline", "linprobe"):
    shutil.rmtree(os.path.join(runs, name), ignore_errors=True)

  print("== step 0: the random-init encoder")
  random_init = dict(train.evaluate(pretrain_config(args, folder, test, args.steps, True),
                                    train.RANDOM_INIT))

  print(f"== pre-training {args.steps} steps with probes every {args.every}")
  config = pretrain_config(args, folder, test, args.steps, True)
  start = time.perf_counter()
  train.train_and_evaluate(config, os.path.join(runs, "probed"))
  probed_wall = time.perf_counter() - start
  logged = scalars(os.path.join(runs, "probed"))
  rate, window, eval_s = training_rate(logged, config.batch_size)

  print(f"== pre-training {args.baseline_steps} steps without probes")
  base = pretrain_config(args, folder, test, args.baseline_steps, False)
  start = time.perf_counter()
  train.train_and_evaluate(base, os.path.join(runs, "baseline"))
  baseline_wall = time.perf_counter() - start
  base_rate, _, _ = training_rate(scalars(os.path.join(runs, "baseline")), base.batch_size)

  linprobe = None
  if args.linprobe_steps > 0:
    print(f"== linear probe of the final checkpoint, {args.linprobe_steps} steps")
    lp = fmnist_classify.get_config(
        f"mode=linprobe,folder={folder},eval_folder={test},total_steps={args.linprobe_steps},"
        f"warmup_steps={max(1, args.linprobe_steps // 10)},eval_every=-1,"
        f"init_from={os.path.join(runs, 'probed')}")
    lp.batch_size = args.batch_size or lp.batch_size
    train.train_and_evaluate(lp, os.path.join(runs, "linprobe"))
    linprobe = scalars(os.path.join(runs, "linprobe"))["eval/top1"][-1][1]

  curves = {tag: [(s, v) for s, v, _ in logged[tag]] for tag in (FEW, KNN)}
  draw(args.png, curves, random_init, linprobe, args.steps, args.eval_examples)
  result = dict(
      steps=args.steps, every=args.every, train_examples=args.train_examples,
      eval_examples=args.eval_examples, random_init=random_init, curves=curves,
      final={t: logged[t][-1][1] for t in logged if "/" in t and not t.startswith("eval/")},
      linprobe_top1=linprobe, img_per_s_with_probes=rate, img_per_s_without=base_rate,
      probe_seconds_in_window=eval_s, window_seconds=window,
      eval_seconds=[(s, v) for s, v, _ in logged["eval_seconds"]],
      wall_seconds=dict(probed=probed_wall, baseline=baseline_wall,
                        total=time.perf_counter() - t_start))
  with open(os.path.join(args.work, "probe_curve.json"), "w") as f:
    json.dump(result, f, indent=1)

  print(f"\n== wrote {args.png} and {os.path.join(args.work, 'probe_curve.json')}; total wall "
        f"{result['wall_seconds']['total']:.0f}s")
  print("| step | 10-shot | k-NN top-1 |\n|---|---|---|")
  print(f"| 0 (random init) | {random_init[FEW]:.4f} | {random_init[KNN]:.4f} |")
  for (s, few), (_, nn) in zip(*curves.values()):
    print(f"| {s} | {few:.4f} | {nn:.4f} |")
  if linprobe is not None:
    print(f"| linear probe of step {args.steps} ({args.linprobe_steps} steps, 10k test) | "
          f"{linprobe:.4f} | |")
  per_eval = np.mean([v for s, v, _ in logged["eval_seconds"][1:]] or [np.nan])
  print(f"\ntraining img/s with probes every {args.every} steps: {rate:.1f}; without: "
        f"{base_rate:.1f} (ratio {rate / base_rate:.3f}, separate runs); probe passes "
        f"{eval_s:.0f}s of {window:.0f}s ({100 * eval_s / window:.1f}%), first "
        f"{logged['eval_seconds'][0][1]:.1f}s (compile + decode), then {per_eval:.1f}s each")


if __name__ == "__main__":
  main()
