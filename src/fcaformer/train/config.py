"""Training configuration: typed sections, YAML presets shipped with the package, and ``key=value`` overrides.

A config is a :class:`TrainConfig` of five sections (``model``, ``data``, ``aug``, ``optim``, ``run``). It is
built from a preset (``default``, ``imagenet``, ``imagenette``, ``repro``) or a YAML file, then overridden with
dotted ``section.key=value`` strings (values parsed as YAML, so ``run.epochs=5`` is an int and
``model.kwargs.dims=[32,64,96,128]`` a list). Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..files import portable_path


class ConfigError(ValueError):
    """An invalid training configuration (unknown key, wrong type, impossible value)."""


@dataclass
class ModelConfig:
    """Which network to build: ``timm.create_model(name, num_classes=<from data>, img_size=<data.img_size>,
    **kwargs)``, and what to start it from."""

    name: str = "fcaformer_l1"
    kwargs: dict[str, Any] = field(default_factory=dict)
    drop_path_rate: float = 0.0
    # Fine-tuning: weights to start from (a release, project or training-state checkpoint, a safetensors or
    # state-dict file, a timm hub folder / local-dir:PATH, or hf-hub:NAME; see fcaformer.weights.read_weights).
    # Not used when resuming: the training state has the weights.
    pretrained: str | None = None
    # Factor on the fresh classifier's initial weights when the pretrained one cannot be used (other classes).
    head_init_scale: float = 1.0
    # Linear probe: train only the classifier; the rest runs in eval mode (frozen BatchNorm statistics, no
    # dropout or stochastic depth) and precise BN is off.
    freeze_backbone: bool = False
    # Add forward cross attention to the timm ViT or Swin named by ``name`` (fcaformer.add_forward_cross_attention)
    # after the pretrained weights are loaded; its switches (cab_max_d, lsf, enhance, ...) go in ``kwargs``.
    forward_cross_attention: bool = False


@dataclass
class DataConfig:
    """Where images come from and how they are read.

    ``dataset``: ``digits`` (scikit-learn's handwritten digits, the embedded default), ``imagefolder``
    (``root/train`` + ``root/val``, or ``root`` split by ``val_split``), ``cifar10`` / ``cifar100``
    (torchvision's on-disk format under ``root``), ``packed`` (a ``.npz`` file written by ``fcaformer pack``).

    ``on_device``: decode the dataset once into a uint8 tensor on the training device (at ``store_size``,
    default ``floor(img_size / crop_pct)``) and augment batches there instead of in loader workers (see
    :mod:`fcaformer.train.device_data`; for datasets that fit in device memory).
    """

    dataset: str = "digits"
    root: str | None = None
    train_dir: str = "train"
    val_dir: str = "val"
    val_split: float = 0.0
    img_size: int = 32
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    train_per_class: int | None = None
    val_per_class: int | None = None
    workers: int = 0
    verify_images: bool = True
    cache: bool = False
    class_names_file: str | None = "classes.json"
    # Keep only these classes (folder names or display names), numbered in this order; null: all.
    classes: list[str] | None = None
    on_device: bool = False
    store_size: int | None = None


@dataclass
class AugConfig:
    """Training-time augmentation and regularisation (timm's transforms, Mixup/CutMix, label smoothing)."""

    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    color_jitter: float = 0.4
    auto_augment: str | None = None
    re_prob: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1


@dataclass
class OptimConfig:
    """Optimizer (timm's factory), schedule (timm's cosine with warm-up), EMA, clipping, accumulation.

    ``lr`` is for a global batch of ``lr_base_batch``; the used lr is ``lr * global_batch / lr_base_batch``
    (the linear scaling rule).
    """

    opt: str = "adamw"
    lr: float = 2e-3
    lr_base_batch: int = 1024
    weight_decay: float = 0.05
    eps: float = 1e-8
    sched: str = "cosine"
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    clip_grad: float | None = None
    accum_steps: int = 1
    ema: bool = False
    ema_decay: float = 0.9999
    # Layer-wise lr decay (timm's param_groups_layer_decay over the model's group_matcher): the head trains at
    # lr, each earlier layer group at layer_decay times the one after it. null: off.
    layer_decay: float | None = None


@dataclass
class RunConfig:
    """Budget, precision, devices, checkpointing and logging."""

    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    # The run folder; "{data}" stands for the dataset's name (the last component of data.root, or data.dataset).
    output: str = "runs/default"
    device: str = "auto"
    threads: int = 0
    amp: str = "none"
    channels_last: bool = False
    # Fca attention without the release's unused cross-token query (same outputs and gradients, faster).
    fast_attention: bool = True
    compile: bool = False
    deterministic: bool = False
    eval_every: int = 1
    # Training images to recompute BatchNorm statistics from before each evaluation (precise BN; 0: off, null:
    # 1,024 for runs shorter than 100 epochs, see fcaformer.train.precise_bn).
    precise_bn_images: int | None = None
    ckpt_every_steps: int = 0
    # Also write the training state when this many minutes have passed since the last one (0: off): the work a
    # fault can cost is bounded by time, however long an epoch is.
    ckpt_every_minutes: float = 10.0
    keep_ckpts: int = 2
    tensorboard: bool = False
    progress: bool = True
    max_steps: int | None = None
    # Check the loss for NaN/inf (and refresh the progress bar) every N batches: each check waits for the GPU.
    log_every: int = 1
    ckpt_every_epochs: int = 1


@dataclass
class TrainConfig:
    """The full configuration of one training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), the form saved in checkpoints and ``config.yaml``.

        ``model.pretrained`` is recorded portably (:func:`fcaformer.files.portable_path`: no absolute path): a
        resumed run takes its weights from the training state, never from this entry."""
        plain = _plain(asdict(self))
        if self.model.pretrained:
            plain["model"]["pretrained"] = portable_path(self.model.pretrained)
        return plain

    def validate(self) -> TrainConfig:
        """Reject values that cannot work, with a message naming the key and the fix."""
        checks = [
            (self.data.dataset in DATASETS, f"data.dataset={self.data.dataset!r}; choose one of {DATASETS}"),
            (self.data.dataset == "digits" or self.data.root,
             f"data.root is required for data.dataset={self.data.dataset!r} (pass --data PATH)"),
            (self.data.img_size >= 32, f"data.img_size={self.data.img_size} must be >= 32 (the models need 32 px)"),
            (0 <= self.data.val_split < 1, f"data.val_split={self.data.val_split} must be in [0, 1)"),
            (self.run.epochs >= 1, f"run.epochs={self.run.epochs} must be >= 1"),
            (self.run.batch_size >= 1, f"run.batch_size={self.run.batch_size} must be >= 1"),
            (self.optim.accum_steps >= 1, f"optim.accum_steps={self.optim.accum_steps} must be >= 1"),
            (self.run.amp in ("none", "bf16", "fp16"), f"run.amp={self.run.amp!r}; choose none, bf16 or fp16"),
            (self.run.log_every >= 1, f"run.log_every={self.run.log_every} must be >= 1"),
            (self.run.ckpt_every_epochs >= 1, f"run.ckpt_every_epochs={self.run.ckpt_every_epochs} must be >= 1"),
            (self.data.store_size is None or self.data.store_size >= self.data.img_size,
             f"data.store_size={self.data.store_size} must be >= data.img_size={self.data.img_size}"),
            (self.run.ckpt_every_minutes >= 0,
             f"run.ckpt_every_minutes={self.run.ckpt_every_minutes} must be >= 0 (0: off)"),
            (self.run.keep_ckpts >= 2, f"run.keep_ckpts={self.run.keep_ckpts} must be >= 2 (fallback needs one)"),
            (self.optim.lr > 0, f"optim.lr={self.optim.lr} must be > 0"),
            (self.model.pretrained is None or (isinstance(self.model.pretrained, str) and self.model.pretrained),
             f"model.pretrained={self.model.pretrained!r} must be a path, local-dir:PATH or hf-hub:NAME"),
            (self.model.head_init_scale > 0, f"model.head_init_scale={self.model.head_init_scale} must be > 0"),
            (self.optim.layer_decay is None or 0 < self.optim.layer_decay <= 1,
             f"optim.layer_decay={self.optim.layer_decay} must be in (0, 1] (or null: off)"),
            (self.data.classes is None or (isinstance(self.data.classes, list) and self.data.classes
                                           and all(isinstance(c, (str, int)) for c in self.data.classes)
                                           and len(set(self.data.classes)) == len(self.data.classes)),
             f"data.classes={self.data.classes!r} must be a list of distinct class names (or null: all)"),
            (self.run.precise_bn_images is None
             or (isinstance(self.run.precise_bn_images, int) and self.run.precise_bn_images >= 0),
             f"run.precise_bn_images={self.run.precise_bn_images!r} must be an integer >= 0 (0: off, null: auto)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.model.head_init_scale != 1 and not self.model.pretrained:
            warnings.warn(f"model.head_init_scale={self.model.head_init_scale} has no effect without model.pretrained "
                          "(it scales a classifier re-initialised over pretrained weights)", stacklevel=2)
        return self


DATASETS = ("digits", "imagefolder", "cifar10", "cifar100", "packed")
SECTIONS = {f.name: f.type for f in fields(TrainConfig)}
RESUMABLE_KEYS = ("run.output", "run.epochs", "run.max_steps", "run.progress", "run.threads", "run.tensorboard",
                  "run.log_every", "run.ckpt_every_steps", "run.ckpt_every_minutes", "run.ckpt_every_epochs",
                  "run.keep_ckpts", "data.workers")
"""Keys a resumed run may take from the command that resumes it: where and how long it runs, how it logs and
checkpoints. Everything else is the run's own (its saved config), and a run folder holds one run."""


def check_known_keys(given: Iterable[str], valid: Iterable[str], where: str) -> None:
    """``ConfigError`` naming the first of ``given`` that is not ``valid`` (with the closest valid one, if any)
    and listing the valid ones."""
    valid = sorted(valid)
    for key in given:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown key {key} in {where}{hint}; valid keys: {', '.join(valid)}")


def flat_config(config: TrainConfig) -> dict[str, Any]:
    """``{"section.key": value}`` of a config (plain values, as saved)."""
    return {f"{section}.{key}": value for section, values in config.to_dict().items() for key, value in values.items()}


def config_differences(a: TrainConfig, b: TrainConfig, ignore: Iterable[str] = RESUMABLE_KEYS) -> list[str]:
    """The ``section.key`` names whose values differ between two configs, except ``ignore``."""
    flat_a, flat_b, skip = flat_config(a), flat_config(b), set(ignore)
    return [key for key in flat_a if key not in skip and flat_a[key] != flat_b.get(key)]


def data_name(data: DataConfig) -> str:
    """What ``{data}`` in ``run.output`` stands for: the dataset root's name (a packed file's without its suffix),
    or the dataset type when there is no root."""
    if not data.root:
        return data.dataset
    path = Path(data.root)
    name = (path.stem if path.suffix == ".npz" else path.name) or path.resolve().name
    return name or data.dataset


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def list_presets() -> list[str]:
    """Names of the presets shipped in ``fcaformer/train/presets``."""
    files = resources.files("fcaformer.train") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in files.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(source: str | os.PathLike) -> dict[str, Any]:
    path = Path(source)
    if not path.suffix:  # a preset name
        if str(source) not in list_presets():
            raise ConfigError(f"unknown preset {source!r}; choose one of {list_presets()} or pass a YAML file")
        text = (resources.files("fcaformer.train") / "presets" / f"{source}.yaml").read_text()
    elif not path.exists():
        raise ConfigError(f"config file not found: {path}")
    else:
        text = path.read_text()
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"cannot parse config {source}: {error}") from error
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {source} must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(getattr(TrainConfig(), section))}


def _coerce(section: str, key: str, value: Any, current: Any) -> Any:
    """Match the YAML value to the field's type (tuples from lists, floats from ints) or explain the mismatch."""
    annotation = str(_section_fields(section)[key].type)
    if isinstance(value, str) and "float" in annotation:
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            value = float(value)
        except ValueError:
            raise ConfigError(f"{section}.{key} expects a number, got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool) and annotation.startswith("float"):
        value = float(value)
    if value is None or current is None:
        return value
    if isinstance(current, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{section}.{key} expects a list, got {value!r}")
        return tuple(value)
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{section}.{key} expects true/false, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, (int, float, str, dict)) and not isinstance(value, type(current)):
        raise ConfigError(f"{section}.{key} expects {type(current).__name__}, got {value!r}")
    return value


def apply_mapping(config: TrainConfig, mapping: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """Overlay a nested ``{section: {key: value}}`` mapping onto ``config`` (in place; returned)."""
    for section, values in mapping.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section {section!r} in {source}; valid sections: {list(SECTIONS)}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"section {section!r} in {source} must be a mapping")
        target = getattr(config, section)
        valid = _section_fields(section)
        check_known_keys((f"{section}.{key}" for key in values), (f"{section}.{key}" for key in valid), source)
        for key, value in values.items():
            setattr(target, key, _coerce(section, key, value, getattr(target, key)))
    return config


def parse_override(text: str) -> dict[str, Any]:
    """``"optim.lr=1e-3"`` or ``"model.kwargs.dims=[32,64,96,128]"`` to a nested mapping."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.lr=1e-3)")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2:
        raise ConfigError(f"override {text!r} needs a section and a key, e.g. run.epochs=5")
    value = yaml.safe_load(raw) if raw.strip() else None
    if len(parts) > 2:  # nested dict field such as model.kwargs.dims
        if parts[1] != "kwargs" or len(parts) != 3:
            raise ConfigError(f"override {text!r}: only model.kwargs.<name> may have three parts")
        return {parts[0]: {"kwargs": {parts[2]: value}}}
    return {parts[0]: {parts[1]: value}}


def load_config(
    source: str | os.PathLike | None = "default", overrides: Iterable[str] = (), base: str | None = None
) -> TrainConfig:
    """Build a config: defaults, then the preset or YAML file ``source`` (a file may name a ``base`` preset
    with a top-level ``base:`` key), then ``overrides``; validated."""
    config = TrainConfig()
    layers: list[tuple[str, dict[str, Any]]] = []
    if source is not None:
        loaded = _read_yaml(source)
        parent = loaded.pop("base", base)
        if parent:
            layers.append((str(parent), _read_yaml(parent)))
        layers.append((str(source), loaded))
    for name, mapping in layers:
        apply_mapping(config, mapping, name)
    for text in overrides:
        mapping = parse_override(text)
        section, values = next(iter(mapping.items()))
        if section == "model" and isinstance(values.get("kwargs"), dict) and len(text.split("=")[0].split(".")) == 3:
            config.model.kwargs = {**config.model.kwargs, **values["kwargs"]}
        else:
            apply_mapping(config, mapping, f"override {text!r}")
    config.run.output = config.run.output.replace("{data}", data_name(config.data))
    return config.validate()


def config_from_dict(mapping: Mapping[str, Any]) -> TrainConfig:
    """Rebuild a config saved with :meth:`TrainConfig.to_dict` (e.g. from a checkpoint)."""
    return apply_mapping(TrainConfig(), mapping, "saved config").validate()
