r"""Shared defaults: the paper's pre-training recipe (ViT-L/16, 800 epochs).

Every field can be overridden on the command line, e.g.
  python -m mae_jax.main --config=configs/vit_b.py --config.model.mask_ratio=0.5
or through the config string argument (short names for model fields work too):
  python -m mae_jax.main --config=configs/vit_l.py:decoder_depth=1,batch_size=1024
"""

import ast

import ml_collections

from mae_jax import model as model_lib
from mae_jax import sharding

IMAGENET_TRAIN_EXAMPLES = 1_281_167


# Where a probe's labelled images come from ("" = as config.data), and its features.
PROBE_DATA = dict(
    dataset="",             # "" = the training data; a TFDS name or image_folder: strict checks
    folder="",              # image_folder root ("" = config.data.folder)
    eval_folder="",         # ("" = config.data.eval_folder; none: held out of the folder)
    train_split="",         # TFDS ("" = config.data.split): its first train_examples
    eval_split="",          # TFDS ("" = config.data.eval_split): its first eval_examples
    train_examples=65_000,  # imagenet2012: the first 65k train examples hold >= 30 per class
    eval_examples=10_000,
    pool="cls",             # cls token | mean of the patch tokens, after the final norm
    batch_size=-1,          # global batch of the feature passes; -1 = config.batch_size
    seed=0,                 # which images, and which shots of them
)


def get_config(arg=None):
  """The paper recipe for `vit_l`; size configs call `sized_config`."""
  return sized_config("vit_l", arg)


