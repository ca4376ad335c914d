r"""MAE pre-training on Fashion-MNIST's 60k training images, labels unused (fashion_mnist.sh).

  apt-get install dataset-fashion-mnist    # Debian: the idx files in FASHION below
  python -m mae_jax.main --config=configs/fmnist_pretrain.py:total_steps=2000 \
      --workdir=/tmp/fmnist/runs/mae

By default the images come straight from the idx files into host memory
(`data.dataset="arrays"`, no PNG round trip; the t10k images for the probes' eval sets).
`folder=/tmp/fmnist/train` (an image folder written by `python -m mae_jax.data.idx`) reads
PNG files instead; `folder=` and `eval_folder=` are short for `data.folder=` /
`data.eval_folder=` and switch to `data.dataset="image_folder"`.

28 px grey images (as 3 equal channels) in 7 px patches: a 4x4 grid, 4 visible patches at
mask ratio 0.75. A small ViT (128 wide, 4 deep, 4 heads) and a 64 x 2 decoder. 7 px patches
rather than 4: a third of the tokens, ~3x the images per second in pre-training and ~4x in
fine-tuning, so a 90-minute CPU budget holds ~4x the epochs (benchmarks/RESULTS.md compares).
The evaluation and probe images are the whole 28 px image (`data.eval_crop=1.0`). Any other
field works as in configs/base.py.
"""

import os


from configs import base

DEFAULT_FOLDER = "/tmp/fmnist/train"
FASHION = "/usr/share/datasets/fashion-mnist"


def idx_file(split, what):
  """Debian's dataset-fashion-mnist file of `split` (train | t10k), `what` (images | labels)."""
  return os.path.join(FASHION, f"{split}-{what}-idx{3 if what == 'images' else 1}-ubyte.gz")

# The encoder shared with configs/fmnist_classify.py (its weights load there).
ENCODER = dict(img_size=28, in_chans=3, patch_size=7, embed_dim=128, depth=4, num_heads=4,
               mlp_ratio=4.0)


def short_args(arg):
  """`folder=` / `eval_folder=` (no `data.` prefix) rewritten for base.apply_args; either
  one switches to the image folder source."""
  if not arg:
    return arg
  items, folder = [], False
  for item in arg.split(","):
    key = item.split("=", 1)[0].strip()
    folder = folder or key in ("folder", "eval_folder")
    items.append(f"data.{item.strip()}" if key in ("folder", "eval_folder") else item)
  return ",".join((["data.dataset=image_folder"] if folder else []) + items)


def get_config(arg=None):
  config = base.sized_config("tiny")
  config.model.update(decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                      norm_pix_loss=True, mask_ratio=0.75, **ENCODER)
  config.data.update(dataset="arrays", arrays=idx_file("train", "images"),
                     eval_arrays=idx_file("t10k", "images"), folder=DEFAULT_FOLDER,
                     num_train_examples=60_000,
                     crop="random_resized", crop_scale=(0.2, 1.0), hflip=True, ship_uint8=True,
                     eval_crop=1.0)
  config.batch_size = 256
  config.total_steps = 2000          # ~8.5 epochs of 60k; the script sets it from a timing
  config.warmup_steps = 100
  config.base_lr = 1.5e-3            # lr = 1.5e-3 (batch 256); short schedule, small model
  config.weight_decay = 0.05
  config.log_every = 50
  config.image_every = -1
  config.num_preview_images = 6
  config.checkpoint.update(every_steps=500, keep=1)
  # Probes (10 classes): 2,000 train images (>= 150 per class), 1,000 of the test images (or,
  # for a folder, held out of it unless data.eval_folder is set), every 200 steps.
  for name in ("fewshot", "knn"):
    config.evals[name].update(every_steps=200, train_examples=2000, eval_examples=1000)
  return base.apply_args(config, short_args(arg))
