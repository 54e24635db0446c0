"""The lean inference graph of the hybrid FcaFormer: one channels-first layout end to end, for deployment runtimes.

:func:`lean_model` turns a hybrid FcaFormer (L1-L4, global attention) into a module that computes the same
outputs (within float rounding: tested to 1e-5 relative against the faithful path) with a graph that a
deployment runtime (OpenVINO, ONNX Runtime) can run without layout changes:

- every activation is a ``(B, C, H, W)`` map or a ``(B, C, L)`` token matrix, channels first, from the stem to
  the head: the ConvNeXt blocks' MLPs are 1x1 convolutions (no NCHW <-> NHWC permutes around the LayerNorm),
  and the Fca blocks never leave the map layout, so the merge (7x7 s4) and enhance (3x3) depthwise convs read
  the attention's output directly;
- LayerNorm over channels is written as ``(x - mean) / sqrt(var + eps)`` over dim 1, the pattern OpenVINO fuses
  into one MVN node, and its affine is folded into the 1x1 convolution after it where one follows;
- attention works on ``(B, heads, head_dim, L)`` views of the channels-first projections: the logits are
  ``q^T k`` and the output ``v attn^T`` (matrix products with a transposed operand, which runtimes fold into
  the product), so the heads need no transposes either; the softmax scale is folded into the query projection;
- each block's own normalised tokens and the normalised cross tokens of the earlier blocks are concatenated
  once into one key/value input, projected by one 1x1 convolution; the query is projected from the block's own
  tokens only (the release's unused cross-token query is not computed);
- the relative-position and cross-token biases of each input size are gathered once into a constant
  ``(1, heads, N, N + M)`` tensor: a constant of any exported graph, not a run-time gather;
- BatchNorms and layer scales are folded as on the fused fast path (:func:`fcaformer.fast.fuse_model`).

The lean model is inference-only and does not cover L0 (a DeiT with a class token) nor the windowed dense
backbone: use :func:`fcaformer.fast.fuse_model` for those.
"""

from __future__ import annotations

import copy

import torch
from timm.models.convnext import ConvNeXtBlock
from torch import nn

from .fast import fuse_model, is_fused
from .layers.fca import FcaBlock, FcaStage, cross_grid_size
from .models._common import check_image_batch
from .models.hybrid import ConvStage, FcaFormer, FcaFormerDense

__all__ = ["LeanConvBlock", "LeanFcaBlock", "LeanFcaFormer", "channel_norm", "lean_model", "supports_lean"]

Grid = tuple[int, int]


