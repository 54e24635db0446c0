"""Names that say what was built: the small registered variants, the presets that train them, and the label every
log line, plot title, result file and checkpoint carries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import yaml

from fcaformer.models import SMALL_ARCHS
from fcaformer.models.names import describe_model
from fcaformer.profile import count_params
from fcaformer.train import engine, list_presets, load_config, train
from fcaformer.weights import load_model
from tests._train_helpers import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
FEMTO = {"dims": [32, 64, 96, 128], "depths": [1, 1, 4, 2], "num_heads": [3, 4]}


@pytest.mark.parametrize(
    ("name", "kwargs", "label"),
    [
        ("fcaformer_l1", {"num_classes": 10, "img_size": 96, "drop_path_rate": 0.1}, "fcaformer_l1"),
        ("fcaformer_l1", FEMTO, "fcaformer_femto"),  # what the presets trained before the small variants existed
        ("fcaformer_l1", {**FEMTO, "cross_attention": False}, "fcaformer_femto with cross_attention=False"),
        ("fcaformer_l1", {"dims": [16, 16, 32, 32]}, "fcaformer_l1 with dims=(16, 16, 32, 32)"),
        ("fcaformer_l2", {"num_heads": [0, 0, 10, 15], "window_size": [14, 7]},
         "fcaformer_l2 with window_size=(14, 7)"),
        ("fcaformer_l0", {"depth": 3}, "fcaformer_l0 with depth=3"),
        ("vit_tiny_patch16_224", {"patch_size": 8, "num_classes": 10}, "vit_tiny_patch16_224 with patch_size=8"),
    ],
)
def test_describe_model(name: str, kwargs: dict, label: str) -> None:
    assert describe_model(name, kwargs) == label


def test_small_variants_are_registered_with_their_native_size() -> None:
    for name, arch in SMALL_ARCHS.items():
        model = timm.create_model(name)
        assert model.img_size == (arch["img_size"],) * 2 == model.pretrained_cfg["input_size"][1:]
        assert model.dims == arch["dims"] and model.depths == arch["depths"]
    atto, femto = (count_params(timm.create_model(n, num_classes=10)) for n in ("fcaformer_atto", "fcaformer_femto"))
    assert round(atto / 1e6, 2) == 0.66 and round(femto / 1e6, 2) == 0.98  # the numbers the docs give


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_trains_a_model_named_for_what_it_is(preset: str) -> None:
    config = load_config(preset, ["data.root=/data"])
    assert describe_model(config.model.name, config.model.kwargs) == config.model.name
    expected = {"default": "fcaformer_atto", "imagenette": "fcaformer_femto", "repro": "fcaformer_femto"}
    assert config.model.name == expected.get(preset, config.model.name)


def test_committed_reproduction_checkpoint_is_the_papers_l1() -> None:
    model, checkpoint = load_model(REPO / "docs" / "repro_gpu" / "checkpoints" / "fca_release.safetensors")
    assert describe_model(checkpoint["model_name"], checkpoint["model_kwargs"]) == "fcaformer_l1"
    assert count_params(model) == count_params(timm.create_model("fcaformer_l1", num_classes=10, img_size=128))
    assert checkpoint["metrics"]["val_top1"] > 80  # the run docs/reproduction.md reports


def test_run_folder_and_log_name_the_model_built(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    titles = []
    for plot in ("plot_curves", "plot_confusion"):
        original = getattr(engine, plot)
        monkeypatch.setattr(engine, plot, lambda *a, _f=original, **k: titles.append(k["title"]) or _f(*a, **k))
    out = tmp_path / "run"
    summary = train(load_config("default", [*tiny_overrides(out), "run.progress=true"]))
    label = "fcaformer_atto with depths=(1, 1, 2, 1), dims=(16, 16, 32, 32), num_heads=(1, 1)"
    assert summary["model"] == label
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == label and results["model_name"] == "fcaformer_atto"
    _, checkpoint = load_model(out / "model.pt")
    assert checkpoint["model_label"] == label
    assert checkpoint["params"] == results["params"] and checkpoint["macs"] == results["macs"] > 0
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["name"] == "fcaformer_atto"
    described = f"{label}: {results['params'] / 1e6:.2f} M params, {results['macs'] / 1e6:.1f} MMACs at 32px"
    assert described in capsys.readouterr().out
    assert len(titles) == 2 and all(title.startswith(described) for title in titles)
