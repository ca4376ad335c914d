"""The ViT classifier against an independent PyTorch model of the official `models_vit.py`.

The reference below is written from the official semantics (timm VisionTransformer blocks,
`global_pool` = mean of the patch tokens then `fc_norm`, else `norm(x)[:, 0]`; the linear
probe's head = BatchNorm1d(affine=False, eps 1e-6) then Linear), not copied. Random
official-format state dicts (numpy, trained-looking: nonzero cls row of pos_embed, BN
statistics) go into both; logits must agree. Also: position-table resizing against
`torch.nn.functional.interpolate`, drop path, BatchNorm statistics, and loader errors.

`load_pytorch_classifier` is not re-exported by `mae_jax.convert`; it is imported from
`mae_jax.weights.classifier`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import write_pth
from mae_jax import classifier, patches
from mae_jax import model as model_lib
from mae_jax.weights.classifier import classifier_state_dict, fill, load_pytorch_classifier

torch = pytest.importorskip("torch", reason="parity tests need torch==2.13.0 (pip install -e '.[test]')")
nn = torch.nn

# float32 on our side against a float64 torch reference: the error is ours alone.
RTOL, ATOL = 1e-5, 1e-5

CASES = {  # name: (img_size, patch, D, depth, heads)
    "tiny": (32, 8, 32, 2, 4),
    "wider": (40, 8, 48, 3, 3),  # grid 5x5, head dim 16, odd head count
}


def _model_config(img=32, patch=8, d=32, depth=2, heads=4):
  return dict(img_size=img, patch_size=patch, in_chans=3, embed_dim=d, depth=depth,
              num_heads=heads, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)


# ---------------------------------------------------------------- the PyTorch reference


class _TorchAttention(nn.Module):

  def __init__(self, d, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(d, 3 * d)
    self.proj = nn.Linear(d, d)

  def forward(self, x):
    b, n, d = x.shape
    hd = d // self.heads
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
    q, k, v = qkv[0], qkv[1], qkv[2]
    weights = torch.softmax((q @ k.transpose(-2, -1)) * hd ** -0.5, dim=-1)
    return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class _TorchMlp(nn.Module):

  def __init__(self, d):
    super().__init__()
    self.fc1 = nn.Linear(d, 4 * d)
    self.fc2 = nn.Linear(4 * d, d)

  def forward(self, x):
    return self.fc2(nn.functional.gelu(self.fc1(x)))  # exact (erf) gelu


class _TorchBlock(nn.Module):

  def __init__(self, d, heads):
    super().__init__()
    self.norm1 = nn.LayerNorm(d, eps=1e-6)
    self.attn = _TorchAttention(d, heads)
    self.norm2 = nn.LayerNorm(d, eps=1e-6)
    self.mlp = _TorchMlp(d)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class _TorchPatchEmbed(nn.Module):

  def __init__(self, d, patch):
    super().__init__()
    self.proj = nn.Conv2d(3, d, patch, stride=patch)

  def forward(self, x):  # (B, C, H, W) -> (B, L, D), row-major over the grid
    return self.proj(x).flatten(2).transpose(1, 2)


class TorchViT(nn.Module):
  """The official fine-tune / linear-probe classifier, in plain torch."""

  def __init__(self, img, patch, d, depth, heads, num_classes, global_pool, bn_head):
    super().__init__()
    grid = img // patch
    self.global_pool = global_pool
    self.patch_embed = _TorchPatchEmbed(d, patch)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
    self.blocks = nn.ModuleList([_TorchBlock(d, heads) for _ in range(depth)])
    if global_pool:
      self.fc_norm = nn.LayerNorm(d, eps=1e-6)
    else:
      self.norm = nn.LayerNorm(d, eps=1e-6)
    linear = nn.Linear(d, num_classes)
    self.head = (nn.Sequential(nn.BatchNorm1d(d, affine=False, eps=1e-6), linear) if bn_head
                 else linear)

  def forward(self, images):
    x = self.patch_embed(images)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    for block in self.blocks:
      x = block(x)
    if self.global_pool:
      feats = self.fc_norm(x[:, 1:].mean(dim=1))
    else:
      feats = self.norm(x)[:, 0]
    return self.head(feats)


def _torch_model(state_dict, img, patch, d, depth, heads, num_classes, global_pool, bn_head):
  model = TorchViT(img, patch, d, depth, heads, num_classes, global_pool, bn_head)
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                        strict=True)
  return model.double().eval()


def _torch_logits(model, images_nhwc):
  with torch.no_grad():
    x = torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).astype(np.float64))
    return model(x).numpy()


# ------------------------------------------------------- random official-format weights


def _official_state_dict(seed, img, patch, d, depth, heads, num_classes, global_pool, bn_head):
  """A random (trained-looking) official `models_vit.py` / linear-probe state dict."""
  del heads
  rng = np.random.default_rng(seed)
  grid = img // patch

  def normal(*shape, std=1.0):
    return (std * rng.normal(size=shape)).astype(np.float32)

  def linear(prefix, d_out, d_in):
    sd[prefix + ".weight"] = normal(d_out, d_in, std=d_in ** -0.5)
    sd[prefix + ".bias"] = normal(d_out, std=0.1)

  def norm(prefix):
    sd[prefix + ".weight"] = 1.0 + normal(d, std=0.1)
    sd[prefix + ".bias"] = normal(d, std=0.1)

  sd = {"cls_token": normal(1, 1, d, std=0.5),
        "pos_embed": normal(1, 1 + grid * grid, d, std=0.5),  # trained: row 0 nonzero
        "patch_embed.proj.weight": normal(d, 3, patch, patch, std=(3 * patch * patch) ** -0.5),
        "patch_embed.proj.bias": normal(d, std=0.1)}
  for i in range(depth):
    norm(f"blocks.{i}.norm1")
    linear(f"blocks.{i}.attn.qkv", 3 * d, d)
    linear(f"blocks.{i}.attn.proj", d, d)
    norm(f"blocks.{i}.norm2")
    linear(f"blocks.{i}.mlp.fc1", 4 * d, d)
    linear(f"blocks.{i}.mlp.fc2", d, 4 * d)
  norm("fc_norm" if global_pool else "norm")
  if bn_head:
    sd["head.0.running_mean"] = normal(d, std=0.3)
    sd["head.0.running_var"] = rng.uniform(0.5, 2.0, size=d).astype(np.float32)
    sd["head.0.num_batches_tracked"] = np.array(1234, np.int64)
    linear("head.1", num_classes, d)
  else:
    linear("head", num_classes, d)
  assert np.abs(sd["pos_embed"][0, 0]).min() > 0
  return sd


@nnx.jit
def _eval_logits(model, images):
  """`model(images)`, compiled: one program instead of op-by-op compiles for each new shape."""
  return model(images)


def _images(seed, batch, img):
  return np.random.default_rng(seed).normal(size=(batch, img, img, 3)).astype(np.float32)


def _set_directly(model, sd):
  """Official weights into a Classifier by explicit attribute paths (not via the loader)."""
  t = lambda k: jnp.asarray(sd[k])  # noqa: E731
  model.patch_embed.proj.kernel[...] = jnp.asarray(sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  model.patch_embed.proj.bias[...] = t("patch_embed.proj.bias")
  model.cls_token[...] = t("cls_token")
  model.pos_embed[...] = t("pos_embed")
  for i, block in enumerate(model.blocks):
    p = f"blocks.{i}."
    for ours, theirs in ((block.norm1, "norm1"), (block.norm2, "norm2")):
      ours.scale[...], ours.bias[...] = t(p + theirs + ".weight"), t(p + theirs + ".bias")
    for ours, theirs in ((block.attn.qkv, "attn.qkv"), (block.attn.proj, "attn.proj"),
                         (block.mlp.fc1, "mlp.fc1"), (block.mlp.fc2, "mlp.fc2")):
      ours.kernel[...], ours.bias[...] = t(p + theirs + ".weight").T, t(p + theirs + ".bias")
  final = model.fc_norm if hasattr(model, "fc_norm") else model.norm
  name = "fc_norm" if hasattr(model, "fc_norm") else "norm"
  final.scale[...], final.bias[...] = t(name + ".weight"), t(name + ".bias")
  if "head.1.weight" in sd:
    bn, lin = model.head
    bn.mean[...], bn.var[...] = t("head.0.running_mean"), t("head.0.running_var")
    lin.kernel[...], lin.bias[...] = t("head.1.weight").T, t("head.1.bias")
  else:
    model.head.kernel[...], model.head.bias[...] = t("head.weight").T, t("head.bias")


HEADS = {  # name: (pool, head, num_classes, global_pool, bn_head)
    "finetune": ("avg", "linear", 7, True, False),    # fc_norm + head
    "linprobe": ("cls", "bn_linear", 5, False, True),  # norm + head.0 BN + head.1
    "linprobe_global_pool": ("avg", "bn_linear", 4, True, True),  # main_linprobe --global_pool
}


# ------------------------------------------------------------------------------ parity


def _case(case, kind, seed):
  """(img, pool, head, num_classes, global_pool, bn_head, random official state dict)."""
  pool, head, num_classes, global_pool, bn_head = HEADS[kind]
  sd = _official_state_dict(seed, *CASES[case], num_classes, global_pool, bn_head)
  return CASES[case][0], pool, head, num_classes, global_pool, bn_head, sd


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", sorted(HEADS))
def test_forward_matches_torch_with_weights_set_directly(case, kind):
  """The Classifier's maths alone (weights placed by hand, no loader)."""
  img, pool, head, num_classes, global_pool, bn_head, sd = _case(case, kind, seed=3)
  model = classifier.Classifier(_model_config(*CASES[case]),
                                dict(num_classes=num_classes, pool=pool, head=head),
                                rngs=nnx.Rngs(0))
  _set_directly(model, sd)
  images = _images(4, 3, img)
  want = _torch_logits(_torch_model(sd, *CASES[case], num_classes, global_pool, bn_head), images)
  got = np.asarray(_eval_logits(model, images))
  assert got.shape == (3, num_classes) and got.dtype == np.float32
  assert np.abs(want).max() > 0.1  # logits of a useful size, so rtol means something
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", sorted(HEADS))
def test_load_pytorch_classifier_matches_torch(case, kind):
  """Pooling, head type and num_classes come from the keys, each on its own; logits match."""
  img, pool, head, num_classes, global_pool, bn_head, sd = _case(case, kind, seed=5)
  model = load_pytorch_classifier(sd, _model_config(*CASES[case]))
  cc = model.classifier_config
  assert (cc.pool, cc.head, cc.num_classes) == (pool, head, num_classes)
  assert hasattr(model, "fc_norm") == global_pool and hasattr(model, "norm") == (not global_pool)
  images = _images(6, 3, img)
  want = _torch_logits(_torch_model(sd, *CASES[case], num_classes, global_pool, bn_head), images)
  np.testing.assert_allclose(np.asarray(_eval_logits(model, images)), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["finetune", "linprobe"])
