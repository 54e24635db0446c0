"""CPU dry runs of the GPU scripts (benchmarks/device_check.sh, gpu.py, cross_attention_gpu.py), so they cannot
rot between the sessions that have a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fcaformer.train.device_data import pack_image_folder
from fcaformer.weights import load_model
from tests.conftest import shared_path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import cross_attention_gpu  # noqa: E402


def test_device_check_dry_run_writes_tests_log_and_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "check"
    done = subprocess.run(["bash", "benchmarks/device_check.sh", str(out), "--device", "cpu", "--quick"],
                          capture_output=True, text=True, cwd=REPO, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["benchmark.log", "gpu.json", "gpu.md", "gpu.png", "tests.log"]
    assert "1 passed" in (out / "tests.log").read_text()
    result = json.loads((out / "gpu.json").read_text())
    rows = result["rows"]
    assert set(rows) == {"fcaformer_l1", "fcaformer_l1 (faithful)", "deit_tiny_patch16_224"}
    for row in ("fcaformer_l1", "fcaformer_l1 (faithful)"):
        assert rows[row]["infer_fp32_img_s"] > 0 and rows[row]["train_img_s"] > 0 and rows[row]["latency_b1_ms"] > 0
    assert {g["goal"] for g in result["goals"]} >= {"bf16 b128 training throughput"}
    assert set(result["profile"]) == {"fcaformer_l1", "fcaformer_l1 (faithful)"}
    assert result["machine"]["card"] in (out / "gpu.md").read_text()


def test_device_check_rejects_unknown_options(tmp_path: Path) -> None:
    done = subprocess.run(["bash", "benchmarks/device_check.sh", str(tmp_path), "--gpu"], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert done.returncode == 2 and "unknown option --gpu" in done.stderr


def test_fit_epochs_and_calibration() -> None:
    # 2 runs x (9,469 train + 3,925 val / 15) images per epoch at 20,000 images/s for 300 s
    assert cross_attention_gpu.fit_epochs(20_000, 2, 9469, 3925, 5, 300) == int(300 * 20_000 / (2 * (9469 + 3925 / 15)))
    rate = cross_attention_gpu.calibrate_one("fca_release", ["run.device=cpu", *cross_attention_gpu.QUICK], 2)
    assert rate > 0


def test_cross_attention_experiment_rehearsal(tmp_path: Path) -> None:
    pack = pack_image_folder(shared_path("data", "imagenette-160"), tmp_path / "tiny.npz", size=40, per_class=3)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "benchmarks/cross_attention_gpu.py", "--pack", str(pack), "--out", str(out),
                           "--quick", "--device", "cpu", "--seeds", "0", "--variants", "fca_release", "no_cross",
                           "--epochs", "1"], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert set(result["variants"]) == {"fca_release", "no_cross"}
    for name, run in result["runs"].items():
        assert run["final"] and run["exit_code"] == 0 and run["epochs"] == 1, name
    stats = result["runs"]["fca_release-s0"]["parameters"]
    assert any("lsf_mean" in block for block in stats.values())
    assert not any("lsf_mean" in block for block in result["runs"]["no_cross-s0"]["parameters"].values())
    assert (out / "curves.png").stat().st_size > 0
    model, raw = load_model(out / "fca_release.safetensors")
    assert raw["model_name"] == "fcaformer_l1" and len(raw["class_names"]) == 10
    assert next(model.parameters()).dtype == torch.float32  # fp16 on disk, the model's dtype once loaded


@pytest.mark.parametrize("variant", list(cross_attention_gpu.VARIANTS))
def test_variant_overrides_build_what_they_say(variant: str) -> None:
    from fcaformer.train import load_config
    from fcaformer.train.engine import build_model

    config = load_config("repro_gpu", ["data.root=x.npz", *cross_attention_gpu.arch_overrides(variant)])
    model, _ = build_model(config, 10)
    has_cross = any(name.endswith("cross_bias") for name, _ in model.named_parameters())
    assert has_cross == (variant != "no_cross")
    assert sum(p.numel() for p in model.parameters()) > 5e6  # the paper's L1, not a reduced variant
