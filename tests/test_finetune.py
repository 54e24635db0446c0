"""Fine-tuning from pretrained weights: every source, head re-initialisation, resizing, refusal of other
architectures, layer-wise lr decay, linear probes, resume, and the CLI's errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

import fcaformer
from fcaformer.cli import main as cli_main
from fcaformer.errors import CheckpointError
from fcaformer.train import DataError, load_config, train
from fcaformer.train.datasets import load_image_lists
from fcaformer.train.engine import Trainer
from fcaformer.weights import read_weights as read_pretrained
from fcaformer.weights.pretrained import load_pretrained
from fcaformer.weights.project import save_model
from tests._train_helpers import TINY_MODEL, tiny_overrides
from tests.conftest import shared_path

TINY = dict(dims=(16, 16, 32, 32), depths=(1, 1, 2, 1), num_heads=(1, 1))


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter and BN statistic away from its initialisation, so that a copy is distinguishable."""
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.rand_like(value) + 0.5 if "running_var" in name else torch.randn_like(value))
    return model.eval()


def _tiny(num_classes: int = 10, img_size: int = 32, **kwargs) -> torch.nn.Module:
    return timm.create_model("fcaformer_l1", num_classes=num_classes, img_size=img_size, **{**TINY, **kwargs})


def _project_checkpoint(path: Path, model: torch.nn.Module, img_size: int = 32, **extra) -> Path:
    kwargs = {**TINY, "num_classes": model.num_classes, "img_size": img_size}
    return save_model(path, model, "fcaformer_l1", kwargs, **extra)


def _trunk_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("head."))


# ---------------------------------------------------------------------------------------------- loading
def test_other_class_count_reinitialises_the_classifier_scaled(tmp_path: Path) -> None:
    source = _randomised(_tiny(10))
    path = _project_checkpoint(tmp_path / "model.pt", source)
    model = _tiny(5)
    fresh = model.head.fc.weight.detach().clone()
    report = load_pretrained(model, path, head_init_scale=0.01)
    assert report.reinitialised == ["head.fc.weight", "head.fc.bias"]
    assert "10 classes, this model 5" in report.reinit_reason and report.kind == "project checkpoint"
    assert report.loaded == report.total - 2 and not report.unused and not report.resized
    assert _trunk_equal(model, source)
    assert torch.equal(model.head.norm.weight, source.head.norm.weight)  # the head's norm is loaded
    torch.testing.assert_close(model.head.fc.weight, fresh * 0.01)  # the fresh init, scaled
    assert "re-initialised 2" in report.summary() and "head.fc.weight" in report.summary()


def test_same_count_other_classes_reinitialises_same_classes_load(tmp_path: Path) -> None:
    source = _randomised(_tiny(3))
    path = _project_checkpoint(tmp_path / "model.pt", source, class_names=["a", "b", "c"])
    other = _tiny(3)
    report = load_pretrained(other, path, class_names=["x", "y", "z"])
    assert report.reinitialised == ["head.fc.weight", "head.fc.bias"] and "are not this dataset's" in \
        report.reinit_reason
    same = _tiny(3)
    report = load_pretrained(same, path, class_names=["a", "b", "c"])
    assert report.reinitialised == [] and report.loaded == report.total
    assert torch.equal(same.head.fc.weight, source.head.fc.weight)


