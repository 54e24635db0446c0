"""Clear errors for bad checkpoints, and never a half-loaded model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import fcaformer
from fcaformer.cli import main
from fcaformer.errors import CheckpointError
from fcaformer.files import atomic_torch_save
from fcaformer.models.state_dicts import load_state_dict_strict, resize_grid_parameters
from fcaformer.profile import REFERENCE
from fcaformer.weights import load_model
from fcaformer.weights.project import save_model
from tests.conftest import shared_path

SMALL = dict(dims=(16, 32, 64, 96), depths=(1, 1, 2, 2), num_heads=(2, 3), num_classes=3)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        fcaformer.load_official(tmp_path / "nope.pth")


def test_not_a_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, I am not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read .*notes.txt"):
        fcaformer.load_official(path)


def test_truncated_file(tmp_path: Path) -> None:
    source = shared_path("parity", "official_custom_cls_cab2.pt")
    path = tmp_path / "truncated.pt"
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        fcaformer.load_official(path)


def test_other_architecture(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), path)
    with pytest.raises(CheckpointError, match="not an FcaFormer release checkpoint.*first keys"):
        fcaformer.load_official(path)


def test_incomplete_release_checkpoint_names_the_missing_key() -> None:
    state_dict = dict(torch.load(shared_path("parity", "official_custom_cls_cab2.pt"), weights_only=True)["state_dict"])
    del state_dict["layer_2.blocks.3.s_token_bias"]
    with pytest.raises(CheckpointError, match=r"missing.*layer_2\.blocks\.3\.s_token_bias|stages\.2\.blocks\.3"):
        fcaformer.load_official(state_dict)


def test_mismatch_leaves_model_untouched() -> None:
    model = timm.create_model("fcaformer_l1", **SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = timm.create_model("fcaformer_l1", **{**SMALL, "num_classes": 7}).state_dict()
    other = {k: v + 1 if v.is_floating_point() else v for k, v in other.items()}
    other["unexpected.weight"] = torch.zeros(1)
    del other["stem.conv1.conv.weight"]
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(model, other)
    message = str(info.value)
    assert "1 missing: ['stem.conv1.conv.weight']" in message
    assert "unexpected.weight" in message
    assert "head.fc.weight: checkpoint (7, 96) vs model (3, 96)" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_project_checkpoint_round_trip_and_wrong_format(tmp_path: Path) -> None:
    model = timm.create_model("fcaformer_l1", **SMALL).eval()
    path = save_model(tmp_path / "run" / "model.pt", model, "fcaformer_l1", SMALL, class_names=["a", "b", "c"])
    loaded, checkpoint = load_model(path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert checkpoint["class_names"] == ["a", "b", "c"]
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temp files
    atomic_torch_save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an fcaformer project checkpoint"):
        load_model(tmp_path / "other.pt")


def test_profile_cli_matches_spec(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--json", "--models", "fcaformer_l1", "fcaformer_l2", "fcaformer_l0"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    for name in ("fcaformer_l1", "fcaformer_l2"):
        assert abs(rows[name]["params_m"] / REFERENCE[name][0] - 1) < 0.01
        assert abs(rows[name]["gmacs"] / REFERENCE[name][1] - 1) < 0.01
    assert 5.7 < rows["fcaformer_l0"]["params_m"] < 6.0


@pytest.mark.slow
def test_profile_cli_every_variant_within_one_percent(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--json"]) == 0
    for row in json.loads(capsys.readouterr().out):
        if row["gmacs_diff_pct"] is not None:
            assert abs(row["gmacs_diff_pct"]) < 1 and abs(row["params_diff_pct"]) < 1


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "fcaformer", "--help"], capture_output=True, text=True, check=True)
    assert "profile" in result.stdout


def test_weights_load_into_other_training_sizes_and_windows() -> None:
    """Grid-sized parameters resized at load time compute exactly what run-time resizing computes."""
    small = dict(dims=(16, 32, 64, 96), depths=(1, 1, 3, 2), num_heads=(2, 3), num_classes=5)
    source = timm.create_model("fcaformer_l1", img_size=64, **small).eval()
    with torch.no_grad():
        for name, param in source.named_parameters():
            if name.endswith(("rel_pos_table", "cross_bias")):
                param.normal_()
            elif name.endswith("cross_scale"):
                param.uniform_(0.5, 1.5)
    target = timm.create_model("fcaformer_l1", img_size=128, **small).eval()
    load_state_dict_strict(target, resize_grid_parameters(source.state_dict(), target))
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    windowed = timm.create_model("fcaformer_l1", img_size=64, window_size=(14, 7), **small).eval()
    load_state_dict_strict(windowed, resize_grid_parameters(source.state_dict(), windowed))
    assert windowed.stages[2].blocks[1].attn.rel_pos_table.shape == (2, 14 * 14)

    plain = dict(embed_dim=48, depth=3, num_heads=2)
    source = timm.create_model("fcaformer_l0", img_size=64, **plain).eval()
    target = timm.create_model("fcaformer_l0", img_size=96, **plain).eval()
    load_state_dict_strict(target, resize_grid_parameters(source.state_dict(), target))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_release_checkpoint_at_another_img_size() -> None:
    path = shared_path("parity", "official_fcaformer_l1_cls.pt")
    reference = fcaformer.load_official(path)
    at_288 = fcaformer.load_official(path, img_size=288)
    via_timm = timm.create_model("fcaformer_l1", pretrained=True, img_size=288,
                                 pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert at_288.stages[2].blocks[0].attn.rel_pos_table.shape == (6, 18 * 18)
    x = torch.randn(1, 3, 288, 288)
    with torch.no_grad():
        expected = reference(x)
        assert torch.allclose(at_288(x), expected, atol=1e-5)
        assert torch.allclose(via_timm(x), expected, atol=1e-5)
