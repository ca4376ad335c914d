"""Image helpers shared by the pipelines, pictures and the Python API (numpy + PIL, no TF)."""

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize(images):
  """uint8 (..., 3) -> float32 with ImageNet mean/std (numpy or jax arrays)."""
  return (images.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def denormalize(images):
  """Inverse of `normalize`, rounded and clipped to uint8 numpy."""
  pixels = (np.asarray(images, np.float32) * IMAGENET_STD + IMAGENET_MEAN) * 255.0
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def resize(image, size, box=None):
  """Crop `box` = (top, left, h, w) of a uint8 image and resize it bicubically to (size, size)."""
  img = Image.fromarray(image)
  if box is not None:
    top, left, h, w = box
    img = img.crop((left, top, left + w, top + h))
  return np.asarray(img.resize((size, size), Image.BICUBIC))


def center_crop(image, size):
  """Largest centred square, resized to (size, size): for pictures and evaluation."""
  height, width = image.shape[:2]
  side = min(height, width)
  return resize(image, size, ((height - side) // 2, (width - side) // 2, side, side))


def load_image(path):
  """Any image file PIL reads -> (H, W, 3) uint8 RGB (grayscale, CMYK, alpha converted)."""
  try:
    with Image.open(path) as img:
      return np.asarray(img.convert("RGB"))
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is not a readable image: {e}") from e


def load_batch(paths, img_size):
  """Image files -> centre-cropped, resized, normalised float32 (N, S, S, 3) for a model."""
  if not isinstance(img_size, int):
    if img_size[0] != img_size[1]:
      raise ValueError(f"pictures and features are made from square crops; the model's "
                       f"img_size={img_size} is not square")
    img_size = img_size[0]
  return normalize(np.stack([center_crop(load_image(p), img_size) for p in paths]))
