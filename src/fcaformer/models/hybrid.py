"""Hybrid FcaFormer (L1-L4): two ConvNeXt stages, then two stages of Fca blocks; and its windowed dense backbone."""

# No `from __future__ import annotations`: torch.fx copies forward()'s annotations into the code it generates,
# and TorchScript (scripting a traced graph) needs them as real types, not strings.

from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import LayerNorm2d
from timm.models._features import feature_take_indices
from timm.models.convnext import ConvNeXtBlock
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

from ..fast import fuse_model
from ..layers import Downsample, FcaStage, LsfPlacement, Stem, conv_out_size
from ..layers.fca import fold_scale_into_linear_
from ._common import ClassifierHead, check_image_batch, init_weights_

torch.fx.wrap("check_image_batch")  # an FX leaf for every tracer (torchvision's feature extraction included)

ARCHS: dict[str, dict[str, tuple[int, ...]]] = {
    "fcaformer_l1": dict(dims=(64, 128, 192, 320), depths=(2, 2, 6, 2), num_heads=(6, 10)),
    "fcaformer_l2": dict(dims=(96, 192, 320, 480), depths=(2, 2, 7, 2), num_heads=(10, 15)),
    "fcaformer_l3": dict(dims=(96, 192, 320, 512), depths=(3, 6, 12, 3), num_heads=(10, 16)),
    "fcaformer_l4": dict(dims=(128, 256, 512, 768), depths=(3, 6, 12, 3), num_heads=(16, 24)),
}
"""Stage dims, depths and Fca-stage heads of the paper's hybrid models (SPEC section 1)."""

SMALL_ARCHS: dict[str, dict[str, Any]] = {
    "fcaformer_atto": dict(dims=(32, 64, 96, 128), depths=(1, 1, 3, 1), num_heads=(3, 4), img_size=32),
    "fcaformer_femto": dict(dims=(32, 64, 96, 128), depths=(1, 1, 4, 2), num_heads=(3, 4), img_size=112),
}
"""Small hybrids that are not in the paper, sized for CPU training: ``fcaformer_atto`` (the embedded digits job,
32 px) and ``fcaformer_femto`` (Imagenette at 96-112 px). Head dim 32 as in the zoo; native resolution included."""


class ConvStage(nn.Module):
    """A ConvNeXt stage (timm's ``ConvNeXtBlock``, layer scale, LN eps 1e-6), with an optional downsample first."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        *,
        downsample: nn.Module | None,
        drop_path_rates: Sequence[float],
        ls_init_value: float | None,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(
            *(
                ConvNeXtBlock(dim, ls_init_value=ls_init_value or None, drop_path=rate)
                for rate in drop_path_rates[:depth]
            )
        )

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold each block's layer scale into its last linear layer (timm's ``reparameterize_model`` calls this)."""
        for block in self.blocks:
            if block.gamma is not None and not block.use_conv_mlp:
                fold_scale_into_linear_(block.mlp.fc2, block.gamma)
                block.gamma = None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the blocks' activations in backward (outputs and gradients are unchanged)."""
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if not torch.jit.is_scripting() and self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint_sequential(self.blocks, len(self.blocks), x, use_reentrant=False)
        return self.blocks(x)


