"""The timm contract on every registered model (the kinds of checks timm's own tests/test_models.py runs)."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import get_pretrained_cfg
from timm.models._manipulate import group_parameters

import fcaformer
from fcaformer.models import MODEL_NAMES, PAPER_MODELS, SMALL_ARCHS

# Small enough for 2 CPU cores; 96 px is no model's native size, so grid-sized parameters are interpolated.
INPUT = (2, 3, 96, 96)
HYBRIDS = [name for name in MODEL_NAMES if name != "fcaformer_l0"]
PAPER_HYBRIDS = [name for name in PAPER_MODELS if name != "fcaformer_l0"]


@pytest.fixture(scope="module", params=MODEL_NAMES)
def model_name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_registered_with_timm() -> None:
    assert set(MODEL_NAMES) <= set(timm.list_models("fcaformer_*"))
    # weights are user-supplied files (pretrained_cfg_overlay=dict(file=...)), so the tags have no URL
    assert get_pretrained_cfg("fcaformer_l1.in1k").paper_ids == "arXiv:2211.07198"


def test_forward_backward_every_parameter(model_name: str) -> None:
    model = timm.create_model(model_name, num_classes=7)
    model.train()
    out = model(torch.randn(INPUT))
    assert out.shape == (INPUT[0], 7)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # the attention path is live: the relative-position tables get a non-zero gradient through the resize
    tables = [p for n, p in model.named_parameters() if n.endswith(("rel_pos_table", "cross_bias"))]
    assert tables and all(p.grad.abs().sum() > 0 for p in tables)


def test_default_cfg(model_name: str) -> None:
    model = timm.create_model(model_name).eval()
    cfg = model.pretrained_cfg
    native = SMALL_ARCHS[model_name]["img_size"] if model_name in SMALL_ARCHS else 224
    assert cfg["input_size"] == (3, native, native)
    assert len(cfg["mean"]) == len(cfg["std"]) == 3
    assert cfg["paper_ids"] == "arXiv:2211.07198" and cfg["license"]
    assert 0 < cfg["crop_pct"] <= 1 and cfg["interpolation"] == "bicubic"
    assert ("not a model of the paper" in cfg["license"]) == (model_name in SMALL_ARCHS)
    classifier = model.get_submodule(cfg["classifier"])
    assert classifier is model.get_classifier() and classifier.out_features == cfg["num_classes"] == 1000
    first_conv = model.get_submodule(cfg["first_conv"])
    assert isinstance(first_conv, torch.nn.Conv2d) and first_conv.in_channels == 3
    x = torch.randn(1, *cfg["input_size"])
    with torch.no_grad():
        features = model.forward_features(x)
        if cfg["pool_size"]:
            assert features.shape[-2:] == cfg["pool_size"]
        model.reset_classifier(0)
        pooled = model(x)
        assert pooled.shape == (1, model.num_features)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert torch.allclose(pooled, pre_logits)
        model.reset_classifier(0, "")
        unpooled = model(x)
        assert unpooled.ndim == (4 if cfg["pool_size"] else 3)
    assert get_pretrained_cfg(f"{model_name}.{cfg['tag']}") is not None


def test_features_only(model_name: str) -> None:
    model = timm.create_model(model_name, features_only=True).eval()
    x = torch.randn(INPUT)
    with torch.no_grad():
        maps = model(x)
    assert len(maps) == len(model.feature_info.channels())
    for feature, channels, reduction in zip(maps, model.feature_info.channels(), model.feature_info.reduction()):
        assert feature.shape[:2] == (INPUT[0], channels)
        assert feature.shape[-2:] == (-(-INPUT[2] // reduction), -(-INPUT[3] // reduction))
    if model_name in HYBRIDS:
        assert model.feature_info.reduction() == [4, 8, 16, 32]
        subset = timm.create_model(model_name, features_only=True, out_indices=(1, 3)).eval()
        assert subset.feature_info.reduction() == [8, 32]


def test_forward_intermediates_match_forward_features(model_name: str) -> None:
    model = timm.create_model(model_name).eval()
    x = torch.randn(INPUT)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        features = model.forward_features(x)
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert torch.allclose(final, features)
    assert len(only) == 2 and all(torch.equal(a, b) for a, b in zip(only, intermediates[-2:]))
    if model_name in HYBRIDS:
        assert torch.allclose(intermediates[-1], features)
    else:  # plain: intermediates are un-normed patch maps; the last one normed equals the final patch tokens
        patches = model.norm(intermediates[-1].flatten(2).transpose(1, 2))
        assert torch.allclose(patches, features[:, 1:], atol=1e-6)
    kept = model.prune_intermediate_layers(indices=(0, 1))
    assert kept == [0, 1]
    with torch.no_grad():
        pruned = model.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(pruned, intermediates[:2]))


def test_grad_checkpointing_same_outputs_and_grads(model_name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=3, drop_path_rate=0.0)
    x = torch.randn(INPUT)
    reference = model(x)
    reference.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    assert torch.allclose(out, reference, atol=1e-6)
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, grads[name], atol=1e-6, rtol=1e-4), name


def test_param_groups_and_no_weight_decay(model_name: str) -> None:
    model = timm.create_model(model_name)
    names = {n for n, _ in model.named_parameters()}
    no_decay = model.no_weight_decay()
    assert no_decay and no_decay <= names
    groups = group_parameters(model, model.group_matcher())
    grouped = [n for members in groups.values() for n in members]
    assert sorted(grouped) == sorted(names)
    assert len(groups) > 3  # stem, blocks, head at least


@pytest.mark.parametrize("name", ["fcaformer_l1", "fcaformer_l0"])
def test_constructor_options(name: str) -> None:
    model = timm.create_model(name, in_chans=1, num_classes=4, drop_path_rate=0.3, global_pool="avg").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 80)).shape == (2, 4)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, timm.layers.DropPath)]
    assert max(rates) == pytest.approx(0.3)
    assert rates == sorted(rates)


def test_params_match_spec() -> None:
    from fcaformer.profile import REFERENCE, count_params

    for name in PAPER_HYBRIDS:
        params = count_params(timm.create_model(name)) / 1e6
        assert abs(params / REFERENCE[name][0] - 1) < 0.01, (name, params)
    l0 = count_params(timm.create_model("fcaformer_l0")) / 1e6
    deit = 5.717  # DeiT-Tiny
    assert deit < l0 < 6.0


def test_dense_backbone_for_every_variant() -> None:
    for name in PAPER_HYBRIDS:
        dims = fcaformer.models.ARCHS[name]["dims"]
        backbone = fcaformer.create_dense_backbone(name, out_dims=(8, 16, 24, 32), depths=(1, 1, 2, 1))
        assert backbone.window_size == (14, 7) and backbone.dims == dims
        with torch.no_grad():
            maps = backbone.eval()(torch.randn(1, 3, 100, 70))
        assert [m.shape[1] for m in maps] == [8, 16, 24, 32]
        assert [m.shape[-2:] for m in maps] == [(25, 18), (13, 9), (7, 5), (4, 3)]
    with pytest.raises(ValueError, match="unknown hybrid variant"):
        fcaformer.create_dense_backbone("fcaformer_l9")
