"""The errors a user can meet, and the optional extras that commands need.

Everything here is imported by every other layer, so it imports nothing from the project.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model it is loaded into."""


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` that adds it."""


EXTRAS: dict[str, str] = {
    "pycocotools": "dense",
    "segmentation_models_pytorch": "dense",
    "torchmetrics": "dense",
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "export",
    "openvino": "deploy",
    "nncf": "deploy",
    "tensorboard": "tensorboard",
}
"""The optional packages and the extra of ``pyproject.toml`` that installs each one."""


def require(module: str, feature: str | None = None) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming the extra that installs it (``feature`` says
    what needs it, e.g. ``"ONNX export"``)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise missing_extra(module, feature) from error


def missing_extra(module: str, feature: str | None = None) -> MissingExtraError:
    """The one-line error for an optional package that is not installed."""
    package = module.split(".")[0]
    needed_by = f" ({feature} needs it)" if feature else ""
    extra = EXTRAS.get(package, "dev")
    return MissingExtraError(f"{package} is not installed{needed_by}: pip install 'fcaformer[{extra}]'")


def as_missing_extra(error: ImportError) -> MissingExtraError | None:
    """``error`` as a :class:`MissingExtraError` when it is one, or an import of an optional package that failed
    (e.g. ``fcaformer detect`` without pycocotools); ``None`` for any other import error, which is a bug."""
    if isinstance(error, MissingExtraError):
        return error
    name = (getattr(error, "name", None) or "").split(".")[0]
    return missing_extra(name) if name in EXTRAS else None


def name_list(items: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` names of ``items`` and how many more there are, for messages."""
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{list(items[:limit])}{more}"
