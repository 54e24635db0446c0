"""The lean inference graph (fcaformer.lean): equal to the faithful path everywhere it applies, and lean."""

from __future__ import annotations

import pytest
import timm
import torch

import fcaformer
from fcaformer.fast import fuse_model
from fcaformer.lean import LeanFcaFormer, channel_norm, lean_model, supports_lean
from tests.conftest import shared_path
from tests.test_fast import SMALL_DEPTHS, TOLERANCE, assert_same_outputs, make_model, relative_error


@pytest.mark.parametrize("name", ["fcaformer_l1", "fcaformer_l2", "fcaformer_l3", "fcaformer_l4"])
def test_lean_equals_faithful_every_hybrid_variant(name: str) -> None:
    """Native size and another, non-square size (resized biases and LSFs), through all cross-token histories."""
    model = make_model(name, img_size=64)
    lean = lean_model(model)
    assert isinstance(lean, LeanFcaFormer)
    assert_same_outputs(model, lean, torch.randn(2, 3, 64, 64))
    assert_same_outputs(model, lean, torch.randn(1, 3, 112, 80))


def test_lean_equals_faithful_l1_native_224() -> None:
    model = make_model("fcaformer_l1")
    assert_same_outputs(model, lean_model(model), torch.randn(1, 3, 224, 224))


@pytest.mark.parametrize("switches", [dict(lsf="post_norm"), dict(lsf="none"), dict(cab_max_d=2),
                                      dict(cross_attention=False), dict(enhance=False), dict(global_pool="max"),
                                      dict(num_classes=0)])
def test_lean_equals_faithful_with_research_switches(switches: dict) -> None:
    model = make_model("fcaformer_l1", img_size=64, **switches)
    assert_same_outputs(model, lean_model(model), torch.randn(2, 3, 64, 96))


def test_lean_from_fused_model_and_features() -> None:
    """Built from a fused model too; forward_features is the last stage's map."""
    model = make_model("fcaformer_l1", img_size=64)
    lean = lean_model(fuse_model(model))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, out = model.forward_features(x), lean.forward_features(x)
    assert out.shape == ref.shape and relative_error(out, ref) < TOLERANCE


@pytest.mark.parametrize("fixture", ["official_fcaformer_l1_cls.pt", "official_custom_cls_cab2.pt"])
def test_lean_matches_release_outputs(fixture: str) -> None:
    data = torch.load(shared_path("parity", fixture), weights_only=True)
    lean = lean_model(fcaformer.load_official(data["state_dict"]))
    with torch.no_grad():
        assert relative_error(lean(data["input"]), data["logits"]) < TOLERANCE


def test_lean_gathers_biases_once_per_size() -> None:
    model = make_model("fcaformer_l1", img_size=64)
    lean = lean_model(model).prepare(64)
    block = lean.stages[2].blocks[1]
    assert list(block._constants) == [(4, 4)]
    bias, scale = block.constants((4, 4))
    assert bias.shape == (1, 6, 16, 16 + 1) and scale.shape == (1, 1, 1)  # 6 heads, 4x4 grid, 1 cross token
    with torch.no_grad():
        lean(torch.randn(1, 3, 96, 64))
    assert set(block._constants) == {(4, 4), (6, 4)}


def test_channel_norm_is_layer_norm_over_channels() -> None:
    x = torch.randn(2, 24, 5, 7) * 3 + 1
    ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (24,), eps=1e-6).permute(0, 3, 1, 2)
    assert relative_error(channel_norm(x, 1e-6), ref) < 1e-6


def test_lean_rejects_models_it_does_not_cover() -> None:
    assert not supports_lean(timm.create_model("fcaformer_l0", img_size=64))
    assert not supports_lean(fcaformer.create_dense_backbone("fcaformer_l1", depths=SMALL_DEPTHS["fcaformer_l2"]))
    assert not supports_lean(timm.create_model("fcaformer_l1", window_size=(14, 7)))
    assert not supports_lean(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="fuse_model"):
        lean_model(timm.create_model("fcaformer_l0", img_size=64))
    with pytest.raises(ValueError, match="windowed"):
        lean_model(timm.create_model("fcaformer_l1", window_size=(14, 7)))


def test_lean_graph_has_no_layout_ops_or_gathers() -> None:
    """Traced for export, the lean graph holds no permutes, gathers or index ops: the biases are constants, and
    the only transposes are the two operand views of each attention's matrix products."""
    model = make_model("fcaformer_l1", img_size=64)
    lean = lean_model(model).prepare(64)
    with torch.no_grad():
        program = torch.export.export(lean, (torch.randn(1, 3, 64, 64),))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert not [t for t in targets if any(k in t for k in ("permute", "gather", "index", "embedding"))]
    fca_blocks = sum(len(stage.blocks) for stage in lean.stages[2:])
    assert sum("transpose" in t for t in targets) == 2 * fca_blocks
    assert sum("aten.cat" in t for t in targets) <= 2 * fca_blocks  # history + key/value input, nothing else
