import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import nnx

from conftest import official_sincos_table
from jaxprs import equations
from mae_jax import model as model_lib
from mae_jax import patches

# SPEC.md section 1: trainable params in millions (encoder / total), fixed pos-embeds excluded.
SPEC_PARAMS = {"vit_b": (85.7, 111.7), "vit_l": (303.1, 329.2), "vit_h": (630.4, 656.6)}


def _formula_params(d, depth, p, d_dec=512, dec_depth=8, c=3):
  """Closed-form count: per block qkv 3D^2+3D, proj D^2+D, fc1 4D^2+4D, fc2 4D^2+D, 2 LNs 4D."""
  block = lambda w: 12 * w * w + 13 * w
  encoder = (p * p * c * d + d) + d + depth * block(d) + 2 * d  # patch embed, cls, blocks, norm
  decoder = ((d * d_dec + d_dec) + d_dec + dec_depth * block(d_dec) + 2 * d_dec
             + (d_dec * p * p * c + p * p * c))  # embed, mask token, blocks, norm, pred
  return encoder, encoder + decoder


def _is_decoder(path):
  return str(path[0]).startswith("decoder") or path[0] == "mask_token"


@pytest.mark.parametrize("size", ["vit_b", "vit_l", "vit_h"])
def test_param_counts_match_spec(size):
  cfg = dict(model_lib.SIZES[size], img_size=224)
  abstract = model_lib.abstract_model(cfg)  # shapes only, no memory
  params = nnx.state(abstract, nnx.Param)
  total = model_lib.count_params(abstract)
  encoder = sum(v.size for path, v in nnx.to_flat_state(params) if not _is_decoder(path))
  s = model_lib.SIZES[size]
  assert (encoder, total) == _formula_params(s["embed_dim"], s["depth"], s["patch_size"])
  spec_enc, spec_total = SPEC_PARAMS[size]
  # SPEC rounds to 0.1M (85.647M is listed as 85.7M): allow rounding of a rounded figure.
  assert abs(encoder / 1e6 - spec_enc) < 0.06 and abs(total / 1e6 - spec_total) < 0.06


def test_pos_embeds_are_fixed_not_params(tiny_config):
  m = model_lib.MAE(tiny_config.model, rngs=nnx.Rngs(0))
  param_paths = {path for path, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  assert ("pos_embed",) not in param_paths and ("decoder_pos_embed",) not in param_paths
  assert isinstance(m.pos_embed, model_lib.FixedEmbed)
  grid = m.config.grid
  np.testing.assert_allclose(np.asarray(m.pos_embed[...][0]), official_sincos_table(32, *grid),
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(m.decoder_pos_embed[...][0]),
                             official_sincos_table(32, *grid), atol=1e-6)
  # gradients flow to every Param and nowhere else
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))

  def loss(p):
    return nnx.merge(graphdef, p, rest)(x, key=jax.random.key(1))[0]
  grads = jax.jit(jax.grad(loss))(params)
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


def test_official_initialisation():
  d, p = 768, 16
  m = model_lib.MAE(dict(model_lib.SIZES["vit_b"], depth=1, decoder_depth=1), rngs=nnx.Rngs(0))
  qkv = np.asarray(m.blocks[0].attn.qkv.kernel[...])
  assert qkv.shape == (d, 3 * d)
  bound = np.sqrt(6 / (d + 3 * d))  # one fused xavier matrix, not three (D, D) ones
  assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.99 * bound
  np.testing.assert_allclose(qkv.std(), bound / np.sqrt(3), rtol=0.01)
  patch = np.asarray(m.patch_embed.proj.kernel[...])
  assert patch.shape == (p, p, 3, d)
  bound = np.sqrt(6 / (p * p * 3 + d))  # xavier on the flattened (p*p*C, D) kernel
  assert np.abs(patch).max() <= bound and np.abs(patch).max() > 0.99 * bound
  fc1 = np.asarray(m.blocks[0].mlp.fc1.kernel[...])
  np.testing.assert_allclose(fc1.std(), np.sqrt(6 / (d + 4 * d)) / np.sqrt(3), rtol=0.01)
  np.testing.assert_allclose(np.asarray(m.cls_token[...]).std(), 0.02, rtol=0.1)
  np.testing.assert_allclose(np.asarray(m.mask_token[...]).std(), 0.02, rtol=0.1)
  assert not np.asarray(m.blocks[0].attn.qkv.bias[...]).any()
  np.testing.assert_array_equal(np.asarray(m.norm.scale[...]), 1.0)
  assert not np.asarray(m.norm.bias[...]).any()
  assert m.norm.epsilon == 1e-6 and m.blocks[0].norm1.epsilon == 1e-6


