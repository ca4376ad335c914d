r"""Shared defaults of the evaluation protocols (official `main_finetune.py` / `main_linprobe.py`).

  python -m mae_jax.main --config=configs/finetune_vit_b.py \
      --config.init_from=mae_pretrain_vit_base.pth --workdir=DIR
  python -m mae_jax.main --config=configs/linprobe_vit_l.py --config.init_from=WORKDIR ...
  python -m mae_jax.main --config=configs/finetune_vit_l.py:trainable_blocks=1 ...  # Fig. 9

The data default to ImageNet (`imagenet2012`, see README "Data"); any TFDS image
classification dataset or image folder works (`data.dataset`, `data.folder`), with
num_classes and the epoch length taken from it.
"""

import ml_collections

from configs import base

# (epochs, base_lr, layer_decay, drop_path) per size: SPEC §3 / official README.
FINETUNE = {"tiny": (100, 5e-4, 0.65, 0.1), "vit_b": (100, 5e-4, 0.65, 0.1),
            "vit_l": (50, 1e-3, 0.75, 0.2), "vit_h": (50, 1e-3, 0.75, 0.3)}


def _classify_config(size):
  config = base.sized_config(size)
  config.task = "classify"
  if size != "tiny":
    config.model.dtype = "auto"  # bfloat16 on GPU / TPU, float32 on CPU
  config.init_from = ""   # pre-trained weights: our workdir / step dir, official .pth, HF file
  config.eval_every = 5000  # steps between evaluations (and at the end); -1: only at the end
  config.evals = ml_collections.ConfigDict()  # the probes are pre-training's (configs/base.py)
  # The decoder fields stay in config.model (ignored here) so a pre-training config's model
  # section can be pasted in unchanged.
  config.data.update(dataset="imagenet2012", split="train", eval_split="validation",
                     num_train_examples=-1,  # -1: from the dataset
                     crop_scale=(0.08, 1.0),  # timm's RandomResizedCrop default
                     eval_folder="")  # image_folder: the evaluation folder ("" = data.folder)
  config.classifier = ml_collections.ConfigDict(dict(
      num_classes=-1,       # -1: from the dataset
      pool="avg", head="linear", drop_path=0.0, head_init_std=2e-5))
  config.finetune = ml_collections.ConfigDict(dict(
      optimizer="adamw",     # adamw | lars
      layer_decay=0.75,      # lr x layer_decay ** (num_layers + 1 - layer_id)
      trainable_blocks=-1,   # -1: all; k >= 0: the last k blocks + final norm + head (Fig. 9)
      train_final_norm=True,  # with trainable_blocks >= 0: the final norm / fc_norm trains too
      mixup=0.0, cutmix=0.0, mixup_switch_prob=0.5, mixup_prob=1.0,
      label_smoothing=0.0))
  config.image_every = -1
  config.checkpoint.every_steps = 1000
  return config


def finetune_config(size, arg=None):
  """End-to-end fine-tuning (global pool + fc_norm, AdamW + layer decay, mixup, RandAugment)."""
  config = _classify_config(size)
  epochs, base_lr, layer_decay, drop_path = FINETUNE[size]
  config.epochs, config.warmup_epochs = epochs, 5
  config.batch_size = 1024
  config.base_lr, config.min_lr, config.weight_decay = base_lr, 1e-6, 0.05
  config.b1, config.b2 = 0.9, 0.999
  config.classifier.update(pool="avg", head="linear", drop_path=drop_path, head_init_std=2e-5)
  config.finetune.update(optimizer="adamw", layer_decay=layer_decay, mixup=0.8, cutmix=1.0,
                         label_smoothing=0.1)
  config.data.update(rand_augment_ops=2, rand_augment_magnitude=9.0, rand_augment_std=0.5,
                     random_erasing=0.25)
  return _apply(config, arg)


def linprobe_config(size, arg=None):
  """Linear probing: frozen encoder, cls token + BatchNorm (no affine) + linear, LARS."""
  config = _classify_config(size)
  config.epochs, config.warmup_epochs = 90, 10
  config.batch_size = 16384
  config.base_lr, config.min_lr, config.weight_decay = 0.1, 0.0, 0.0
  config.classifier.update(pool="cls", head="bn_linear", drop_path=0.0, head_init_std=0.01)
  config.finetune.update(optimizer="lars", layer_decay=1.0, trainable_blocks=0,
                         train_final_norm=False)
  return _apply(config, arg)


def _apply(config, arg):
  """Config-string overrides; `trainable_blocks=k` etc. may omit the `finetune.` prefix."""
  if not arg:
    return config
  items = []
  for item in arg.split(","):
    key = item.split("=", 1)[0].strip()
    for section in ("finetune", "classifier"):
      known_elsewhere = key in config or key in config.model
      if "." not in key and not known_elsewhere and key in config[section]:
        item = f"{section}.{item.strip()}"
    items.append(item)
  return base.apply_args(config, ",".join(items))
