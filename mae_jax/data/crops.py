"""Crop boxes drawn in numpy (the TF-free bundled-photo path).

The tf.data pipelines draw the same boxes with TF ops in `transforms` (fed the same
uniform draws they give identical boxes; tests/test_data_crops.py checks it), so the
bundled photos and ImageNet get the same augmentation without loading TensorFlow.
"""

import math

CROPS = ("random_resized", "fixed_size", "center")
EVAL_CROP_FRACTION = 224 / 256  # eval: resize the shorter side to size / this, centre crop


def random_resized_crop_box(rng, height, width, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
  """(top, left, h, w) of a crop with area fraction in `scale` and aspect in `ratio`.

  Ten tries like torchvision, then a centre crop clamped to `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def fixed_size_crop_box(rng, height, width):
  """(top, left, side, side): a square of 224/256 of the shorter side at a random place."""
  side = max(1, int(round(min(height, width) * EVAL_CROP_FRACTION)))
  return int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)), side, side
