"""Smoke runs of the real entry points: the reproduction script (one epoch, tiny subsets) and, marked slow, the
README's main-job command ``fcaformer train`` with no arguments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fcaformer.cli import main as cli_main
from fcaformer.weights import load_model
from tests.conftest import shared_path

REPO = Path(__file__).resolve().parents[1]


def test_reproduction_script_one_epoch_smoke(tmp_path: Path) -> None:
    data = shared_path("data", "imagenette-160")
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import reproduce_cross_attention as repro
    finally:
        sys.path.pop(0)
    out = tmp_path / "out"
    code = repro.main(["--seeds", "0", "--data", str(data), "--runs", str(tmp_path / "runs"), "--out", str(out),
                       "--figure", str(tmp_path / "repro.png"), "--set", "run.epochs=1", "data.train_per_class=2",
                       "data.val_per_class=2", "data.cache=false", "run.batch_size=10"])
    assert code == 0
    table = json.loads((out / "results.json").read_text())
    assert set(table) == {"fca_release", "fca_post_norm", "no_cross"}
    assert table["no_cross"]["params"] < table["fca_release"]["params"] == table["fca_post_norm"]["params"]
    assert all(row["val_images"] == 20 and row["train_images"] == 20 for row in table.values())
    assert (tmp_path / "repro.png").is_file() and "fca_release" in (out / "results.md").read_text()
    for variant, cross in (("fca_release", True), ("no_cross", False)):
        model, ckpt = load_model(out / "checkpoints" / f"{variant}.pt")
        assert ckpt["model_kwargs"]["cross_attention"] is cross and ckpt["class_names"][0] == "tench"


@pytest.mark.slow
def test_default_command_trains_digits(tmp_path: Path) -> None:
    """``fcaformer train`` with no arguments (its default run folder is relative to the working directory)."""
    done = subprocess.run([sys.executable, "-m", "fcaformer", "train", "--no-progress"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "digits"
    results = json.loads((run / "results.json").read_text())
    assert results["val"]["top1"] > 90 and results["epochs_done"] == 12
    for name in ("model.pt", "metrics.jsonl", "curves.png", "confusion.png"):
        assert (run / name).is_file()
    assert cli_main(["predict", str(run / "curves.png"), "--model", str(run / "model.pt"), "--json"]) == 0
