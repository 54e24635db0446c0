"""Training-state checkpoints of every task: written atomically by one process, the newest few kept, a corrupt
newest one skipped, and the same one read by every rank on resume."""

from __future__ import annotations

import random
import re
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed as dist

from ..errors import CheckpointError
from ..files import atomic_write
from ..weights.training_state import STATE_FORMAT, read_training_state
from .faults import fault_point, trace

_NAME = re.compile(r"^state-(\d{10})\.pt$")
# the temporary file fcaformer.files.atomic_write writes a state into before renaming it into place
_PARTIAL = re.compile(r"^\.state-\d{10}\.pt\..*\.tmp$")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer (any size: NumPy takes it modulo 2**32)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def _write_state(handle: BinaryIO, state: dict[str, Any]) -> None:
    torch.save(state, handle)
    fault_point("checkpoint")  # written but not yet in place: a kill here must leave the previous states readable


def save_state(directory: Path, position: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Atomically write a training state and delete all but the ``keep`` newest."""
    path = atomic_write(state_path(directory, position),
                        lambda handle: _write_state(handle, {"format": STATE_FORMAT, **state}))
    for old in list_states(directory)[keep:]:
        old.unlink(missing_ok=True)
    trace("state", position=position)
    return path


def remove_partial_states(directory: Path) -> int:
    """Delete the temporary files of state writes that a kill interrupted (never read: the states they would have
    become do not exist); returns how many. Call it only while no process of the run writes."""
    if not directory.is_dir():
        return 0
    partial = [p for p in directory.iterdir() if _PARTIAL.match(p.name)]
    for path in partial:
        path.unlink(missing_ok=True)
    return len(partial)


def list_states(directory: Path) -> list[Path]:
    """State files in ``directory``, newest first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if _NAME.match(p.name)), reverse=True)


def load_latest_state(target: Path) -> tuple[dict[str, Any], Path]:
    """The newest readable state in a run folder (``target/checkpoints``), or from a given state file;
    ``FileNotFoundError`` when there is none.

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


def load_agreed_state(target: Path) -> tuple[dict[str, Any], Path] | None:
    """:func:`load_latest_state`, the same state on every rank, or ``None`` when there is none.

    Under torch.distributed rank 0 chooses (skipping unreadable files) and every other rank reads the file it
    chose, so ranks never resume from different positions, e.g. when one of them sees a file another missed. An
    error (no readable state among several) is raised on every rank.
    """
    if not (dist.is_available() and dist.is_initialized()):
        try:
            return load_latest_state(target)
        except FileNotFoundError:
            return None
    found, choice = None, [("none", "")]
    if dist.get_rank() == 0:
        try:
            found = load_latest_state(target)
            choice = [("path", str(found[1]))]
        except FileNotFoundError:
            pass
        except CheckpointError as error:
            choice = [("error", str(error))]
    dist.broadcast_object_list(choice, src=0)
    kind, value = choice[0]
    if kind == "error":
        raise CheckpointError(value)
    if kind == "none":
        return None
    return found or load_latest_state(Path(value))
