"""ViT building blocks shared by the MAE and the classifier (Flax NNX).

Linear layers with logical axis names (sharding.py maps them to the mesh), LayerNorm with
the official eps, multi-head attention (selectable implementation), the pre-norm block
with optional remat and drop path, the patch embedding, and `run_blocks` (a loop, or one
`lax.scan` over the blocks).
"""

import jax
import jax.numpy as jnp
from flax import nnx

LN_EPS = 1e-6
_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()
token_init = nnx.initializers.normal(stddev=0.02)  # cls and mask tokens
# The official code inits the conv as a linear layer on the flattened (p*p*C, D)
# kernel; flax's conv-aware xavier would also count the receptive field in fan_out.
_patch_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2),
                                                out_axis=-1)

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
    """The block without remat; `drop_rate` may be traced (a scan over blocks)."""
    if key is not None and (isinstance(drop_rate, jax.Array) or drop_rate > 0.0):
      attn_key, mlp_key = jax.random.split(key)
      x = x + drop_path(self.attn(self.norm1(x)), drop_rate, attn_key)
      return x + drop_path(self.mlp(self.norm2(x)), drop_rate, mlp_key)
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


def run_blocks(blocks, x, scan=False, drop_rates=None, key=None):
  """`x` through `blocks` in order; with `drop_rates` (one per block) and a `key`, drop path.

  `scan=True` runs one `jax.lax.scan` over the blocks' weights stacked on a new leading
  axis: XLA compiles one block instead of `len(blocks)` copies (compile time, program
  size). The weights stay one entry per block (checkpoints, converters and optimizer
  state see the same tree); the stack is a copy made inside the step, and gradients flow
  back through it to each block's own weights. Same numbers as the loop.
  """
  keys = jax.random.split(key, len(blocks)) if key is not None and drop_rates else None
  if not scan or len(blocks) < 2:
    for i, block in enumerate(blocks):
      x = block(x, 0.0, None) if keys is None else block(x, drop_rates[i], keys[i])
    return x
  graphdef, _ = nnx.split(blocks[0])
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[nnx.state(b) for b in blocks])

  def body(x, per_block):
    weights, rate, block_key = per_block
    block = nnx.merge(graphdef, weights)
    return (block(x, 0.0, None) if block_key is None else block(x, rate, block_key)), None

  rates = None if keys is None else jnp.asarray(drop_rates, jnp.float32)
  x, _ = jax.lax.scan(body, x, (stacked, rates, keys))
  return x


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