@pytest.mark.parametrize("case", ["deeper", "wider", "no_cross", "other_family"])
def test_another_architecture_is_refused_whole(tmp_path: Path, case: str) -> None:
    if case == "deeper":
        source = _tiny(depths=(1, 1, 3, 1))  # a block the model lacks
    elif case == "wider":
        source = _tiny(dims=(16, 16, 32, 48))  # other shapes
    elif case == "no_cross":
        source = _tiny(cross_attention=False)  # the model's cross-attention tensors are missing
    else:
        source = timm.create_model("resnet10t", num_classes=10)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = _tiny(5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="another architecture") as error:
        load_pretrained(model, path, model_label="the tiny model")
    assert "nothing was loaded" in str(error.value) and "the tiny model" in str(error.value)
    expected = {"deeper": "stages.2.blocks.2", "wider": "of another shape", "no_cross": "missing from the checkpoint",
                "other_family": "missing from the checkpoint"}[case]
    assert expected in str(error.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_grid_sized_parameters_are_resized_to_the_training_size(tmp_path: Path) -> None:
    source = _randomised(_tiny(10, img_size=64))
    path = _project_checkpoint(tmp_path / "model.pt", source, img_size=64)
    model = _tiny(10, img_size=96)
    report = load_pretrained(model, path)
    assert report.resized and all(k.endswith(("rel_pos_table", "cross_bias", "cross_scale")) for k in report.resized)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():  # what the source computes at 96 px (run-time resizing), now with native 96 px grids
        assert torch.equal(model.eval()(x), source(x))


def test_release_checkpoint_into_another_size_and_class_count(tmp_path: Path) -> None:
    fixture = torch.load(shared_path("parity", "official_custom_cls_cab2.pt"), weights_only=True)
    path = tmp_path / "release.pth"
    torch.save({"model": fixture["state_dict"]}, path)
    weights = read_pretrained(path)
    assert weights.kind == "release checkpoint" and weights.model_name == "fcaformer_l1"
    assert weights.model_kwargs["img_size"] == 160 and weights.model_kwargs["cab_max_d"] == 2
    kwargs = {k: v for k, v in weights.model_kwargs.items() if k not in ("img_size", "num_classes")}
    model = timm.create_model("fcaformer_l1", num_classes=4, img_size=128, **kwargs)
    report = load_pretrained(model, weights)
    assert report.kind == "release checkpoint" and report.resized and "10 classes" in report.reinit_reason
    release = fcaformer.load_official(path)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_head(model.forward_features(x), pre_logits=True),
                                   release.forward_head(release.forward_features(x), pre_logits=True),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["safetensors", "state dict", "training state", "hub folder", "local-dir"])
def test_every_source_kind_loads(tmp_path: Path, kind: str) -> None:
    source = _randomised(_tiny(10))
    if kind == "safetensors":
        path = str(_project_checkpoint(tmp_path / "model.safetensors", source))
    elif kind == "state dict":
        from safetensors.torch import save_file

        path = str(tmp_path / "weights.safetensors")  # a bare file, as other tools write them
        save_file(source.state_dict(), path, metadata={"format": "pt"})
    elif kind == "training state":
        config = load_config("default", tiny_overrides(tmp_path / "run", "run.epochs=1"))
        train(config)
        path = str(sorted((tmp_path / "run" / "checkpoints").glob("state-*.pt"))[-1])
        state = torch.load(path, weights_only=True)
        source = _tiny(10)
        source.load_state_dict(state["model"])
    else:
        assert cli_main(["convert", str(_project_checkpoint(tmp_path / "model.pt", source)),
                         str(tmp_path / "hub")]) == 0
        path = ("local-dir:" if kind == "local-dir" else "") + str(tmp_path / "hub")
    model = _tiny(10)
    report = load_pretrained(model, path)
    assert report.loaded == report.total and _trunk_equal(model, source)
    assert report.sha256 and len(report.sha256) == 64


def test_hf_hub_names_are_handed_to_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    create = timm.create_model

    def fake_create(name: str, pretrained: bool = False, **kwargs):  # stands in for timm's download
        built.append((name, pretrained))
        return _randomised(create("fcaformer_l1", num_classes=10, img_size=32, **TINY))

    monkeypatch.setattr(timm, "create_model", fake_create)
    weights = read_pretrained("hf-hub:someone/fcaformer-tiny")
    assert built == [("hf-hub:someone/fcaformer-tiny", True)]
    assert weights.kind == "hf-hub model" and weights.label == "hf-hub:someone/fcaformer-tiny"
    monkeypatch.setattr(timm, "create_model", create)
    report = load_pretrained(_tiny(10), weights)
    assert report.loaded == report.total

    def offline(name: str, pretrained: bool = False, **kwargs):
        raise OSError("cannot reach the Hugging Face Hub\n(a long traceback-like explanation)")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(CheckpointError, match=r"^timm could not load hf-hub:someone/x: cannot reach the Hugging "
                                              r"Face Hub$"):
        read_pretrained("hf-hub:someone/x")