class FcaFormer(nn.Module):
    """Hybrid FcaFormer: stem, two ConvNeXt stages, two Fca stages, mean-pool + LN + linear head.

    Every stage maps ``(B, C, H, W)`` to ``(B, C', H', W')``; any input size with ``H, W >= 32`` works.

    Args:
        dims: channels of the four stages.
        depths: blocks per stage.
        num_heads: heads of the two Fca stages (head dim 32 in the zoo).
        img_size: training resolution; fixes the native grids of the grid-sized attention parameters.
        in_chans: input channels.
        num_classes: classifier outputs (0: no classifier, ``forward`` returns pooled features).
        global_pool: ``"avg"``, ``"max"`` or ``""`` (no pooling).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
        ls_init_value: initial layer scale of every block (``0``: no layer scale; timm drops ``None`` kwargs).
        cab_max_d: most recent blocks whose cross tokens each Fca block sees.
        cross_attention: ``False`` builds the identical network without cross tokens (the paper's baseline).
        lsf: LSF placement, ``"release"`` (before the cross-token LN, as released), ``"post_norm"`` or ``"none"``.
        enhance: whether the TME enhance conv is used.
        window_size: ``None`` for global attention, or the windows ``(stage 3, stage 4)`` of the dense backbone,
            e.g. ``(14, 7)``.
        mlp_ratio: FFN expansion of the Fca blocks.
    """

    def __init__(
        self,
        dims: Sequence[int] = (64, 128, 192, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (6, 10),
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        ls_init_value: float | None = 1e-6,
        cab_max_d: int = 12,
        cross_attention: bool = True,
        lsf: LsfPlacement = "release",
        enhance: bool = True,
        window_size: Sequence[int] | None = None,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if len(dims) != 4 or len(depths) != 4:
            raise ValueError(f"dims and depths need 4 entries, got {tuple(dims)} and {tuple(depths)}")
        if len(num_heads) == 4:  # the release's layout, (0, 0, h3, h4)
            num_heads = num_heads[2:]
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.dims = tuple(dims)
        self.depths = tuple(depths)
        self.num_heads = tuple(num_heads)
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.window_size = tuple(window_size) if window_size else None
        self.num_features = self.head_hidden_size = dims[3]

        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stage_rates = [rates[sum(depths[:i]) : sum(depths[: i + 1])] for i in range(4)]
        self.stem = Stem(in_chans, dims[0])
        stages: list[nn.Module] = []
        for i in range(2):
            stages.append(
                ConvStage(
                    dims[i - 1] if i else dims[0],
                    dims[i],
                    depths[i],
                    downsample=Downsample(dims[i - 1], dims[i]) if i else None,
                    drop_path_rates=stage_rates[i],
                    ls_init_value=ls_init_value,
                )
            )
        for i in (2, 3):
            grid = (conv_out_size(img_size[0], i + 2), conv_out_size(img_size[1], i + 2))
            stages.append(
                FcaStage(
                    dims[i - 1],
                    dims[i],
                    depths[i],
                    num_heads[i - 2],
                    grid,
                    downsample=Downsample(dims[i - 1], dims[i]),
                    window_size=self.window_size[i - 2] if self.window_size else None,
                    cab_max_d=cab_max_d,
                    cross_attention=cross_attention,
                    drop_path_rates=stage_rates[i],
                    lsf=lsf,
                    enhance=enhance,
                    ls_init_value=ls_init_value,
                    mlp_ratio=mlp_ratio,
                )
            )
        self.stages = nn.Sequential(*stages)
        self.feature_info = [
            dict(num_chs=dims[i], reduction=2 ** (i + 2), module=f"stages.{i}") for i in range(4)
        ]
        self.head = ClassifierHead(dims[3], num_classes, global_pool, drop_rate, norm_eps=1e-5)
        self.apply(init_weights_)

    # ---------------------------------------------------------------------------------------- timm interface
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Grid-sized attention parameters and LSFs are exempt from weight decay (norms/biases by timm's 1-D rule)."""
        return {
            name
            for name, _ in self.named_parameters()
            if name.endswith(("rel_pos_table", "cross_bias", "cross_scale"))
        }

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups (stem, stages / blocks) for layer-wise lr decay."""
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.downsample", (0,)),
                                                     (r"^stages\.(\d+)\.blocks\.(\d+)", None)],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward, stage by stage (outputs are unchanged)."""
        for stage in self.stages:
            stage.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (``num_classes=0`` removes it); optionally change the pooling."""
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    # ---------------------------------------------------------------------------------------------- forward
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (strides 4, 8, 16, 32) as ``NCHW`` maps, timm's ``forward_intermediates`` contract.

        ``norm`` is accepted for API compatibility; the model has no norm between the last stage and the head.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.stem(check_image_batch(x, self.in_chans))
        intermediates = []
        stages = self.stages if not stop_early else self.stages[: max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last requested index (and the head); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` images to the ``(B, C4, H/32, W/32)`` last-stage map (unpooled)."""
        return self.stages(self.stem(check_image_batch(x, self.in_chans)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, LayerNorm, dropout and classify; ``pre_logits`` stops before the classifier."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def fuse(self) -> "FcaFormer":
        """Convert this model in place to the fast inference path (see :func:`fcaformer.fast.fuse_model`)."""
        return fuse_model(self, inplace=True)


class FcaFormerDense(FcaFormer):
    """The release's dense-prediction backbone: windowed Fca stages and four projected, normalised maps.

    Each stage output goes through a bias-free 1x1 conv to ``out_dims[i]`` channels and a channels-first
    LayerNorm (eps 1e-6). ``forward`` returns the four maps (strides 4, 8, 16, 32).
    """

    def __init__(
        self,
        out_dims: Sequence[int] = (96, 192, 384, 768),
        window_size: Sequence[int] | None = (14, 7),
        **kwargs: Any,
    ) -> None:
        kwargs["num_classes"] = 0
        super().__init__(window_size=window_size, **kwargs)
        self.out_dims = tuple(out_dims)
        self.head = nn.Identity()
        self.out_proj = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(dim, out_dim, 1, bias=False),
                LayerNorm2d(out_dim, eps=1e-6),
            )
            for dim, out_dim in zip(self.dims, self.out_dims)
        )
        self.out_proj.apply(init_weights_)
        self.feature_info = [
            dict(num_chs=out_dim, reduction=2 ** (i + 2), module=f"out_proj.{i}")
            for i, out_dim in enumerate(self.out_dims)
        ]

    def get_classifier(self) -> nn.Module:
        return nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if num_classes:
            raise ValueError("the dense backbone has no classifier; build FcaFormer for classification")

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise RuntimeError("the dense backbone has no classification head; call forward() for its feature maps")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        """The four projected maps ``[(B, out_dims[i], H/2^(i+2), W/2^(i+2))]``."""
        maps = self.forward_intermediates(x, intermediates_only=True)
        return [proj(feature) for proj, feature in zip(self.out_proj, maps)]


def create_dense_backbone(variant: str = "fcaformer_l2", **kwargs: Any) -> FcaFormerDense:
    """The windowed dense-prediction backbone of a hybrid variant (``fcaformer_l1`` ... ``fcaformer_l4``).

    Keyword arguments override the architecture (``out_dims``, ``window_size``, ``drop_path_rate``, ...).
    """
    if variant not in ARCHS:
        raise ValueError(f"unknown hybrid variant {variant!r}; choose from {sorted(ARCHS)}")
    return FcaFormerDense(**{**ARCHS[variant], **kwargs})
