"""Shared fixtures: the ``../shared`` folder (parity fixtures and real data).

Its location is ``$FCAFORMER_SHARED`` or ``<repo>/../shared``. Tests that need it skip when it is absent,
except in CI (``CI=true``), where its absence is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_path(*parts: str) -> Path:
    """A path inside the shared folder, skipping (or failing in CI) when it does not exist."""
    root = Path(os.environ.get("FCAFORMER_SHARED", REPO_ROOT.parent / "shared"))
    path = root.joinpath(*parts)
    if not path.exists():
        message = f"shared test data not found: {path} (set FCAFORMER_SHARED)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(autouse=True)
def _deterministic_seed() -> None:
    torch.manual_seed(0)
