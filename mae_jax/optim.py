"""Learning-rate schedules, weight-decay masks and the pre-training optimizer (optax)."""

import jax
import optax


def scaled_lr(base_lr, batch_size):
  """The linear scaling rule of the paper: lr = base_lr * batch / 256."""
  return base_lr * batch_size / 256


def warmup_cosine(peak_lr, warmup_steps, total_steps, end_lr=0.0):
  """Linear warm-up from 0 to `peak_lr`, then half-cycle cosine to `end_lr`, per step."""
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) < total_steps ({total_steps})")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=end_lr)


def decay_mask(params):
  """Weight decay on every parameter with ndim >= 2 (not biases / LayerNorm), as official."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def adamw(schedule, *, b1=0.9, b2=0.95, weight_decay=0.05):
  """AdamW with decoupled weight decay on the parameters `decay_mask` selects."""
  return optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay,
                     mask=decay_mask)