def test_pth_file_loads_matches_torch_and_round_trips(tmp_path, kind):
  img, patch, d, depth, heads = CASES["tiny"]
  pool, head, num_classes, global_pool, bn_head = HEADS[kind]
  sd = _official_state_dict(7, *CASES["tiny"], num_classes, global_pool, bn_head)
  path = write_pth(tmp_path / f"{kind}.pth", sd)  # torch.save({'model': tensors})
  model = load_pytorch_classifier(path, _model_config(*CASES["tiny"]))
  images = _images(8, 4, img)
  want = _torch_logits(_torch_model(sd, *CASES["tiny"], num_classes, global_pool, bn_head), images)
  np.testing.assert_allclose(np.asarray(model(images)), want, rtol=RTOL, atol=ATOL)

  file_sd = torch.load(path, weights_only=True)["model"]
  back = classifier_state_dict(model)
  missing = set(file_sd) - set(back)
  assert missing == ({"head.0.num_batches_tracked"} if bn_head else set())
  assert set(back) - set(file_sd) == set(), sorted(set(back) - set(file_sd))
  for key, value in back.items():
    want_value = file_sd[key].numpy()
    assert value.shape == want_value.shape and value.dtype == want_value.dtype, key
    np.testing.assert_array_equal(value, want_value, err_msg=key)  # bit for bit


