"""Forward cross attention added to timm ViTs and Swins (fcaformer.add_forward_cross_attention): identity at
conversion on real images, gradients of the new parts, equivalence with fcaformer_l0, the timm interface,
torch.compile, ONNX export and the training CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch

import fcaformer
from benchmarks.any_vit_fca import compare_predictions
from fcaformer import add_forward_cross_attention
from fcaformer.benchmark import randomize_weights_
from fcaformer.cli import main as cli_main
from fcaformer.deploy import onnx_bytes, onnx_session
from fcaformer.export import check_onnx
from fcaformer.layers import FcaBlock
from fcaformer.models.any_vit import (
    CLOSED_CROSS_BIAS,
    FcaSwinTransformer,
    FcaVisionTransformer,
    calibrate_,
)
from fcaformer.train import load_config
from fcaformer.train.data import ImageDataset, build_transforms, eval_loader
from fcaformer.train.datasets import load_image_lists
from fcaformer.train.engine import CALIBRATION_IMAGES
from fcaformer.train.precise_bn import calibration_loader
from fcaformer.weights import convert_to_hub, load_model
from fcaformer.weights.project import save_model
from tests._train_helpers import TINY_MODEL, tiny_overrides
from tests.conftest import shared_path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "any_vit"
# Small configurations of the two families at 64 px (no padding to the Swin windows; a shifted stage-1 block).
VIT = dict(img_size=64, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=10)
SWIN = dict(img_size=64, embed_dim=32, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=8, num_classes=10)
BASES = {"vit": ("vit_tiny_patch16_224", VIT), "swin": ("swin_tiny_patch4_window7_224", SWIN)}


def _base(family: str, **extra) -> torch.nn.Module:
    name, kwargs = BASES[family]
    return timm.create_model(name, **{**kwargs, **extra}).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _attention_maps(model: torch.nn.Module, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per Fca block with cross tokens, in eval mode: the attention ``(B, heads, N, .)`` on the block's own tokens
    and on the cross tokens (read from the attention probes)."""
    maps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def probe(count: int):
        return lambda module, args, probs: maps.append((probs[..., :-count], probs[..., -count:]))

    hooks = [m.attn.attn_probe.register_forward_hook(probe(m.attn.cross_bias.shape[-1])) for m in model.modules()
             if isinstance(m, FcaBlock) and m.attn.cross_bias is not None]
    with torch.no_grad():
        model.eval()(images)
    for hook in hooks:
        hook.remove()
    return maps


# ------------------------------------------------------------------------------------- identity on real images
@pytest.fixture(scope="module")
def val_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """1,000 Imagenette val images (100 per class) at 64 px, as the committed models were evaluated."""
    config = load_config("repro", [f"data.root={shared_path('data', 'imagenette-160')}", "data.img_size=64",
                                   "data.val_per_class=100", "data.verify_images=false"])
    _, val = load_image_lists(config.data)
    return list(eval_loader(ImageDataset(val, build_transforms(config)[1]), 250, 0))


@pytest.fixture(scope="module", params=["vit", "swin"])
def trained(request) -> tuple[str, torch.nn.Module]:
    """A model trained on Imagenette by benchmarks/any_vit_fca.py (committed fp16 checkpoint)."""
    model, _ = load_model(DOCS / f"{request.param}_imagenette64.safetensors")
    return request.param, model.eval()


def test_conversion_keeps_a_trained_models_predictions(trained, val_batches) -> None:
    family, model = trained
    converted = add_forward_cross_attention(model)
    assert isinstance(converted, FcaVisionTransformer if family == "vit" else FcaSwinTransformer)
    assert sum(len(targets) for _, targets in val_batches) == 1000
    change = compare_predictions(model, converted, val_batches)
    assert change["top1_agreement"] >= 99.9 and change["max_relative_logit_change"] < 1e-3, change


