"""Classification on the MAE encoder: fine-tuning, linear probing, partial fine-tuning.

The three protocols of the paper are config choices of this one task (SPEC §3, §7):
- fine-tune: avg pool + fc_norm, linear head (init std 2e-5), drop path, layer-wise lr
  decay, AdamW (.9, .999) wd .05 (not on 1-D params, pos_embed, cls_token), mixup / cutmix
  + label smoothing, RandAugment + random erasing in the input pipeline;
- linear probe: cls token after `norm`, BatchNorm (no affine) + linear head (std .01),
  LARS, no weight decay, only the head trains (`finetune.trainable_blocks=0`,
  `finetune.train_final_norm=False`);
- partial fine-tune: `finetune.trainable_blocks=k` trains the last k blocks, the final
  norm and the head (paper Fig. 9).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax import classifier, data, imaging, mixup, optim
from mae_jax import model as model_lib
from mae_jax.weights import classifier as classifier_weights
from mae_jax.weights import keys

OPTIMIZERS = ("adamw", "lars")


def _path_names(path):
  return [str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path]


def trainable_mask(params, depth, trainable_blocks, train_final_norm):
  """Bool pytree like `params`: what trains (all when trainable_blocks < 0)."""
  def one(path, _):
    names = _path_names(path)
    if trainable_blocks < 0:
      return True
    if names[0] == "head":
      return True
    if names[0] in ("norm", "fc_norm"):
      return bool(train_final_norm)
    if names[0] == "blocks":
      return int(names[1]) >= depth - trainable_blocks
    return False  # patch_embed, cls_token, pos_embed
  return jax.tree_util.tree_map_with_path(one, params)


def _trainable(config, params):
  """`trainable_mask` for the config's model and finetune fields."""
  ft = config.finetune
  return trainable_mask(params, model_lib.model_config(config.model).depth, ft.trainable_blocks,
                        ft.train_final_norm)


