"""Pre-training: the MAE, its loss on per-example masks, AdamW, reconstruction pictures."""

import logging
import os

import jax
import numpy as np
from flax import nnx

from mae_jax import data, evaluators, flops, imaging, optim, patches, pictures
from mae_jax import model as model_lib
from mae_jax.data import array_batches
from mae_jax.weights import keys, load

log = logging.getLogger(__name__)


class Pretrain:
  """The MAE pre-training task (config.task = "pretrain")."""

  name = "pretrain"
  model_state = nnx.BatchStat  # none in the MAE: the filter simply matches nothing
  eval_sums = None             # no labelled eval step (probes: see the evaluators)

  def frozen(self, config, abstract_params):
    """Every parameter trains."""
    del config, abstract_params
    return None

  def check(self, config):
    """Validate the config; the epoch length comes from the dataset unless the config sets it."""
    model_lib.model_config(config.model)
    description = data.check_data(config)
    epoch = data.sources.fill_epoch_length(config)  # prepares a TFDS dataset if it must
    evaluators.check(config)  # the probes' data and labels
    return f"{description}; {epoch}"

  def build_model(self, config, rngs):
    return model_lib.MAE(config.model, rngs=rngs)

  def flops_per_image(self, config):
    """Analytic training FLOPs per image (for MFU): fwd + bwd = 3 x fwd, see mae_jax.flops."""
    return flops.train_flops_per_image(config.model)

  def optimizer(self, config, total_steps, warmup_steps, abstract_params):
    """AdamW (b2 .95, decay on ndim >= 2), linear lr scaling, warm-up + half-cycle cosine."""
    del abstract_params
    peak = optim.scaled_lr(config.base_lr, config.batch_size)
    schedule = optim.warmup_cosine(peak, warmup_steps, total_steps, config.min_lr)
    tx = optim.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
    return tx, schedule

  def loss(self, config, model, batch, key):
    """Norm-pix MSE; each example's mask depends only on (seed, step, its global index)."""
    del config
    mc = model.config
    noise = patches.example_noise(mc.mask_sampler, key, batch["index"], mc.grid, mc.mask_ratio)
    images = batch["images"]
    if images.dtype == np.uint8:  # pipelines may ship uint8 and normalise here, on device
      images = imaging.normalize(images)
    loss, _, _ = model(images, noise=noise)
    return loss, {}

  def train_batches(self, config, start_step):
    return data.create_pretrain_iterator(config, start_step=start_step)

  def initial_weights(self, config, model, source):
    """Fill the MAE from an official / HF file (`--restore` of weights without optimizer)."""
    imported = load.import_checkpoint(source, require_decoder=False,
                                      **_file_overrides(config.model))
    ours = nnx.state(model, nnx.Param)
    theirs = nnx.state(imported.model, nnx.Param)
    got = jax.tree.map(lambda x: x.shape, theirs)
    want = jax.tree.map(lambda x: x.shape, ours)
    if got != want:
      mc = imported.model.config
      raise ValueError(f"{source}: its MAE (embed_dim={mc.embed_dim}, depth={mc.depth}, "
                       f"decoder {mc.decoder_embed_dim}x{mc.decoder_depth}) does not match "
                       "config.model")
    nnx.update(model, theirs)
    fresh = (f"; freshly initialised: {keys.summarise_keys(imported.fresh)}"
             if imported.fresh else "")
    return f"weights from {source} ({keys.KINDS[imported.kind]}){fresh}"

  def evaluators(self, config):
    """Few-shot and k-NN probes of the frozen encoder (config.evals) where labels exist."""
    return evaluators.from_config(config)

  def finish(self, config, model, writer, workdir, step):
    path = os.path.join(workdir, "reconstructions.png")
    picture(config, model, writer, step, path)
    return f"wrote {path} (original | masked | reconstruction | reconstruction + visible)"

  def periodic(self, config, model, writer, step):
    """Mid-run outputs (every `image_every` steps): a picture in TensorBoard."""
    picture(config, model, writer, step, None)


def _file_overrides(model_cfg):
  """Model fields a PyTorch file does not store, taken from config.model."""
  names = ("img_size", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads",
           "norm_pix_loss")
  return {n: model_cfg[n] for n in names if n in model_cfg}


def picture(config, model, writer, step, path):
  """Reconstructions of the preview images (host `model`) to TensorBoard (and `path`), and one
  log line: their masked-patch PSNR against the mean-colour oracle (`pictures.masked_psnr`).
  The images: the first evaluation images of in-memory arrays, else the bundled photos."""
  if jax.process_index() != 0:  # only process 0 writes; the others would compile op by op
    return path
  size, count = model.config.img_size, config.num_preview_images
  images = (array_batches.preview_images(config.data, count, size, model.config.in_chans)
            if config.data.dataset == data.ARRAYS else data.preview_images(count, size))
  grid, (model_db, oracle_db) = pictures.preview(
      model, images, key=jax.random.key(config.seed), scale=max(1, 224 // size))
  writer.image(step, "reconstructions", grid)
  writer.scalars(step, {"preview/psnr": model_db, "preview/psnr_oracle": oracle_db})
  log.info("step %d preview: masked-patch PSNR %.2f dB, mean-colour oracle %.2f dB (%+.2f dB)",
           step, model_db, oracle_db, model_db - oracle_db)
  if path:
    pictures.save_png(grid, path)
  return path


TASK = Pretrain()
