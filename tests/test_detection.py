"""Detection: multi-scale backbones, weight loading (parity fixtures), Mask R-CNN on the real voc-mini photos,
bad-input handling, layer-wise lr decay, crash-safe checkpoints and resume, the ``detect`` CLI."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

import fcaformer
from fcaformer.cli import main as cli_main
from fcaformer.detection import (
    AnnotationError,
    CocoDetection,
    build_backbone,
    faster_rcnn,
    load_backbone_weights,
    mask_rcnn,
)
from fcaformer.detection.engine import DetectTrainConfig, load_detector, train_detector
from fcaformer.detection.training import layer_decay_param_groups, read_task_checkpoint
from fcaformer.errors import CheckpointError
from fcaformer.train.state import list_states
from tests.conftest import shared_path

SMALL = dict(dims=(32, 64, 96, 128), depths=(1, 1, 2, 1), num_heads=(3, 4))
SMALL_HEADS = dict(fpn_channels=64, box_head_dim=128, mask_head_channels=32, rpn_batch_size_per_image=64,
                   box_batch_size_per_image=64, rpn_post_nms_top_n_test=100, box_detections_per_img=20)
TOLERANCE = 1e-5


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def voc() -> tuple[str, str]:
    root = shared_path("data", "voc-mini")
    return str(root), str(root / "annotations.json")


# ------------------------------------------------------------------------------------------------ backbones
@pytest.mark.parametrize("mode", ["windowed", "global", "dense"])
def test_backbone_gives_four_maps_at_strides_4_to_32_for_odd_sizes(mode: str) -> None:
    backbone = build_backbone("fcaformer_l1", mode, **SMALL).eval()
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 100, 150))
    expected_channels = [96, 192, 384, 768] if mode == "dense" else list(SMALL["dims"])
    assert backbone.out_channels == expected_channels
    assert [m.shape[1] for m in maps] == expected_channels
    for i, feature in enumerate(maps):  # every stride-2 step rounds up
        stride = 2 ** (i + 2)
        assert feature.shape[-2:] == (math.ceil(100 / stride), math.ceil(150 / stride))


def test_windowed_trunk_with_release_seg_weights_matches_the_release_dense_backbone() -> None:
    """Release mmseg-style weights into the windowed timm trunk: every trunk tensor loads, only the 1x1
    projections are left over, and trunk maps + the release's projections reproduce the release's outputs
    (including sizes that need window padding)."""
    fixture = torch.load(shared_path("parity", "official_seg_backbone_small.pt"), weights_only=True)
    config = fixture["config"]
    backbone = build_backbone("fcaformer_l1", "windowed", dims=config["dims"], depths=config["depths"],
                              num_heads=config["num_heads"]).eval()
    mmseg_style = {"state_dict": {f"backbone.{k}": v for k, v in fixture["state_dict"].items()},
                   "meta": {"note": "mmseg wraps the model"}}
    report = load_backbone_weights(backbone, mmseg_style)
    assert report.missing == []
    assert sorted(report.unused) == sorted(f"out_proj.{i}.{j}.{p}" for i in range(4)
                                           for j, p in [(0, "weight"), (1, "weight"), (1, "bias")])
    release = fcaformer.load_official(fixture["state_dict"])
    for case in fixture["cases"][1:]:  # 256x320 and 200x300: both need window padding
        with torch.no_grad():
            maps = [proj(m) for proj, m in zip(release.out_proj, backbone(case["input"]), strict=True)]
        for ours, ref in zip(maps, case["features"], strict=True):
            assert relative_error(ours, ref) < TOLERANCE


def test_dense_mode_loads_the_release_dense_checkpoint_in_full() -> None:
    fixture = torch.load(shared_path("parity", "official_seg_backbone_small.pt"), weights_only=True)
    config = fixture["config"]
    backbone = build_backbone("fcaformer_l1", "dense", dims=config["dims"], depths=config["depths"],
                              num_heads=config["num_heads"], out_dims=config["seg_head_dims"]).eval()
    report = load_backbone_weights(backbone, fixture["state_dict"])
    assert report.missing == [] and report.unused == []
    case = fixture["cases"][2]
    with torch.no_grad():
        maps = backbone(case["input"])
    assert all(relative_error(a, b) < TOLERANCE for a, b in zip(maps, case["features"], strict=True))


def test_release_classification_weights_into_windowed_l1_backbone() -> None:
    """At 224 the release's classification grids (14, 7) equal the windows: all trunk tensors load, the
    classifier is reported unused, and with a single window per stage the maps equal the classifier's."""
    fixture = torch.load(shared_path("parity", "official_fcaformer_l1_cls.pt"), weights_only=True)
    backbone = build_backbone("fcaformer_l1", "windowed").eval()
    report = load_backbone_weights(backbone, {"model": fixture["state_dict"]})
    assert report.missing == []
    assert sorted(report.unused) == ["head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight"]
    with torch.no_grad():
        pooled = backbone(fixture["input"])[-1].mean((2, 3))
    assert relative_error(pooled, fixture["pooled_features"]) < TOLERANCE


