"""CPU deployment (fcaformer.deploy): OpenVINO and ONNX Runtime exports in fp32 / bf16 / int8, checked on real
images; runners and profiles; the benchmark under one runtime; the error when the [deploy] extra is missing.

The int8 agreement tests use a *trained* model that ships with the repository (the reproduction's
``fca_release.safetensors``, ``fcaformer_l1`` trained on Imagenette at 128 px), calibrated on Imagenette train
images and checked on val images, so top-1 agreement means something (a random-weight model's logits are
near ties).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from benchmarks import openvino_irs
from fcaformer.cli import export as export_command
from fcaformer.cli import main
from fcaformer.deploy import (
    OnnxRunner,
    OpenVinoRunner,
    TorchRunner,
    build_runner,
    compare_outputs,
    eval_transform,
    layout_share,
    list_images,
    load_images,
)
from fcaformer.errors import MissingExtraError as DeployDependencyError
from fcaformer.errors import require
from fcaformer.export import export_model
from fcaformer.weights import load_model
from tests.conftest import REPO_ROOT, shared_path

TRAINED = REPO_ROOT / "docs" / "repro_gpu" / "checkpoints" / "fca_release.safetensors"
SIZE = 128  # its training size


def deploy_installed() -> None:
    """Skip without OpenVINO / NNCF (fail in CI, whose ``.[dev]`` install includes the ``[deploy]`` extra)."""
    try:
        require("openvino")
        require("nncf")
    except DeployDependencyError as error:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(str(error))
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, dict]:
    model, raw = load_model(TRAINED)
    return model, raw["data_config"]


@pytest.fixture(scope="module")
def images(trained) -> dict[str, torch.Tensor]:
    """32 Imagenette train images to calibrate on and 48 val images to check on, preprocessed for the model."""
    _, data_config = trained
    root = shared_path("data", "imagenette-160")
    transform = eval_transform(data_config, (SIZE, SIZE))
    return {"calib": load_images(list_images(root / "train", limit=32), transform),
            "check": load_images(list_images(root / "val", limit=48), transform)}


def test_list_images_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        list_images(tmp_path / "missing")
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_openvino_export_round_trip_on_real_images(trained, images, tmp_path, precision: str) -> None:
    deploy_installed()
    model, _ = trained
    result = export_model(model, tmp_path / "m.xml", "openvino", img_size=SIZE, precision=precision,
                          calibration=images["calib"], check_images=images["check"])
    assert result.path.exists() and result.path.with_suffix(".bin").exists()
    assert result.check_images == 48
    if precision == "fp32":
        assert result.max_relative_error < 1e-4 and result.top1_agreement == 1.0
    else:
        # bf16 runs natively only where the CPU has it (else OpenVINO stays fp32); int8 is calibrated
        assert result.top1_agreement >= 0.9
    # the file stands alone: read back by OpenVINO, dynamic batch, still agrees
    runner = OpenVinoRunner(result.path, threads=2, precision=precision)
    agreement = compare_outputs(runner, model, images["check"][:5])
    assert agreement.top1_agreement >= 0.8
    if precision == "bf16":
        import openvino as ov

        hint = ov.Core().read_model(str(result.path)).get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"])
        assert hint.astype(str) == "bf16"


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_onnx_export_round_trip_on_real_images(trained, images, tmp_path, precision: str) -> None:
    if precision == "int8":
        deploy_installed()  # NNCF places and calibrates the quantization nodes
    model, _ = trained
    result = export_model(model, tmp_path / "m.onnx", "onnx", img_size=SIZE, precision=precision,
                          calibration=images["calib"], check_images=images["check"])
    if precision == "fp32":
        assert result.max_relative_error < 1e-4 and result.top1_agreement == 1.0
    else:
        assert result.top1_agreement >= 0.9
        import onnx

        ops = {node.op_type for node in onnx.load(str(result.path)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_export_rejects_bad_precision_and_missing_calibration(trained, tmp_path) -> None:
    model, _ = trained
    with pytest.raises(ValueError, match="fp32 or int8"):
        export_model(model, tmp_path / "m.onnx", "onnx", img_size=SIZE, precision="bf16")
    with pytest.raises(ValueError, match="calibration"):
        export_model(model, tmp_path / "m.onnx", "onnx", img_size=SIZE, precision="int8")
    with pytest.raises(ValueError, match="fp32"):
        export_model(model, tmp_path / "m.pt2", "exported-program", img_size=SIZE, precision="int8")
    with pytest.raises(ValueError, match=r"\.xml"):
        export_model(model, tmp_path / "m.onnx", "openvino", img_size=SIZE)
    with pytest.raises(ValueError, match="does not offer"):
        build_runner(model, "onnxruntime", "bf16", SIZE)


def test_missing_deploy_extra_is_one_clear_line(tmp_path, monkeypatch, capsys) -> None:
    for name in ("openvino", "nncf"):
        monkeypatch.setitem(sys.modules, name, None)  # what an environment without the extra sees: ImportError
    with pytest.raises(DeployDependencyError, match=r"pip install 'fcaformer\[deploy\]'"):
        require("openvino")
    code = main(["export", "--checkpoint", str(TRAINED), "--format", "openvino", "-o", str(tmp_path / "m.xml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: openvino is not installed") and "fcaformer[deploy]" in err[-1]


def test_cli_export_openvino_int8_with_calibration(tmp_path, capsys, monkeypatch) -> None:
    deploy_installed()
    monkeypatch.setattr(export_command, "LOW_AGREEMENT", 1.01)  # any agreement is "low": the hint must show
    root = shared_path("data", "imagenette-160")
    output = tmp_path / "m_int8.xml"
    code = main(["export", "--checkpoint", str(TRAINED), "--format", "openvino", "--precision", "int8",
                 "--calib", str(root / "train"), "--calib-images", "16", "--check-images", "16", "-o", str(output)])
    out, err = capsys.readouterr()
    assert code == 0 and output.exists()
    assert f"{SIZE}x{SIZE}" in out  # the checkpoint's own training size is the default
    assert "top-1 agreement with PyTorch fp32" in out and "of 16 images" in out
    assert "note: below 101%; `--format openvino --min-agreement 99.5`" in err
    # benchmarks/openvino_irs.py times exported IRs and counts what stayed in full precision
    stem = tmp_path / "irs"
    assert openvino_irs.main([str(output), "--repeats", "2", "--warmup", "1", "-o", str(stem)]) == 0
    (row,) = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert row["fake_quantize"] > 0 and row["weighted_ops_quantized"] > 0 and row["ratio"] == 1.0


def test_cli_export_int8_without_calibration_is_an_error(capsys) -> None:
    code = main(["export", "--checkpoint", str(TRAINED), "--format", "onnx", "--precision", "int8"])
    assert code == 2 and "--calib" in capsys.readouterr().err


def small_model() -> torch.nn.Module:
    """Random weights are enough where only the graph matters (profiles)."""
    import timm

    return timm.create_model("fcaformer_atto", num_classes=10).eval()


def test_runners_profile_per_op() -> None:
    model = small_model()
    x = torch.randn(1, 3, 64, 64)
    for runner in (TorchRunner(model), build_runner(model, "onnxruntime", "fp32", 64, threads=1)):
        ops = runner.profile(x, repeats=2)
        assert ops and abs(sum(op.share for op in ops) - 1) < 1e-6
        assert ops == sorted(ops, key=lambda op: -op.share)
        assert 0 <= layout_share(ops) < 1
    assert isinstance(build_runner(model, "onnxruntime", "fp32", 64), OnnxRunner)


def test_openvino_lean_graph_profile_is_lean() -> None:
    """Under OpenVINO the lean graph spends little time moving data (transposes, reorders, concats, gathers)."""
    deploy_installed()
    model = small_model()
    runner = build_runner(model, "openvino", "fp32", SIZE, threads=1, batch_size=1, profile=True)
    ops = runner.profile(torch.randn(1, 3, SIZE, SIZE), repeats=3)
    names = {op.op for op in ops}
    assert "Transpose" not in names and "Gather" not in names
    assert layout_share(ops) < 0.2  # at 128 px the fixed costs weigh more than at 224 (~5 %)
    out = runner.for_batch(3)(np.random.randn(3, 3, SIZE, SIZE).astype(np.float32))
    assert out.shape == (3, 10)


def test_cli_benchmark_under_openvino_with_profile(tmp_path, capsys) -> None:
    """Ours and a peer under the same runtime and precision, with the per-op profile (small size: cheap; a peer
    that takes any input size)."""
    deploy_installed()
    code = main(["benchmark", "--models", "fcaformer_l1", "--peers", "convnext_femto", "--runtime", "openvino",
                 "--img-size", "64", "--repeats", "2", "--warmup", "1", "--throughput-batch", "2",
                 "--throughput-repeats", "1", "--profile", "-o", str(tmp_path / "bench")])
    out = capsys.readouterr().out
    assert code == 0
    assert "openvino fp32" in out and "layout + concat + gather share" in out
    rows = [line for line in out.splitlines() if line.startswith("| fcaformer_l1 |")
            or line.startswith("| convnext_femto |")]
    assert len(rows) == 2
    assert (tmp_path / "bench.json").exists()
