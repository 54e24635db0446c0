"""Training, evaluation and prediction for FcaFormer image classifiers."""

from .config import ConfigError, TrainConfig, list_presets, load_config
from .data import DataError
from .engine import Trainer, TrainingDiverged, train, train_or_resume
from .evaluate import EvalResult, evaluate

__all__ = [
    "ConfigError",
    "DataError",
    "EvalResult",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "evaluate",
    "list_presets",
    "load_config",
    "train",
    "train_or_resume",
]
