"""Plain FcaFormer-L0: DeiT-Tiny whose blocks are Fca blocks (SPEC section 4; the release has no code for it)."""

# No `from __future__ import annotations`: torch.fx copies forward()'s annotations into the code it generates,
# and TorchScript (scripting a traced graph) needs them as real types, not strings.

from typing import Any

import torch
from timm.layers import PatchEmbed, register_notrace_function, resample_abs_pos_embed, trunc_normal_
from timm.models._features import feature_take_indices
from torch import nn

from ..fast import fuse_model
from ..layers import FcaStage, LsfPlacement
from ._common import ClassifierHead, check_image_batch, init_weights_, prune_stage_model

torch.fx.wrap("check_image_batch")  # an FX leaf for every tracer (torchvision's feature extraction included)


@torch.fx.wrap
@register_notrace_function
def position_embedding_for_grid(
    pos_embed: torch.Tensor, native_grid: tuple[int, int], grid: tuple[int, int]
) -> torch.Tensor:
    """The ``(1, 1 + H*W, C)`` position embedding (class token first) for a ``grid`` of patches: the stored one
    on the native grid, else resampled (an FX leaf: the comparison happens when the graph runs)."""
    if grid[0] == native_grid[0] and grid[1] == native_grid[1]:
        return pos_embed
    return resample_abs_pos_embed(
        pos_embed, [grid[0], grid[1]], [native_grid[0], native_grid[1]], num_prefix_tokens=1
    )


class FcaFormerPlain(nn.Module):
    """DeiT with forward cross attention.

    The class token is a regular token (query, key and value) but is never merged into cross tokens nor passed
    through the enhance conv; the patch tokens form the grid. A learned absolute position embedding (resampled
    for other input sizes) replaces the hybrid's relative-position tables. Inputs of any size ``>= 32`` are
    padded up to a multiple of the patch size.

    Args:
        img_size: training resolution (fixes the position embedding and the native cross-token grid).
        patch_size: patch side.
        in_chans: input channels.
        num_classes: classifier outputs (0: none).
        global_pool: ``"token"`` (class token, DeiT), ``"avg"`` (mean of patch tokens) or ``""``.
        embed_dim, depth, num_heads, mlp_ratio: transformer size (DeiT-Tiny by default).
        cab_max_d, cross_attention, lsf, enhance: forward-cross-attention switches, as in the hybrid.
        drop_rate, drop_path_rate: dropout before the head, stochastic depth (linear over the blocks).
        ls_init_value: layer scale of the Fca blocks (``0`` or ``None``: none, as in DeiT).
    """

    num_prefix_tokens = 1

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        cab_max_d: int = 12,
        cross_attention: bool = True,
        lsf: LsfPlacement = "release",
        enhance: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        ls_init_value: float | None = None,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = 1  # also an instance attribute: TorchScript reads only those
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, output_fmt="NHWC", strict_img_size=False,
            dynamic_img_pad=True,
        )
        self.grid_size = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size[0] * self.grid_size[1], embed_dim))
        self.blocks = FcaStage(
            embed_dim,
            embed_dim,
            depth,
            num_heads,
            self.grid_size,
            cab_max_d=cab_max_d,
            cross_attention=cross_attention,
            drop_path_rates=torch.linspace(0, drop_path_rate, depth).tolist(),
            lsf=lsf,
            enhance=enhance,
            rel_pos=False,
            num_prefix_tokens=1,
            mlp_ratio=mlp_ratio,
            ls_init_value=ls_init_value,
            norm_eps=1e-6,
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        # the final LN belongs to the trunk (DeiT layout), so the head only pools and classifies
        self.head = ClassifierHead(embed_dim, num_classes, global_pool, drop_rate, norm_eps=None, input_fmt="NLC")
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.blocks.{i}") for i in range(depth)
        ]
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_weights_)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        extra = {n for n, _ in self.named_parameters() if n.endswith(("cross_bias", "cross_scale"))}
        return {"pos_embed", "cls_token"} | extra

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.blocks\.(\d+)", None),
                                                                       (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.blocks.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.patch_embed(check_image_batch(x, self.in_chans))
        batch, height, width, channels = x.shape
        pos_embed = position_embedding_for_grid(self.pos_embed, self.grid_size, (height, width))
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, channels)), dim=1)
        return tokens + pos_embed, (height, width)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-block patch-token maps (stride 16, ``NCHW`` or ``NLC``); the final output is normed tokens."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks.blocks), indices)
        embedded, (height, width) = self._embed(x)
        tokens, taken = self.blocks.forward_tokens(
            embedded, (height, width), take_indices, max_index if stop_early else None
        )
        intermediates = []
        for out in taken:
            patches = (self.norm(out) if norm else out)[:, 1:]
            if output_fmt == "NCHW":
                patches = patches.transpose(1, 2).reshape(patches.shape[0], -1, height, width)
            intermediates.append(patches)
        if intermediates_only:
            return intermediates
        return self.norm(tokens), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        return prune_stage_model(self, indices, prune_norm, prune_head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images to normed ``(B, 1 + N, C)`` tokens (class token first)."""
        tokens, grid = self._embed(x)
        tokens, _ = self.blocks.forward_tokens(tokens, grid)
        return self.norm(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.head.pool_type == "avg":
            x = x[:, self.num_prefix_tokens :]
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def fuse(self) -> "FcaFormerPlain":
        """Convert this model in place to the fast inference path (see :func:`fcaformer.fast.fuse_model`)."""
        return fuse_model(self, inplace=True)