class Classify:
  """The classification task (config.task = "classify")."""

  name = "classify"
  model_state = nnx.BatchStat  # the linear probe's BatchNorm statistics

  def check(self, config):
    """Validate the config; take num_classes / num_train_examples from the dataset."""
    mc = model_lib.model_config(config.model)
    description = data.check_data(config)
    if config.data.dataset == data.BUNDLED:
      raise ValueError(f"config.data.dataset={data.BUNDLED!r} has no labels; classification "
                       "needs a labelled TFDS dataset or an image folder (root/<class>/<image>)")
    _, classes = data.dataset_info(config)
    if classes is None:
      raise ValueError(f"config.data.dataset={config.data.dataset!r} has no class labels")
    if config.classifier.num_classes <= 0:
      config.classifier.num_classes = classes
    elif config.classifier.num_classes != classes:
      raise ValueError(f"config.classifier.num_classes={config.classifier.num_classes} but "
                       f"{config.data.dataset} ({config.data.folder or config.data.split}) has "
                       f"{classes} classes; set -1 to take it from the dataset")
    epoch = data.sources.fill_epoch_length(config)
    classifier.classifier_config(config.classifier)
    ft = config.finetune
    if ft.optimizer not in OPTIMIZERS:
      raise ValueError(f"config.finetune.optimizer={ft.optimizer!r}; expected one of "
                       f"{OPTIMIZERS}")
    if ft.trainable_blocks > mc.depth:
      raise ValueError(f"config.finetune.trainable_blocks={ft.trainable_blocks} but the "
                       f"encoder has {mc.depth} blocks")
    return f"{description}; {classes} classes; {epoch}"

  def build_model(self, config, rngs):
    return classifier.Classifier(config.model, config.classifier, rngs=rngs)

  def flops_per_image(self, config):
    """Not counted (no MFU in classification logs)."""
    del config
    return None

  def optimizer(self, config, total_steps, warmup_steps, abstract_params):
    """AdamW with layer-wise lr decay, or LARS (linear probe); frozen params never move."""
    ft = config.finetune
    peak = optim.scaled_lr(config.base_lr, config.batch_size)
    schedule = optim.warmup_cosine(peak, warmup_steps, total_steps, config.min_lr)
    depth = model_lib.model_config(config.model).depth
    trainable = _trainable(config, abstract_params)
    if ft.optimizer == "lars":
      tx = optim.only_trainable(optim.lars(schedule, weight_decay=config.weight_decay),
                                trainable)
    else:
      tx = optim.finetune_adamw(schedule, abstract_params, num_layers=depth,
                                layer_decay=ft.layer_decay, b1=config.b1, b2=config.b2,
                                weight_decay=config.weight_decay, trainable=trainable)
    return tx, schedule

  def loss(self, config, model, batch, key):
    """Soft-target cross-entropy after mixup / cutmix (if on) with smoothed labels."""
    ft = config.finetune
    images = batch["images"]
    if images.dtype == np.uint8:
      images = imaging.normalize(images)
    num_classes = model.classifier_config.num_classes
    mix_key, model_key = jax.random.split(key)
    if ft.mixup > 0 or ft.cutmix > 0:
      images, targets = mixup.mixup_cutmix(
          mix_key, images, batch["label"], num_classes=num_classes, mixup_alpha=ft.mixup,
          cutmix_alpha=ft.cutmix, switch_prob=ft.mixup_switch_prob, prob=ft.mixup_prob,
          smoothing=ft.label_smoothing)
    else:
      targets = mixup.smooth_one_hot(batch["label"], num_classes, ft.label_smoothing)
    logits = model(images, train=True, key=model_key)
    return mixup.soft_target_cross_entropy(logits, targets), {}

  def train_batches(self, config, start_step):
    return data.create_pretrain_iterator(config, start_step=start_step)

  def initial_weights(self, config, model, source, *, whole_classifier=False):
    """Encoder weights from any source `init_from` accepts (the whole classifier for eval)."""
    state_dict, what = classifier_weights.source_state_dict(source)
    classifier_weights.check_encoder_size(state_dict, config.model, source)
    if whole_classifier:
      pool, head, num_classes = classifier_weights.head_spec(state_dict, source)
      cc = model.classifier_config
      if (pool, head, num_classes) != (cc.pool, cc.head, cc.num_classes):
        raise ValueError(f"{source} is a classifier with pool={pool}, head={head}, "
                         f"num_classes={num_classes} but config.classifier has pool={cc.pool}, "
                         f"head={cc.head}, num_classes={cc.num_classes}")
    used, created = classifier_weights.fill(model, state_dict, source,
                                            encoder_only=not whole_classifier)
    unused = sorted(set(state_dict) - set(used))
    report = f"weights from {source} ({what}): {len(used)} tensors"
    if unused:
      report += f"; not used: {keys.summarise_keys(unused)}"
    if created:
      report += f"; freshly initialised: {keys.summarise_keys(created)}"
    return report

  def frozen(self, config, abstract_params):
    """Bool pytree: params that never train (no backward pass is computed for them)."""
    if config.finetune.trainable_blocks < 0:
      return None
    return jax.tree.map(lambda t: not t, _trainable(config, abstract_params))

  def eval_sums(self, model, batch):
    return eval_sums(model, batch)

  def evaluators(self, config):
    return [Accuracy(config)]

  def finish(self, config, model, writer, workdir, step):
    del config, model, writer, workdir, step
    return None

  def periodic(self, config, model, writer, step):
    del config, model, writer, step


def eval_sums(model, batch):
  """Sums over the valid examples of a global eval batch: top-1 / top-5 hits, loss, count."""
  images = batch["images"]
  if images.dtype == np.uint8:
    images = imaging.normalize(images)
  logits = model(images, train=False)
  labels = batch["label"]
  valid = batch["valid"].astype(jnp.float32)
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  hit1 = (top5[:, 0] == labels).astype(jnp.float32)
  hit5 = (top5 == labels[:, None]).any(axis=1).astype(jnp.float32)
  safe = jnp.where(batch["valid"], labels, 0)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), safe[:, None], axis=1)[:, 0]
  return {"top1": (hit1 * valid).sum(), "top5": (hit5 * valid).sum(),
          "loss": (nll * valid).sum(), "count": valid.sum()}


class Accuracy:
  """Top-1 / top-5 / loss on the eval split, every example exactly once on any process count.

  `run(context)` takes the loop's `evaluators.Context`, whose `evaluate_batch` maps a local
  eval batch to the global sums of `eval_sums` (jitted over the mesh); a plain function
  doing that works too.
  """

  name = "eval"

  def __init__(self, config):
    self.config = config
    self.every_steps = config.get("eval_every", -1)

  def run(self, context):
    evaluate_batch = getattr(context, "evaluate_batch", context)
    totals = {}
    for batch in data.create_eval_iterator(self.config):
      sums = evaluate_batch(batch)
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.get("count", 0.0), 1.0)
    return [("eval/top1", totals["top1"] / count), ("eval/top5", totals["top5"] / count),
            ("eval/loss", totals["loss"] / count), ("eval/examples", totals["count"])]


TASK = Classify()