# ------------------------------------------------------------- position-table resizing


def _torch_resized(table, old_grid, new_grid):
  """The official interpolate_pos_embed, generalised to rectangular grids (float64)."""
  (gh, gw), d = old_grid, table.shape[-1]
  grid = torch.from_numpy(table[0, 1:].astype(np.float64)).reshape(1, gh, gw, d).permute(0, 3, 1, 2)
  grid = torch.nn.functional.interpolate(grid, size=tuple(new_grid), mode="bicubic",
                                         align_corners=False)
  rows = grid.permute(0, 2, 3, 1).reshape(-1, d).numpy()
  return np.concatenate([table[0, :1].astype(np.float64), rows])[None]


@pytest.mark.parametrize("old_grid,new_grid", [((4, 4), (6, 6)), ((4, 4), (3, 3)),
                                               ((4, 4), (3, 5)), ((4, 6), (5, 3)),
                                               ((5, 5), (7, 2))])
def test_resize_pos_embed_matches_torch_bicubic(old_grid, new_grid):
  table = np.random.default_rng(9).normal(size=(1, 1 + old_grid[0] * old_grid[1], 16))
  table = table.astype(np.float32)
  got = patches.resize_pos_embed(table, old_grid, new_grid)
  assert got.shape == (1, 1 + new_grid[0] * new_grid[1], 16) and got.dtype == np.float32
  np.testing.assert_array_equal(got[0, 0], table[0, 0])  # cls row kept
  np.testing.assert_allclose(got, _torch_resized(table, old_grid, new_grid), rtol=1e-5, atol=1e-6)


