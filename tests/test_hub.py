"""timm hub folders: ``fcaformer convert`` writes them (parity with the authors' outputs through timm's own
loader), and every loader of the project reads them and safetensors files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

import fcaformer
from fcaformer.cli import main as cli_main
from fcaformer.detection.backbone import build_backbone, load_backbone_weights
from fcaformer.files import file_sha256
from fcaformer.train.inference import load_any_model
from fcaformer.weights import load_model
from fcaformer.weights.convert import PARITY_TOLERANCE
from fcaformer.weights.hub import read_hub_folder
from fcaformer.weights.project import save_model
from tests._train_helpers import make_image_folder
from tests.conftest import shared_path


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Path, Path]]:
    """Both classification parity fixtures as release files and the hub folders converted from them."""
    root = tmp_path_factory.mktemp("hub")
    folders = {}
    for name in ("official_fcaformer_l1_cls.pt", "official_custom_cls_cab2.pt"):
        fixture = torch.load(shared_path("parity", name), weights_only=True)
        release = root / name.replace(".pt", ".pth")
        torch.save({"model": fixture["state_dict"]}, release)
        out = root / name.replace(".pt", "_hub")
        assert cli_main(["convert", str(release), str(out)]) == 0
        folders[name] = (fixture, release, out)
    return folders


@pytest.mark.parametrize("name", ["official_fcaformer_l1_cls.pt", "official_custom_cls_cab2.pt"])
def test_timm_local_dir_reproduces_the_release_logits(converted: dict, name: str) -> None:
    fixture, release, out = converted[name]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        logits = model(fixture["input"])
    assert relative_error(logits, fixture["logits"]) < 1e-6  # the authors' outputs
    with torch.no_grad():  # and exactly what the project's release loader computes
        assert torch.equal(logits, fcaformer.load_official(release)(fixture["input"]))
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "fcaformer_l1" and config["num_classes"] == fixture["logits"].shape[1]
    parity = config["fcaformer"]["parity"]
    assert parity["relative_diff"] <= PARITY_TOLERANCE and config["fcaformer"]["source_kind"] == "release checkpoint"
    assert config["fcaformer"]["source_sha256"] == file_sha256(release)
    card = (out / "README.md").read_text()
    assert file_sha256(release) in card and "params" in card and "MACs" in card and "parity" in card


def test_folder_records_the_release_preprocessing_and_architecture(converted: dict) -> None:
    _, _, l1 = converted["official_fcaformer_l1_cls.pt"]
    model = timm.create_model(f"local-dir:{l1}", pretrained=True)
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 224, 224) and data["crop_pct"] == 0.875 and data["crop_mode"] == "center"
    assert data["interpolation"] == "bicubic"
    fixture, _, custom = converted["official_custom_cls_cab2.pt"]
    config = json.loads((custom / "config.json").read_text())
    expected = fixture["config"]
    assert config["model_args"]["dims"] == list(expected["embed_dims"]) and config["model_args"]["cab_max_d"] == 2
    assert timm.create_model(f"local-dir:{custom}", pretrained=True).img_size == (160, 160)


def test_every_loader_reads_folders_and_safetensors(converted: dict, tmp_path: Path) -> None:
    fixture, release, out = converted["official_custom_cls_cab2.pt"]
    x = fixture["input"]
    with torch.no_grad():
        reference = fcaformer.load_official(release)(x)
        for source in (out, f"local-dir:{out}"):
            assert torch.equal(fcaformer.load_official(source)(x), reference)
        assert torch.equal(load_model(out)[0](x), reference)
        loaded = load_any_model(f"local-dir:{out}", fast=False)
        assert loaded.kind == "timm hub folder" and loaded.release_preprocessing
        assert torch.equal(loaded.model(x), reference)
        from safetensors.torch import save_file  # the release's state dict as a bare safetensors file

        bare = tmp_path / "release.safetensors"
        save_file({k: v.contiguous() for k, v in fixture["state_dict"].items()}, bare, metadata={"format": "pt"})
        assert torch.equal(fcaformer.load_official(bare)(x), reference)
    # the detection / segmentation trunk loader: L1's classification weights (224 px: 14x14 and 7x7 grids) into
    # the windowed backbone (windows 14 and 7)
    _, _, l1 = converted["official_fcaformer_l1_cls.pt"]
    report = load_backbone_weights(build_backbone("fcaformer_l1"), f"local-dir:{l1}")
    assert report.loaded > 0 and not report.missing and "head.fc.weight" in report.unused


def test_export_reads_a_hub_folder(converted: dict, tmp_path: Path) -> None:
    _, _, out = converted["official_custom_cls_cab2.pt"]
    target = tmp_path / "custom.ts"
    assert cli_main(["export", "--checkpoint", f"local-dir:{out}", "--format", "torchscript", "--img-size", "160",
                     "-o", str(target)]) == 0
    assert target.is_file()


def test_project_checkpoint_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = timm.create_model("fcaformer_atto", num_classes=3).eval()
    data_config = {"img_size": 32, "crop_pct": 1.0, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    source = save_model(tmp_path / "model.safetensors", model, "fcaformer_atto", {"num_classes": 3, "img_size": 32},
                        class_names=["cat", "dog", "owl"], data_config=data_config)
    assert cli_main(["convert", str(source), str(tmp_path / "hub"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source_kind"] == "project checkpoint" and report["relative_diff"] == 0.0
    assert report["architecture"] == "fcaformer_atto" and report["img_size"] == 32
    raw = read_hub_folder(tmp_path / "hub")
    assert raw["class_names"] == ["cat", "dog", "owl"] and raw["model_name"] == "fcaformer_atto"
    assert {k: raw["data_config"][k] for k in data_config} == data_config
    timm_model = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True)
    assert timm_model.pretrained_cfg["label_names"] == ["cat", "dog", "owl"]
    assert tuple(timm.data.resolve_data_config({}, model=timm_model)["mean"]) == (0.5, 0.5, 0.5)


def test_convert_errors_are_one_line_and_leave_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    model = timm.create_model("fcaformer_atto", num_classes=3).eval()
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)

    def fails(*args: str) -> str:
        assert cli_main(["convert", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    assert "--model NAME" in fails(str(bare), str(tmp_path / "out"))
    assert "not found" in fails(str(tmp_path / "missing.pth"), str(tmp_path / "out"))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    assert "safetensors" in fails(str(broken), str(tmp_path / "out"))
    dense = tmp_path / "dense.pth"
    torch.save(torch.load(shared_path("parity", "official_seg_backbone_small.pt"), weights_only=True)["state_dict"],
               dense)
    assert "dense-prediction backbone" in fails(str(dense), str(tmp_path / "out"))
    # with --model the bare state dict converts; a second time the folder is there already
    assert cli_main(["convert", str(bare), str(tmp_path / "out"), "--model", "fcaformer_atto"]) == 0
    capsys.readouterr()
    assert "already exists" in fails(str(bare), str(tmp_path / "out"), "--model", "fcaformer_atto")
    monkeypatch.setattr("fcaformer.weights.convert.PARITY_TOLERANCE", -1.0)  # any difference now fails the parity check
    assert "nothing written" in fails(str(bare), str(tmp_path / "out2"), "--model", "fcaformer_atto")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.pth", "broken.safetensors", "dense.pth", "out"]
    assert cli_main(["convert", str(bare), str(tmp_path / "out"), "--model", "fcaformer_atto", "--overwrite"]) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_eval_and_predict_read_a_hub_folder(converted: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, release, out = converted["official_custom_cls_cab2.pt"]
    root = make_image_folder(tmp_path / "data", [f"c{i}" for i in range(10)], 2, size=48)
    reports = []
    for source in (str(release), f"local-dir:{out}"):
        assert cli_main(["eval", source, "--data", str(root), "--json"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[1]["kind"] == "timm hub folder" and reports[1]["top1"] == reports[0]["top1"]
    assert reports[1]["loss"] == pytest.approx(reports[0]["loss"], rel=1e-6)
    assert reports[1]["preprocessing"] == reports[0]["preprocessing"]
    image = next((root / "val" / "c0").glob("*.png"))
    assert cli_main(["predict", str(image), "--model", str(out), "--json", "--topk", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["top"]) == 2
