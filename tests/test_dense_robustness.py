"""``fcaformer detect`` / ``segment`` on damaged data and with user mistakes (issue 11), on the real voc-mini
photos: damaged copies are made in each test's tmp folder (the shared data is only read)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from fcaformer.cli import main as cli_main
from fcaformer.detection import AnnotationError, CocoDetection
from fcaformer.detection.data import check_segmentation
from fcaformer.detection.engine import DetectTrainConfig, draw_detections, train_detector
from fcaformer.detection.inputs import DataCheckError, SampleError, output_stems, palette, probe_image
from fcaformer.segmentation import SegmentationFolder
from fcaformer.segmentation.engine import SegmentTrainConfig, train_segmentor
from tests.conftest import shared_path

SMALL = json.dumps(dict(dims=[32, 64, 96, 128], depths=[1, 1, 2, 1], num_heads=[3, 4]))
# box_score_thresh 0: a barely trained detector still returns detections (with masks) for predict to write
HEADS = json.dumps(dict(fpn_channels=64, box_head_dim=128, mask_head_channels=32, rpn_batch_size_per_image=64,
                        box_batch_size_per_image=64, rpn_post_nms_top_n_test=100, box_detections_per_img=10,
                        box_score_thresh=0.0))
PHOTOS = ("2011_000003", "2011_000006", "2011_000025")


# ------------------------------------------------------------------------------------------------- helpers
def voc_copy(tmp_path: Path) -> Path:
    """A private copy of voc-mini (photos, class label maps, COCO json) that a test may damage."""
    source, root = shared_path("data", "voc-mini"), tmp_path / "voc"
    for folder in ("JPEGImages", "SegmentationClass"):
        shutil.copytree(source / folder, root / folder)
    shutil.copyfile(source / "annotations.json", root / "annotations.json")
    return root


def truncate(path: Path, keep: float = 0.6) -> None:
    """Cut a file short, as an interrupted download or copy does."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def corrupt_png_middle(path: Path) -> None:
    """Damage a PNG's pixel data but keep its header and end marker: only decoding the pixels finds it."""
    data = path.read_bytes()
    start = data.index(b"IDAT")
    path.write_bytes(data[: start + 200] + data[-12:])


def annotations(root: Path) -> dict:
    return json.loads((root / "annotations.json").read_text())


def write_annotations(root: Path, data: dict, name: str = "annotations.json") -> str:
    (root / name).write_text(json.dumps(data))
    return str(root / name)


def detect_train_args(root: Path, ann: str, out: Path, iterations: int = 1, *extra: str) -> list[str]:
    return ["detect", "train", "--data-root", str(root), "--ann", ann, "--out", str(out), "--model", "fcaformer_l1",
            "--backbone-kwargs", SMALL, "--detector-kwargs", HEADS, "--min-size", "128", "--max-size", "192",
            "--iterations", str(iterations), "--batch-size", "2", "--workers", "0", "--checkpoint-every", "1",
            *extra]


def segment_train_args(root: Path, out: Path, iterations: int = 1, *extra: str) -> list[str]:
    return ["segment", "train", "--img-dir", str(root / "JPEGImages"), "--ann-dir", str(root / "SegmentationClass"),
            "--num-classes", "21", "--out", str(out), "--model", "fcaformer_l1", "--backbone-kwargs", SMALL,
            "--decoder-channels", "32", "--decoder-norm", "identity", "--crop-size", "96", "--base-size", "96",
            "--iterations", str(iterations), "--batch-size", "2", "--workers", "0", "--checkpoint-every", "1",
            *extra]


