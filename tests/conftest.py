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


TEST_DEVICE = os.environ.get("FCAFORMER_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device of the device-parametrised tests (``tests/test_device.py``): ``$FCAFORMER_TEST_DEVICE``, default
    ``cpu``; ``FCAFORMER_TEST_DEVICE=cuda`` runs them on a GPU."""
    chosen = torch.device(TEST_DEVICE)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"FCAFORMER_TEST_DEVICE={TEST_DEVICE} but torch {torch.__version__} sees no CUDA GPU")
    return chosen


@pytest.fixture()
def exact_fp32():
    """fp32 without TF32: cuDNN rounds fp32 convolution inputs to TF32 (10-bit mantissa) by default, which would
    hide 1e-5 comparisons behind 1e-3 rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
