"""Numerical parity with the authors' release (fixtures in ../shared/parity) and checkpoint loading paths."""

from __future__ import annotations

import pytest
import timm
import torch

import fcaformer
from fcaformer.weights.release import infer_release_config
from tests.conftest import shared_path

TOLERANCE = 1e-5


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def load_fixture(name: str) -> dict:
    return torch.load(shared_path("parity", name), weights_only=True)


@pytest.mark.parametrize("name", ["official_fcaformer_l1_cls.pt", "official_custom_cls_cab2.pt"])
def test_classification_parity(name: str) -> None:
    fixture = load_fixture(name)
    model = fcaformer.load_official(fixture["state_dict"])
    assert not model.training
    with torch.no_grad():
        features = model.forward_features(fixture["input"])
        logits = model.forward_head(features)
    assert relative_error(logits, fixture["logits"]) < TOLERANCE
    assert relative_error(features.mean((2, 3)), fixture["pooled_features"]) < TOLERANCE


def test_windowed_backbone_parity() -> None:
    fixture = load_fixture("official_seg_backbone_small.pt")
    model = fcaformer.load_official(fixture["state_dict"])
    assert isinstance(model, fcaformer.FcaFormerDense)
    sizes = set()
    for case in fixture["cases"]:
        sizes.add(tuple(case["input"].shape[-2:]))
        with torch.no_grad():
            outputs = model(case["input"])
        assert len(outputs) == 4
        for out, ref in zip(outputs, case["features"]):
            assert out.shape == ref.shape
            assert relative_error(out, ref) < TOLERANCE
    assert {(224, 224), (256, 320), (200, 300)} <= sizes


def test_inferred_architecture_matches_fixture_configs() -> None:
    custom = load_fixture("official_custom_cls_cab2.pt")
    config = infer_release_config(custom["state_dict"])
    expected = custom["config"]
    assert config["dims"] == tuple(expected["embed_dims"])
    assert config["depths"] == tuple(expected["depths"])
    assert config["num_heads"] == tuple(expected["num_heads"][2:])
    assert config["cab_max_d"] == expected["cab_max_d"] == 2
    assert config["num_classes"] == expected["num_classes"]
    assert config["img_size"] == expected["img_size"]
    assert config["windowed"] is False

    l1 = infer_release_config(load_fixture("official_fcaformer_l1_cls.pt")["state_dict"])
    assert l1 == dict(dims=(64, 128, 192, 320), depths=(2, 2, 6, 2), num_heads=(6, 10), windowed=False,
                      img_size=224, num_classes=1000, cab_max_d=12)

    seg = load_fixture("official_seg_backbone_small.pt")
    config = infer_release_config(seg["state_dict"])
    assert config["windowed"] is True
    assert config["window_size"] == (14, 7)
    assert config["out_dims"] == tuple(seg["config"]["seg_head_dims"])
    assert config["depths"] == tuple(seg["config"]["depths"])


@pytest.mark.parametrize("wrapper", ["model", "model_ema", "state_dict", "backbone", "module"])
def test_wrapped_checkpoints_load_identically(wrapper: str) -> None:
    fixture = load_fixture("official_custom_cls_cab2.pt")
    state_dict = fixture["state_dict"]
    if wrapper == "backbone":  # mmdet/mmseg layout: prefixed backbone keys next to other modules' keys
        checkpoint = {"state_dict": {**{f"backbone.{k}": v for k, v in state_dict.items()},
                                     "neck.lateral.weight": torch.zeros(3)}}
    elif wrapper == "module":
        checkpoint = {f"module.{k}": v for k, v in state_dict.items()}
    else:
        checkpoint = {wrapper: state_dict, "epoch": 3}
    model = fcaformer.load_official(checkpoint, use_ema=wrapper == "model_ema")
    with torch.no_grad():
        assert relative_error(model(fixture["input"]), fixture["logits"]) < TOLERANCE


def test_timm_pretrained_file_overlay() -> None:
    path = shared_path("parity", "official_fcaformer_l1_cls.pt")
    fixture = torch.load(path, weights_only=True)
    model = timm.create_model("fcaformer_l1", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert relative_error(model(fixture["input"]), fixture["logits"]) < TOLERANCE
    # a new classifier keeps the trunk (timm drops the mismatched head) and the pooled features still match
    model = timm.create_model(
        "fcaformer_l1", pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(file=str(path))
    ).eval()
    with torch.no_grad():
        pooled = model.forward_features(fixture["input"]).mean((2, 3))
    assert relative_error(pooled, fixture["pooled_features"]) < TOLERANCE
    assert model.get_classifier().out_features == 5


def test_release_weights_in_windowed_mode_and_other_sizes() -> None:
    """Classification weights drive the windowed trunk (global == windowed when one window covers the grid)."""
    fixture = load_fixture("official_fcaformer_l1_cls.pt")
    global_model = fcaformer.load_official(fixture["state_dict"])
    windowed = fcaformer.load_official(fixture["state_dict"], window_size=(14, 7))
    with torch.no_grad():
        assert relative_error(windowed(fixture["input"]), fixture["logits"]) < TOLERANCE
        other = torch.randn(1, 3, 96, 160)
        assert global_model(other).shape == windowed(other).shape == (1, 1000)