def error_line(capsys) -> str:
    """The captured stderr, checked to be one ``error:`` line (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    return lines[-1]


def train_log(out: Path) -> dict:
    return json.loads((out / "train_log.json").read_text())


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    """A Mask R-CNN checkpoint trained 1 iteration on the clean voc-mini photos."""
    root = shared_path("data", "voc-mini")
    out = tmp_path_factory.mktemp("det") / "run"
    assert cli_main(detect_train_args(root, str(root / "annotations.json"), out)) == 0
    return out / "model.pt"


@pytest.fixture(scope="module")
def segmentor(tmp_path_factory) -> Path:
    """An UperNet checkpoint trained 1 iteration on the clean voc-mini photos, with the VOC class names."""
    root = shared_path("data", "voc-mini")
    out = tmp_path_factory.mktemp("seg") / "run"
    assert cli_main(segment_train_args(root, out, 1, "--class-names", str(root / "class_names.txt"))) == 0
    return out / "model.pt"


# ------------------------------------------------------------------------- 1: truncated and corrupt images
def test_truncated_jpeg_is_named_and_skipped_by_detect_train_and_eval(tmp_path, capsys) -> None:
    """Issue 11.1: was ``OSError: image file is truncated`` mid-run, naming no file."""
    root = voc_copy(tmp_path)
    truncate(root / "JPEGImages" / "2011_000006.jpg")
    ann = str(root / "annotations.json")
    out = tmp_path / "run"
    assert cli_main(detect_train_args(root, ann, out, 1, "--val-ann", ann)) == 0
    printed = capsys.readouterr().out
    assert "1 unreadable images" in printed
    skipped = train_log(out)["skipped"]["when_scanned"]
    assert len(skipped["unreadable images"]) == 1 and "2011_000006.jpg" in skipped["unreadable images"][0]
    with pytest.raises(SampleError, match="2011_000006.jpg: image file is truncated"):
        probe_image(root / "JPEGImages" / "2011_000006.jpg")
    capsys.readouterr()
    assert cli_main(["detect", "eval", "--checkpoint", str(out / "model.pt"), "--data-root", str(root), "--ann", ann,
                     "--json-out", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["images"] == 2
    # issue 23: the summary line says what was left out (it said "COCO AP on 2 images")
    assert "COCO AP on 2 images, 1 skipped (1 when the data was scanned, 0 that failed to load" in \
        capsys.readouterr().out


def test_image_that_fails_to_decode_during_training_is_skipped_and_named(tmp_path) -> None:
    """Issue 11.1, at load time: a PNG whose header and end marker are intact passes the scan; decoding it
    fails during training, which goes on with the other images and names the file."""
    root = voc_copy(tmp_path)
    data = annotations(root)
    image = data["images"][0]
    png = root / "JPEGImages" / "damaged.png"
    Image.open(root / image["file_name"]).save(png)
    corrupt_png_middle(png)
    image["file_name"] = "JPEGImages/damaged.png"
    config = DetectTrainConfig(data_root=str(root), ann_file=write_annotations(root, data), out_dir=str(tmp_path / "r"),
                               variant="fcaformer_l1", backbone_kwargs=json.loads(SMALL),
                               detector_kwargs=json.loads(HEADS), min_size=(128,), max_size=192, iterations=2,
                               batch_size=3, workers=0)
    result = train_detector(config, show_progress=False)
    assert len(result["losses"]) == 2
    [failure] = result["skipped"]["when_loaded"]
    assert "damaged.png" in failure and "truncated" in failure
    assert train_log(tmp_path / "r")["skipped"]["when_loaded"] == [failure]


def test_segmentation_skips_truncated_images_and_corrupt_label_maps(tmp_path, caplog, capsys) -> None:
    """Issue 11.1 for ``segment``: a truncated photo is dropped when the folders are scanned, a label map
    corrupt in the middle when it is loaded; training, its validation and eval all finish."""
    root = voc_copy(tmp_path)
    truncate(root / "JPEGImages" / "2011_000025.jpg")
    corrupt_png_middle(root / "SegmentationClass" / "2011_000006.png")
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert cli_main(segment_train_args(root, out, 2, "--min-usable", "0.3", "--val-img-dir",
                                           str(root / "JPEGImages"), "--val-ann-dir",
                                           str(root / "SegmentationClass"))) == 0
    skipped = train_log(out)["skipped"]
    assert "2011_000025.jpg" in skipped["when_scanned"]["unreadable images or label maps"][0]
    assert len(skipped["when_loaded"]) == 1 and "2011_000006.png" in skipped["when_loaded"][0]
    # 10.3: the dataset's warnings come from the segmentation package
    assert any(r.name == "fcaformer.segmentation.data" and "2011_000025.jpg" in r.getMessage()
               for r in caplog.records)
    assert not any(r.name.startswith("fcaformer.detection") for r in caplog.records)
    capsys.readouterr()
    assert cli_main(["segment", "eval", "--checkpoint", str(out / "model.pt"), "--img-dir", str(root / "JPEGImages"),
                     "--ann-dir", str(root / "SegmentationClass"), "--min-usable", "0.3",
                     "--json-out", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["images"] == 1 and "2011_000006.png" in metrics["skipped_when_loaded"][0]
    # issue 23: one line says how many images were evaluated and how many skipped, and where
    assert ("segmentation (whole) on 1 images, 2 skipped (1 when the data was scanned, 1 that failed to load"
            in capsys.readouterr().out)


def test_too_little_usable_data_stops_before_training(tmp_path, capsys) -> None:
    root = voc_copy(tmp_path)
    for name in PHOTOS[1:]:
        truncate(root / "JPEGImages" / f"{name}.jpg")
    out = tmp_path / "run"
    assert cli_main(detect_train_args(root, str(root / "annotations.json"), out)) == 2
    line = error_line(capsys)
    assert "only 1 of 3 images" in line and "2011_000006.jpg" in line and "--min-usable" in line
    assert not (out / "checkpoints").exists()
    assert cli_main(segment_train_args(root, out)) == 2
    assert "only 1 of 3 images" in error_line(capsys)
    # a threshold the user lowers lets the run go on with what is usable
    assert cli_main(segment_train_args(root, out, 1, "--min-usable", "0.3")) == 0


# ---------------------------------------------------------------------------- 2: malformed segmentations
def test_flat_polygons_are_read_and_malformed_segmentations_skipped(tmp_path, caplog) -> None:
    """Issue 11.2: a flat ``[x, y, ...]`` list crashed pycocotools (``object of type 'float' has no len()``)."""
    root = voc_copy(tmp_path)
    data = annotations(root)
    anns = data["annotations"]
    first = anns[0]
    nested = json.loads(json.dumps(first["segmentation"]))
    first["segmentation"] = nested[0]  # flat list
    image = next(i for i in data["images"] if i["id"] == first["image_id"])
    height, width = image["height"], image["width"]
    good_rle = mask_utils.encode(np.asfortranarray(np.ones((height, width), np.uint8)))
    extra = [
        {**first, "id": 901, "segmentation": [[10.0, 10.0, 50.0, 50.0]]},  # 4 coordinates: not a polygon
        {**first, "id": 902, "segmentation": [[10.0, 10.0, 50.0, 50.0, 10.0]]},  # odd count
        {**first, "id": 903, "segmentation": [[10.0, "a", 50.0, 50.0, 10.0, 60.0]]},
        {**first, "id": 904, "segmentation": {"size": [height + 1, width], "counts": good_rle["counts"].decode()}},
        {**first, "id": 905, "segmentation": {"size": [height, width], "counts": "PPPP0"}},  # covers too little
        {**first, "id": 906, "segmentation": {"size": [height, width], "counts": [5, 3]}},
        {**first, "id": 907, "bbox": [10.0, float("nan"), 5.0, 5.0], "segmentation": nested},
    ]
    data["annotations"] = anns + extra
    with caplog.at_level(logging.WARNING):
        dataset = CocoDetection(root, write_annotations(root, data))
    assert dataset.skipped == {"annotations with a malformed segmentation": 6,
                               "annotations with a malformed bbox": 1}
    details = " ".join(dataset.skip_details["annotations with a malformed segmentation"])
    assert "annotation 901" in details and "needs an even number, at least 6" in details
    assert "RLE size" in details and "run lengths cover" in details
    assert dataset.flat_polygons == [first["id"]] and "flat list" in caplog.text
    index = [i["id"] for i in dataset.images].index(first["image_id"])
    _, target = dataset[index]
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(nested, height, width)))
    assert torch.equal(target["masks"][0], torch.from_numpy(expected))
    with pytest.raises(ValueError, match="RLE run lengths"):
        check_segmentation({"size": [2, 2], "counts": [1, 1]}, 2, 2)


# ----------------------------------------------------------------------------- 3: every annotation dropped
def test_category_ids_that_match_nothing_are_an_error_naming_them(tmp_path, capsys) -> None:
    """Issue 11.3: was one warning, then training on pure background with exit status 0."""
    root = voc_copy(tmp_path)
    data = annotations(root)
    data["categories"] = [{"id": 0, "name": "person"}]
    for ann in data["annotations"]:
        ann["category_id"] = 1
    out = tmp_path / "run"
    assert cli_main(detect_train_args(root, write_annotations(root, data, "mismatch.json"), out)) == 2
    line = error_line(capsys)
    assert "none of the 12 annotations" in line and "category_id 1 (12 annotations)" in line
    assert "0 ('person')" in line
    assert not (out / "model.pt").exists()
    # part of the annotations lost: a threshold
    data = annotations(root)
    for ann in data["annotations"][:8]:
        ann["category_id"] = 99
    path = write_annotations(root, data, "partial.json")
    with pytest.raises(DataCheckError, match=r"only 4 of 12 annotations .* category_id 99 \(8 annotations\)"):
        CocoDetection(root, path)
    assert len(CocoDetection(root, path, min_usable=0.0).gt_annotations) == 4
    data["annotations"] = []
    with pytest.raises(AnnotationError, match="has no annotations"):
        CocoDetection(root, write_annotations(root, data, "empty.json"))


# ------------------------------------------------------------------------------ 4: one line, exit status 2
@pytest.mark.parametrize("case", ["detect-train", "detect-eval", "detect-predict", "segment-train", "segment-eval",
                                  "segment-predict"])
def test_user_errors_print_one_error_line_and_exit_2(case, tmp_path, capsys, detector, segmentor) -> None:
    """Issue 11.4: every user error printed a 25-40 line traceback first."""
    voc = shared_path("data", "voc-mini")
    images, labels = str(voc / "JPEGImages"), str(voc / "SegmentationClass")
    argv, expected = {
        "detect-train": (["detect", "train", "--data-root", str(voc), "--ann", str(tmp_path / "no.json"),
                          "--out", str(tmp_path / "o")], "annotation file not found"),
        "detect-eval": (["detect", "eval", "--checkpoint", str(segmentor), "--data-root", str(voc), "--ann",
                         str(voc / "annotations.json")], "is a segmentation checkpoint, not a detection one"),
        "detect-predict": (["detect", "predict", "--checkpoint", str(detector), str(tmp_path / "no.jpg"), "--out",
                            str(tmp_path / "p")], "image not found"),
        "segment-train": (["segment", "train", "--img-dir", str(tmp_path / "none"), "--ann-dir", labels,
                           "--num-classes", "21", "--out", str(tmp_path / "o")], "image folder not found"),
        "segment-eval": (["segment", "eval", "--checkpoint", str(tmp_path / "no.pt"), "--img-dir", images,
                          "--ann-dir", labels], "checkpoint not found"),
        "segment-predict": (["segment", "predict", "--checkpoint", str(segmentor), str(tmp_path), "--out",
                             str(tmp_path / "p")], "has no images"),
    }[case]
    assert cli_main(argv) == 2
    assert expected in error_line(capsys)
    with pytest.raises(ValueError if case in ("detect-eval", "segment-predict") else FileNotFoundError):
        cli_main([*argv, "--debug"])


def test_the_command_prints_exactly_one_line_and_the_debug_variable_the_traceback(tmp_path, monkeypatch) -> None:
    command = [sys.executable, "-m", "fcaformer", "segment", "eval", "--checkpoint", str(tmp_path / "x.pt"),
               "--img-dir", str(tmp_path), "--ann-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: checkpoint not found: {tmp_path / 'x.pt'}"]
    monkeypatch.setenv("FCAFORMER_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        cli_main(command[3:])


# ------------------------------------------------------------------------------- 5: resume of nothing
def test_resume_of_a_run_that_does_not_exist_is_an_error(tmp_path, capsys) -> None:
    """Issue 11.5: was "starting from scratch", then a new run with exit status 0."""
    voc = shared_path("data", "voc-mini")
    out = tmp_path / "typo"
    assert cli_main(detect_train_args(voc, str(voc / "annotations.json"), out, 1, "--resume")) == 2
    line = error_line(capsys)
    assert "nothing to resume" in line and str(out) in line
    assert not out.exists()
    out.mkdir()
    assert cli_main(segment_train_args(voc, out, 1, "--resume")) == 2
    assert f"{out} has no training state" in error_line(capsys)


# ---------------------------------------------------------------------- 6: folders and shared file names
def test_predict_takes_folders_and_keeps_inputs_with_the_same_name_apart(tmp_path, detector, segmentor,
                                                                         monkeypatch) -> None:
    """Issue 11.6: a folder failed, and a/x.png, b/x.png overwrote each other's outputs."""
    voc = shared_path("data", "voc-mini", "JPEGImages")
    for folder, photo in (("a", PHOTOS[0]), ("b", PHOTOS[1])):
        (tmp_path / folder).mkdir()
        shutil.copyfile(voc / f"{photo}.jpg", tmp_path / folder / "x.jpg")
    out = tmp_path / "det"
    assert cli_main(["detect", "predict", "--checkpoint", str(detector), str(tmp_path / "a"),
                     str(tmp_path / "b" / "x.jpg"), "--out", str(out), "--score-threshold", "0"]) == 0
    records = json.loads((out / "predictions.json").read_text())
    assert [(r["image"], r["output"]) for r in records] == [("a/x.jpg", "a/x.png"), ("b/x.jpg", "b/x.png")]
    for record in records:  # each drawing is of its own photo
        assert Image.open(out / record["output"]).size == Image.open(tmp_path / record["image"]).size
    assert Image.open(out / "a" / "x.png").size != Image.open(out / "b" / "x.png").size  # 500x338 vs 500x375
    out = tmp_path / "seg"
    assert cli_main(["segment", "predict", "--checkpoint", str(segmentor), str(voc), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*_labels.png")) == [f"{p}_labels.png" for p in PHOTOS]
    assert output_stems([Path("d/x.jpg"), Path("d/x.png")]) == ["x", "x_2"]

    # issue 23: inputs given by a relative path are recorded as given (was "a/x.jpg" for dup/det/a/x.jpg and
    # "img_corrupt/..." for a folder given as mistakes/seg/img_corrupt), failures too
    monkeypatch.chdir(tmp_path)
    for folder in ("dup/det/a", "mistakes/seg/img_corrupt"):
        shutil.copytree(tmp_path / "a", folder)
        Path(folder, "broken.jpg").write_bytes(b"not an image")
    assert cli_main(["detect", "predict", "--checkpoint", str(detector), "dup/det/a", "--out", "det_rel"]) == 0
    assert cli_main(["segment", "predict", "--checkpoint", str(segmentor), "mistakes/seg/img_corrupt", "--out",
                     "seg_rel"]) == 0
    for out, folder in (("det_rel", "dup/det/a"), ("seg_rel", "mistakes/seg/img_corrupt")):
        records = json.loads(Path(out, "predictions.json").read_text())
        assert [r["image"] for r in records] == [f"{folder}/x.jpg", f"{folder}/broken.jpg"]
        assert "error" in records[1] and "error" not in records[0]
    assert output_stems([Path("x.png"), Path("x_labels.png")], (".png", "_labels.png")) == ["x", "x_labels_2"]


# --------------------------------------------------------------------------------------- 7: class names
def test_class_names_reach_eval_tables_and_predict_legends(tmp_path, capsys, detector, segmentor) -> None:
    """Issue 11.7: names were stored but never shown, and a names file of the wrong length was accepted."""
    voc = shared_path("data", "voc-mini")
    images, labels = str(voc / "JPEGImages"), str(voc / "SegmentationClass")
    short = tmp_path / "names.txt"
    short.write_text("\n".join(voc.joinpath("class_names.txt").read_text().split()[:20]))
    assert cli_main(segment_train_args(voc, tmp_path / "o", 1, "--class-names", str(short))) == 2
    assert "has 20 class names but --num-classes is 21" in error_line(capsys)

    assert cli_main(["segment", "eval", "--checkpoint", str(segmentor), "--img-dir", images, "--ann-dir", labels,
                     "--json-out", str(tmp_path / "seg.json")]) == 0
    out = capsys.readouterr().out
    assert "IoU per class" in out and "person" in out and "tv/monitor" in out
    metrics = json.loads((tmp_path / "seg.json").read_text())
    assert metrics["class_names"][15] == "person" and len(metrics["per_class_iou"]) == 21
    assert cli_main(["segment", "predict", "--checkpoint", str(segmentor), f"{images}/{PHOTOS[0]}.jpg", "--out",
                     str(tmp_path / "pred")]) == 0
    assert Image.open(tmp_path / "pred" / "legend.png").size[1] > 20
    [record] = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    names = voc.joinpath("class_names.txt").read_text().split()
    assert set(record["class_fractions"]) <= set(names)
    assert sum(record["class_fractions"].values()) == pytest.approx(1.0, abs=1e-4)

    ann = str(voc / "annotations.json")
    assert cli_main(["detect", "eval", "--checkpoint", str(detector), "--data-root", str(voc), "--ann", ann,
                     "--json-out", str(tmp_path / "det.json")]) == 0
    out = capsys.readouterr().out
    assert "AP per class" in out and "person" in out and "mask AP" in out
    metrics = json.loads((tmp_path / "det.json").read_text())
    assert len(metrics["bbox_per_class_AP"]) == len(metrics["segm_per_class_AP"]) == 20
    with_gt = {a["category_id"] for a in annotations(voc)["annotations"]}
    for cat_id, value in enumerate(metrics["bbox_per_class_AP"], start=1):  # voc-mini's ids are 1..20
        assert (value is None) == (cat_id not in with_gt)
    other = annotations(voc)
    other["categories"] = other["categories"][:6]
    other["annotations"] = [a for a in other["annotations"] if a["category_id"] < 6]
    assert cli_main(["detect", "eval", "--checkpoint", str(detector), "--data-root", str(voc), "--ann",
                     write_annotations(tmp_path, other), "--min-usable", "0"]) == 2
    assert "detects 20 classes" in error_line(capsys)


# ------------------------------------------------------------------------------ 8: a run across resumes
def test_log_curves_and_final_message_cover_the_whole_run_across_resumes(tmp_path, capsys) -> None:
    """Issue 11.8: after a resume the log held only the resumed iterations, the message counted them alone."""
    voc = shared_path("data", "voc-mini")
    out = tmp_path / "run"
    assert cli_main(segment_train_args(voc, out, 2)) == 0
    first = train_log(out)["losses"]
    capsys.readouterr()
    assert cli_main(segment_train_args(voc, out, 4, "--resume")) == 0
    assert "trained 4 iterations (2 in this session, resumed at iteration 2)" in capsys.readouterr().out
    log = train_log(out)
    assert log["iterations"] == 4 and len(log["losses"]) == len(log["lrs"]) == 4
    assert log["losses"][:2] == first and log["resumed_at"] == [2]
    # issue 23: the lr of the first resumed iteration is the 4-iteration schedule's (half the peak, no warm-up),
    # not the 2-iteration one's end (it was 0.0)
    assert log["lrs"][2] == pytest.approx(1e-4 / 2)
    assert Image.open(out / "curves.png").size[0] > 1000
    assert cli_main(segment_train_args(voc, out, 4, "--resume")) == 2
    assert "already done 4 iterations" in error_line(capsys)
    assert cli_main(segment_train_args(voc, out, 6, "--resume", "--decoder-channels", "64")) == 2
    assert "decoder_channels differ" in error_line(capsys)


# ------------------------------------------------------------------------------------ 9: defaults and CPU
@pytest.mark.parametrize("command", ["detect", "segment"])
@pytest.mark.parametrize("action", ["train", "eval", "predict"])
def test_help_shows_the_defaults(command, action, capsys) -> None:
    with pytest.raises(SystemExit):
        cli_main([command, action, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: cpu)" in text or "(default: 1000)" in text
    assert "--debug" in text
    if action == "train":
        assert "(default: fcaformer_l2)" in text and "(default: 0.0001)" in text
        assert "(default: min(50, iterations / 10))" in text
        assert ("(default: 800)" if command == "detect" else "(default: 512x512)") in text


def test_short_runs_leave_warm_up_and_cpu_users_are_told_what_to_set(tmp_path, capsys, caplog) -> None:
    """Issue 11.9: with fewer iterations than the 50 warm-up ones the lr never reached its peak, silently."""
    voc = shared_path("data", "voc-mini")
    assert cli_main(segment_train_args(voc, tmp_path / "a", 3, "--warmup-iters", "50")) == 2
    assert "--warmup-iters 50 must be below --iterations 3" in error_line(capsys)
    config = SegmentTrainConfig(img_dir=str(voc / "JPEGImages"), ann_dir=str(voc / "SegmentationClass"),
                                num_classes=21, out_dir=str(tmp_path / "b"), variant="fcaformer_l1",
                                backbone_kwargs=json.loads(SMALL), decoder_channels=32, decoder_norm="identity",
                                crop_size=(288, 288), base_size=288, scale_range=None, iterations=3, batch_size=2,
                                lr=1e-3, workers=0, device="cpu")
    with caplog.at_level(logging.INFO):
        train_segmentor(config, show_progress=False)
    assert train_log(tmp_path / "b")["lrs"][0] == pytest.approx(1e-3)  # no warm-up in a 3-iteration run
    assert "warm-up 0" in caplog.text and "iterations 1-3" in caplog.text
    assert "--crop-size 256" in caplog.text  # 288 px crops on a CPU: the advice names smaller settings


# ---------------------------------------------------------------------------------- 10: outputs of a run
def test_predictions_json_has_masks_as_coco_rle_and_training_leaves_curves(tmp_path, detector) -> None:
    """Issue 11.10: predictions.json had boxes only; dense training left no curve PNG."""
    assert (detector.parent / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    photo = shared_path("data", "voc-mini", "JPEGImages", f"{PHOTOS[0]}.jpg")
    assert cli_main(["detect", "predict", "--checkpoint", str(detector), str(photo), "--out", str(tmp_path),
                     "--score-threshold", "0"]) == 0
    [record] = json.loads((tmp_path / "predictions.json").read_text())
    assert record["detections"]
    for detection in record["detections"]:
        rle = detection["segmentation"]
        assert rle["size"] == [338, 500] and isinstance(rle["counts"], str)
        mask = mask_utils.decode(rle)
        assert mask.shape == (338, 500) and int(mask.sum()) == int(mask_utils.area(rle))
        x1, y1, x2, y2 = detection["box_xyxy"]
        assert detection["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
        assert detection["label"] != "__background__" and 0.0 <= detection["score"] <= 1.0


def test_segmentation_folder_skips_colour_label_maps_when_scanned(tmp_path, caplog) -> None:
    """Label maps of the wrong mode are skipped and counted when the folders are scanned (they raised when read,
    mid-run), under the segmentation logger."""
    root = voc_copy(tmp_path)
    label = root / "SegmentationClass" / f"{PHOTOS[0]}.png"
    Image.open(label).convert("RGB").save(label)
    with caplog.at_level(logging.WARNING, logger="fcaformer.segmentation.data"):
        dataset = SegmentationFolder(root / "JPEGImages", root / "SegmentationClass", 21)
    assert len(dataset) == 2
    assert dataset.skipped == {"label maps that are not single-channel class indices": 1}
    assert f"{PHOTOS[0]}.png has mode RGB" in caplog.text


# ------------------------------------------------------------------------ issue 23: bad input let through
@pytest.mark.parametrize("case", ["detector-kwargs", "detect-backbone-kwargs", "segment-backbone-kwargs", "set"])
def test_unknown_keys_of_kwargs_options_are_errors_naming_the_valid_ones(case, tmp_path, capsys) -> None:
    """``{"fpn_chanels": 64}`` trained the default 256-channel FPN and stored the typo in the checkpoint; a typo in
    ``--backbone-kwargs`` or ``--set model.kwargs.*`` ended in a TypeError traceback after the data scan."""
    voc = shared_path("data", "voc-mini")
    out = tmp_path / "run"
    argv, typo, valid = {
        "detector-kwargs": (detect_train_args(voc, str(voc / "annotations.json"), out, 1, "--detector-kwargs",
                                              '{"fpn_chanels": 64}'), "fpn_chanels", "fpn_channels"),
        "detect-backbone-kwargs": (detect_train_args(voc, str(voc / "annotations.json"), out, 1, "--backbone-kwargs",
                                                     '{"depth": [1, 1, 2, 1]}'), "depth", "depths"),
        "segment-backbone-kwargs": (segment_train_args(voc, out, 1, "--backbone-kwargs", '{"drop_path": 0.1}'),
                                    "drop_path", "drop_path_rate"),
        "set": (["train", "--output", str(out), "--set", "run.progress=false", "model.kwargs.dimz=[16,16,32,32]"],
                "dimz", "dims"),
    }[case]
    assert cli_main(argv) == 2
    line = error_line(capsys)
    assert f"unknown key {typo}" in line and f"did you mean {valid}?" in line and "valid keys:" in line
    assert not out.exists()  # refused before anything was read or written


def test_detection_labels_are_drawn_on_a_filled_background_in_a_contrasting_colour() -> None:
    """Labels were drawn in the box colour on the photo: unreadable where boxes overlap."""
    image = torch.tensor([0.1, 0.1, 0.6])[:, None, None].expand(3, 120, 200)  # dark blue
    detections = {"boxes": torch.tensor([[40.0, 50.0, 190.0, 110.0]]), "scores": torch.tensor([0.9]),
                  "labels": torch.tensor([7])}
    names = [f"class{i}" for i in range(21)]
    picture = draw_detections(image, detections, names).permute(1, 2, 0).numpy().astype(int)
    label = picture[40:50, 42:90]  # inside the label's place: above the box's top-left corner
    fill = palette(21)[7]  # mid-grey
    filled = (np.abs(label - fill).sum(-1) == 0).mean()
    ink = np.abs(label - fill).sum(-1) > 300  # far from the fill: the text (white on this grey)
    assert filled > 0.5 and ink.mean() > 0.05
    assert (label[ink] > 200).all()  # white text on the mid-grey fill (luminance 128)