def test_new_parts_receive_gradients_that_adamw_turns_into_full_steps(trained, val_batches) -> None:
    """At conversion the cross tokens are almost shut out, yet every new part gets a gradient above AdamW's eps
    (1e-8), so AdamW moves it by about the lr per step: after 5 steps on real images the cross-token biases moved
    by several lr and the cross tokens' share of the attention changed in every block."""
    family, model = trained
    images, targets = val_batches[0]
    images, targets = images[:64], targets[:64]
    # LSFs after the cross-token LayerNorm: in the release's placement (before it) they are inert by design
    converted = add_forward_cross_attention(model, lsf="post_norm", calibration_images=images).train()
    torch.nn.functional.cross_entropy(converted(images), targets).backward()
    # the patch tokens of a class-token ViT's last block reach no output: its enhance conv rightly gets no gradient
    last = f"blocks.blocks.{len(converted.blocks.blocks) - 1}." if family == "vit" else None
    new = {n: p for n, p in converted.named_parameters()
           if any(key in n for key in ("cross_bias", "cross_scale", "norm_cross", "merge", "enhance"))
           and not (last and n.startswith(last) and ".enhance." in n)}
    for part in ("attn.cross_bias", "cross_scale", "norm_cross.weight", "norm_cross.bias", "merge.weight",
                 "enhance.conv.weight", "enhance.bn.weight", "enhance.bn.bias"):
        assert any(n.endswith(part) for n in new), part
    assert all(param.grad is not None and param.grad.abs().max() > 0 for param in new.values())
    for part in ("cross_bias", "cross_scale", "norm_cross", "merge", "enhance"):
        # each kind's mean |gradient| is above AdamW's eps (1e-8): its steps are at least half the lr
        grads = torch.cat([p.grad.abs().flatten() for n, p in new.items() if part in n])
        assert grads.mean() > 1e-8, (part, grads.mean())
    lr = 1e-3
    optimizer = torch.optim.AdamW(converted.parameters(), lr=lr, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in new.items()}
    start = torch.stack([cross.sum(-1).mean() for _, cross in _attention_maps(converted, images)])
    for _ in range(5):
        optimizer.step()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(converted.train()(images), targets).backward()
    # not damped by eps: the cross-token biases moved by about the lr per step (less the steps that turned back;
    # a gradient 10x below eps would move them by 0.5 lr in all), and with them the attention
    moved = torch.cat([(new[n] - before[n]).abs().flatten() for n in new if n.endswith("cross_bias")])
    assert moved.median() > 1.5 * lr, moved.median()
    end = torch.stack([cross.sum(-1).mean() for _, cross in _attention_maps(converted, images)])
    assert start.max() < 1e-3 and ((end - start).abs() / start).min() > 0.05, (start, end)


def test_calibration_closes_every_cross_token_for_every_query_of_its_images(trained, val_batches) -> None:
    """On the calibration images no query gives its cross tokens together more than exp(-8) of the attention its
    own tokens get (measured through the attention probes)."""
    _, model = trained
    images = val_batches[0][0][:128]
    converted = calibrate_(add_forward_cross_attention(model), images)
    worst = [(cross.sum(-1) / own.sum(-1)).max().item() for own, cross in _attention_maps(converted, images)]
    assert worst and max(worst) < 1.5 * torch.exp(torch.tensor(CLOSED_CROSS_BIAS)).item(), worst


def test_calibrated_enhance_keeps_the_function_in_training_mode(val_batches) -> None:
    """Uncalibrated, the enhance BatchNorms standardise every channel in training mode; calibrated on training
    images, a converted model in training mode computes what its base does (dropout and drop-path are off)."""
    model, _ = load_model(DOCS / "vit_imagenette64.safetensors")
    images = val_batches[0][0][:128]
    with torch.no_grad():
        reference = model.train()(images)
        raw = add_forward_cross_attention(model).train()(images)
        calibrated = add_forward_cross_attention(model, calibration_images=images).train()(images)
    assert _rel(raw, reference) > 0.1 and _rel(calibrated, reference) < 1e-3, (_rel(raw, reference),
                                                                                 _rel(calibrated, reference))


@pytest.mark.parametrize("options", [
    dict(class_token=False, global_pool="avg", reg_tokens=4, no_embed_class=True, init_values=0.1),
    dict(dynamic_img_size=True, qkv_bias=False, pre_norm=True),
])
def test_vit_variants_keep_their_function(options: dict) -> None:
    """Register tokens without a class token, layer scale, no qkv bias, a pre-norm, any input size: with the
    cross tokens shut (a bias of -50) the converted model is its base, up to the repeated LayerNorm's eps."""
    base = randomize_weights_(_base("vit", **options))
    converted = add_forward_cross_attention(base, cross_bias_init=-50.0)
    size = 80 if options.get("dynamic_img_size") else 64
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert _rel(converted(x), base(x)) < 1e-5