def sized_config(size, arg=None):
  """The recipe for encoder `size` (a key of mae_jax.model.SIZES), then `arg` overrides."""
  config = ml_collections.ConfigDict()
  config.task = "pretrain"        # pretrain | classify (configs/finetune_*.py, linprobe_*.py)

  # Network: encoder size from the table; decoder 512 wide, 8 deep (paper default).
  config.model = ml_collections.ConfigDict(dict(
      img_size=224, in_chans=3,
      decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
      norm_pix_loss=True,           # per-patch normalised pixel targets (Table 1d)
      mask_ratio=0.75,              # fraction of patches removed
      mask_sampler="random",        # random | block | grid (Table 1f)
      mask_tokens_in_encoder=False,  # paper ablation (Table 1c); ~3.3x FLOPs
      dtype="float32",              # compute dtype (bfloat16 on accelerators)
      attention="auto",             # auto | matmul | xla | cudnn; auto: matmul on CPU, cudnn on
                                    # NVIDIA GPUs (bf16 / fp16), xla elsewhere
      remat="none",                 # none | dots_saveable | full: activation checkpointing per block
      scan=False,                   # True: one lax.scan over the blocks (compile time; same numbers)
      **model_lib.SIZES[size]))

  # Data. The bundled photos need no download; ImageNet: dataset="imagenet2012" with a
  # prepared data_dir (see README "Data"). Augmentation = the paper's recipe by default.
  config.data = ml_collections.ConfigDict(dict(
      dataset="bundled_photos",  # bundled_photos | image_folder | arrays | a TFDS name (imagenet2012, ...)
      num_train_examples=-1,    # one epoch for the schedule; -1: the size of `split`
      data_dir="",              # TFDS data_dir, local or gs:// ("" = TFDS default)
      manual_dir="",            # ILSVRC2012_img_{train,val}.tar: prepares imagenet2012 if needed
      file_format="auto",       # TFDS: auto | array_record (read by index: one global order on
                                # any process count) | tfrecord (read in order per process)
      folder="",                # image_folder root: folder/<class>/<image>
      eval_folder="",           # image_folder of evaluation / probe images ("" = none)
      arrays="",                # arrays: uint8 images in host memory (.npy, .npz, IDX [.gz])
      labels="",                # arrays: their labels ("" = the .npz's, the IDX sibling's, none)
      eval_arrays="",           # arrays: evaluation / probe images ("" = none)
      eval_labels="",           # arrays: their labels (as `labels`)
      per_class=0,              # arrays: > 0 trains on that many images per class (seed 0)
      split="train",            # pre-training split (TFDS sub-split syntax allowed)
      eval_split="validation",
      crop="random_resized",    # random_resized | fixed_size | center (Table 1e ablations)
      crop_scale=(0.2, 1.0),    # RandomResizedCrop area fraction
      crop_ratio=(3 / 4, 4 / 3),
      eval_crop=224 / 256,      # evaluation: the centre crop's share of the shorter side
                                # (1.0: the whole image, e.g. 28 px Fashion-MNIST)
      hflip=True,
      antialias=True,           # bicubic shrinks like PIL (paper); False: 1.6x faster decoding
      color_jitter=0.0,         # > 0: brightness, contrast, saturation x U[1-s, 1+s] (e.g. 0.4)
      rand_augment_ops=0,       # fine-tuning: timm rand-m9-mstd0.5-inc1 = 2 ops (0 = off)
      rand_augment_magnitude=9.0,
      rand_augment_std=0.5,
      random_erasing=0.0,       # fine-tuning: probability of one erased box (timm 'pixel')
      ship_uint8=True,          # uint8 batches, normalised on device (4x less host->device)
      shuffle_buffer=10_000,    # encoded TFDS records per process (after file shuffling)
      num_parallel_calls=-1,    # decode + augment parallelism; -1 = tf.data.AUTOTUNE
  ))

  # Optimisation (paper recipe): AdamW, lr = base_lr * batch / 256, warm-up + cosine.
  config.batch_size = 4096        # global batch
  config.accum_steps = 1          # > 1: the batch runs as this many micro-batches in one step
  config.epochs = 800
  config.warmup_epochs = 40
  config.total_steps = -1         # > 0: train exactly this many steps (overrides epochs)
  config.warmup_steps = -1        # > 0: overrides warmup_epochs
  config.base_lr = 1.5e-4
  config.min_lr = 0.0
  config.weight_decay = 0.05
  config.b1 = 0.9
  config.b2 = 0.95
  config.seed = 0

  # Devices: a (data, fsdp, tensor) mesh; -1 = all remaining devices. The batch is
  # split over data x fsdp; `rules` map the parameters' logical axes to mesh axes.
  config.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, tensor=1, rules=sharding.DEFAULT_RULES))

  # Checkpoints in <workdir>/checkpoints: async, atomic; a run auto-resumes from the latest.
  config.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=1000,   # save every N steps (and always at the end / on preemption)
      keep=3,             # keep the last K checkpoints ...
      keep_period=-1,     # ... plus every step divisible by M (milestones); -1 = none
      async_save=True,    # write in the background while training continues
  ))
  config.stop_after_steps = -1    # > 0: checkpoint and exit after N steps of this job
  # Non-finite loss / gradient: the step is skipped (weights unchanged); more than
  # `nan_patience` in a row (seen at log intervals) roll the run back to the newest checkpoint
  # saved with a finite loss, masks re-seeded; after `max_rollbacks` roll-backs it stops
  # with an error (the good checkpoint stays on disk).
  config.nan_patience = 20
  config.max_rollbacks = 3

  # Probes of the frozen encoder (mae_jax/evaluators): few-shot and k-NN accuracy every
  # `every_steps` steps and at the end (-1: only at the end, 0: off); on by default when the
  # training data have labels (off with one log line when not). ~0.5% of a ViT-L run's time.
  config.evals = ml_collections.ConfigDict(dict(
      fewshot=dict(type="fewshot", every_steps=2500, shots=(1, 5, 10, 25), seeds=3,
                   l2_reg=2.0 ** 10, **PROBE_DATA),
      knn=dict(type="knn", every_steps=2500, k=20, temperature=0.07, **PROBE_DATA),
      # fast linear probe (logistic regression, L-BFGS on features extracted once); off
      # unless every_steps != 0, e.g. `python -m mae_jax.evaluate ... --config.evals.linear.every_steps=-1`
      linear=dict(type="linear", every_steps=0, l2_reg=1e-4, steps=300, **PROBE_DATA)))

  # Logging and outputs.
  config.log_every = 50           # steps between log lines / TensorBoard scalars
  config.image_every = 5000       # steps between reconstruction pictures in TensorBoard
  config.num_preview_images = 6   # images in the reconstruction PNG at the end
  config.peak_tflops = 0.0        # > 0: the chip's peak for MFU (default: a table of TPUs /
                                  # GPUs; none on CPU: pass a measured matmul peak)
  return apply_args(config, arg)


def _parse_value(text):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_args(config, arg):
  """Apply 'key=value,key2=value2' (model fields may omit the `model.` prefix)."""
  if not arg:
    return config
  for item in arg.split(","):
    if "=" not in item:
      raise ValueError(f"config argument {item!r} is not of the form key=value (in {arg!r})")
    key, text = (s.strip() for s in item.split("=", 1))
    if "." not in key and key not in config and key in config.model:
      key = "model." + key
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      if part not in node:
        raise KeyError(f"config argument {key!r}: no field {part!r}")
      node = node[part]
    if leaf not in node:
      raise KeyError(f"config argument {key!r}: no field {leaf!r}; fields here: {sorted(node)}")
    value = _parse_value(text)
    if isinstance(node[leaf], float) and isinstance(value, int):
      value = float(value)
    node[leaf] = value
  return config