def test_forward_shapes_noise_and_key(tiny_config):
  mc = tiny_config.model
  m = model_lib.MAE(mc, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  noise = jax.random.uniform(jax.random.key(1), (3, 16))
  loss, pred, mask = m(x, noise=noise)
  assert pred.shape == (3, 16, 8 * 8 * 3) and mask.shape == (3, 16)
  np.testing.assert_array_equal(np.asarray(mask).sum(1), 12)
  np.testing.assert_array_equal(np.asarray(mask),
                                np.asarray(patches.masking_from_noise(noise, 4).mask))
  loss2, pred2, _ = m(x, noise=noise)
  assert float(loss) == float(loss2) and np.array_equal(pred, pred2)
  # key= is deterministic; the model's own rngs advance between calls
  _, _, mk1 = m(x, key=jax.random.key(5))
  _, _, mk2 = m(x, key=jax.random.key(5))
  np.testing.assert_array_equal(mk1, mk2)
  _, _, ma = m(x)
  _, _, mb = m(x)
  assert not np.array_equal(ma, mb)


def test_encoder_sees_only_visible_tokens(tiny_config):
  m = model_lib.MAE(tiny_config.model, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  masking = patches.masking_from_noise(jax.random.uniform(jax.random.key(1), (2, 16)), 4)
  assert m.encode_masked(x, masking).shape == (2, 1 + 4, 32)
  # changing a removed patch's pixels does not change the encoder output
  removed = int(np.flatnonzero(np.asarray(masking.mask[0]))[0])
  r, c = divmod(removed, 4)
  y = x.at[0, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].add(5.0)
  np.testing.assert_allclose(m.encode_masked(y, masking), m.encode_masked(x, masking), atol=1e-6)


def _numpy_weights(model):
  """{'blocks.0.attn.qkv.kernel': float64 array, ...} of every Param of `model`."""
  return {".".join(map(str, path)): np.asarray(v[...], np.float64)
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _reference_mae_with_mask_tokens_in_encoder(w, images, noise, cfg):
  """(loss, pred, mask, encoder output) in float64 numpy, written from the paper's ablation:
  every patch enters the encoder, the removed ones as the encoder's mask token + their
  position; the decoder takes all 1 + L tokens as they are (no mask-token insertion)."""
  p, d, heads, dec_heads = cfg["patch_size"], cfg["embed_dim"], cfg["num_heads"], cfg[
      "decoder_num_heads"]
  batch, height, width, chans = images.shape
  rows, cols = height // p, width // p
  # (B, L, p*p*C): patches in row-major order, each flattened (row in patch, col, channel)
  patches_ = images.reshape(batch, rows, p, cols, p, chans).transpose(0, 1, 3, 2, 4, 5)
  patches_ = patches_.reshape(batch, rows * cols, p * p * chans).astype(np.float64)
  len_keep = int(rows * cols * (1 - cfg["mask_ratio"]))
  mask = np.ones((batch, rows * cols))
  np.put_along_axis(mask, np.argsort(noise, axis=1)[:, :len_keep], 0.0, axis=1)

  def layer_norm(x, name):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * w[name + ".scale"] + w[name + ".bias"]

  def linear(x, name):
    return x @ w[name + ".kernel"] + w[name + ".bias"]

  def block(x, name, num_heads):
    n, width_ = x.shape[1], x.shape[2]
    qkv = linear(layer_norm(x, name + ".norm1"), name + ".attn.qkv")
    q, k, v = qkv.reshape(batch, n, 3, num_heads, width_ // num_heads).transpose(2, 0, 3, 1, 4)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(width_ // num_heads)  # (B, H, N, N)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, n, width_)
    x = x + linear(attended, name + ".attn.proj")
    hidden = linear(layer_norm(x, name + ".norm2"), name + ".mlp.fc1")
    hidden = 0.5 * hidden * (1 + scipy.special.erf(hidden / np.sqrt(2)))  # exact GELU
    return x + linear(hidden, name + ".mlp.fc2")

  pos = official_sincos_table(d, rows, cols)  # (1 + L, D), cls row first
  tokens = patches_ @ w["patch_embed.proj.kernel"].reshape(-1, d) + w["patch_embed.proj.bias"]
  tokens = np.where(mask[:, :, None] > 0, w["encoder_mask_token"][0], tokens) + pos[1:]
  cls = np.broadcast_to(w["cls_token"][0] + pos[:1], (batch, 1, d))
  x = np.concatenate([cls, tokens], axis=1)  # (B, 1 + L, D)
  for i in range(cfg["depth"]):
    x = block(x, f"blocks.{i}", heads)
  latent = layer_norm(x, "norm")
  x = linear(latent, "decoder_embed") + official_sincos_table(cfg["decoder_embed_dim"], rows,
                                                              cols)
  for i in range(cfg["decoder_depth"]):
    x = block(x, f"decoder_blocks.{i}", dec_heads)
  pred = linear(layer_norm(x, "decoder_norm"), "decoder_pred")[:, 1:]
  target = patches_
  if cfg["norm_pix_loss"]:
    target = ((target - target.mean(-1, keepdims=True))
              / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6))
  per_patch = ((pred - target) ** 2).mean(-1)
  return (per_patch * mask).sum() / mask.sum(), pred, mask, latent


def test_mask_tokens_in_encoder_ablation(tiny_config):
  cfg = dict(tiny_config.model.to_dict(), mask_tokens_in_encoder=True, img_size=(32, 48))
  m = model_lib.MAE(cfg, rngs=nnx.Rngs(0))
  base = model_lib.abstract_model(dict(cfg, mask_tokens_in_encoder=False))
  assert model_lib.count_params(m) == model_lib.count_params(base) + 32  # the encoder's token
  # perturb every weight (biases, norms, tokens) so that no term of the forward is trivial
  rng = np.random.default_rng(0)
  nnx.update(m, jax.tree.map(lambda v: v + 0.1 * rng.normal(size=v.shape).astype(np.float32),
                             nnx.state(m, nnx.Param)))
  x = rng.normal(size=(2, 32, 48, 3)).astype(np.float32)
  noise = rng.random((2, 24)).astype(np.float32)

  forward = nnx.jit(lambda model, images: (model(images, noise=noise), model.encode_masked(
      images, patches.masking_from_noise(noise, model.config.len_keep))))
  (loss, pred, mask), latent = forward(m, x)
  ref_loss, ref_pred, ref_mask, ref_latent = _reference_mae_with_mask_tokens_in_encoder(
      _numpy_weights(m), x, noise, cfg)
  np.testing.assert_array_equal(np.asarray(mask), ref_mask)
  assert latent.shape == (2, 1 + 24, 32)  # all tokens enter the encoder
  np.testing.assert_allclose(np.asarray(latent), ref_latent, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(pred), ref_pred, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  # the decoder's own mask token is unused in this ablation; the removed pixels stay unseen
  m.mask_token[...] = m.mask_token[...] + 1.0
  y = x.copy()
  y[mask.astype(bool).repeat(8 * 8, axis=1).reshape(2, 4, 6, 8, 8).transpose(
      0, 1, 3, 2, 4).reshape(2, 32, 48)] += 3.0
  (_, pred_y, _), _ = forward(m, y)
  np.testing.assert_allclose(np.asarray(pred_y), np.asarray(pred), rtol=1e-6, atol=1e-6)


def _traced_forward(model, x, noise):
  """(loss, pred, [(operand dtypes, result dtype)] of every dot_general / convolution)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  forward = lambda p, r: nnx.merge(graphdef, p, r)(x, noise=noise)[:2]
  jaxpr = jax.make_jaxpr(forward)(params, rest).jaxpr
  dtypes = [(tuple(str(v.aval.dtype) for v in eqn.invars), str(eqn.outvars[0].aval.dtype))
            for eqn, _ in equations(jaxpr)
            if eqn.primitive.name in ("dot_general", "conv_general_dilated")]
  return *jax.jit(forward)(params, rest), dtypes


def test_bfloat16_compute(tiny_config):
  """dtype=bfloat16 puts every matmul in bf16 (params stay float32): the loss moves a little."""
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  noise = jax.random.uniform(jax.random.key(1), (2, 16))
  fp32 = model_lib.MAE(tiny_config.model, rngs=nnx.Rngs(0))
  bf16 = model_lib.MAE(dict(tiny_config.model.to_dict(), dtype="bfloat16"), rngs=nnx.Rngs(0))
  assert bf16.blocks[0].attn.qkv.kernel[...].dtype == jnp.float32  # params stay float32
  loss_low, pred_low, low = _traced_forward(bf16, x, noise)
  loss_full, pred_full, full = _traced_forward(fp32, x, noise)
  # patch embed + (qkv, 2 attention, proj, fc1, fc2) per block + decoder_embed + decoder_pred
  assert len(low) == len(full) == 1 + 6 * 3 + 2
  assert all(operands == ("bfloat16", "bfloat16") for operands, _ in low), low
  assert all(operands == ("float32", "float32") and out == "float32" for operands, out in full)
  assert pred_low.dtype == jnp.float32 and np.isfinite(float(loss_low))
  assert float(loss_low) != float(loss_full)  # same weights, rounded compute
  np.testing.assert_allclose(float(loss_low), float(loss_full), rtol=1e-2)
  assert not np.array_equal(pred_low, pred_full)
  np.testing.assert_allclose(pred_low, pred_full, atol=0.05 * float(jnp.std(pred_full)))


@pytest.mark.parametrize("override,message", [
    (dict(mask_ratio=0.0), r"mask_ratio must be in \(0, 1\), got 0.0"),
    (dict(mask_ratio=1.2), r"mask_ratio must be in \(0, 1\), got 1.2"),
    (dict(img_size=36), r"img_size=36 is not divisible by model.patch_size=8"),
    (dict(num_heads=5), r"embed_dim=32 is not divisible by config.model.num_heads=5"),
    (dict(mask_sampler="spiral"), r"mask_sampler='spiral'"),
    (dict(patch_sizes=8), r"unknown config.model field\(s\) \['patch_sizes'\]"),
])
def test_bad_config_clear_error(tiny_config, override, message):
  with pytest.raises(ValueError, match=message):
    model_lib.MAE(dict(tiny_config.model.to_dict(), **override), rngs=nnx.Rngs(0))


def test_wrong_image_size_clear_error_before_compile(tiny_config):
  m = model_lib.MAE(tiny_config.model, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"images have shape \(2, 48, 48, 3\).*\(batch, 32, 32, 3\)"):
    jax.jit(lambda x: m(x, key=jax.random.key(0)))(jnp.ones((2, 48, 48, 3)))
  with pytest.raises(ValueError, match=r"noise has shape \(2, 9\)"):
    m(jnp.ones((2, 32, 32, 3)), noise=jnp.ones((2, 9)))