def test_resize_pos_embed_same_grid_is_identity():
  table = np.random.default_rng(10).normal(size=(1, 17, 8)).astype(np.float32)
  np.testing.assert_array_equal(patches.resize_pos_embed(table, (4, 4), (4, 4)), table)


@pytest.mark.parametrize("new_img", [48, 24])  # grid 4x4 -> 6x6 (up), 4x4 -> 3x3 (down)
def test_loader_resizes_pos_embed_to_the_configured_image_size(new_img):
  img, patch, d, depth, heads = CASES["tiny"]
  sd = _official_state_dict(11, *CASES["tiny"], 7, True, False)
  model = load_pytorch_classifier(sd, _model_config(new_img, patch, d, depth, heads))
  new_grid = (new_img // patch,) * 2
  want = _torch_resized(sd["pos_embed"], (4, 4), new_grid)
  got = np.asarray(model.pos_embed[...])
  assert got.shape == want.shape
  np.testing.assert_array_equal(got[0, 0], sd["pos_embed"][0, 0])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # and the whole classifier at the new size = torch with the same resized table
  resized = dict(sd, pos_embed=want.astype(np.float32))
  images = _images(12, 2, new_img)
  ref = _torch_model(resized, new_img, patch, d, depth, heads, 7, True, False)
  np.testing.assert_allclose(np.asarray(_eval_logits(model, images)), _torch_logits(ref, images),
                             rtol=RTOL, atol=ATOL)


def test_loader_resizes_a_square_table_to_a_rectangular_image():
  sd = _official_state_dict(13, *CASES["tiny"], 7, True, False)
  mc = dict(_model_config(), img_size=(32, 48))  # grid 4x6
  model = load_pytorch_classifier(sd, mc)
  np.testing.assert_allclose(np.asarray(model.pos_embed[...]),
                             _torch_resized(sd["pos_embed"], (4, 4), (4, 6)), rtol=1e-5, atol=1e-6)
  assert model(np.zeros((1, 32, 48, 3), np.float32)).shape == (1, 7)


# ------------------------------------------------------------------------- drop path


@pytest.mark.parametrize("rate", [0.5, 0.25])
def test_drop_path_zeroes_or_rescales_whole_examples(rate):
  branch = jax.random.normal(jax.random.key(0), (4000, 3, 4)) + 2.0
  out = np.asarray(model_lib.drop_path(branch, rate, jax.random.key(1)))
  branch = np.asarray(branch)
  dropped = np.all(out == 0, axis=(1, 2))
  kept = np.all(np.isclose(out, branch / (1 - rate), rtol=1e-6, atol=0), axis=(1, 2))
  assert np.all(dropped ^ kept)  # every example wholly dropped or wholly kept and rescaled
  n = len(branch)
  sigma = math.sqrt(rate * (1 - rate) / n)
  assert abs(kept.mean() - (1 - rate)) < 5 * sigma, kept.mean()


@pytest.mark.parametrize("rate", [0.5, 0.25])
def test_drop_path_preserves_the_expectation(rate):
  branch = jax.random.normal(jax.random.key(2), (8, 3, 4))
  num_keys = 4000
  outs = jax.vmap(lambda k: model_lib.drop_path(branch, rate, k))(
      jax.random.split(jax.random.key(3), num_keys))
  mean = np.asarray(outs.mean(axis=0))
  # per element: out = branch * Bernoulli(1-rate) / (1-rate), std |branch| sqrt(rate/(1-rate))
  sigma = np.abs(np.asarray(branch)) * math.sqrt(rate / (1 - rate)) / math.sqrt(num_keys)
  assert np.all(np.abs(mean - np.asarray(branch)) <= 5 * sigma + 1e-6)
  # draws are independent across examples (not one coin for the whole batch)
  per_example = np.asarray(outs[:, :, 0, 0] != 0)
  assert 0 < per_example.mean(axis=1).mean() < 1 and not np.all(per_example == per_example[:, :1])


def test_block_drops_each_residual_branch_per_example():
  rate = 0.5
  block = model_lib.Block(32, 4, 4.0, jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(4), (64, 5, 32))
  out = np.asarray(block(x, rate, jax.random.key(5)))
  x, a = np.asarray(x), np.asarray(block.attn(block.norm1(x)))
  candidates = {}  # (attn kept, mlp kept) -> the block's output for every example
  for keep_attn in (0, 1):
    x1 = x + keep_attn * a / (1 - rate)
    m = np.asarray(block.mlp(block.norm2(jnp.asarray(x1))))
    for keep_mlp in (0, 1):
      candidates[keep_attn, keep_mlp] = x1 + keep_mlp * m / (1 - rate)
  seen = set()
  for i in range(x.shape[0]):
    matches = [c for c, cand in candidates.items()
               if np.allclose(out[i], cand[i], rtol=1e-5, atol=1e-5)]
    assert len(matches) == 1, (i, matches)
    seen.add(matches[0])
  assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}  # the two branches are drawn separately
  np.testing.assert_array_equal(np.asarray(block(x)), np.asarray(block(x, 0.0, jax.random.key(5))))


