"""Export round trips (ONNX via onnxruntime, torch.export, TorchScript), torch.compile without graph breaks, CLI."""

from __future__ import annotations

import onnx
import pytest
import timm
import torch

import fcaformer
from fcaformer.cli import main
from fcaformer.deploy import onnx_session, relative_error, run_onnx
from fcaformer.export import export_model
from fcaformer.fast import fuse_model
from fcaformer.weights.project import save_model
from tests.test_fast import randomize_

# A narrow model with the full structure (conv stages, two Fca stages with cross-token histories): exports fast.
TINY = dict(dims=(16, 32, 64, 96), depths=(1, 1, 3, 2), num_heads=(2, 3), img_size=64, num_classes=10)


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(timm.create_model("fcaformer_l1", **TINY))


@pytest.fixture(scope="module")
def tiny_dense() -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {k: v for k, v in TINY.items() if k not in ("num_classes", "img_size")}
    return randomize_(fcaformer.create_dense_backbone("fcaformer_l1", out_dims=(8, 16, 24, 32), **kwargs))


def test_onnx_dynamic_batch_matches_pytorch(tiny, tmp_path) -> None:
    result = export_model(tiny, tmp_path / "tiny.onnx", "onnx", img_size=64)
    assert result.max_relative_error is not None and result.max_relative_error < 1e-4
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto)
    batch_dim, _, height, width = proto.graph.input[0].type.tensor_type.shape.dim
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic batch
    assert (height.dim_value, width.dim_value) == (64, 64)  # spatial size fixed (documented)
    # independent check against the faithful (unfused) model at batch sizes other than the traced one
    session = onnx_session(result.path)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            ref = tiny(x)
        (out,) = run_onnx(session, x)
        assert out.shape == tuple(ref.shape)
        assert relative_error(out, ref) < 1e-4


def test_onnx_windowed_backbone_with_padding(tiny_dense, tmp_path) -> None:
    """The dense backbone at a size whose Fca stages need window padding; four outputs."""
    result = export_model(tiny_dense, tmp_path / "dense.onnx", "onnx", img_size=(96, 160))
    assert result.max_relative_error < 1e-4
    session = onnx_session(result.path)
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        refs = tiny_dense(x)
    outs = run_onnx(session, x)
    assert [o.shape for o in outs] == [tuple(r.shape) for r in refs]
    assert max(relative_error(o, r) for o, r in zip(outs, refs)) < 1e-4


def test_exported_program_round_trip(tiny, tmp_path) -> None:
    result = export_model(tiny, tmp_path / "tiny.pt2", "exported-program", img_size=64)
    assert result.max_relative_error < 1e-5
    program = torch.export.load(str(result.path))
    x = torch.randn(4, 3, 64, 64)  # a batch size never traced
    with torch.no_grad():
        assert relative_error(program.module()(x), tiny(x)) < 1e-5


def test_torchscript_round_trip(tiny, tmp_path) -> None:
    result = export_model(tiny, tmp_path / "tiny.ts", "torchscript", img_size=64)
    assert result.max_relative_error < 1e-5


def test_export_rejects_bad_arguments(tiny, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown export format"):
        export_model(tiny, tmp_path / "x.bin", "tflite")
    with pytest.raises(ValueError, match=r"\.pt2"):
        export_model(tiny, tmp_path / "x.pt", "exported-program")
    with pytest.raises(ValueError, match="img_size"):
        export_model(tiny, tmp_path / "x.onnx", "onnx", img_size=16)


def test_torch_compile_fast_path_has_no_graph_breaks(tiny) -> None:
    """Dynamo captures the whole fused model as one graph (checked with the eager backend: no codegen cost)."""
    fused = fuse_model(tiny)
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(fused)(x)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        compiled = torch.compile(fused, backend="eager", fullgraph=True)
        assert relative_error(compiled(x), tiny(x)) < 1e-5


def test_cli_export_project_checkpoint(tiny, tmp_path, capsys) -> None:
    checkpoint = tmp_path / "tiny.pt"
    save_model(checkpoint, tiny, "fcaformer_l1", TINY)
    output = tmp_path / "tiny.pt2"
    code = main(["export", "--checkpoint", str(checkpoint), "--format", "exported-program", "--img-size", "64",
                 "--output", str(output)])
    assert code == 0
    assert "max relative error" in capsys.readouterr().out
    program = torch.export.load(str(output))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(program.module()(x), tiny(x)) < 1e-5


def test_cli_export_rejects_wrong_suffix(tmp_path) -> None:
    with pytest.raises(SystemExit, match=r"\.pt2"):
        main(["export", "--model", "fcaformer_l1", "--format", "exported-program", "--output", str(tmp_path / "a.pt")])
