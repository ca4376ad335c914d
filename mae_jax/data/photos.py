"""The bundled photo set: 18 real photographs shipped inside scikit-image (numpy + PIL, no TF)."""

import functools
import os

import numpy as np

from mae_jax.imaging import center_crop, load_image, normalize, to_channels

BUNDLED = "bundled_photos"  # the config.data.dataset value

# Real photographs (and micrographs) shipped inside scikit-image; synthetic
# images (chessboard, logo, phantom, ...), tiny ones and near-duplicates are left out.
BUNDLED_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
    "moon.png", "motorcycle_left.png",
    "page.png", "retina.jpg", "rocket.jpg", "text.png", "clock_motion.png",
)



@functools.cache
def bundled_photos():
  """The bundled photos as a tuple of (H, W, 3) uint8 arrays (grayscale ones made RGB)."""
  try:
    import skimage
  except ImportError as e:
    raise ImportError("the bundled photo set needs scikit-image (pip install "
                      "scikit-image==0.26.0)") from e
  root = os.path.join(os.path.dirname(skimage.__file__), "data")
  photos = []
  for name in BUNDLED_PHOTOS:
    path = os.path.join(root, name)
    if not os.path.exists(path):
      raise FileNotFoundError(f"bundled photo {path} is missing from the scikit-image install")
    photos.append(load_image(path))
  return tuple(photos)


def preview_images(count, image_size, channels=3):
  """`count` fixed, centre-cropped bundled photos, normalised: (count, S, S, channels)."""
  photos = bundled_photos()
  picks = [photos[i % len(photos)] for i in range(count)]
  return normalize(to_channels(np.stack([center_crop(p, image_size) for p in picks]), channels))
