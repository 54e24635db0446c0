"""Training-state checkpoints: written atomically, the newest few kept, and a corrupt newest one skipped."""

from __future__ import annotations

import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..files import atomic_torch_save
from ..weights.training_state import STATE_FORMAT, read_training_state

_NAME = re.compile(r"^state-(\d{10})\.pt$")


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states, in a weights-only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_path(directory: Path, position: int) -> Path:
    """File of the state after ``position`` training batches in total (names sort in training order)."""
    return directory / f"state-{position:010d}.pt"


def save_state(directory: Path, position: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Atomically write a training state and delete all but the ``keep`` newest."""
    path = atomic_torch_save({"format": STATE_FORMAT, **state}, state_path(directory, position))
    for old in list_states(directory)[keep:]:
        old.unlink(missing_ok=True)
    return path


def list_states(directory: Path) -> list[Path]:
    """State files in ``directory``, newest first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if _NAME.match(p.name)), reverse=True)


def load_latest_state(target: Path) -> tuple[dict[str, Any], Path]:
    """The newest readable state in a run folder (``target/checkpoints``), or from a given state file.

    An unreadable (e.g. truncated) newest file is skipped with a warning naming it and the one used instead.
    """
    if target.is_file():
        candidates = [target]
    else:
        directory = target / "checkpoints" if (target / "checkpoints").is_dir() else target
        candidates = list_states(directory)
        if not candidates:
            raise FileNotFoundError(f"nothing to resume: no state-*.pt checkpoint in {directory}")
    errors = []
    for path in candidates:
        try:
            return read_training_state(path), path
        except CheckpointError as error:
            errors.append(f"{path}: {error}")
            warnings.warn(f"checkpoint {path} is unreadable ({error}); falling back to the previous one",
                          stacklevel=2)
    raise CheckpointError("no readable training state to resume from:\n  " + "\n  ".join(errors))
