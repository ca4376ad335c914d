"""Input data: the ONLY package that imports tensorflow / tensorflow_datasets.

TF is imported lazily (`tf_setup.tf_modules()`), with every accelerator hidden from it
first, so the bundled photos, pictures and the Python API never load TF at all.

- `tf_setup`: the lazy TensorFlow import (accelerators hidden from TF).
- `augment`: RandAugment (timm rand-m9-mstd0.5-inc1) and random erasing as TF ops.
- `photos`: the bundled photo set (18 scikit-image photographs; numpy + PIL).
- `crops`: crop-box samplers in numpy (the TF ops in `transforms` draw the same boxes).
- `transforms`: pre-training augmentation and the evaluation transform as TF ops.
- `sources`: TFDS datasets (ImageNet from manual tars) and image folders, per-process
  shares, `check_data`.
- `arrays`, `array_batches`, `resample`: images held in host memory (`.npy`, `.npz`, IDX),
  batches gathered by index with a batched crop + resize + flip in numpy (no tf.data).
- `order`: the global per-epoch order shared by folders and arrays.
- `iterators`: the batching, exactly resumable iterators (`create_pretrain_iterator`,
  `create_eval_iterator`).

Sources (`config.data.dataset`): a TFDS name (`imagenet2012`, `imagenette`,
`imagenet2012_subset/1pct`, ...) read from a prepared `data.data_dir`, `imagenet2012`
preparable from `data.manual_dir`; `image_folder`: `data.folder/<class>/<image>` (local or
gs://); `arrays`: `data.arrays` (+ `data.labels`) in host memory; `bundled_photos`.
"""

from mae_jax.data import arrays, random_access
from mae_jax.data.arrays import ARRAYS
from mae_jax.data.crops import (CROPS, EVAL_CROP_FRACTION, fixed_size_crop_box,
                                random_resized_crop_box)
from mae_jax.data.iterators import (PhotoBatches, TfBatches, create_eval_iterator,
                                    create_pretrain_iterator)
from mae_jax.data.photos import BUNDLED, BUNDLED_PHOTOS, bundled_photos, preview_images
from mae_jax.data.sources import (FOLDER, IMAGE_EXTENSIONS, IMAGENET_HOW_TO, check_data,
                                  dataset_info, list_image_folder, make_source, tfds_builder)
from mae_jax.data.transforms import eval_transform, pretrain_transform
