"""ViT classifier on the MAE encoder: fine-tuning, linear probing, partial fine-tuning.

Parameter names match the MAE encoder's (patch_embed, cls_token, pos_embed, blocks.i, norm),
so pre-trained weights move in by name, and official `models_vit.py` checkpoints load
through `mae_jax.weights`. Unlike pre-training, all L patches are encoded (no masking) and
the position table is a TRAINED parameter, initialised from the checkpoint's table.

Two poolings (official `global_pool`): `avg` = mean of the patch tokens of the last block
(cls excluded), then a fresh LayerNorm `fc_norm` (the encoder's `norm` is not used);
`cls` = the cls token after the final `norm`. Two heads: `linear`, or `bn_linear` =
BatchNorm without affine (eps 1e-6, torch momentum 0.1 = flax 0.9) then linear, the
official linear probe. Pooling and head are independent.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax import model as model_lib
from mae_jax import patches

POOLS = ("avg", "cls")
HEADS = ("linear", "bn_linear")


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """The classifier on top of the encoder; built from `config.classifier`."""
  num_classes: int = 1000
  pool: str = "avg"            # avg (fine-tune) | cls (linear probe)
  head: str = "linear"         # linear | bn_linear (linear probe)
  drop_path: float = 0.0       # max stochastic-depth rate, linear from 0 over the blocks
  head_init_std: float = 2e-5  # fine-tune 2e-5, linear probe 0.01 (official)


def classifier_config(cfg) -> ClassifierConfig:
  """Validated ClassifierConfig from a ConfigDict / dict; errors name the field."""
  if isinstance(cfg, ClassifierConfig):
    cc = cfg
  else:
    cc = ClassifierConfig(**model_lib.config_values(cfg, ClassifierConfig, "classifier"))
  if cc.pool not in POOLS:
    raise ValueError(f"config.classifier.pool={cc.pool!r}; expected one of {POOLS}")
  if cc.head not in HEADS:
    raise ValueError(f"config.classifier.head={cc.head!r}; expected one of {HEADS}")
  if cc.num_classes < 2:
    raise ValueError(f"config.classifier.num_classes={cc.num_classes} must be >= 2")
  if not 0.0 <= cc.drop_path < 1.0:
    raise ValueError(f"config.classifier.drop_path={cc.drop_path} must be in [0, 1)")
  return cc


class Classifier(nnx.Module):
  """`logits = model(images)` (eval) or `model(images, train=True, key=key)`.

  images: (B, H, W, C) float32, normalised; logits: (B, num_classes) float32. In training
  `key` drives drop path and BatchNorm uses (and updates) batch statistics.
  """

  def __init__(self, model_config, classifier_cfg, *, rngs: nnx.Rngs):
    mc = self.config = model_lib.model_config(model_config)
    cc = self.classifier_config = classifier_config(classifier_cfg)
    dtype = jnp.dtype(mc.dtype)
    d = mc.embed_dim
    self.patch_embed = model_lib.PatchEmbed(mc.in_chans, d, mc.patch_size, dtype, rngs=rngs)
    self.cls_token = nnx.Param(model_lib.token_init(rngs.params(), (1, 1, d)),
                               out_sharding=(None, None, "embed"), eager_sharding=False)
    self.pos_embed = nnx.Param(jnp.asarray(patches.sincos_2d(d, mc.grid))[None],
                               out_sharding=(None, None, "embed"), eager_sharding=False)
    self.blocks = nnx.List([model_lib.Block(d, mc.num_heads, mc.mlp_ratio, dtype, "",
                                            mc.attention, mc.remat, rngs=rngs)
                            for _ in range(mc.depth)])
    if cc.pool == "avg":
      self.fc_norm = model_lib.layer_norm(d, rngs)
    else:
      self.norm = model_lib.layer_norm(d, rngs)
    linear = nnx.Linear(d, cc.num_classes, dtype=dtype, rngs=rngs,
                        kernel_init=nnx.initializers.truncated_normal(cc.head_init_std),
                        bias_init=nnx.initializers.zeros_init())
    if cc.head == "bn_linear":
      batch_norm = nnx.BatchNorm(d, use_scale=False, use_bias=False, epsilon=model_lib.LN_EPS,
                                 momentum=0.9, rngs=rngs)
      self.head = nnx.List([batch_norm, linear])  # official keys head.0 (BN), head.1 (linear)
    else:
      self.head = linear
    self.drop_rates = tuple(float(r) for r in np.linspace(0.0, cc.drop_path, mc.depth))

  def check_images(self, images):
    """Raise a clear error unless images are (B, H, W, C) of the configured size."""
    model_lib.check_images(images, self.config)

  def features(self, images, *, train=False, key=None):
    """Pooled encoder features (B, D): fc_norm(mean of patch tokens) or norm(x)[:, 0]."""
    mc = self.config
    x = self.patch_embed(images)  # (B, L, D)
    pos = self.pos_embed[...].astype(x.dtype)
    x = x + pos[:, 1:]
    cls = self.cls_token[...].astype(x.dtype) + pos[:, :1]
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)
    x = model_lib.run_blocks(self.blocks, x, mc.scan, self.drop_rates,
                             key if train and any(self.drop_rates) else None)
    if self.classifier_config.pool == "avg":
      return self.fc_norm(x[:, 1:].mean(axis=1))
    return self.norm(x)[:, 0]

  def __call__(self, images, *, train=False, key=None):
    feats = self.features(images, train=train, key=key)
    if self.classifier_config.head == "bn_linear":
      batch_norm, linear = self.head
      return linear(batch_norm(feats, use_running_average=not train)).astype(jnp.float32)
    return self.head(feats).astype(jnp.float32)


def abstract_classifier(model_config, classifier_cfg):
  """The classifier's shapes without allocating memory (`nnx.eval_shape`)."""
  return nnx.eval_shape(lambda: Classifier(model_config, classifier_cfg, rngs=nnx.Rngs(0)))