# ---------------------------------------------------------------------------------------------- fcaformer_l0
def test_deit_tiny_converts_to_fcaformer_l0() -> None:
    """One implementation, two ways to reach it: the converted deit_tiny_patch16_224 has fcaformer_l0's
    structure and parameter count, and with L0's weights (all away from their init) L0's outputs."""
    l0 = randomize_weights_(timm.create_model("fcaformer_l0"))
    converted = add_forward_cross_attention(timm.create_model("deit_tiny_patch16_224")).eval()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(converted) == count(l0) == 5_859_304
    shapes = {k.replace("head.fc.", "head."): v.shape for k, v in l0.state_dict().items()}
    assert {k: v.shape for k, v in converted.state_dict().items()} == shapes
    for ours, theirs in zip(converted.blocks.blocks, l0.blocks.blocks):
        assert (ours.num_sources, ours.merge is None, ours.attn.cross_bias.shape if ours.num_sources else None) == \
            (theirs.num_sources, theirs.merge is None, theirs.attn.cross_bias.shape if theirs.num_sources else None)
    converted.load_state_dict({k.replace("head.fc.", "head."): v for k, v in l0.state_dict().items()})
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert _rel(converted(x), l0(x)) <= 1e-5


# ------------------------------------------------------------------------------------------- timm interface
@pytest.mark.parametrize("family", ["vit", "swin"])
def test_timm_interface_is_kept(family: str) -> None:
    extra = {"reg_tokens": 2} if family == "vit" else {}
    base = randomize_weights_(_base(family, **extra))
    converted = add_forward_cross_attention(base).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = converted.forward_features(x)
        assert features.shape == base.forward_features(x).shape
        assert _rel(converted.forward_head(features), converted(x)) < 1e-6
        final, inter = converted.forward_intermediates(x)
        base_final, base_inter = base.forward_intermediates(x)
        assert final.shape == base_final.shape and [t.shape for t in inter] == [t.shape for t in base_inter]
        assert _rel(final, features) < 1e-6
        # the intermediates are the blocks' (ViT) or stages' (Swin) outputs: the last one, normed, is the output
        last = converted.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
        expect = features[:, converted.num_prefix_tokens:] if family == "vit" else features
        assert _rel(last.flatten(2).transpose(1, 2), expect.reshape(2, -1, expect.shape[-1])) < 1e-5
        if family == "vit":
            pairs = converted.forward_intermediates(x, indices=[0], return_prefix_tokens=True, output_fmt="NLC",
                                                    stop_early=True, intermediates_only=True)
            assert pairs[0][0].shape == (2, 64, 64) and pairs[0][1].shape == (2, 3, 64)
    name, kwargs = BASES[family]
    features_only = timm.create_model("fca_any", base=name, features_only=True, **kwargs)
    maps = features_only(x)
    assert [m.shape[1] for m in maps] == features_only.feature_info.channels()
    assert converted.no_weight_decay() >= {n for n, _ in converted.named_parameters() if n.endswith("cross_bias")}
    groups = timm.optim.param_groups_layer_decay(converted, layer_decay=0.8)
    assert sum(len(g["params"]) for g in groups) == len(list(converted.parameters()))
    converted.train()
    torch.manual_seed(0)
    reference = torch.autograd.grad(converted(x).sum(), list(converted.parameters()), allow_unused=True)
    converted.set_grad_checkpointing(True)
    torch.manual_seed(0)
    checkpointed = torch.autograd.grad(converted(x).sum(), list(converted.parameters()), allow_unused=True)
    for a, b in zip(reference, checkpointed):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)


