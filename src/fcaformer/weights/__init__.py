"""Weights: the one way in (:func:`read_weights`) for every source the project reads, the project's checkpoint
format, timm hub folders, fine-tuning loads and conversion.

Modules, each importing only those above it in this list:

- :mod:`.reading`: torch and safetensors files, with errors that name the file (no format knowledge);
- :mod:`.record`: :class:`WeightsRecord`, what every source is read into, and building its network;
- the formats, each a leaf that knows only itself: :mod:`.release` (the authors' checkpoints), :mod:`.project`
  (``model.pt`` / ``.safetensors``), :mod:`.training_state` (``state-*.pt``), :mod:`.hub` (timm hub folders,
  ``local-dir:``, ``hf-hub:``);
- :mod:`.load`: the dispatcher (:func:`read_weights`, :func:`load_official`, :func:`load_model`);
- :mod:`.pretrained` (fine-tuning loads) and :mod:`.convert` (``fcaformer convert``), built on the dispatcher.
"""

from ..errors import CheckpointError
from .convert import ConvertReport, convert_to_hub
from .hub import HF_PREFIX, LOCAL_PREFIX, hub_folder, read_hub_folder, write_hub_folder
from .load import load_model, load_official, read_weights, record_from_checkpoint
from .pretrained import PretrainedReport, load_pretrained
from .project import PROJECT_FORMAT, model_checkpoint, save_model
from .record import WeightsRecord, preprocessing_config
from .release import infer_release_config, release_architecture, release_data_config
from .training_state import STATE_FORMAT, read_training_state

__all__ = [
    "HF_PREFIX",
    "LOCAL_PREFIX",
    "PROJECT_FORMAT",
    "STATE_FORMAT",
    "CheckpointError",
    "ConvertReport",
    "PretrainedReport",
    "WeightsRecord",
    "convert_to_hub",
    "hub_folder",
    "infer_release_config",
    "load_model",
    "load_official",
    "load_pretrained",
    "model_checkpoint",
    "preprocessing_config",
    "read_hub_folder",
    "read_training_state",
    "read_weights",
    "record_from_checkpoint",
    "release_architecture",
    "release_data_config",
    "save_model",
    "write_hub_folder",
]
