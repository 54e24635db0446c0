"""Pieces shared by the hybrid and plain models: input validation, head, initialisation."""

from __future__ import annotations

import torch
from timm.layers import register_notrace_function, trunc_normal_
from torch import nn

MIN_INPUT_SIZE = 32


# An FX leaf (timm's registry here; the modules that call it torch.fx.wrap it for any tracer): a traced graph
# checks the real input when it runs. TorchScript skips the check (a scripted model's input is typed).
@register_notrace_function
def check_image_batch(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Raise ``ValueError`` (expected vs got) unless ``x`` is a float ``(B, in_chans, H, W)`` batch, H, W >= 32."""
    if not torch.jit.is_scripting():
        _check_image_batch(x, in_chans)
    return x


def _check_image_batch(x: torch.Tensor, in_chans: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor image batch, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(
            f"expected a 4-D (batch, channels, height, width) tensor, got {x.ndim}-D with shape {tuple(x.shape)}"
            + ("; add a batch dim with x.unsqueeze(0)" if x.ndim == 3 else "")
        )
    if not x.is_floating_point():
        raise ValueError(
            f"expected a floating-point tensor, got {x.dtype}; convert images with x.float() / 255 and normalize"
        )
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if x.shape[2] < MIN_INPUT_SIZE or x.shape[3] < MIN_INPUT_SIZE:
        raise ValueError(
            f"expected height and width >= {MIN_INPUT_SIZE}, got {x.shape[2]}x{x.shape[3]}; resize the input"
        )


POOL_TYPES = ("avg", "max", "token", "")


class ClassifierHead(nn.Module):
    """Pool, LayerNorm (skipped with ``norm_eps=None``), dropout, linear.

    The input is a ``(B, C, H, W)`` map (``input_fmt="NCHW"``) or a ``(B, N, C)`` token sequence
    (``input_fmt="NLC"``), fixed at construction so that tracing and scripting see no shape-dependent branch.
    ``pool_type`` is ``"avg"`` / ``"max"`` over the positions, ``"token"`` (take token 0 of a sequence) or ``""``
    (no pooling: the norm and classifier act per position, and a map stays a channels-first map).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        pool_type: str = "avg",
        drop_rate: float = 0.0,
        norm_eps: float | None = 1e-5,
        input_fmt: str = "NCHW",
    ) -> None:
        super().__init__()
        if input_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"input_fmt must be 'NCHW' or 'NLC', got {input_fmt!r}")
        self.dim = dim
        self.is_map = input_fmt == "NCHW"
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if norm_eps is not None else nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.pool_type = ""
        self.fc: nn.Module = nn.Identity()
        self.reset(num_classes, pool_type)

    def reset(self, num_classes: int, pool_type: str | None = None) -> None:
        """Replace the classifier (fresh init) and optionally the pooling."""
        if pool_type is not None:
            if pool_type not in POOL_TYPES:
                raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {pool_type!r}")
            self.pool_type = pool_type
        self.fc = nn.Linear(self.dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            init_weights_(self.fc)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.pool_type == "avg":
            x = x.mean((2, 3)) if self.is_map else x.mean(1)
        elif self.pool_type == "max":
            x = x.amax((2, 3)) if self.is_map else x.amax(1)
        elif self.pool_type == "token":
            x = x[:, 0]
        elif self.is_map:
            x = x.permute(0, 2, 3, 1)
        x = self.drop(self.norm(x))
        if not pre_logits:
            x = self.fc(x)
        if self.pool_type == "" and self.is_map:
            x = x.permute(0, 3, 1, 2)
        return x


def init_weights_(module: nn.Module) -> None:
    """From-scratch init: conv/linear weights truncated normal std 0.02 and zero bias (norms keep 1/0)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def prune_stage_model(model: nn.Module, indices: int | list[int], prune_norm: bool, prune_head: bool) -> list[int]:
    """timm's ``prune_intermediate_layers`` for a model whose blocks are one ``FcaStage`` at ``model.blocks``
    followed by ``model.norm``: keep the blocks up to the last of ``indices``; returns the block indices to take."""
    take_indices = model.blocks.prune_blocks(indices)
    if prune_norm:
        model.norm = nn.Identity()
    if prune_head:
        model.reset_classifier(0, "")
    return take_indices