def test_fca_any_entry_point_and_switches() -> None:
    with pytest.raises(ValueError, match="base="):
        timm.create_model("fca_any")
    model = timm.create_model("fca_any", base="vit_tiny_patch16_224", cab_max_d=2, lsf="post_norm", **VIT)
    assert isinstance(model, FcaVisionTransformer) and model.blocks.blocks[2].num_sources == 2
    assert model.blocks.blocks[1].lsf == "post_norm"
    # without pretrained weights: fcaformer_l0's from-scratch initialisation (open cross attention)
    assert all((b.attn.cross_bias == 0).all() for b in model.blocks.blocks[1:])
    kept = add_forward_cross_attention(_base("vit"))  # closed: together like one token with bias -8
    for block in kept.blocks.blocks[1:]:
        assert torch.allclose(block.attn.cross_bias.exp().sum(-1), torch.tensor(math.exp(CLOSED_CROSS_BIAS)))
    plain = add_forward_cross_attention(_base("swin"), cross_attention=False, enhance=False)
    assert all(b.num_sources == 0 and b.merge is None for stage in plain.layers for b in stage.blocks)


def test_unsupported_models_are_refused_with_the_reason() -> None:
    cases = [
        (timm.create_model("resnet18"), "supports timm's VisionTransformer and SwinTransformer"),
        (_base("vit", qk_norm=True), "normalisation"),
        (_base("vit", patch_drop_rate=0.1), "patch_drop_rate=0"),
        (_base("swin", img_size=72), "multiples of the window"),
        (_base("swin", strict_img_size=False), "one img_size"),
    ]
    for model, message in cases:
        with pytest.raises(ValueError, match=message):
            add_forward_cross_attention(model)
    with pytest.raises(ValueError, match="already"):
        add_forward_cross_attention(add_forward_cross_attention(_base("vit")))


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_torch_compile_captures_one_graph(family: str) -> None:
    """Dynamo captures the converted model whole (eager backend: no code generation), training fast path too."""
    model = randomize_weights_(add_forward_cross_attention(_base(family), init="scratch"))
    fcaformer.fast.set_fast_attention(model)
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        assert _rel(torch.compile(model, backend="eager", fullgraph=True)(x), model(x)) < 1e-6


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_onnx_export_matches_pytorch(family: str) -> None:
    model = randomize_weights_(add_forward_cross_attention(_base(family), init="scratch"))
    x = torch.randn(2, 3, 64, 64)
    session = onnx_session(onnx_bytes(model, x))
    assert check_onnx(session, model, [x, torch.randn(3, 3, 64, 64)]) < 1e-4  # measured ~1e-6


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_converted_checkpoint_becomes_a_hub_folder_that_timm_loads(family: str, tmp_path: Path) -> None:
    """``fcaformer convert`` of an ``fca_any`` checkpoint: timm's ``local-dir:`` load builds the converted model
    (not its base) and loads its weights, with the same logits."""
    base_name, kwargs = BASES[family]
    model = randomize_weights_(add_forward_cross_attention(_base(family), init="scratch")).eval()
    save_model(tmp_path / "fca.safetensors", model, "fca_any", {"base": base_name, **kwargs})
    report = convert_to_hub(tmp_path / "fca.safetensors", tmp_path / "hub")
    assert report.relative_diff == 0.0
    loaded = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    assert type(loaded) is type(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ------------------------------------------------------------------------------------------------- training
VIT_CLI = ["model.name=vit_tiny_patch16_224", "model.kwargs.patch_size=4", "model.kwargs.embed_dim=32",
           "model.kwargs.depth=3", "model.kwargs.num_heads=1"]


def _vit_overrides(output: Path, *extra: str) -> list[str]:
    """The training helpers' tiny digits run (4 train / 2 val images per class, 32 px), with a tiny timm ViT."""
    return [o for o in tiny_overrides(output, *VIT_CLI, *extra) if o not in TINY_MODEL]


def test_train_cli_adds_forward_cross_attention_to_a_trained_timm_model(tmp_path: Path, capsys) -> None:
    """Train a timm ViT, then fine-tune it with ``--set model.forward_cross_attention=true``: the run starts from
    the converted trained weights and saves a model that ``load_model`` rebuilds (as ``fca_any``)."""
    source = tmp_path / "source"
    assert cli_main(["train", "--set", *_vit_overrides(source)]) == 0
    out = tmp_path / "fca"
    assert cli_main(["train", "--pretrained", str(source / "model.pt"), "--set",
                     *_vit_overrides(out, "model.forward_cross_attention=true", "model.kwargs.cab_max_d=1",
                                     "optim.lr=1e-9", "optim.min_lr=1e-9",
                                     "optim.warmup_lr=1e-9", "run.precise_bn_images=0")]) == 0
    assert "+ forward cross attention (cab_max_d=1)" in capsys.readouterr().out
    model, raw = load_model(out / "model.pt")
    assert isinstance(model, FcaVisionTransformer) and raw["model_name"] == "fca_any"
    assert raw["model_kwargs"]["base"] == "vit_tiny_patch16_224" and model.blocks.blocks[2].num_sources == 1
    results = json.loads((out / "results.json").read_text())
    assert results["pretrained"]["loaded"] == results["pretrained"]["total"]
    # at lr 1e-9 the run ends where it started: the source converted and calibrated on 256 training images
    base, _ = load_model(source / "model.pt")
    config = load_config("default", _vit_overrides(out))
    train_list, _ = load_image_lists(config.data)
    loader = calibration_loader(ImageDataset(train_list, build_transforms(config)[1]), CALIBRATION_IMAGES,
                                CALIBRATION_IMAGES, 0, config.run.seed)
    expected = add_forward_cross_attention(base, cab_max_d=1, calibration_images=next(iter(loader))[0])
    got = dict(model.named_parameters())  # (the BatchNorm statistics moved with the training batches)
    assert all(torch.allclose(got[k], v, atol=1e-5) for k, v in expected.named_parameters())
    bias = model.blocks.blocks[1].attn.cross_bias  # calibrated: away from the data-free closing
    assert (bias - (CLOSED_CROSS_BIAS - math.log(bias.shape[-1]))).abs().min() > 0.1
    # torchrun's restart command (issue 23) continues the converted run: one more epoch, from its own state
    assert cli_main(["train", "--resume", "auto", "--pretrained", str(source / "model.pt"), "--set",
                     *_vit_overrides(out, "model.forward_cross_attention=true", "model.kwargs.cab_max_d=1",
                                     "optim.lr=1e-9", "optim.min_lr=1e-9",
                                     "optim.warmup_lr=1e-9", "run.precise_bn_images=0", "run.epochs=2")]) == 0
    assert capsys.readouterr().out.startswith("resumed from ")
    resumed, raw = load_model(out / "model.pt")
    assert raw["model_name"] == "fca_any" and json.loads((out / "results.json").read_text())["epochs_done"] == 2
    moved = {k: float((dict(resumed.named_parameters())[k] - v).abs().max()) for k, v in got.items()}
    assert max(moved.values()) < 1e-5, sorted(moved.items(), key=lambda kv: -kv[1])[:5]


def test_train_cli_errors_name_the_problem(tmp_path: Path, capsys) -> None:
    assert cli_main(["train", "--set", *tiny_overrides(tmp_path / "a", "model.forward_cross_atention=true")]) == 2
    assert "unknown key model.forward_cross_atention" in capsys.readouterr().err
    assert cli_main(["train", "--set", *tiny_overrides(tmp_path / "b", "model.forward_cross_attention=true")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "supports timm's VisionTransformer and SwinTransformer" in err


def test_committed_evidence_is_what_the_script_writes_from_its_runs(tmp_path: Path) -> None:
    """docs/any_vit/results.md is benchmarks/any_vit_fca.py's report of results.json, and every Welch comparison in
    it matches scipy on the per-seed top-1 values."""
    from scipy.stats import ttest_ind

    from benchmarks.any_vit_fca import COMPARISONS, write_outputs

    table = json.loads((DOCS / "results.json").read_text())
    write_outputs(table, tmp_path, tmp_path / "figure.png")
    assert (tmp_path / "results.md").read_text() == (DOCS / "results.md").read_text()
    assert (tmp_path / "figure.png").stat().st_size > 10_000
    for model, row in table["models"].items():
        assert set(row["arms"]) == {"plain", "fca", "fca_no_cross"} and all(
            len(arm["top1"]) == 3 for arm in row["arms"].values())
        for first, second in COMPARISONS:
            a, b = row["arms"][first]["top1"], row["arms"][second]["top1"]
            versus = row["versus"][f"{first} - {second}"]
            assert versus["diff"] == pytest.approx(sum(a) / 3 - sum(b) / 3, abs=1e-9)
            if a != b:
                assert versus["p"] == pytest.approx(ttest_ind(a, b, equal_var=False).pvalue), (model, first, second)
