r"""Our MAE train step vs HuggingFace ViTMAEForPreTraining + torch.optim.AdamW, one process.

  python benchmarks/compare_pytorch.py --size=vit_b --batch=8 --repeats=7

Alternates the two frameworks step by step (A B A B ...) after warm-up, and measures both fp32
matmul peaks (a 2048^2 matmul) the same way, so the numbers survive a shared / throttled box.
Prints one table: median s/step, img/s, efficiency = img/s x analytic training FLOPs per image
(mae_jax.flops) / that framework's measured matmul peak, and the ratio ours / HF. Same size,
batch, mask ratio; fp32 on CPU. On a GPU (--device=gpu): our step in bfloat16 with cuDNN
attention vs HF under bf16 autocast + SDPA (+ torch.compile with --compile). Needs no
TensorFlow. Extra `--config` overrides go to our config (e.g. model.attention=xla).
"""

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from mae_jax import flops, preload, sharding
from mae_jax import steps as steps_lib


def _timed(fn, sync):
  start = time.perf_counter()
  fn()
  sync()
  return time.perf_counter() - start


def ours(size, batch, mask_ratio, overrides, dtype):
  """A closure running one of our jitted train steps (as `mae_jax.train` builds it)."""
  config = base.sized_config(size, f"batch_size={batch},total_steps=1000,warmup_steps=1")
  config.model.mask_ratio = mask_ratio
  config.model.dtype = dtype
  if overrides:
    base.apply_args(config, overrides)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  built = steps_lib.build(config, mesh, 1000, 1)
  state, static = built.init_fn()
  rng = np.random.default_rng(0)
  data = sharding.global_batch(
      {"images": rng.standard_normal((batch, 224, 224, 3), dtype=np.float32),
       "index": np.arange(batch, dtype=np.int32)}, mesh)
  start = time.perf_counter()
  compiled = built.step_fn.lower(state, static, data).compile()
  compile_s = time.perf_counter() - start
  box = {"state": state}

  def step():
    box["state"], metrics = compiled(box["state"], static, data)
    box["loss"] = metrics["loss"]

  sync = lambda: jax.block_until_ready(box["loss"])
  return step, sync, compile_s, config


