"""Masked autoencoder (ViT encoder on visible patches + light decoder) in Flax NNX."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mae_jax import losses, patches
from mae_jax.vit import (ATTENTION, LN_EPS, REMAT, Block, FixedEmbed, PatchEmbed,  # noqa: F401
                         _linear, attention_core, drop_path, layer_norm, resolve_attention,
                         run_blocks, token_init)

# Encoder sizes. Decoders default to 512 wide, 8 deep, 16 heads (paper Table 1a/1b).
SIZES = {
    "tiny": dict(patch_size=8, embed_dim=128, depth=4, num_heads=4),
    "vit_b": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_l": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_h": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}



@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that defines the network; built from `config.model` by `model_config()`."""
  img_size: int | tuple = 224
  patch_size: int = 16
  in_chans: int = 3
  embed_dim: int = 1024
  depth: int = 24
  num_heads: int = 16
  decoder_embed_dim: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  mlp_ratio: float = 4.0
  norm_pix_loss: bool = True
  mask_ratio: float = 0.75
  mask_sampler: str = "random"         # random | block | grid
  mask_tokens_in_encoder: bool = False  # paper Table 1c / Table 2 ablation
  dtype: str = "float32"               # compute dtype; parameters stay float32
  attention: str = "auto"              # auto | matmul | xla | cudnn (see ATTENTION)
  remat: str = "none"                  # none | dots_saveable | full, per block (see REMAT)
  scan: bool = False                   # one lax.scan over the blocks (see run_blocks)

  @property
  def grid(self):
    return patches.grid_size(self.img_size, self.patch_size)

  @property
  def num_patches(self):
    return self.grid[0] * self.grid[1]

  @property
  def image_shape(self):
    h, w = (self.img_size,) * 2 if isinstance(self.img_size, int) else tuple(self.img_size)
    return h, w, self.in_chans

  @property
  def len_keep(self):
    return patches.num_keep(self.num_patches, self.mask_ratio)


def config_values(cfg, cls, section):
  """The fields of dataclass `cls` from a ConfigDict / dict; an unknown one is an error that
  names `config.<section>`."""
  values = dict(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"unknown config.{section} field(s) {unknown}; known: {sorted(known)}")
  return values


def default_dtype():
  """The compute dtype `dtype="auto"` stands for: bfloat16 on accelerators, float32 on CPU."""
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def model_config(cfg) -> ModelConfig:
  """Validated ModelConfig from a ConfigDict / dict / ModelConfig; errors name the field."""
  if isinstance(cfg, ModelConfig):
    mc = cfg
  else:
    values = config_values(cfg, ModelConfig, "model")
    if isinstance(values.get("img_size"), (list, tuple)):
      values["img_size"] = tuple(values["img_size"])
    mc = ModelConfig(**values)
  if mc.dtype == "auto":
    mc = dataclasses.replace(mc, dtype=default_dtype())
  if not 0.0 < mc.mask_ratio < 1.0:
    raise ValueError(f"config.model.mask_ratio must be in (0, 1), got {mc.mask_ratio}")
  mc.grid  # raises if img_size is not divisible by patch_size
  for width, heads, name in ((mc.embed_dim, mc.num_heads, ""),
                             (mc.decoder_embed_dim, mc.decoder_num_heads, "decoder_")):
    if width % heads:
      raise ValueError(f"config.model.{name}embed_dim={width} is not divisible by "
                       f"config.model.{name}num_heads={heads}")
    if width % 4:
      raise ValueError(f"config.model.{name}embed_dim={width} must be a multiple of 4 "
                       "(2-D sin-cos position table)")
  if mc.mask_sampler not in patches.MASK_SAMPLERS:
    raise ValueError(f"config.model.mask_sampler={mc.mask_sampler!r}; expected one of "
                     f"{patches.MASK_SAMPLERS}")
  if mc.attention not in ATTENTION:
    raise ValueError(f"config.model.attention={mc.attention!r}; expected one of {ATTENTION}")
  if mc.remat not in REMAT:
    raise ValueError(f"config.model.remat={mc.remat!r}; expected one of {tuple(REMAT)}")
  if mc.len_keep < 1:
    raise ValueError(f"config.model.mask_ratio={mc.mask_ratio} keeps no patch of "
                     f"{mc.num_patches}")
  return mc


def check_images(images, mc):
  """Raise a clear error unless images are (B, H, W, C) of ModelConfig `mc`'s size."""
  expected = mc.image_shape
  if images.ndim != 4 or tuple(images.shape[1:]) != expected:
    raise ValueError(f"images have shape {tuple(images.shape)} but config.model expects "
                     f"(batch, {', '.join(map(str, expected))}) (NHWC, img_size="
                     f"{mc.img_size}, in_chans={mc.in_chans})")


def _gather_tokens(x, ids):
  """x (B, L, D), ids (B, K) -> (B, K, D)."""
  return jnp.take_along_axis(x, ids[:, :, None], axis=1)