def test_incompatible_backbone_weights_raise_before_loading() -> None:
    fixture = torch.load(shared_path("parity", "official_custom_cls_cab2.pt"), weights_only=True)
    backbone = build_backbone("fcaformer_l1", "windowed", dims=(32, 64, 96, 128), depths=(1, 2, 5, 3),
                              num_heads=(3, 4))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    # cab_max_d=2 at a 10x10 grid: cross-token tables do not fit 14x14 windows
    with pytest.raises(CheckpointError, match="another shape"):
        load_backbone_weights(backbone, fixture["state_dict"])
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    with pytest.raises(CheckpointError, match="tensors are in the checkpoint"):
        load_backbone_weights(backbone, {"foo.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="choose one of"):
        build_backbone("fcaformer_l0")


# ----------------------------------------------------------------------------------------- model and optim
def test_detectors_train_and_eval_outputs() -> None:
    model = faster_rcnn("fcaformer_l1", 5, backbone_kwargs=SMALL, min_size=128, max_size=160, **SMALL_HEADS)
    images = [torch.rand(3, 120, 150), torch.rand(3, 100, 90)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 80.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    for out, image in zip(outputs, images, strict=True):
        assert out["boxes"].shape[1] == 4 and len(out["scores"]) == len(out["labels"])
        if len(out["boxes"]):  # boxes are mapped back to the input's pixels
            assert float(out["boxes"][:, 2].max()) <= image.shape[2] + 1e-3
    with pytest.raises(ValueError, match="background"):
        mask_rcnn("fcaformer_l1", 1, backbone_kwargs=SMALL)


def test_layer_decay_groups_cover_every_parameter_once_with_decaying_scales() -> None:
    model = mask_rcnn("fcaformer_l1", 3, backbone_kwargs=SMALL, **SMALL_HEADS)
    trunk = model.backbone.body.trunk
    groups = layer_decay_param_groups(model, trunk, weight_decay=0.05, layer_decay=0.95)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    stem, last_block = trunk.stem.conv1.conv.weight, trunk.stages[3].blocks[0].attn.qkv.weight
    # the trunk's group_matcher orders stem < stages/blocks; each step deeper multiplies the lr by 0.95
    trunk_scales = sorted({scale_of[id(p)] for p in trunk.parameters()})
    assert scale_of[id(stem)] == trunk_scales[0] and scale_of[id(last_block)] == trunk_scales[-1]
    assert len(trunk_scales) >= 5
    ratios = [b / a for a, b in zip(trunk_scales, trunk_scales[1:], strict=False)]
    assert ratios == pytest.approx([1 / 0.95] * len(ratios))
    assert trunk_scales[-1] <= 1.0
    assert scale_of[id(model.roi_heads.box_predictor.cls_score.weight)] == 1.0
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.backbone.fpn.inner_blocks[0][0].bias) in no_decay and id(stem) not in no_decay


# -------------------------------------------------------------------------------------------- data checks
def _write_ann(tmp_path, data) -> str:
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_annotation_file_errors_are_clear(tmp_path) -> None:
    root, _ = voc()
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        CocoDetection(root, tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(AnnotationError, match="not valid JSON"):
        CocoDetection(root, bad)
    with pytest.raises(AnnotationError, match="'annotations'"):
        CocoDetection(root, _write_ann(tmp_path, {"images": [], "categories": []}))


def test_bad_boxes_categories_and_images_are_counted_skips(tmp_path, caplog) -> None:
    root, ann_file = voc()
    data = json.loads(Path(ann_file).read_text())
    image0 = data["images"][0]  # 500 x 338
    ann = data["annotations"][0]
    extra = [
        {**ann, "id": 101, "bbox": [600.0, 10.0, 20.0, 20.0]},  # entirely outside the image
        {**ann, "id": 102, "bbox": [10.0, 10.0, 0.0, 30.0]},  # zero width
        {**ann, "id": 103, "category_id": 999},  # unknown category
        {**ann, "id": 104, "bbox": [480.0, 300.0, 100.0, 100.0]},  # partly outside: clipped, kept
    ]
    garbage = tmp_path / "broken.jpg"
    garbage.write_bytes(b"not a jpeg")
    images = [*data["images"],
              {**image0, "id": 50, "file_name": str(garbage)},
              {**image0, "id": 51, "width": 640}]  # size differs from the file
    path = _write_ann(tmp_path, {**data, "images": images, "annotations": data["annotations"] + extra})
    with caplog.at_level(logging.WARNING):
        dataset = CocoDetection(root, path)
    assert dataset.skipped == {"zero-area boxes or boxes outside the image": 2,
                               "annotations with unknown category ids": 1, "unreadable images": 1,
                               "images whose size differs from the annotation": 1}
    assert "unreadable images" in caplog.text
    assert len(dataset) == 3
    _, target = dataset[[i["id"] for i in dataset.images].index(image0["id"])]
    assert len(target["boxes"]) == 3 + 1
    assert target["boxes"][-1].tolist() == [480.0, 300.0, 500.0, 338.0]
    assert target["masks"].shape == (4, 338, 500) and target["masks"].dtype == torch.uint8


def test_voc_mini_targets_match_the_annotations() -> None:
    root, ann_file = voc()
    dataset = CocoDetection(root, ann_file)
    data = json.loads(Path(ann_file).read_text())
    assert dataset.class_names[15] == "person" and len(dataset.class_names) == 21  # _background_ is label 0
    image, target = dataset[0]
    anns = [a for a in data["annotations"] if a["image_id"] == dataset.images[0]["id"]]
    assert image.shape == (3, dataset.images[0]["height"], dataset.images[0]["width"])
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert target["labels"].tolist() == [a["category_id"] for a in anns]
    for mask, box, ann in zip(target["masks"], target["boxes"], anns, strict=True):
        rows, cols = torch.nonzero(mask, as_tuple=True)  # the polygon mask lies inside its box
        assert cols.min() >= box[0] - 1 and cols.max() <= box[2] and rows.min() >= box[1] - 1
        assert abs(int(mask.sum()) - ann["area"]) / ann["area"] < 0.1


# --------------------------------------------------------------------------------------- training on data
def _config(tmp_path, iterations: int, **kwargs) -> DetectTrainConfig:
    root, ann_file = voc()
    return DetectTrainConfig(data_root=root, ann_file=ann_file, out_dir=str(tmp_path / "run"),
                             variant="fcaformer_l1", backbone_kwargs=SMALL, detector_kwargs=SMALL_HEADS,
                             min_size=(160,), max_size=240, iterations=iterations, batch_size=3, lr=1e-3,
                             warmup_iters=1, workers=0, checkpoint_every=2, **kwargs)


def test_mask_rcnn_trains_on_voc_mini_with_falling_loss_and_resumes(tmp_path) -> None:
    first = train_detector(_config(tmp_path, 2), show_progress=False)
    resumed = train_detector(_config(tmp_path, 4, resume=True), show_progress=False)
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    # issue 23: the resumed run trains at its own schedule's lr from its first step (warm-up 1, then linear decay
    # over 3 iterations: 2/3 of the peak at iteration 3), not at the 2-iteration schedule's end (0)
    assert log["lrs"][2] == pytest.approx(1e-3 * 2 / 3)
    # continued at iteration 2; the losses, train_log.json and curves.png cover the whole run (issue 11.8)
    assert resumed["start_iteration"] == 2 and resumed["losses"][:2] == first["losses"]
    losses = resumed["losses"]
    assert len(losses) == 4 and max(losses[-2:]) < min(losses[:2])
    assert log["losses"] == losses and log["resumed_at"] == [2] and (tmp_path / "run" / "curves.png").exists()
    states = [read_task_checkpoint(path, "detection") for path in list_states(tmp_path / "run" / "checkpoints")]
    assert [state["iteration"] for state in states] == [4, 2] and all("optimizer" in state for state in states)
    _, raw = load_detector(tmp_path / "run" / "model.pt")
    assert raw["class_names"][15] == "person" and raw["iteration"] == 4


def test_detect_cli_eval_and_predict(tmp_path, capsys) -> None:
    root, ann_file = voc()
    out = tmp_path / "run"
    assert cli_main(["detect", "train", "--data-root", root, "--ann", ann_file, "--out", str(out),
                     "--model", "fcaformer_l1", "--backbone-kwargs", json.dumps(SMALL),
                     "--detector-kwargs", json.dumps(SMALL_HEADS), "--min-size", "144", "160",
                     "--max-size", "240", "--iterations", "1", "--batch-size", "3", "--workers", "0"]) == 0
    assert cli_main(["detect", "eval", "--checkpoint", str(out / "model.pt"), "--data-root", root,
                     "--ann", ann_file, "--json-out", str(tmp_path / "metrics.json")]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"bbox_AP", "bbox_AP50", "segm_AP"} <= set(metrics)
    assert all(-1.0 <= v <= 1.0 for k, v in metrics.items() if k.startswith(("bbox_AP", "segm_AP")))
    image = str(shared_path("data", "voc-mini", "JPEGImages", "2011_000003.jpg"))
    assert cli_main(["detect", "predict", "--checkpoint", str(out / "model.pt"), image, "--out",
                     str(tmp_path / "pred"), "--score-threshold", "0.0"]) == 0
    from PIL import Image

    drawn = Image.open(tmp_path / "pred" / "2011_000003.png")
    original = Image.open(image)
    assert drawn.size == original.size
    records = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert records[0]["image"] == "JPEGImages/2011_000003.jpg"  # no absolute path in what the project writes
    with pytest.raises(CheckpointError, match="not an fcaformer detection checkpoint"):
        load_detector(shared_path("parity", "official_seg_backbone_small.pt"))
    with pytest.raises(SystemExit):
        cli_main(["detect", "train", "--data-root", root, "--ann", ann_file, "--out", str(out),
                  "--backbone-kwargs", "{not json"])
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.slow
def test_mask_rcnn_overfits_voc_mini(tmp_path) -> None:
    """Bounded over-fit on the three photos: clearly non-trivial box and mask AP on the training images."""
    root, ann_file = voc()
    config = _config(tmp_path, 150, val_ann_file=ann_file)
    config.lr, config.warmup_iters, config.checkpoint_every = 5e-4, 10, 0
    result = train_detector(config, show_progress=False)
    print("overfit metrics", result["metrics"], "loss", result["losses"][0], "->", result["losses"][-1])
    # measured (2-core CPU): box AP 0.92 / AP50 1.0, mask AP 0.58 / AP50 0.83; loss 6.12 -> 0.53
    assert result["metrics"]["bbox_AP"] > 0.5 and result["metrics"]["bbox_AP50"] > 0.7
    assert result["metrics"]["segm_AP"] > 0.3 and result["metrics"]["segm_AP50"] > 0.5
    shutil.rmtree(tmp_path / "run")