def hf(size, batch, mask_ratio, device, compile_model):
  """A closure running one HF ViTMAEForPreTraining + AdamW step (torch)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from mae_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  s = model_lib.SIZES[size]
  cfg = transformers.ViTMAEConfig(
      image_size=224, patch_size=s["patch_size"], num_channels=3, hidden_size=s["embed_dim"],
      num_hidden_layers=s["depth"], num_attention_heads=s["num_heads"],
      intermediate_size=4 * s["embed_dim"], decoder_hidden_size=512, decoder_num_hidden_layers=8,
      decoder_num_attention_heads=16, decoder_intermediate_size=2048, hidden_act="gelu",
      layer_norm_eps=1e-6, qkv_bias=True, norm_pix_loss=True, mask_ratio=mask_ratio,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
      attn_implementation="sdpa" if device == "gpu" else "eager")
  dev = "cuda" if device == "gpu" else "cpu"
  model = transformers.ViTMAEForPreTraining(cfg).to(dev).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
  forward = torch.compile(model) if compile_model else model
  images = torch.randn(batch, 3, 224, 224, device=dev)

  def step():
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=device == "gpu"):
      loss = forward(pixel_values=images).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
  return step, sync


def matmul_peaks(device, n=2048, repeats=7):
  """(XLA, torch) measured matmul FLOP/s of an n x n product, alternating, medians."""
  import torch  # pylint: disable=import-outside-toplevel
  dtype = "bfloat16" if device == "gpu" else "float32"
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
  mm = jax.jit(lambda x: x @ x)
  dev = "cuda" if device == "gpu" else "cpu"
  t = torch.randn(n, n, device=dev, dtype=getattr(torch, dtype))
  sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
  jax.block_until_ready(mm(a))
  (t @ t), sync()
  xs, ts = [], []
  for _ in range(repeats):
    xs.append(_timed(lambda: jax.block_until_ready(mm(a)), lambda: None))
    ts.append(_timed(lambda: t @ t, sync))
  work = 2 * n ** 3
  return work / float(np.median(xs)), work / float(np.median(ts))


def attention_only(batch, tokens, heads, head_dim, repeats):
  """fwd + bwd of one attention core at one shape: our implementations vs torch, alternating."""
  import torch  # pylint: disable=import-outside-toplevel
  from mae_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  shape = (batch, tokens, heads, head_dim)
  rng = np.random.default_rng(0)
  q, k, v, w = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
  runs = {}
  for impl in ("matmul", "xla"):
    f = jax.jit(jax.grad(lambda q, k, v, impl=impl: jnp.sum(
        model_lib.attention_core(q, k, v, impl) * w), argnums=(0, 1, 2)))
    args = tuple(map(jnp.asarray, (q, k, v)))
    runs[f"jax {impl}"] = lambda f=f, args=args: jax.block_until_ready(f(*args))
  tq, tk, tv = (torch.tensor(x.transpose(0, 2, 1, 3), requires_grad=True) for x in (q, k, v))
  tw = torch.tensor(w.transpose(0, 2, 1, 3))

  def eager():
    p = ((tq * head_dim ** -0.5) @ tk.transpose(-2, -1)).softmax(-1)
    torch.autograd.grad(((p @ tv) * tw).sum(), (tq, tk, tv))

  def sdpa():
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    torch.autograd.grad((out * tw).sum(), (tq, tk, tv))

  runs.update({"torch eager": eager, "torch SDPA": sdpa})
  times = {name: [] for name in runs}
  for _ in range(2):
    for run in runs.values():
      run()
  for _ in range(repeats):
    for name, run in runs.items():
      times[name].append(_timed(run, lambda: None))
  print(f"# attention fwd+bwd {shape} (B, T, H, d) fp32, medians of {repeats}, alternating")
  print("| implementation | ms | vs torch eager |")
  print("|---|---|---|")
  ref = float(np.median(times["torch eager"]))
  for name, t in times.items():
    print(f"| {name} | {1e3 * float(np.median(t)):.1f} | {ref / float(np.median(t)):.2f}x |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--mask_ratio", type=float, default=0.75)
  parser.add_argument("--repeats", type=int, default=7, help="timed steps of each, alternating")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
  parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
  parser.add_argument("--compile", action="store_true", help="torch.compile the HF model")
  parser.add_argument("--config", default="",
                      help="overrides of our config, 'key=value,...' (e.g. attention=xla)")
  parser.add_argument("--variants", default="", help="more of our configs timed in the same "
                      "rotation, ';'-separated overrides (e.g. 'attention=xla;remat=full')")
  parser.add_argument("--attention_only", default="",
                      help="B,T,H,d: time only the attention core at this shape (e.g. 8,197,16,32)")
  args = parser.parse_args()
  if args.attention_only:
    attention_only(*map(int, args.attention_only.split(",")), max(args.repeats, 5))
    return
  import torch  # pylint: disable=import-outside-toplevel
  dtype = "bfloat16" if args.device == "gpu" else "float32"

  runs, compile_s = {}, {}
  for extra in [args.config] + [v for v in args.variants.split(";") if v]:
    name = f"mae_jax {extra}".strip()
    step, sync, compile_s[name], config = ours(args.size, args.batch, args.mask_ratio, extra,
                                               dtype)
    runs[name] = (step, sync, config)
  runs["HF torch"] = hf(args.size, args.batch, args.mask_ratio, args.device, args.compile)
  for _ in range(args.warmup):
    for run in runs.values():
      _timed(run[0], run[1])
  times = {name: [] for name in runs}
  for _ in range(args.repeats):  # A B A B ...: a busy neighbour slows both alike
    for name, run in runs.items():
      times[name].append(_timed(run[0], run[1]))
  xla_peak, torch_peak = matmul_peaks(args.device)

  config = runs[next(iter(runs))][2]
  flops_per_image = flops.train_flops_per_image(config.model)
  print(f"# {time.strftime('%Y-%m-%d')} {platform.processor() or platform.machine()} "
        f"{jax.devices()[0].device_kind}; jax {jax.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); {args.size} batch {args.batch} mask "
        f"{args.mask_ratio} {dtype}; our compile s {compile_s}; "
        f"{flops_per_image / 1e9:.1f} GFLOP/img; {preload.allocator()}")
  print("| framework | s/step (median) | min | img/s | matmul peak GFLOP/s | efficiency | "
        "vs HF |")
  print("|---|---|---|---|---|---|---|")
  rates = {name: args.batch / float(np.median(t)) for name, t in times.items()}
  for name in runs:
    peak = torch_peak if name == "HF torch" else xla_peak
    print(f"| {name} | {float(np.median(times[name])):.3f} | {min(times[name]):.3f} | "
          f"{rates[name]:.3g} | {peak / 1e9:.0f} | {100 * rates[name] * flops_per_image / peak:.0f}%"
          f" | {rates[name] / rates['HF torch']:.2f}x |")
  first = next(iter(runs))
  print(f"ratio {first} / HF img/s: {rates[first] / rates['HF torch']:.2f}x")


if __name__ == "__main__":
  preload.reexec_with_tcmalloc()  # as `python -m mae_jax.main` runs (MAE_JAX_TCMALLOC=0: glibc)
  main()
