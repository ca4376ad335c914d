"""mae_jax: Masked Autoencoders (He et al. 2021) in JAX / Flax NNX."""

__version__ = "0.1.0"


def load(path_or_workdir, step=None):
  """Restore a workdir or step directory: a pre-trained MAE or a classifier (see mae_jax.api)."""
  from mae_jax import api  # pylint: disable=import-outside-toplevel
  return api.load(path_or_workdir, step)
