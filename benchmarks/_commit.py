"""Helpers shared by the experiment scripts."""

from __future__ import annotations

import json
import os
from pathlib import Path


def commit_checkpoint(run_model: Path, checkpoint: Path, repo: Path) -> Path:
    """Save a run's ``model.pt`` as an fp16 safetensors project checkpoint fit to commit: it names no path of the
    machine it was made on (the data and run folders become relative to ``repo``, so ``fcaformer eval`` of the
    checkpoint finds the data from the repository root)."""
    import torch

    from fcaformer.weights import load_model
    from fcaformer.weights.project import save_model

    model, raw = load_model(run_model)
    keep = {k: raw[k] for k in ("class_names", "data_config", "metrics", "macs") if k in raw}
    train_config = json.loads(json.dumps(raw["train_config"]))
    for section, key in (("data", "root"), ("run", "output")):
        train_config[section][key] = os.path.relpath(train_config[section][key], repo)
    return save_model(checkpoint, model, raw["model_name"], raw["model_kwargs"], dtype=torch.float16,
                      train_config=train_config, **keep)
