"""CPU dry runs of the GPU scripts (benchmarks/device_check.sh, prepare_device.sh, gpu.py, cross_attention_gpu.py),
so they cannot rot between the sessions that have a GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fcaformer.files import file_sha256
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


@pytest.mark.parametrize(("option", "message"), [(["--gpu"], "unknown option --gpu"),
                                                (["--shared", "no-such-dir"], "no-such-dir has no data/ folder")])
def test_device_check_rejects_bad_options(tmp_path: Path, option: list[str], message: str) -> None:
    done = subprocess.run(["bash", "benchmarks/device_check.sh", str(tmp_path / "out"), *option],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 2 and message in done.stderr


def test_prepare_device_dry_run_builds_the_shared_subset_manifest_and_size_check(tmp_path: Path) -> None:
    shared = shared_path("data").parent
    env = {**os.environ, "FCAFORMER_SHARED": str(shared)}

    def prepare(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "benchmarks/prepare_device.sh", *args], capture_output=True, text=True,
                              cwd=REPO, timeout=60, env=env)

    out = tmp_path / "prep"
    done = prepare(str(out), "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    assert list((out / "wheels").iterdir()) == []  # nothing fetched
    # what tests/test_device.py reads: the first 8 images of the first two val classes, the first two VOC images
    val = shared / "data" / "imagenette-160" / "val"
    expected = [path for folder in sorted(val.iterdir())[:2] for path in sorted(folder.iterdir())[:8]]
    expected += sorted((shared / "data" / "voc-mini" / "JPEGImages").iterdir())[:2]
    copied = sorted(path for path in (out / "shared").rglob("*") if path.is_file())
    assert copied == sorted(out / "shared" / path.relative_to(shared) for path in expected)
    assert all((out / "shared" / p.relative_to(shared)).read_bytes() == p.read_bytes() for p in expected)
    manifest = dict(line.split("  ", 1)[::-1] for line in (out / "MANIFEST.sha256").read_text().splitlines())
    assert manifest == {str(p.relative_to(out)): file_sha256(p) for p in copied}
    # the reported total: every file that travels (tracked or untracked, not ignored) plus the prepared folder
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    tree = sum((REPO / name).stat().st_size for name in listed if name and (REPO / name).is_file())
    carried = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    total_mib = float(re.search(r"total ([0-9.]+) MiB of 60 MiB", done.stdout).group(1))
    assert abs(total_mib - (tree + carried) / 2**20) < 0.1  # du also counts the folders' own entries
    assert "--wheels" in done.stdout and "--shared" in done.stdout and "--budget-s 500" in done.stdout

    over = prepare(str(out), "--dry-run", "--limit-mib", "1")
    assert over.returncode == 1 and over.stderr.count("\n") == 1 and "over 1 MiB" in over.stderr
    assert prepare(str(out), "--limit-mib", "x").returncode == 2
    # a folder inside the repository must be git-ignored (else git would pick the wheels and data up)
    inside = prepare("benchmarks/not-ignored", "--dry-run")
    assert inside.returncode == 2 and "not git-ignored" in inside.stderr
    assert not (REPO / "benchmarks" / "not-ignored").exists()
    assert subprocess.run(["git", "check-ignore", "-q", ".device/"], cwd=REPO).returncode == 0


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
