"""The one record every weights source is read into (:class:`WeightsRecord`), and building its network."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
from torch import nn

from .. import models  # noqa: F401  (registers the FcaFormer architectures with timm: records name them)
from ..errors import CheckpointError
from ..models.names import describe_model
from ..models.state_dicts import StateDict, load_state_dict_strict, resize_grid_parameters

PREPROCESSING_KEYS = ("img_size", "crop_pct", "interpolation", "mean", "std")
"""The evaluation preprocessing a checkpoint records (the project's data-config form)."""


def preprocessing_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`PREPROCESSING_KEYS` entries present in ``data`` (a training run's ``data`` config or a recorded
    data config), mean and std as lists."""
    return {k: list(data[k]) if k in ("mean", "std") else data[k] for k in PREPROCESSING_KEYS if k in data}


@dataclass
class WeightsRecord:
    """Weights from any source the project reads, in this project's key layout, with what the source says about
    them. :func:`fcaformer.weights.read_weights` returns one for every source; :meth:`build` makes the network.
    """

    state_dict: StateDict | None
    """The tensors (``None`` for a bare model name: random weights)."""
    kind: str
    """``"release checkpoint"``, ``"release dense backbone"``, ``"project checkpoint"``, ``"training state"``,
    ``"timm hub folder"``, ``"hf-hub model"``, ``"state dict"`` (bare, says nothing about its network) or
    ``"timm model"`` (a registered name, random weights)."""
    label: str
    """The source as recorded in written files: its last two path components, or the hub / model name."""
    model_name: str | None = None
    """The registered (timm) architecture, when the source says it or the caller named it."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """``timm.create_model`` arguments that rebuild the network together with :attr:`model_name`."""
    class_names: list[str] | None = None
    data_config: dict[str, Any] | None = None
    """The evaluation preprocessing the source records (project data-config form), if any."""
    release_preprocessing: bool = False
    """The weights are the authors' (directly or converted): evaluate at any size as the release does."""
    sha256: str | None = None
    path: Path | None = None
    """The file read (a hub folder's weights file); ``None`` for hub names, model names and loaded mappings."""
    info: dict[str, Any] = field(default_factory=dict)
    """What else the source records (``train_config``, ``metrics``, ``pretrained``, a hub folder's ``record``)."""
    raw: Any = field(default=None, repr=False)
    """The content as read."""
    builder: Callable[..., nn.Module] | None = field(default=None, repr=False)
    """Builds the network (``builder(**overrides)``) where it is not ``timm.create_model(model_name, ...)``: the
    release's own construction from the inferred configuration."""

    @property
    def architecture(self) -> str | None:
        """The network the weights are for (:func:`~fcaformer.models.names.describe_model`), when known."""
        return describe_model(self.model_name, self.model_kwargs) if self.model_name else None

    def build(self, **overrides: Any) -> nn.Module:
        """The network with these weights loaded (all or nothing), in eval mode.

        ``overrides`` change constructor arguments, not the architecture: ``img_size`` or ``window_size`` resize the
        grid-sized parameters, ``drop_path_rate`` prepares fine-tuning.

        Raises:
            CheckpointError: a bare state dict (its network unknown), an unknown model name, or weights that do not
                fit the network.
        """
        if self.builder is not None:
            model = self.builder(**overrides)
        elif self.model_name is None:
            keys = list(self.state_dict or {})[:5]
            raise CheckpointError(
                f"{self.label} is neither a project checkpoint, a training state nor a timm hub folder, and not an "
                "FcaFormer release checkpoint (key 'patch_embed.seq.0.c.weight' is missing; first keys: "
                f"{keys}): a bare state dict does not say which network it holds; name it (--model NAME)"
            )
        elif not timm.is_model(self.model_name):
            raise CheckpointError(f"{self.label} names the unknown model {self.model_name!r} (see timm.list_models())")
        else:
            model = timm.create_model(self.model_name, **{**self.model_kwargs, **overrides})
        if self.state_dict is not None:
            load_state_dict_strict(model, resize_grid_parameters(self.state_dict, model))
        return model.eval()