def channel_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over dim 1 without affine: ``(x - mean) / sqrt(var + eps)``, biased variance.

    Written out (rather than as a permute + ``layer_norm`` + permute) so that an exported graph keeps the
    channels-first layout; OpenVINO fuses exactly this pattern into one MVN node.
    """
    centred = x - x.mean(1, keepdim=True)
    return centred / torch.sqrt(centred.pow(2).mean(1, keepdim=True) + eps)


@torch.no_grad()
def _pointwise_conv(linear: nn.Linear, norm: nn.LayerNorm | None = None, out_scale: float = 1.0,
                    dims: int = 2) -> nn.Module:
    """A 1x1 convolution computing ``linear(norm_affine(x)) * out_scale`` over dim 1 (weights folded in float64)."""
    weight, bias = linear.weight.double(), linear.bias.double()
    if norm is not None:  # linear(w * z + b) = (W diag(w)) z + (W b + bias)
        bias = bias + weight @ norm.bias.double()
        weight = weight * norm.weight.double()
    conv_cls = nn.Conv2d if dims == 2 else nn.Conv1d
    conv = conv_cls(weight.shape[1], weight.shape[0], 1, device=linear.weight.device, dtype=linear.weight.dtype)
    conv.weight.copy_((weight * out_scale).reshape(conv.weight.shape))
    conv.bias.copy_(bias * out_scale)
    return conv


class _ChannelAffine(nn.Module):
    """The affine part of a LayerNorm over dim 1 (``w * z + b`` with per-channel ``w``, ``b``)."""

    def __init__(self, norm: nn.LayerNorm, dims: int) -> None:
        super().__init__()
        shape = (-1,) + (1,) * dims
        self.register_buffer("weight", norm.weight.detach().reshape(shape).clone())
        self.register_buffer("bias", norm.bias.detach().reshape(shape).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


class LeanConvBlock(nn.Module):
    """A ConvNeXt block channels first: depthwise 7x7, channel norm, 1x1 conv, GELU, 1x1 conv, residual.

    The LayerNorm's affine is folded into the first 1x1 conv, the layer scale into the second.
    """

    def __init__(self, block: ConvNeXtBlock) -> None:
        super().__init__()
        if block.use_conv_mlp or not isinstance(block.shortcut, nn.Identity):
            raise ValueError("only FcaFormer's ConvNeXt blocks (linear MLP, identity shortcut) have a lean form")
        self.conv_dw = copy.deepcopy(block.conv_dw)
        self.eps = block.norm.eps
        self.fc1 = _pointwise_conv(block.mlp.fc1, block.norm)
        self.act = nn.GELU()
        fc2 = copy.deepcopy(block.mlp.fc2)
        if block.gamma is not None:  # a faithful block (not folded yet): fold its layer scale here
            with torch.no_grad():
                fc2.weight.mul_(block.gamma[:, None])
                fc2.bias.mul_(block.gamma)
        self.fc2 = _pointwise_conv(fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(channel_norm(self.conv_dw(x), self.eps))))


class LeanFcaBlock(nn.Module):
    """An Fca block (SPEC section 2) on a ``(B, C, H, W)`` map, channels first throughout.

    Args:
        block: the block, fused (:func:`fcaformer.fast.fuse_model`: layer scales folded, enhance BN folded).
    """

    def __init__(self, block: FcaBlock) -> None:
        super().__init__()
        attn = block.attn
        if block.num_prefix_tokens or attn.rel_pos_table is None:
            raise ValueError("the lean form covers the hybrid models' Fca blocks (no class token, relative positions)")
        if not attn.fast:
            raise ValueError("build the lean block from a fused block (fcaformer.fast.fuse_model)")
        dim = attn.qkv.in_features
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.num_sources = block.num_sources
        self.eps1, self.eps2, self.eps_mlp = block.norm1.eps, block.norm2.eps, block.mlp.norm.eps
        q_linear = nn.Linear(dim, dim)
        kv_linear = nn.Linear(dim, 2 * dim)
        with torch.no_grad():
            q_linear.weight.copy_(attn.qkv.weight[:dim])
            q_linear.bias.copy_(attn.qkv.bias[:dim])
            kv_linear.weight.copy_(attn.qkv.weight[dim:])
            kv_linear.bias.copy_(attn.qkv.bias[dim:])
        if self.num_sources:
            # Own and cross tokens share the key/value projection but not the norm: the norms' affines stay
            # explicit and both token sets go through one projection after one concatenation.
            self.norm1_affine = _ChannelAffine(block.norm1, dims=1)
            self.norm_cross_affine = _ChannelAffine(block.norm_cross, dims=1)
            self.eps_cross = block.norm_cross.eps
            self.lsf = block.lsf if block.cross_scale is not None else "none"
            self.q = _pointwise_conv(q_linear, out_scale=attn.scale, dims=1)
            self.kv = _pointwise_conv(kv_linear, dims=1)
        else:
            qkv = nn.Linear(dim, 3 * dim)
            with torch.no_grad():
                qkv.weight.copy_(attn.qkv.weight)
                qkv.bias.copy_(attn.qkv.bias)
                qkv.weight[:dim] *= attn.scale
                qkv.bias[:dim] *= attn.scale
            self.qkv = _pointwise_conv(qkv, block.norm1, dims=1)
        self.proj = _pointwise_conv(attn.proj)
        self.merge = copy.deepcopy(block.merge) if block.merge is not None else None
        self.enhance = copy.deepcopy(block.enhance)
        self.norm2_affine = _ChannelAffine(block.norm2, dims=2)
        self.fc1 = _pointwise_conv(block.mlp.fc1, block.mlp.norm)
        self.act = nn.GELU()
        self.fc2 = _pointwise_conv(block.mlp.fc2)
        # Biases and LSFs depend on the grid: gathered once per grid from the source block (kept outside the
        # module tree, so the state dict holds no duplicates; its grid-sized parameters are read, never trained).
        self._source = (block,)
        self._constants: dict[Grid, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @torch.no_grad()
    def constants(self, grid: Grid) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(attention bias (1, heads, N, N + M), LSFs (1, 1, M) or None)`` for ``grid``, computed once."""
        found = self._constants.get(grid)
        if found is None:
            (block,) = self._source
            cross_grid = cross_grid_size(grid)
            num_cross = self.num_sources * cross_grid[0] * cross_grid[1]
            bias = block.attn.attention_bias(grid, num_cross)
            scale = block.scale_factors(cross_grid).reshape(1, 1, -1) if self.num_sources and self.lsf != "none" \
                else None
            found = (bias.detach().clone(), None if scale is None else scale.detach().clone())
            self._constants[grid] = found
        return found

    def _normalize_cross(self, cross: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        if self.lsf == "release":
            cross = cross * scale.to(cross.dtype)
        cross = self.norm_cross_affine(channel_norm(cross, self.eps_cross))
        if self.lsf == "post_norm":
            cross = cross * scale.to(cross.dtype)
        return cross

    def forward(self, x: torch.Tensor, history: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` (B, C, H, W) and the ``(B, C, T)`` cross tokens of the earlier blocks (oldest first) -> the new
        map and the ``(B, C, T)`` cross tokens this block emits (``None`` if none)."""
        batch, channels, height, width = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        # int(): under tracing the sizes can be traced scalars, which must still hit the cache (a constant).
        bias, scale = self.constants((int(height), int(width)))
        normed = channel_norm(x, self.eps1).flatten(2)
        if self.num_sources:
            cross = torch.cat(history[-self.num_sources :], dim=2) if self.num_sources > 1 else history[-1]
            normed = self.norm1_affine(normed)
            q = self.q(normed)
            tokens = torch.cat((normed, self._normalize_cross(cross, scale)), dim=2)
            k, v = self.kv(tokens).chunk(2, dim=1)
        else:
            q, k, v = self.qkv(normed).chunk(3, dim=1)
        q = q.reshape(batch, heads, head_dim, -1)
        k = k.reshape(batch, heads, head_dim, -1)
        v = v.reshape(batch, heads, head_dim, -1)
        attn = torch.softmax(torch.matmul(q.transpose(-2, -1), k) + bias.to(x.dtype), dim=-1)
        out = torch.matmul(v, attn.transpose(-2, -1)).reshape(batch, channels, height, width)
        x = x + self.proj(out)
        new_cross = self.merge(x).flatten(2) if self.merge is not None else None
        x = self.enhance(x)
        hidden = channel_norm(self.norm2_affine(channel_norm(x, self.eps2)), self.eps_mlp)
        x = x + self.fc2(self.act(self.fc1(hidden)))
        return x, new_cross


class LeanFcaStage(nn.Module):
    """An Fca stage (global attention) channels first: downsample, then the blocks with their cross tokens."""

    def __init__(self, stage: FcaStage) -> None:
        super().__init__()
        if stage.window_size:
            raise ValueError("the lean form covers global attention only; windowed stages run on the fused path")
        self.downsample = copy.deepcopy(stage.downsample)
        self.blocks = nn.ModuleList(LeanFcaBlock(block) for block in stage.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        history: list[torch.Tensor] = []
        for block in self.blocks:
            x, new_cross = block(x, history)
            if new_cross is not None:
                history.append(new_cross)
        return x


class LeanConvStage(nn.Module):
    """A ConvNeXt stage channels first."""

    def __init__(self, stage: ConvStage) -> None:
        super().__init__()
        self.downsample = copy.deepcopy(stage.downsample)
        self.blocks = nn.Sequential(*(LeanConvBlock(block) for block in stage.blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class LeanFcaFormer(nn.Module):
    """The lean inference form of a hybrid :class:`~fcaformer.FcaFormer` (see the module docstring).

    ``forward`` returns what the source model's ``forward`` returns (logits, or pooled features without a
    classifier); ``forward_features`` the last stage's map. Any input size with ``H, W >= 32`` works; the
    biases of each new size are gathered once, on its first forward (:meth:`prepare` does it ahead, e.g.
    before an export, so the graph holds them as constants).
    """

    def __init__(self, model: FcaFormer) -> None:
        super().__init__()
        self.in_chans = model.in_chans
        self.num_classes = model.num_classes
        self.stem = copy.deepcopy(model.stem)
        self.stages = nn.Sequential(
            *(LeanConvStage(s) if isinstance(s, ConvStage) else LeanFcaStage(s) for s in model.stages)
        )
        self.head = copy.deepcopy(model.head)

    @torch.no_grad()
    def prepare(self, img_size: int | tuple[int, int]) -> LeanFcaFormer:
        """Gather the attention biases for ``img_size`` inputs now (returns self)."""
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        param = next(self.parameters())
        self.forward_features(torch.zeros(1, self.in_chans, *size, device=param.device, dtype=param.dtype))
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` images to the ``(B, C4, H/32, W/32)`` last-stage map."""
        return self.stages(self.stem(check_image_batch(x, self.in_chans)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def supports_lean(model: nn.Module) -> bool:
    """Whether :func:`lean_model` covers ``model``: a hybrid classification FcaFormer with global attention."""
    return isinstance(model, FcaFormer) and not isinstance(model, FcaFormerDense) and not model.window_size


def lean_model(model: nn.Module) -> LeanFcaFormer:
    """The lean inference graph of a hybrid FcaFormer (``fcaformer_l1`` ... ``l4``, global attention), eval mode.

    ``model`` may be faithful or already fused; it is not modified.

    Raises:
        ValueError: for L0, the windowed dense backbone or windowed stages, or a model that is no FcaFormer.
    """
    if not supports_lean(model):
        kind = "a windowed model" if getattr(model, "window_size", None) else type(model).__name__
        raise ValueError(f"the lean graph covers the hybrid classification models with global attention "
                         f"(fcaformer_l1 ... l4), not {kind}: use fcaformer.fast.fuse_model for it")
    fused = model if is_fused(model) else fuse_model(model, channels_last=False)
    fused = fused.eval()
    return LeanFcaFormer(fused).eval()
