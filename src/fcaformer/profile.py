"""Parameter and MAC counts, measured with ``torch.utils.flop_counter`` (MACs = FLOPs / 2)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# SPEC section 1 (measured on the authors' release) and the paper for L0.
REFERENCE: dict[str, tuple[float, float | None]] = {
    "fcaformer_l0": (5.9, None),
    "fcaformer_l1": (6.19, 1.374),
    "fcaformer_l2": (16.28, 3.602),
    "fcaformer_l3": (27.89, 6.651),
    "fcaformer_l4": (65.64, 14.492),
}
"""Reference (params in M, GMACs at 224) per model; L0's MACs are not published."""


@dataclass
class Profile:
    """Size and cost of one model at one input size."""

    name: str
    img_size: int
    params_m: float
    gmacs: float
    ref_params_m: float | None = None
    ref_gmacs: float | None = None

    @property
    def params_diff_pct(self) -> float | None:
        return None if self.ref_params_m is None else 100 * (self.params_m / self.ref_params_m - 1)

    @property
    def gmacs_diff_pct(self) -> float | None:
        return None if self.ref_gmacs is None or self.img_size != 224 else 100 * (self.gmacs / self.ref_gmacs - 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "params_diff_pct": self.params_diff_pct, "gmacs_diff_pct": self.gmacs_diff_pct}


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, int, int, int]) -> int:
    """Multiply-accumulates of one eval-mode forward on a zero input of ``input_size`` (B, C, H, W)."""
    model = model.eval()
    param = next(model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(input_size, device=param.device, dtype=param.dtype))
    return counter.get_total_flops() // 2


def profile_model(name: str, img_size: int = 224, **kwargs) -> Profile:
    """Params and MACs of a registered model (batch 1, 3 channels) at ``img_size``."""
    model = timm.create_model(name, **kwargs)
    ref_params, ref_gmacs = REFERENCE.get(name, (None, None))
    return Profile(
        name=name,
        img_size=img_size,
        params_m=count_params(model) / 1e6,
        gmacs=count_macs(model, (1, 3, img_size, img_size)) / 1e9,
        ref_params_m=ref_params,
        ref_gmacs=ref_gmacs,
    )
