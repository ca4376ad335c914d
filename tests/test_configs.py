import glob
import os

import pytest
from ml_collections.config_flags import config_flags

from configs import base
from flax import nnx

from mae_jax import model as model_lib
from mae_jax import tasks, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                      if not p.endswith("__init__.py"))


def _load(path, arg=None):
  """Load a config file the way `--config=path[:arg]` does."""
  spec = f"{path}:{arg}" if arg else path
  return config_flags.ConfigFileFlagParser(name="config").parse(spec)


def test_every_config_file_is_covered():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  assert {"base.py", "tiny.py", "vit_b.py", "vit_l.py", "vit_h.py"} <= names


def _imagenet_sizes(config):
  """What `task.check` takes from the dataset (-1 in the config), as ImageNet's; no data read."""
  if config.data.num_train_examples <= 0:
    config.data.num_train_examples = base.IMAGENET_TRAIN_EXAMPLES
  if config.get("task", "pretrain") == "classify" and config.classifier.num_classes <= 0:
    config.classifier.num_classes = 1000


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_loads_and_builds_abstractly(path):
  config = _load(path)
  _imagenet_sizes(config)
  task = tasks.get(config)
  abstract = nnx.eval_shape(lambda: task.build_model(config, nnx.Rngs(0)))  # validates fields
  assert model_lib.count_params(abstract) > 0
  total, warmup = train.schedule_steps(config)
  assert 0 <= warmup < total


@pytest.mark.parametrize("name,size,patch", [("vit_b", 768, 16), ("vit_l", 1024, 16),
                                             ("vit_h", 1280, 14)])
def test_paper_recipe(name, size, patch):
  config = _load(os.path.join(ROOT, "configs", f"{name}.py"))
  assert (config.model.embed_dim, config.model.patch_size) == (size, patch)
  assert config.batch_size == 4096 and config.epochs == 800 and config.warmup_epochs == 40
  assert config.base_lr == 1.5e-4 and config.model.mask_ratio == 0.75
  assert config.model.norm_pix_loss and (config.b1, config.b2, config.weight_decay) == (0.9, 0.95,
                                                                                      0.05)
  assert (config.model.decoder_embed_dim, config.model.decoder_depth) == (512, 8)
  _imagenet_sizes(config)  # tests/test_epoch_length.py reads it from imagenet2012's split info
  total, warmup = train.schedule_steps(config)
  assert (total, warmup) == (800 * (1281167 // 4096), 40 * (1281167 // 4096))


def test_string_args_override():
  config = _load(os.path.join(ROOT, "configs", "vit_l.py"),
                 "decoder_depth=1,batch_size=1024,model.mask_sampler=block,base_lr=1e-4")
  assert config.model.decoder_depth == 1 and config.batch_size == 1024
  assert config.model.mask_sampler == "block" and config.base_lr == 1e-4
  assert base.apply_args(base.get_config(), "decoder_embed_dim=256").model.decoder_embed_dim == 256


@pytest.mark.parametrize("arg,error,message", [
    ("decoder_depht=1", KeyError, "decoder_depht"),
    ("model.nope=1", KeyError, "no field 'nope'"),
    ("batch_size", ValueError, "not of the form key=value"),
])
def test_bad_string_args(arg, error, message):
  with pytest.raises(error, match=message):
    base.sized_config("vit_b", arg)


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h", "finetune_vit_l", "linprobe_vit_h"])
def test_accelerator_configs_compute_in_bf16_on_accelerators_only(name, monkeypatch):
  config = _load(os.path.join(ROOT, "configs", f"{name}.py"))
  assert config.model.dtype == "auto"
  assert model_lib.model_config(config.model).dtype == "float32"  # this CPU
  for backend, want in (("gpu", "bfloat16"), ("tpu", "bfloat16"), ("cpu", "float32")):
    monkeypatch.setattr(model_lib.jax, "default_backend", lambda b=backend: b)
    assert model_lib.model_config(config.model).dtype == want, backend
  # an explicit dtype wins, and the small configs stay float32
  config.model.dtype = "float16"
  assert model_lib.model_config(config.model).dtype == "float16"
  assert _load(os.path.join(ROOT, "configs", "tiny.py")).model.dtype == "float32"
