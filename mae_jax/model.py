"""Masked autoencoder (ViT encoder on visible patches + light decoder) in Flax NNX."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mae_jax import losses, patches

# Encoder sizes. Decoders default to 512 wide, 8 deep, 16 heads (paper Table 1a/1b).
SIZES = {
    "tiny": dict(patch_size=8, embed_dim=128, depth=4, num_heads=4),
    "vit_b": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_l": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_h": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}

LN_EPS = 1e-6
_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()
token_init = nnx.initializers.normal(stddev=0.02)  # cls and mask tokens
# The official code inits the conv as a linear layer on the flattened (p*p*C, D)
# kernel; flax's conv-aware xavier would also count the receptive field in fan_out.
_patch_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2),
                                                out_axis=-1)


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


def model_config(cfg) -> ModelConfig:
  """Validated ModelConfig from a ConfigDict / dict / ModelConfig; errors name the field."""
  if isinstance(cfg, ModelConfig):
    mc = cfg
  else:
    values = config_values(cfg, ModelConfig, "model")
    if isinstance(values.get("img_size"), (list, tuple)):
      values["img_size"] = tuple(values["img_size"])
    mc = ModelConfig(**values)
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


class FixedEmbed(nnx.Variable):
  """A fixed (never trained) table, e.g. the sin-cos position embeddings."""


def _logical(init, *names):
  """Tag a parameter with logical axis names; sharding.py maps them to mesh axes."""
  return nnx.with_partitioning(init, names, eager_sharding=False)


def _linear(d_in, d_out, dtype, rngs, names=(None, None)):
  return nnx.Linear(d_in, d_out, kernel_init=_logical(_xavier, *names),
                    bias_init=_logical(_zeros, names[1]), dtype=dtype, rngs=rngs)


def layer_norm(dim, rngs):
  """LayerNorm with the official eps 1e-6."""
  return nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)


# "matmul": (B*H, T, d) batched matmuls, the scale folded into q, softmax in fp32. On XLA:CPU
# it runs the fwd+bwd of the decoder's attention (197 tokens, 16 x 32) ~2x faster than
# jax.nn.dot_product_attention's "xla" path (benchmarks/RESULTS.md). "cudnn": the fused flash
# kernel of NVIDIA GPUs (fp16 / bf16 only). "auto": cudnn on a GPU where it applies, matmul on
# CPU, xla elsewhere (TPU).
ATTENTION = ("auto", "matmul", "xla", "cudnn")


def resolve_attention(attention, dtype, head_dim):
  """The implementation "auto" stands for on the default backend (others pass through)."""
  if attention != "auto":
    return attention
  backend = jax.default_backend()
  if backend == "cpu":
    return "matmul"
  if (backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
      and head_dim % 8 == 0 and head_dim <= 128):
    return "cudnn"
  return "xla"


def attention_core(q, k, v, implementation):
  """softmax(q k^T / sqrt(d)) v of (B, T, H, d) q, k, v -> (B, T, H, d)."""
  if implementation in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  batch, tokens, heads, head_dim = q.shape
  to_bh = lambda x: x.transpose(0, 2, 1, 3).reshape(batch * heads, tokens, head_dim)
  q = to_bh(q * jnp.asarray(head_dim ** -0.5, q.dtype))
  scores = jnp.einsum("bqd,bkd->bqk", q, to_bh(k), preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # (B*H, T, T), fp32 softmax
  out = jnp.einsum("bqk,bkd->bqd", weights, to_bh(v))  # (B*H, T, d)
  return out.reshape(batch, heads, tokens, head_dim).transpose(0, 2, 1, 3)


class Attention(nnx.Module):
  """Multi-head self-attention with one fused qkv projection (q, k, v stacked on the output)."""

  def __init__(self, dim, num_heads, dtype, prefix="", attention="auto", *, rngs):
    self.num_heads = num_heads
    self.implementation = resolve_attention(attention, dtype, dim // num_heads)
    embed, heads = prefix + "embed", prefix + "heads"
    # One (D, 3D) xavier matrix, as the official init (not three (D, D) ones).
    self.qkv = _linear(dim, 3 * dim, dtype, rngs, (embed, heads))
    self.proj = _linear(dim, dim, dtype, rngs, (heads, embed))

  def __call__(self, x):  # (B, N, D)
    qkv = self.qkv(x).reshape(*x.shape[:2], 3, self.num_heads, -1)  # (B, N, 3, H, hd)
    out = attention_core(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.implementation)
    return self.proj(out.reshape(x.shape[:2] + (-1,)))


class Mlp(nnx.Module):
  def __init__(self, dim, hidden, dtype, prefix="", *, rngs):
    self.fc1 = _linear(dim, hidden, dtype, rngs, (prefix + "embed", prefix + "mlp"))
    self.fc2 = _linear(hidden, dim, dtype, rngs, (prefix + "mlp", prefix + "embed"))

  def __call__(self, x):
    return self.fc2(nnx.gelu(self.fc1(x), approximate=False))


# Activation checkpointing of each block: what its backward may keep from the forward.
REMAT = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
         "dots_saveable": jax.checkpoint_policies.dots_saveable}


class Block(nnx.Module):
  """Pre-norm ViT block: x + Attn(LN(x)); x + MLP(LN(x))."""

  def __init__(self, dim, num_heads, mlp_ratio, dtype, prefix="", attention="auto",
               remat="none", *, rngs):
    self.remat = remat
    self.norm1 = layer_norm(dim, rngs)
    self.attn = Attention(dim, num_heads, dtype, prefix, attention, rngs=rngs)
    self.norm2 = layer_norm(dim, rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype, prefix, rngs=rngs)

  def __call__(self, x, drop_rate=0.0, key=None):
    """`drop_rate` > 0 with a `key`: drop path (stochastic depth) on both residual branches."""
    if self.remat == "none":
      return self.forward(x, drop_rate, key)
    run = nnx.remat(lambda block, x, key: block.forward(x, drop_rate, key),
                    policy=REMAT[self.remat])
    return run(self, x, key)

  def forward(self, x, drop_rate=0.0, key=None):
    """The block without remat."""
    if drop_rate > 0.0 and key is not None:
      attn_key, mlp_key = jax.random.split(key)
      x = x + drop_path(self.attn(self.norm1(x)), drop_rate, attn_key)
      return x + drop_path(self.mlp(self.norm2(x)), drop_rate, mlp_key)
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


def drop_path(branch, rate, key):
  """Zero a residual branch per example with probability `rate`, scale the rest by 1/(1-rate).

  The expectation is unchanged; one draw per example (all its tokens), as timm's DropPath.
  """
  keep = jax.random.bernoulli(key, 1.0 - rate, (branch.shape[0],) + (1,) * (branch.ndim - 1))
  return jnp.where(keep, branch / (1.0 - rate), jnp.zeros_like(branch))


class PatchEmbed(nnx.Module):
  """A p x p stride-p convolution: (B, H, W, C) -> (B, L, D), patches in row-major order."""

  def __init__(self, in_chans, dim, patch_size, dtype, *, rngs):
    p = patch_size
    self.proj = nnx.Conv(in_chans, dim, (p, p), strides=(p, p), padding="VALID",
                         kernel_init=_logical(_patch_init, None, None, None, "embed"),
                         bias_init=_logical(_zeros, "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, images):
    x = self.proj(images)  # (B, H/p, W/p, D)
    return x.reshape(x.shape[0], -1, x.shape[-1])


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
    for block in self.blocks:
      x = block(x)
    return self.norm(x)

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
    for block in self.decoder_blocks:
      x = block(x)
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