class MAE(nnx.Module):
  """Masked autoencoder: `loss, pred, mask = model(images, noise=noise)`.

  images: (B, H, W, C) float32, already normalised. noise: (B, L) float32; without
  it the noise comes from `key=` or the model's own rngs. pred: (B, L, p*p*C) in
  patchify order; mask: (B, L), 1 = removed.
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    mc = self.config = model_config(config)
    dtype = jnp.dtype(mc.dtype)
    d, d_dec, p = mc.embed_dim, mc.decoder_embed_dim, mc.patch_size
    self.patch_embed = PatchEmbed(mc.in_chans, d, p, dtype, rngs=rngs)
    self.cls_token = nnx.Param(token_init(rngs.params(), (1, 1, d)),
                               out_sharding=(None, None, "embed"), eager_sharding=False)
    self.pos_embed = FixedEmbed(jnp.asarray(patches.sincos_2d(d, mc.grid))[None])
    if mc.mask_tokens_in_encoder:
      self.encoder_mask_token = nnx.Param(token_init(rngs.params(), (1, 1, d)),
                                          out_sharding=(None, None, "embed"),
                                          eager_sharding=False)
    self.blocks = nnx.List([Block(d, mc.num_heads, mc.mlp_ratio, dtype, "", mc.attention, mc.remat,
                                  rngs=rngs) for _ in range(mc.depth)])
    self.norm = layer_norm(d, rngs)

    self.decoder_embed = _linear(d, d_dec, dtype, rngs, ("embed", "decoder_embed"))
    self.mask_token = nnx.Param(token_init(rngs.params(), (1, 1, d_dec)),
                                out_sharding=(None, None, "decoder_embed"), eager_sharding=False)
    self.decoder_pos_embed = FixedEmbed(jnp.asarray(patches.sincos_2d(d_dec, mc.grid))[None])
    self.decoder_blocks = nnx.List([
        Block(d_dec, mc.decoder_num_heads, mc.mlp_ratio, dtype, "decoder_", mc.attention,
              mc.remat, rngs=rngs)
        for _ in range(mc.decoder_depth)])
    self.decoder_norm = layer_norm(d_dec, rngs)
    self.decoder_pred = _linear(d_dec, p * p * mc.in_chans, dtype, rngs, ("decoder_embed", None))
    self.rngs = nnx.Rngs(masking=rngs.params())

  def check_images(self, images):
    """Raise a clear error unless images are (B, H, W, C) of the configured size."""
    check_images(images, self.config)

  def sample_noise(self, batch, key=None, sampler=None):
    """Masking scores (B, L) from `key` (or the model's rngs) for the configured sampler."""
    mc = self.config
    key = self.rngs.masking() if key is None else key
    return patches.sample_noise(sampler or mc.mask_sampler, key, batch, mc.grid,
                                mc.mask_ratio)

  def embed(self, images):
    """Patch embedding + position rows 1..L: (B, H, W, C) -> (B, L, D)."""
    x = self.patch_embed(images)
    return x + self.pos_embed[...][:, 1:, :].astype(x.dtype)

  def encoder(self, x):
    """Prepend cls (+ pos row 0), run the blocks and the final norm: (B, N, D) -> (B, 1+N, D)."""
    cls = (self.cls_token[...] + self.pos_embed[...][:, :1, :]).astype(x.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)
    return self.norm(run_blocks(self.blocks, x, self.config.scan))

  def encode(self, images):
    """Encoder features of ALL patches, no masking: (B, H, W, C) -> (B, 1 + L, D)."""
    return self.encoder(self.embed(images))

  def encode_masked(self, images, masking):
    """Encoder features of the visible patches (or all, with mask tokens in the encoder)."""
    x = self.embed(images)  # (B, L, D)
    if self.config.mask_tokens_in_encoder:
      token = self.encoder_mask_token[...].astype(x.dtype)
      x = jnp.where(masking.mask[:, :, None] > 0, token + self.pos_embed[...][:, 1:], x)
    else:
      x = _gather_tokens(x, masking.ids_keep)  # (B, len_keep, D)
    return self.encoder(x)

  def decoder(self, latent, masking):
    """(B, 1+N, D) encoder output -> (B, L, p*p*C) pixel predictions."""
    x = self.decoder_embed(latent)  # (B, 1+N, D_dec)
    if not self.config.mask_tokens_in_encoder:
      batch, num_patches = masking.mask.shape
      tokens = jnp.broadcast_to(self.mask_token[...].astype(x.dtype),
                                (batch, num_patches + 1 - x.shape[1], x.shape[-1]))
      shuffled = jnp.concatenate([x[:, 1:], tokens], axis=1)  # (B, L, D_dec)
      x = jnp.concatenate([x[:, :1], _gather_tokens(shuffled, masking.ids_restore)], axis=1)
    x = x + self.decoder_pos_embed[...].astype(x.dtype)
    x = run_blocks(self.decoder_blocks, x, self.config.scan)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:]

  def __call__(self, images, noise=None, key=None):
    self.check_images(images)
    mc = self.config
    if noise is None:
      noise = self.sample_noise(images.shape[0], key)
    if noise.shape != (images.shape[0], mc.num_patches):
      raise ValueError(f"noise has shape {noise.shape}, expected "
                       f"{(images.shape[0], mc.num_patches)}")
    masking = patches.masking_from_noise(noise, mc.len_keep)
    latent = self.encode_masked(images, masking)
    pred = self.decoder(latent, masking).astype(jnp.float32)
    target = patches.patchify(images, mc.patch_size)
    loss = losses.mae_loss(pred, target, masking.mask, mc.norm_pix_loss)
    return loss, pred, masking.mask


def count_params(module_or_state):
  """Number of trainable (nnx.Param) values; works on abstract (eval_shape) models."""
  state = (nnx.state(module_or_state, nnx.Param)
           if isinstance(module_or_state, nnx.Module) else module_or_state)
  return sum(x.size for x in jax.tree.leaves(state))


def abstract_model(config):
  """The model's shapes without allocating memory (`nnx.eval_shape`)."""
  return nnx.eval_shape(lambda: MAE(config, rngs=nnx.Rngs(0)))


def with_mask_ratio(model, mask_ratio):
  """A copy of `model` (weights shared) that removes `mask_ratio` of the patches."""
  if mask_ratio is None or mask_ratio == model.config.mask_ratio:
    return model
  config = model_config(dataclasses.replace(model.config, mask_ratio=mask_ratio))
  clone = nnx.merge(*nnx.split(model))
  clone.config = config
  return clone