# ---------------------------------------------------------------------------------------------- training
def test_data_classes_selects_and_renumbers() -> None:
    config = load_config("default", ["data.classes=[7, '3']", "data.train_per_class=4", "data.val_per_class=2"])
    train_list, val_list = load_image_lists(config.data)
    assert train_list.class_names == val_list.class_names == ["7", "3"]
    assert sorted({label for _, label in train_list.samples}) == [0, 1] and len(train_list) == 8
    with pytest.raises(DataError, match="no class '12'"):
        load_image_lists(load_config("default", ["data.classes=[1, 12]"]).data)


def _pretrained_digits(tmp_path: Path) -> Path:
    """A tiny model trained briefly on digits 0-4 (its model.pt)."""
    out = tmp_path / "pre"
    train(load_config("default", tiny_overrides(out, "data.classes=[0,1,2,3,4]")))
    return out / "model.pt"


def test_layer_decay_groups_follow_the_group_matcher(tmp_path: Path) -> None:
    config = load_config("default", tiny_overrides(tmp_path / "run", "optim.layer_decay=0.5"))
    trainer = Trainer(config)
    scales = {}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for group in trainer.optimizer.param_groups:
        for param in group["params"]:
            scales[names[id(param)]] = group["lr_scale"]
    # TINY_MODEL (depths 1, 1, 2, 1): the stem, then one layer per block (a stage's downsample joins its first
    # block, as in timm's ConvNeXt), then the head at full lr: 7 layers
    assert scales["head.fc.weight"] == scales["head.norm.weight"] == 1.0
    assert scales["stages.3.blocks.0.attn.qkv.weight"] == scales["stages.3.downsample.conv1.conv.weight"] == 0.5
    assert scales["stages.2.blocks.1.mlp.fc1.weight"] == 0.25
    assert scales["stages.2.blocks.0.mlp.fc1.weight"] == scales["stages.2.downsample.conv1.conv.weight"] == 0.125
    assert scales["stem.conv1.conv.weight"] == 0.5 ** 6
    trainer.scheduler.step_update(1)  # timm's scheduler applies the scale: the stem trains at a fraction
    lrs = {g["lr_scale"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs[0.5 ** 6] == pytest.approx(lrs[1.0] * 0.5 ** 6) and lrs[1.0] > 0


def test_linear_probe_trains_only_the_classifier(tmp_path: Path) -> None:
    pretrained = _pretrained_digits(tmp_path)
    config = load_config("default", tiny_overrides(
        tmp_path / "probe", "data.classes=[5,6,7,8,9]", f"model.pretrained={pretrained}",
        "model.freeze_backbone=true", "model.drop_path_rate=0.2"))
    trainer = Trainer(config)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == {"head.fc.weight", "head.fc.bias"}
    summary = trainer.fit()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.fc.weight", "head.fc.bias"}  # BN statistics included: the trunk ran in eval mode
    assert summary["precise_bn_images"] == 0 and summary["pretrained"]["reinitialised"]


def test_resumed_fine_tuning_equals_uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pretrained_model = _pretrained_digits(tmp_path)
    pretrained = tmp_path / "pretrained.pt"
    pretrained.write_bytes(pretrained_model.read_bytes())
    extra = ["run.epochs=2", "run.ckpt_every_steps=1", "run.deterministic=true", "data.classes=[5,6,7,8,9]",
             "data.train_per_class=6",  # 30 images: 3 batches of 8 per epoch
             f"model.pretrained={pretrained}", "optim.layer_decay=0.7", "model.head_init_scale=0.1",
             "optim.ema=true", "optim.ema_decay=0.8"]
    reference = train(load_config("default", tiny_overrides(tmp_path / "reference", *extra)))

    class Crash(Exception):
        pass

    original = Trainer._optimizer_step

    def step_then_crash(self: Trainer) -> None:
        original(self)
        if self.pos.step == 5:  # mid-epoch 2, before this step's checkpoint
            raise Crash

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_crash)
    with pytest.raises(Crash):
        train(load_config("default", tiny_overrides(tmp_path / "killed", *extra)))
    monkeypatch.setattr(Trainer, "_optimizer_step", original)
    pretrained.unlink()  # resuming needs the training state only
    resumed = train(load_config("default", tiny_overrides(tmp_path / "killed", *extra)), resume=tmp_path / "killed")
    assert resumed["pretrained"] == reference["pretrained"] and resumed["steps"] == reference["steps"] == 6
    expected = torch.load(tmp_path / "reference" / "model.pt", weights_only=True)
    got = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    for name, value in expected["state_dict"].items():
        assert torch.equal(value, got["state_dict"][name]), name
    assert got["pretrained"]["source"] == "pretrained.pt" or got["pretrained"]["source"].endswith("/pretrained.pt")


def test_cli_fine_tuning_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["train", "--epochs", "1", "--no-progress", "--output", str(tmp_path / "run"), "--set", *TINY_MODEL,
            "data.train_per_class=2", "data.val_per_class=1", "run.batch_size=4"]
    assert cli_main([*base[:1], "--pretrained", str(tmp_path / "missing.pt"), *base[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.pt" in err
    other = tmp_path / "l2.pth"
    torch.save(timm.create_model("fcaformer_l2", num_classes=10).state_dict(), other)
    assert cli_main([*base[:1], "--pretrained", str(other), *base[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "another architecture" in err and "nothing was loaded" in err
    assert cli_main([*base[:1], "--layer-decay", "1.5", *base[1:]]) == 2
    assert "optim.layer_decay=1.5" in capsys.readouterr().err


def test_cli_fine_tuning_reports_what_loaded(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pretrained = _pretrained_digits(tmp_path)
    capsys.readouterr()
    out = tmp_path / "ft"
    assert cli_main(["train", "--epochs", "1", "--no-progress", "--output", str(out), "--pretrained",
                     str(pretrained), "--head-init-scale", "0.001", "--layer-decay", "0.8",
                     "--set", *tiny_overrides(out, "data.classes=[5,6,7,8,9]")]) == 0
    printed = capsys.readouterr().out
    assert "pretrained weights from pre/model.pt (project checkpoint" in printed
    assert "re-initialised 2" in printed and "0 checkpoint tensors unused" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["pretrained"]["loaded"] == results["pretrained"]["total"] - 2
    assert not Path(results["pretrained"]["source"]).is_absolute()


# ---------------------------------------------------------------------------------------------- evidence
CHECKPOINT = Path(__file__).resolve().parents[1] / "docs" / "finetuning" / "femto_imagenette5.safetensors"


def test_pretrained_features_transfer_to_new_imagenette_classes(tmp_path: Path) -> None:
    """The short version of docs/finetuning.md: fcaformer_femto pretrained on five Imagenette classes (the committed
    checkpoint that benchmarks/finetune_transfer.py trained) against the same network from its random
    initialisation, on the other five classes with 20 real training images each, the same recipe and budget (a
    linear probe at the lr chosen on the development split, 10 epochs, one seed), evaluated on 40 real val images
    per class. The linear probe isolates what the loaded weights bring, cheaply: the fine-tuning-vs-scratch
    comparison needs two full runs and all val images (the slow test below)."""
    from benchmarks.finetune_transfer import ARMS, COMMON, TRANSFER

    data = shared_path("data", "imagenette-160")
    top1, reports = {}, {}
    for arm, start in (("pretrained", [f"model.pretrained={CHECKPOINT}"]), ("random", [])):
        config = load_config("repro", [f"data.root={data}", f"run.output={tmp_path / arm}", *COMMON, *TRANSFER,
                                       *ARMS["linear_probe"], *start, "optim.lr=2e-2", "run.epochs=10",
                                       "data.val_per_class=40"])
        summary = train(config)
        top1[arm], reports[arm] = summary["val"]["top1"], summary["pretrained"]
    assert reports["random"] is None and reports["pretrained"]["loaded"] == reports["pretrained"]["total"] - 2
    # measured on the project's CPU: 57.0 % vs 20.0 % (chance: a random trunk's features carry nothing here)
    assert top1["pretrained"] >= 45 and top1["pretrained"] >= top1["random"] + 15, top1


@pytest.mark.slow
def test_finetuning_beats_scratch_on_new_imagenette_classes(tmp_path: Path) -> None:
    """The documented comparison itself, seed 0: fine-tuning the committed checkpoint (at the setting the
    development split chose: lr 2e-3, no layer decay) against the same network from scratch, the full 30-epoch
    budget on the 100 training images, scored on all 1,991 val images of the new classes (a 500-image subset is too
    small: seed 0 measured +1.6 points there). Over five seeds the margin is +5.9 points and every fine-tuning seed
    beats every scratch seed (docs/finetuning.md)."""
    from benchmarks.finetune_transfer import ARMS, COMMON, TRANSFER, setting_overrides

    data = shared_path("data", "imagenette-160")
    top1 = {}
    for arm, start in (("finetune", [f"model.pretrained={CHECKPOINT}"]), ("scratch", [])):
        setting = {"lr": 2e-3, "layer_decay": None} if arm == "finetune" else {"lr": 2e-3}
        config = load_config("repro", [f"data.root={data}", f"run.output={tmp_path / arm}", *COMMON, *TRANSFER,
                                       *ARMS[arm], *start, *setting_overrides(setting)])
        top1[arm] = train(config)["val"]["top1"]
    # measured on the project's CPU (the documented seed-0 runs): 67.00 % vs 63.03 %
    assert top1["finetune"] >= top1["scratch"] + 2, top1


def test_transfer_script_selects_on_the_dev_split_and_compares(tmp_path: Path) -> None:
    """benchmarks/finetune_transfer.py end to end in its smoke size (one epoch, 8 training and 4 val images per
    class): each arm's selected setting is the grid's best on the development split, studies whose settings agree
    share their runs, and the comparison is recomputed here from the per-seed numbers."""
    import statistics

    from scipy.stats import ttest_ind

    from benchmarks.finetune_transfer import GRID, PRESET_SETTINGS, main, setting_label

    out = tmp_path / "out"
    assert main(["--quick", "--select-lr", "--seeds", "0", "1", "--data", str(shared_path("data", "imagenette-160")),
                 "--runs", str(tmp_path / "runs"), "--out", str(out), "--figure", str(tmp_path / "f.png")]) == 0
    table = json.loads((out / "results.json").read_text())
    selection = json.loads((out / "lr_selection.json").read_text())
    for arm, grid in GRID.items():
        scores, selected = selection["arms"][arm]["dev_top1"], selection["arms"][arm]["selected"]
        assert len(scores) == len(grid) and scores[setting_label(selected)] == max(scores.values())
    for study, content in table["studies"].items():
        arms = content["arms"]
        assert set(arms) == set(GRID) and all(row["seeds"] == [0, 1] for row in arms.values())
        for arm, row in arms.items():
            expected = PRESET_SETTINGS[arm] if study == "same_lr" else selection["arms"][arm]["selected"]
            assert row["setting"] == expected and row["val_images"] == 20 and row["train_images"] == 40
            same = table["studies"]["same_lr"]["arms"][arm]
            if row["setting"] == same["setting"]:  # the same runs, not a rerun
                assert row["top1"] == same["top1"]
        ft, sc = arms["finetune"]["top1"], arms["scratch"]["top1"]
        versus = content["finetune_vs_scratch"]
        assert versus["margin"] == pytest.approx(statistics.mean(ft) - statistics.mean(sc))
        assert versus["worst_finetune_minus_best_scratch"] == pytest.approx(min(ft) - max(sc))
        if "welch_p" in versus:
            assert versus["welch_p"] == pytest.approx(ttest_ind(ft, sc, equal_var=False).pvalue)
    assert (out / "femto_imagenette5.safetensors").is_file() and (tmp_path / "f.png").is_file()
    assert "fine-tune − scratch" in (out / "results.md").read_text()

