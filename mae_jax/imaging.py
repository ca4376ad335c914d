"""Image helpers shared by the pipelines, pictures and the Python API (numpy + PIL, no TF)."""

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# One grey channel (config.model.in_chans=1): the means of the RGB statistics.
GREY_MEAN, GREY_STD = IMAGENET_MEAN.mean(keepdims=True), IMAGENET_STD.mean(keepdims=True)


def stats(channels):
  """(mean, std) of `channels` = 3 (ImageNet RGB) or 1 (grey) normalised channels."""
  if channels not in (1, 3):
    raise ValueError(f"images with {channels} channels: expected 3 (RGB) or 1 (grey)")
  return (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GREY_MEAN, GREY_STD)


def normalize(images):
  """uint8 (..., C) -> float32 with the mean / std of `stats(C)` (numpy or jax arrays)."""
  mean, std = stats(images.shape[-1])
  return (images.astype(np.float32) / 255.0 - mean) / std


def denormalize(images):
  """Inverse of `normalize`, rounded and clipped to uint8 numpy."""
  mean, std = stats(images.shape[-1])
  pixels = (np.asarray(images, np.float32) * std + mean) * 255.0
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


def to_channels(images, channels):
  """uint8 (N, H, W, 3) as `channels` = 3 (unchanged) or 1 (PIL's ITU-R 601 luma, "L")."""
  if channels == 3:
    return images
  stats(channels)
  return np.stack([np.asarray(Image.fromarray(i).convert("L"))[..., None] for i in images])


def load_batch(paths, img_size, channels=3):
  """Image files -> centre-cropped, resized, normalised float32 (N, S, S, channels)."""
  if not isinstance(img_size, int):
    if img_size[0] != img_size[1]:
      raise ValueError(f"pictures and features are made from square crops; the model's "
                       f"img_size={img_size} is not square")
    img_size = img_size[0]
  return normalize(to_channels(np.stack([center_crop(load_image(p), img_size) for p in paths]),
                               channels))