def test_drop_rates_are_linear_over_depth():
  mc = _model_config(depth=5)
  model = classifier.Classifier(mc, dict(num_classes=3, drop_path=0.2), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(model.drop_rates, np.linspace(0, 0.2, 5), rtol=0, atol=1e-12)
  assert model.drop_rates[0] == 0.0 and model.drop_rates[-1] == pytest.approx(0.2)
  none = classifier.Classifier(_model_config(), dict(num_classes=3), rngs=nnx.Rngs(0))
  assert none.drop_rates == (0.0, 0.0)


def test_drop_path_is_identity_in_eval_and_active_in_training():
  mc = _model_config()
  images = _images(14, 8, 32)
  plain = classifier.Classifier(mc, dict(num_classes=3), rngs=nnx.Rngs(1))
  eval_logits = np.asarray(plain(images))
  np.testing.assert_array_equal(np.asarray(plain(images)), eval_logits)
  np.testing.assert_allclose(np.asarray(plain(images, train=True, key=jax.random.key(0))),
                             eval_logits, rtol=1e-6, atol=1e-6)  # drop_path 0: nothing dropped

  dropping = classifier.Classifier(mc, dict(num_classes=3, drop_path=0.5), rngs=nnx.Rngs(1))
  for (_, a), (_, b) in zip(nnx.to_flat_state(nnx.state(plain)),
                            nnx.to_flat_state(nnx.state(dropping))):
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))  # same weights
  np.testing.assert_array_equal(np.asarray(dropping(images)), eval_logits)  # eval: identity
  train_a = np.asarray(dropping(images, train=True, key=jax.random.key(1)))
  train_b = np.asarray(dropping(images, train=True, key=jax.random.key(1)))
  train_c = np.asarray(dropping(images, train=True, key=jax.random.key(2)))
  np.testing.assert_array_equal(train_a, train_b)  # the key decides
  assert not np.allclose(train_a, eval_logits) and not np.allclose(train_a, train_c)
  # per example: block 1 (rate .5) dropped something -> differs; some examples keep both branches
  differs = ~np.all(np.isclose(train_a, eval_logits, rtol=1e-5, atol=1e-6), axis=1)
  assert differs.any()


# ----------------------------------------------------------------- BatchNorm head stats


def _bn_model(seed=0):
  model = classifier.Classifier(_model_config(), dict(num_classes=5, pool="cls", head="bn_linear",
                                                      head_init_std=0.5), rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed + 100)
  bn, _ = model.head
  bn.mean[...] = jnp.asarray(rng.normal(size=32).astype(np.float32))
  bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, size=32).astype(np.float32))
  return model


