"""Tests of ``fcaformer.analysis`` and ``fcaformer analyze``: hooks leave outputs unchanged, shares are right."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import fcaformer  # noqa: F401  (registers the models)
from fcaformer import FcaFormer, FcaStage
from fcaformer.analysis import (
    AttentionRecorder,
    analyze,
    attention_removed,
    attention_shares,
    collect_images,
    cross_tokens_masked,
    find_fca_blocks,
    load_analysis_model,
    lsfs_replaced,
    measure_cross_ablation,
    measure_lsf_effect,
    query_cell,
)
from fcaformer.analysis.plots import plot_attention_maps, plot_share_heatmap
from fcaformer.analysis.recorder import window_origin, window_query
from fcaformer.cli import main
from fcaformer.errors import CheckpointError
from fcaformer.weights.project import save_model

from .conftest import shared_path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = dict(dims=(16, 32, 64, 64), depths=(1, 1, 4, 2), num_heads=(2, 2), img_size=128, num_classes=10)


def small_hybrid(**kwargs) -> FcaFormer:
    """A tiny hybrid whose attention branches matter (layer scale 1, not 1e-6) and whose attention is not
    uniform (larger qkv weights than the 0.02 init)."""
    model = FcaFormer(**{**SMALL, "ls_init_value": 1.0, **kwargs}).eval()
    with torch.no_grad():
        for _, block in find_fca_blocks(model):
            block.attn.qkv.weight.normal_(0, 0.3)
            if block.merge is not None:
                block.merge.weight.normal_(0, 0.3)
    return model


def small_plain(**kwargs):
    return timm.create_model("fcaformer_l0", img_size=64, embed_dim=64, depth=4, num_heads=2, num_classes=10,
                             **kwargs).eval()


def fused(model):
    fast = pytest.importorskip("fcaformer.fast")
    return fast.fuse_model(model)


# ------------------------------------------------------------------------------------------------- shares
def test_attention_shares_match_a_loop_over_sources():
    probs = torch.rand(2, 3, 5, 7 + 3 * 4).softmax(-1)
    shares = attention_shares(probs, num_regular=7, num_sources=3)
    assert shares.shape == (2, 3, 5, 4)
    expected = [probs[..., :7].sum(-1)] + [probs[..., 7 + 4 * j : 11 + 4 * j].sum(-1) for j in range(3)]
    torch.testing.assert_close(shares, torch.stack(expected, -1))
    torch.testing.assert_close(shares.sum(-1), torch.ones(2, 3, 5))


def test_attention_shares_reject_a_layout_that_does_not_fit():
    with pytest.raises(ValueError, match="equal"):
        attention_shares(torch.rand(1, 1, 4, 4 + 5), num_regular=4, num_sources=2)
    with pytest.raises(ValueError, match="num_sources"):
        attention_shares(torch.rand(1, 1, 4, 6), num_regular=4, num_sources=0)


# ------------------------------------------------------------------------------------ outputs unchanged
CASES = {
    "global": lambda: (small_hybrid(), torch.randn(2, 3, 128, 128)),
    # 96 px: stage-3 grid 6x6 padded to 8x8 = 4 windows of 4x4; stage 4 3x3 padded to 4x4 = 4 windows of 2x2
    "windowed": lambda: (small_hybrid(window_size=(4, 2)), torch.randn(2, 3, 96, 96)),
    "plain_l0": lambda: (small_plain(), torch.randn(2, 3, 64, 64)),
    "fast_global": lambda: (fused(small_hybrid()), torch.randn(2, 3, 128, 128)),
    "fast_windowed": lambda: (fused(small_hybrid(window_size=(4, 2))), torch.randn(2, 3, 96, 96)),
}


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_outputs_unchanged_and_every_block_recorded(case):
    model, images = CASES[case]()
    before = model(images)
    with AttentionRecorder(model, map_images=[0], map_queries=[(0.5, 0.5)]) as recorder:
        during = model(images)
    after = model(images)
    if case.startswith("fast"):
        # With a probe hook the fused attention computes explicit probabilities instead of SDPA: same math,
        # different rounding.
        torch.testing.assert_close(during, before, rtol=1e-4, atol=1e-5)
    else:
        assert torch.equal(during, before)
    assert torch.equal(after, before)  # the hooks are gone afterwards
    summary = recorder.summary()
    assert len(summary) == len(find_fca_blocks(model))
    for block in summary.values():
        att = block["attention"]
        assert att["query_samples"] > 0
        assert sum(att["mean"]) == pytest.approx(1.0, abs=1e-5)
        assert len(att["mean"]) == 1 + block["num_sources"]
        assert (att["cross_share"] > 0) == (block["num_sources"] > 0)
    if "windowed" in case:
        assert {b["attention"]["windows_per_image"] for b in summary.values()} == {4}
        assert recorder.maps and all(capture.map_grid for capture in recorder.maps)
    else:
        assert recorder.maps and not any(capture.map_grid for capture in recorder.maps)
    for capture in recorder.maps:
        torch.testing.assert_close(capture.probs.sum(-1), torch.ones(capture.probs.shape[0]))


@torch.no_grad()
def test_cross_token_bias_steers_the_recorded_shares():
    """An independent handle on the shares: a huge cross-token bias on one source block's tokens must pull all
    attention there; a hugely negative one must leave the cross tokens none."""
    model = small_hybrid()
    blocks = dict((info.name, (info, block)) for info, block in find_fca_blocks(model))
    info, block = blocks["stages.2.blocks.3"]  # 3 source blocks, 4 cross tokens each at 128 px
    bias = torch.full((info.num_heads, info.num_sources, 4), -30.0)
    bias[:, 1] = 30.0
    block.attn.cross_bias.copy_(bias.reshape(block.attn.cross_bias.shape))
    other_info, other = blocks["stages.2.blocks.2"]
    other.attn.cross_bias.fill_(-1e4)
    with AttentionRecorder(model) as recorder:
        model(torch.randn(2, 3, 128, 128))
    summary = recorder.summary()
    steered = summary["stages.2.blocks.3"]["attention"]
    assert steered["mean"][2] > 0.999 and steered["cross_share"] > 0.999
    assert all(share > 0.999 for share in steered["cross_share_per_head"])
    assert summary["stages.2.blocks.2"]["attention"]["cross_share"] < 1e-6
    # value-weighted: the steered block's attention output comes (almost) entirely from cross tokens, the
    # masked block's not at all
    assert steered["cross_output_fraction"] == pytest.approx(1.0, abs=1e-3)
    assert summary["stages.2.blocks.2"]["attention"]["cross_output_fraction"] < 1e-6
    assert steered["value_norm_ratio"] > 0


@torch.no_grad()
def test_windowed_statistics_are_per_image():
    """Batch x windows is unfolded correctly: two images together give the per-image shares of each alone."""
    model = small_hybrid(window_size=(4, 2))
    images = torch.randn(2, 3, 96, 96)
    with AttentionRecorder(model) as together:
        model(images)
    alone = []
    for i in range(2):
        with AttentionRecorder(model) as recorder:
            model(images[i : i + 1])
        alone.append(recorder.accumulators["stages.2.blocks.3"].per_image[0])
    torch.testing.assert_close(together.accumulators["stages.2.blocks.3"].per_image[0], torch.cat(alone))
    per_image = together.summary()["stages.2.blocks.3"]["attention"]["cross_share_per_image"]
    assert per_image == pytest.approx([float(a[0].mean(0)[1:].sum()) for a in alone], abs=1e-6)
    assert not torch.allclose(alone[0], alone[1])  # the images do differ


@torch.no_grad()
def test_attention_maps_are_probabilities_at_the_right_query():
    model = small_hybrid()
    images = torch.randn(3, 3, 128, 128)
    with AttentionRecorder(model, map_images=[2], map_queries=[(0.0, 0.99), (0.5, 0.5)]) as recorder:
        model(images[:2])
        model(images[2:])  # image index 2 arrives in the second batch
    assert {capture.image_index for capture in recorder.maps} == {2}
    capture = next(c for c in recorder.maps if c.block.name == "stages.2.blocks.1")
    assert capture.query == (0, 7) and capture.grid == (8, 8)
    torch.testing.assert_close(capture.probs.sum(-1), torch.ones(2))
    with AttentionRecorder(model, map_images=[0], map_queries=[(0.5, 0.5)], map_blocks=["stages.3.blocks.0"]) as rec:
        model(images[:1])
    assert [c.block.name for c in rec.maps] == ["stages.3.blocks.0"]  # asked for: drawn even without cross tokens
    with pytest.raises(ValueError, match="unknown blocks"):
        AttentionRecorder(model, map_blocks=["stages.9.blocks.0"])
    assert query_cell((0.5, 0.5), (8, 8)) == (4, 4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        query_cell((1.5, 0.2), (8, 8))


def test_window_geometry_by_hand():
    # 6x6 map, windows of 4: padded to 8x8, 2x2 windows; even blocks pad top/left by 2, odd blocks bottom/right
    assert window_query((0.0, 0.0), (6, 6), 4, top_left=True) == (0, (2, 2))
    assert window_origin(0, (6, 6), 4, top_left=True) == (-2, -2)
    assert window_query((0.99, 0.0), (6, 6), 4, top_left=True) == (2, (3, 2))
    assert window_origin(3, (6, 6), 4, top_left=True) == (2, 2)
    assert window_query((0.99, 0.99), (6, 6), 4, top_left=False) == (3, (1, 1))
    assert window_origin(3, (6, 6), 4, top_left=False) == (4, 4)
    # 13x19 map, windows of 14: 1x2 windows, padding 1 on top and 9 on the left; (6, 3) -> padded (7, 12)
    assert window_query((0.5, 0.2), (13, 19), 14, top_left=True) == (0, (7, 12))


@torch.no_grad()
def test_windowed_maps_equal_global_maps_when_one_window_covers_the_map(tmp_path):
    """A window as large as the map (no padding) computes what global attention does: same maps, origin 0."""
    global_model = small_hybrid()
    windowed = small_hybrid(window_size=(8, 4))
    windowed.load_state_dict(global_model.state_dict())
    images = torch.randn(2, 3, 128, 128)
    captured = []
    for model in (global_model, windowed):
        with AttentionRecorder(model, map_images=[1], map_queries=[(0.3, 0.8)]) as recorder:
            model(images)
        captured.append(recorder.maps)
    assert len(captured[0]) == len(captured[1]) == 4
    for flat, window in zip(*captured, strict=True):
        assert window.map_grid == flat.grid and window.origin == (0, 0) and window.query == flat.query
        assert window.source_origins == ((0, 0),) * window.block.num_sources
        torch.testing.assert_close(window.probs, flat.probs)
    figure = plot_attention_maps(torch.rand(3, 128, 128), captured[1], tmp_path / "w.png")
    assert figure.read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------------------------------------------------- LSF
def lsf_stage(lsf: str) -> FcaStage:
    """A bare Fca stage on unit-variance maps: its cross tokens are far larger than LayerNorm's eps (in a
    freshly initialised full model they are ~1e-8 and the eps dominates)."""
    return FcaStage(32, 32, 4, 2, (8, 8), lsf=lsf, ls_init_value=1.0).eval()


@pytest.mark.parametrize(
    ("lsf", "value", "expected"),
    [
        ("post_norm", 3.0, 2 / 3),  # |3 s_hat - s_hat| / |3 s_hat|
        ("release", -1.0, 2.0),  # LN(-s) = -LN(s) when LN's bias is 0
        ("release", 3.0, 0.0),  # LN(3 s) = LN(s) up to LN's eps
    ],
)
@torch.no_grad()
def test_lsf_effect_on_normed_cross_tokens(lsf, value, expected):
    model = lsf_stage(lsf)
    blocks = [block for info, block in find_fca_blocks(model) if info.num_sources]
    for block in blocks:
        block.cross_scale.fill_(value)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    effect = measure_lsf_effect(model, [torch.randn(2, 32, 8, 8)], progress=False)
    assert len(effect["blocks"]) == 3
    for name, entry in effect["blocks"].items():
        assert entry["normed_cross_change"] == pytest.approx(expected, abs=1e-3), name
        if expected:
            assert entry["attention_change"] > 1e-2 and entry["output_change"] > 1e-3
        else:
            assert entry["attention_change"] < 1e-4 and entry["output_change"] < 1e-4
        # unit-variance maps: the cross tokens' variance dwarfs LN's eps, hence LN(3 s) = LN(s) above
        assert entry["cross_token_variance"] > 1e3 * entry["norm_eps"]
    changed = effect["model"]["logits_change"]
    assert (changed > 1e-3) if expected else (changed < 1e-4)
    for key, value_ in model.state_dict().items():  # every LSF restored
        assert torch.equal(value_, state[key]), key


@torch.no_grad()
def test_lsfs_of_one_change_nothing_and_are_restored_after_errors():
    model = small_hybrid(lsf="post_norm")
    effect = measure_lsf_effect(model, [torch.randn(1, 3, 128, 128)], progress=False)
    assert effect["model"]["logits_change"] == 0.0 and effect["model"]["top1_agreement"] == 1.0
    assert all(entry["output_change"] == 0.0 for entry in effect["blocks"].values())
    block = next(block for info, block in find_fca_blocks(model) if info.num_sources)
    block.cross_scale.fill_(2.0)
    with pytest.raises(RuntimeError, match="boom"), lsfs_replaced([block]):
        assert torch.all(block.cross_scale == 1)
        raise RuntimeError("boom")
    assert torch.all(block.cross_scale == 2)


@torch.no_grad()
def test_lsf_effect_without_lsfs_is_empty():
    model = small_hybrid(lsf="none")
    effect = measure_lsf_effect(model, [torch.randn(1, 3, 128, 128)], progress=False)
    assert effect["blocks"] == {} and "logits_change" not in effect["model"]


@torch.no_grad()
def test_masking_cross_tokens_equals_the_network_without_them():
    """Independent check of the ablation: masked cross tokens compute exactly what the cross_attention=False
    network computes with the same (shared) weights."""
    model = small_hybrid()
    plain = FcaFormer(**{**SMALL, "ls_init_value": 1.0, "cross_attention": False}).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected  # the cross-token parameters only exist in the full model
    images = torch.randn(2, 3, 64, 64)  # a grid of 4x4 at the native 8x8: resized biases, same identity
    intact = model(images)
    biases = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("cross_bias")}
    with cross_tokens_masked(model) as count, AttentionRecorder(model) as recorder:
        masked = model(images)
    assert count == 4
    torch.testing.assert_close(masked, plain(images), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(masked, intact, atol=1e-3)
    assert all(b["attention"]["cross_share"] == 0 for b in recorder.summary().values())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in biases.items())  # restored
    result = measure_cross_ablation(model, [images], labels=[0, 1], progress=False)
    expected = ((intact - masked).norm() / intact.norm()).item()
    assert result["output_change"] == pytest.approx(expected, rel=1e-4)
    assert result["top1"] == float((intact.argmax(-1) == torch.tensor([0, 1])).double().mean())
    assert measure_cross_ablation(plain, [images], progress=False) is None
    # removing the attention branch = zero attention layer scale
    import copy

    silent = copy.deepcopy(model)
    for _, block in find_fca_blocks(silent):
        block.ls1.gamma.zero_()
    with attention_removed(model) as count:
        bare = model(images)
    assert count == 6
    torch.testing.assert_close(bare, silent(images))
    expected = ((intact - bare).norm() / intact.norm()).item()
    assert result["output_change_without_attention"] == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------------------- API and CLI
def make_image_folder(root, classes=("a_class", "b_class"), per_class=2):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_collect_images_samples_classes_round_robin(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=("b", "a"), per_class=3)
    images = collect_images([root], num_images=3)
    assert images.labels == ["a", "b", "a"] and images.classes == ["a", "b"]
    assert [p.name for p in images.paths] == ["0.png", "0.png", "1.png"]
    with pytest.raises(FileNotFoundError, match="missing"):
        collect_images([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        collect_images([tmp_path / "empty"])


def test_analyze_api_writes_json_markdown_and_figures(tmp_path):
    root = make_image_folder(tmp_path / "data")
    model = small_hybrid(num_classes=2)
    result = analyze(model, collect_images([root]), img_size=64, batch_size=3, map_images=[1],
                     map_queries=[(0.5, 0.5)], progress=False)
    assert result.images["count"] == 4
    assert result.accuracy is not None and result.accuracy["images"] == 4
    assert len(result.cross_blocks()) == 4
    files = result.save(tmp_path / "out")
    names = {f.name for f in files}
    assert {"analysis.json", "analysis.md", "analysis_share_heatmap.png", "analysis_maps_image1.png"} <= names
    for f in files:
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == PNG_MAGIC
    data = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert data["blocks"]["stages.2.blocks.3"]["source_blocks"] == [0, 1, 2]
    assert data["lsf_effect"]["model"]["top1_agreement"] == 1.0  # LSFs are 1 at init
    assert data["cross_ablation"]["images"] == 4 and data["cross_ablation"]["output_change"] > 0
    assert data["cross_ablation"]["top1"] == data["accuracy"]["top1"]
    markdown = (tmp_path / "out" / "analysis.md").read_text()
    assert "| S3.B3 | 3 |" in markdown and "![analysis_share_heatmap.png]" in markdown
    with pytest.raises(ValueError, match="out of range"):
        analyze(model, collect_images([root]), map_images=[9], progress=False)


def test_plots_reject_missing_captures(tmp_path):
    with pytest.raises(ValueError, match="no attention maps"):
        plot_attention_maps(torch.zeros(3, 8, 8), [], tmp_path / "x.png")
    blocks = {"s.blocks.0": {"stage": "s", "index": 0, "label": "S.B0", "source_blocks": [],
                             "attention": {"mean": [1.0]}}}
    assert plot_share_heatmap(blocks, tmp_path / "h.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_on_project_checkpoints_with_comparison(tmp_path, capsys):
    root = make_image_folder(tmp_path / "data")
    kwargs = {**SMALL, "num_classes": 2, "img_size": 64}
    for name, lsf in (("release", "release"), ("post", "post_norm")):
        save_model(tmp_path / f"{name}.pt", small_hybrid(**kwargs, lsf=lsf), "fcaformer_l1",
                   {**kwargs, "lsf": lsf, "ls_init_value": 1.0}, class_names=["a_class", "b_class"])
    code = main(["analyze", str(tmp_path / "release.pt"), str(tmp_path / "post.pt"), "--images", str(root),
                 "--num-images", "3", "--queries", "0.5,0.5", "--map-images", "0", "--fast", "--no-lsf-effect",
                 "--out", str(tmp_path / "o")])
    assert code == 0
    assert (tmp_path / "o" / "compare_share_by_depth.png").read_bytes()[:8] == PNG_MAGIC
    for name, lsf in (("release", "release"), ("post", "post_norm")):
        data = json.loads((tmp_path / "o" / name / "analysis.json").read_text())
        assert data["model"]["kind"] == "project" and data["model"]["img_size"] == [64, 64]
        assert data["model"]["fused"] and data["cross_ablation"]["images"] == 3 and data["lsf_effect"] is None
        assert data["accuracy"]["label_order"] == "checkpoint class_names"
        assert {p["lsf_placement"] for p in data["parameters"].values()} == {lsf}
        # portable records: paths relative to the image folder, inputs by their last two path components
        assert data["images"]["paths"][:2] == ["a_class/0.png", "b_class/0.png"]
        assert data["images"]["source"] == f"{tmp_path.name}/data"
        assert data["model"]["source"] == f"{tmp_path.name}/{name}.pt"
        assert data["model"]["model"].startswith("fcaformer_l1 with ")
        for written in ("analysis.json", "analysis.md"):
            assert str(tmp_path) not in (tmp_path / "o" / name / written).read_text()


def test_project_checkpoint_brings_its_normalisation(tmp_path):
    kwargs = {**SMALL, "img_size": 64}
    save_model(tmp_path / "m.pt", FcaFormer(**kwargs), "fcaformer_l1", kwargs,
               data_config={"img_size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    loaded = load_analysis_model(tmp_path / "m.pt", window_size=(4, 2))
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.25, 0.25, 0.25) and loaded.img_size == (64, 64)
    assert all(info.windowed for info, _ in find_fca_blocks(loaded.model))


def test_cli_rejects_bad_queries(capsys):
    with pytest.raises(SystemExit):
        main(["analyze", "fcaformer_l1", "--images", ".", "--out", "x", "--queries", "0.5"])
    assert "y,x" in capsys.readouterr().err


def test_cli_reports_bad_inputs_without_a_traceback(tmp_path, capsys):
    code = main(["analyze", str(tmp_path / "missing.pt"), "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "no images" in capsys.readouterr().err  # images are collected first
    make_image_folder(tmp_path / "data")
    code = main(["analyze", str(tmp_path / "missing.pt"), "--images", str(tmp_path / "data"), "--out",
                 str(tmp_path / "o")])
    assert code == 2 and "checkpoint not found" in capsys.readouterr().err


def test_load_analysis_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_analysis_model(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="fcaformer_l1"):
        load_analysis_model("resnet50")
    bogus = tmp_path / "bogus.pt"
    torch.save({"weight": torch.zeros(2)}, bogus)
    with pytest.raises(CheckpointError, match="neither a project checkpoint"):
        load_analysis_model(bogus)
    with pytest.raises(ValueError, match="no FcaStage"):
        AttentionRecorder(torch.nn.Linear(2, 2))
    loaded = load_analysis_model("fcaformer_l0")
    assert loaded.kind == "timm" and not loaded.trained and loaded.img_size == (224, 224)


# ------------------------------------------------------------------------------------- real checkpoint
@torch.no_grad()
def test_parity_checkpoint_on_real_images():
    """The release layout and real images: outputs unchanged, shares add up, block layout as the SPEC says."""
    checkpoint = shared_path("parity", "official_fcaformer_l1_cls.pt")
    images = collect_images([shared_path("data", "imagenette-160", "val")], num_images=2)
    loaded = load_analysis_model(checkpoint)
    assert loaded.kind == "release" and loaded.img_size == (224, 224)
    result = analyze(loaded, images, batch_size=2, map_images=[0], measure_lsf=False, measure_ablation=False,
                     progress=False)
    blocks = result.blocks
    assert [b["num_sources"] for b in blocks.values()] == [0, 1, 2, 3, 4, 5, 0, 1]
    assert blocks["stages.2.blocks.5"]["attention"]["tokens_per_source"] == 16  # ceil(14/4)^2
    assert blocks["stages.3.blocks.1"]["attention"]["tokens_per_source"] == 4  # ceil(7/4)^2
    for block in result.cross_blocks():
        assert 0 < block["attention"]["cross_share"] < 1
    reference = torch.load(checkpoint, weights_only=True)
    with AttentionRecorder(loaded.model):
        logits = loaded.model(reference["input"])
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_release_checkpoint_with_truncated_history():
    """cab_max_d = 2: block i sees only blocks i-2 and i-1; shares are recorded per source accordingly."""
    checkpoint = shared_path("parity", "official_custom_cls_cab2.pt")
    reference = torch.load(checkpoint, weights_only=True)
    loaded = load_analysis_model(checkpoint)
    with AttentionRecorder(loaded.model) as recorder:
        logits = loaded.model(reference["input"])
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-4, atol=1e-4)
    summary = recorder.summary()
    stage3 = [summary[f"stages.2.blocks.{i}"] for i in range(5)]
    assert [b["source_blocks"] for b in stage3] == [[], [0], [0, 1], [1, 2], [2, 3]]
    assert [b["attention"]["tokens_per_source"] for b in stage3[1:]] == [9] * 4  # 10x10 grid -> 3x3 cross
    assert all(len(b["attention"]["mean"]) == 1 + b["num_sources"] for b in stage3)


@torch.no_grad()
def test_release_windowed_backbone_with_padding():
    """The release's dense backbone (windows of 14 and 7, padded at 200x300): outputs unchanged, and the
    windows are unfolded per image."""
    checkpoint = shared_path("parity", "official_seg_backbone_small.pt")
    case = torch.load(checkpoint, weights_only=True)["cases"][2]
    loaded = load_analysis_model(checkpoint)
    assert type(loaded.model).__name__ == "FcaFormerDense"
    with AttentionRecorder(loaded.model) as recorder:
        features = loaded.model(case["input"])
    for got, want in zip(features, case["features"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    summary = recorder.summary()
    # 200x300 input: stage 3 is 13x19 -> 1x2 windows of 14; stage 4 is 7x10 -> 1x2 windows of 7
    assert summary["stages.2.blocks.4"]["attention"]["windows_per_image"] == 2
    assert summary["stages.3.blocks.1"]["attention"]["windows_per_image"] == 2
    assert summary["stages.2.blocks.4"]["attention"]["tokens_per_source"] == 16
