"""The shared-data lookup: override by environment, skip outside CI, fail in CI."""

from __future__ import annotations

from pathlib import Path

import pytest
from _pytest.outcomes import Failed, Skipped

from tests.conftest import shared_path


def test_override_and_missing_behaviour(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "parity").mkdir()
    monkeypatch.setenv("FCAFORMER_SHARED", str(tmp_path))
    assert shared_path("parity") == tmp_path / "parity"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(Skipped, match="shared test data not found"):
        shared_path("data", "voc-mini")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(Failed, match="shared test data not found"):
        shared_path("data", "voc-mini")
