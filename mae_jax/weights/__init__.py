"""PyTorch weights <-> mae_jax, one concern a module.

- `keys`: official names and torch layouts <-> our variables; filling a model from a state dict.
- `hf`: HuggingFace `ViTMAEForPreTraining` names (4.x files and 5.x), model directories, config.json.
- `files`: reading `.pth` (torch, `weights_only=True` only) / `.safetensors`, writing them.
- `infer`: the model config a file implies (shapes), with what had to be assumed.
- `load`: an official / HF file -> a validated MAE (`load_pytorch`, `import_checkpoint`).
- `workdir`: imported weights <-> our checkpoint directories (import, export, extras item).
"""

from mae_jax.weights.files import read_state_dict
from mae_jax.weights.hf import hf_to_official, official_to_hf
from mae_jax.weights.infer import infer_model_config
from mae_jax.weights.keys import (CLASSIFIER_PREFIXES, DECODER_PREFIXES, KINDS,
                                  official_state_dict, summarise_keys)
from mae_jax.weights.load import Imported, full_config, import_checkpoint, load_pytorch
from mae_jax.weights.workdir import (export_checkpoint, export_state_dict, is_our_checkpoint,
                                     save_imported)