def test_bn_head_train_mode_uses_batch_stats_and_updates_running_ones():
  model = _bn_model()
  bn, linear = model.head
  old_mean, old_var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
  w, b = np.asarray(linear.kernel[...], np.float64), np.asarray(linear.bias[...], np.float64)
  images = _images(15, 16, 32)
  feats = np.asarray(model.features(images), np.float64)  # (B, D); no drop path configured
  batch_mean, batch_var = feats.mean(0), feats.var(0)

  logits = np.asarray(model(images, train=True, key=jax.random.key(0)))
  want = ((feats - batch_mean) / np.sqrt(batch_var + 1e-6)) @ w + b
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)

  new_mean, new_var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
  np.testing.assert_allclose(new_mean, 0.9 * old_mean + 0.1 * batch_mean, rtol=1e-5, atol=1e-6)
  # torch's BatchNorm1d(momentum=0.1) agrees on the running mean
  tbn = nn.BatchNorm1d(32, affine=False, eps=1e-6, momentum=0.1).double().train()
  tbn.running_mean.copy_(torch.from_numpy(old_mean.astype(np.float64)))
  tbn.running_var.copy_(torch.from_numpy(old_var.astype(np.float64)))
  with torch.no_grad():
    tbn(torch.from_numpy(feats))
  np.testing.assert_allclose(new_mean, tbn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
  # flax folds in the biased batch variance (torch the unbiased one: a factor n/(n-1))
  np.testing.assert_allclose(new_var, 0.9 * old_var + 0.1 * batch_var, rtol=1e-5, atol=1e-6)

  # eval: the (updated) running statistics, which eval does not change
  eval_logits = np.asarray(model(images))
  want_eval = ((feats - new_mean) / np.sqrt(new_var.astype(np.float64) + 1e-6)) @ w + b
  np.testing.assert_allclose(eval_logits, want_eval, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(bn.mean[...]), new_mean)
  np.testing.assert_array_equal(np.asarray(bn.var[...]), new_var)


# ---------------------------------------------------------------------------- errors


def test_pretrained_mae_state_dict_has_no_classifier_head():
  from mae_jax.weights import official_state_dict  # pylint: disable=import-outside-toplevel
  mae = model_lib.MAE(_model_config(), rngs=nnx.Rngs(0))
  with pytest.raises((KeyError, ValueError), match="no classifier head"):
    load_pytorch_classifier(official_state_dict(mae), _model_config())


def test_another_width_names_the_key_and_both_shapes():
  sd = _official_state_dict(16, 32, 8, 48, 2, 4, 7, True, False)  # D 48 vs config D 32
  with pytest.raises(ValueError, match=r"48.*32|32.*48") as err:
    load_pytorch_classifier(sd, _model_config())
  assert "'" in str(err.value) or "pos_embed" in str(err.value), str(err.value)

  # one key only: the message names it and gives both shapes exactly
  sd = _official_state_dict(17, *CASES["tiny"], 7, True, False)
  sd["head.weight"] = np.zeros((7, 48), np.float32)
  with pytest.raises(ValueError) as err:
    load_pytorch_classifier(sd, _model_config())
  msg = str(err.value)
  assert "head.weight" in msg and "(7, 48)" in msg and "(7, 32)" in msg, msg


def test_missing_block_key_is_named():
  sd = _official_state_dict(18, *CASES["tiny"], 5, False, True)
  del sd["blocks.1.mlp.fc2.bias"]
  with pytest.raises(KeyError, match=r"blocks\.1\.mlp\.fc2\.bias"):
    load_pytorch_classifier(sd, _model_config())


def test_deeper_file_than_config_is_refused():
  sd = _official_state_dict(19, 32, 8, 32, 3, 4, 7, True, False)  # depth 3 vs config depth 2
  with pytest.raises((KeyError, ValueError), match="blocks.2|depth"):
    load_pytorch_classifier(sd, _model_config())


def test_fill_encoder_only_takes_every_encoder_tensor_and_leaves_the_head():
  from mae_jax.weights import official_state_dict  # pylint: disable=import-outside-toplevel
  mae = model_lib.MAE(_model_config(), rngs=nnx.Rngs(3))
  sd = {k: np.random.default_rng(20).normal(size=v.shape).astype(np.float32)
        for k, v in official_state_dict(mae).items()}
  model = classifier.Classifier(_model_config(), dict(num_classes=3), rngs=nnx.Rngs(0))
  head_before = np.asarray(model.head.kernel[...])
  used, created = fill(model, sd, "mae.pth", encoder_only=True)
  assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.mlp.fc2.bias"} <= set(used)
  np.testing.assert_array_equal(np.asarray(model.cls_token[...]), sd["cls_token"])
  np.testing.assert_array_equal(np.asarray(model.pos_embed[...]), sd["pos_embed"])
  np.testing.assert_array_equal(np.asarray(model.head.kernel[...]), head_before)
  assert set(created) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
