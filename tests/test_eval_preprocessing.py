"""``fcaformer eval`` of release weights feeds the network exactly the release's evaluation tensors.

The release (its ``build_transform``, from ConvNeXt's code) evaluates with ``Resize(int(size / crop_pct), bicubic)``
+ ``CenterCrop(size)`` + ImageNet mean/std, ``crop_pct = 224 / 256`` below 384 px, and a plain bicubic warp to
``size x size`` from 384 px on. The reference below is that pipeline written with torchvision alone, applied to
real Imagenette images; the command's loader is captured where it meets the network.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from fcaformer.cli import main as cli_main
from fcaformer.train.evaluate import EvalResult
from tests.conftest import shared_path

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def release_transform(size: int) -> T.Compose:
    """The release's evaluation transform, independently of this project's code."""
    if size >= 384:
        resize = [T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)]
    else:
        resize = [T.Resize(int(size / (224 / 256)), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    return T.Compose([*resize, T.ToTensor(), T.Normalize(MEAN, STD)])


@pytest.fixture(scope="module")
def release_and_hub(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    fixture = torch.load(shared_path("parity", "official_fcaformer_l1_cls.pt"), weights_only=True)
    root = tmp_path_factory.mktemp("release")
    release = root / "fcaformer_l1.pth"
    torch.save({"model": fixture["state_dict"]}, release)
    assert cli_main(["convert", str(release), str(root / "hub")]) == 0
    return release, root / "hub"


def _fed_tensors(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> tuple[torch.Tensor, list[int]]:
    """Run ``fcaformer eval`` with the evaluation replaced by a recorder of the batches the network would get."""
    seen: list[torch.Tensor] = []
    labels: list[int] = []

    def record(model, loader, num_classes, device, amp="none", **kwargs) -> EvalResult:
        for images, targets in loader:
            seen.append(images)
            labels.extend(targets.tolist())
        return EvalResult(0.0, 0.0, 0.0, len(labels), 1.0, [0.0] * num_classes, [[0] * num_classes] * num_classes)

    # the module (the package re-exports a function of the same name); eval imports evaluate from it when it runs
    monkeypatch.setattr(importlib.import_module("fcaformer.train.evaluate"), "evaluate", record)
    assert cli_main(["eval", *args, "--json"]) == 0
    return torch.cat(seen), labels


@pytest.mark.parametrize("size", [224, 384])
@pytest.mark.parametrize("source", ["release", "hub folder"])
def test_eval_feeds_the_release_tensors(release_and_hub: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture, size: int, source: str) -> None:
    data = shared_path("data", "imagenette-160")
    model = str(release_and_hub[0] if source == "release" else f"local-dir:{release_and_hub[1]}")
    args = [model, "--data", str(data), "--val-per-class", "2", "--batch-size", "8"]
    fed, labels = _fed_tensors(monkeypatch, args + (["--img-size", str(size)] if size != 224 else []))
    capsys.readouterr()
    classes = sorted(p.name for p in (data / "val").iterdir() if p.is_dir())
    # the same balanced subset as the command's, read independently: the files of each class in its order
    from fcaformer.train.data import balanced_subset, scan_image_folder

    files = [path for path, _ in balanced_subset(scan_image_folder(data / "val", verify=False, classes=classes),
                                                 2).samples]
    assert len(files) == len(fed) == 20 and labels == [classes.index(Path(f).parent.name) for f in files]
    transform = release_transform(size)
    expected = []
    for path in files:
        with Image.open(path) as image:
            expected.append(transform(image.convert("RGB")))
    assert fed.shape == (20, 3, size, size)
    assert torch.equal(fed, torch.stack(expected))  # bit-identical tensors


def test_timm_pipeline_of_the_folder_is_the_release_pipeline(release_and_hub: tuple[Path, Path]) -> None:
    import timm

    model = timm.create_model(f"local-dir:{release_and_hub[1]}", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    image_path = next((shared_path("data", "imagenette-160") / "val" / "n01440764").iterdir())
    with Image.open(image_path) as image:
        assert torch.equal(transform(image.convert("RGB")), release_transform(224)(image.convert("RGB")))
