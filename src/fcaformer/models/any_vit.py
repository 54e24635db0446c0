"""Forward cross attention for timm's vision transformers: :func:`add_forward_cross_attention`.

The conversion turns a timm ``VisionTransformer`` (the vit_* and deit_* families) or ``SwinTransformer`` into the
same network whose blocks are this project's Fca blocks (:class:`~fcaformer.layers.FcaBlock`: cross tokens merged
from the earlier blocks' outputs, TME enhance, LSFs and cross-token biases, with ``fcaformer_l0``'s switches), and
copies every trained weight across. The new parts start so that the converted model computes what the original
did (see ``docs/any_vit.md``: the closed cross-token bias, the identity enhance conv and the split LayerNorm), yet
every one of them receives a gradient that AdamW turns into full-size steps.

- **ViT**: the blocks become one :class:`~fcaformer.layers.FcaStage` over the patch grid (the class and register
  tokens are prefix tokens: they attend and are attended to, but are never merged nor enhanced). A
  ``deit_tiny_patch16_224``-shaped model converts to ``fcaformer_l0``'s structure and parameter count.
- **Swin**: every block runs its Fca block on its own (shifted) windows, with Swin's relative-position bias and
  shift mask added to the logits, and attends to the cross tokens that the earlier blocks of its stage merged
  from the window of the same index (per-window cross tokens, as in the release's windowed dense backbone).

``timm.create_model("fca_any", base=NAME, ...)`` builds ``NAME`` and converts it (registered on import).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Literal

import timm
import torch
from timm.layers import LayerScale, Mlp
from timm.layers import PatchEmbed as TimmPatchEmbed
from timm.models import load_pretrained, register_model
from timm.models._features import FeatureGetterNet, feature_take_indices
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    SwinTransformerStage,
    WindowAttention,
    window_partition,
    window_reverse,
)
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from ..layers import ConvBN, FcaBlock, FcaStage, LsfPlacement
from ..layers.fca import gather_cross
from ._common import init_weights_, prune_stage_model

__all__ = [
    "CLOSED_CROSS_BIAS",
    "FCA_ENTRY",
    "SWITCHES",
    "FcaSwinStage",
    "FcaSwinTransformer",
    "FcaVisionTransformer",
    "SwinWindows",
    "add_forward_cross_attention",
    "calibrate_",
    "split_switches",
]

FCA_ENTRY = "fca_any"
"""The timm name of a converted model: ``timm.create_model("fca_any", base="deit_small_patch16_224", ...)``."""

SWITCHES: tuple[str, ...] = ("cab_max_d", "cross_attention", "lsf", "enhance", "init", "cross_bias_init")
"""Keyword arguments of :func:`add_forward_cross_attention` that :func:`fca_any` takes apart from the base's."""

CLOSED_CROSS_BIAS = -8.0
"""How closed a converted model's cross tokens start (``init="keep"``): together they get at most ``exp(-8)`` of the
attention a query gives its own tokens. Each of a block's ``M`` cross-token biases starts at ``-8 - log(M)``, and
:func:`calibrate_` lowers (or raises) it by how much the most eager query of the calibration images preferred its
cross token to all its own tokens. On the models measured in ``docs/any_vit.md`` every image's logits then stay
within 3e-4 of the original's, while the new parts' gradients stay above AdamW's ``eps``."""

CALIBRATION_CHUNK = 64
"""Images per forward pass of :func:`calibrate_` (its attention maps are kept one chunk at a time)."""

CROSS_DEVIATION_SCALE = 0.5
"""With ``init="keep"``, the cross-token LayerNorm's weight is ``norm1``'s times this: a cross token starts as the
block's mean token plus half of its own normalised deviation. Full deviation (1) changes the logits by up to
1e-3 through the cross tokens' values; less (0.1) starves the merge of gradient (``docs/any_vit.md``)."""

Init = Literal["keep", "scratch"]


def split_switches(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(switches, base_kwargs)``: the conversion's keyword arguments (:data:`SWITCHES`) and the rest."""
    switches = {k: v for k, v in kwargs.items() if k in SWITCHES}
    return switches, {k: v for k, v in kwargs.items() if k not in SWITCHES}


# ------------------------------------------------------------------------------------------------ weights
def _drop_prob(module: nn.Module) -> float:
    return float(getattr(module, "drop_prob", 0.0))


def _unsupported(model: nn.Module, what: str) -> ValueError:
    return ValueError(f"cannot add forward cross attention to this {type(model).__name__}: {what}")


def _block_state(norm1: nn.LayerNorm, attn: nn.Module, norm2: nn.LayerNorm, mlp: nn.Module,
                 ls1: nn.Module, ls2: nn.Module) -> dict[str, torch.Tensor]:
    """A timm block's weights under :class:`~fcaformer.layers.FcaBlock`'s names.

    The Fca block's FFN has two LayerNorms in a row (``norm2``, then the MLP's own ``norm``, SPEC section 2). The
    trained ``norm2`` becomes the MLP's norm and ``norm2`` a plain normalisation (weight 1, bias 0): normalising a
    normalised token again changes it by a factor ``1/sqrt(1 + eps - eps/var)``, i.e. by ~eps.
    """
    qkv_bias = attn.qkv.bias if attn.qkv.bias is not None else attn.qkv.weight.new_zeros(attn.qkv.out_features)
    state = {
        "norm1.weight": norm1.weight, "norm1.bias": norm1.bias,
        "attn.qkv.weight": attn.qkv.weight, "attn.qkv.bias": qkv_bias,
        "attn.proj.weight": attn.proj.weight, "attn.proj.bias": attn.proj.bias,
        "norm2.weight": torch.ones_like(norm2.weight), "norm2.bias": torch.zeros_like(norm2.bias),
        "mlp.norm.weight": norm2.weight, "mlp.norm.bias": norm2.bias,
        "mlp.fc1.weight": mlp.fc1.weight, "mlp.fc1.bias": mlp.fc1.bias,
        "mlp.fc2.weight": mlp.fc2.weight, "mlp.fc2.bias": mlp.fc2.bias,
    }
    for name, layer_scale in (("ls1", ls1), ("ls2", ls2)):
        if isinstance(layer_scale, LayerScale):
            state[f"{name}.gamma"] = layer_scale.gamma
    return {k: v.detach().clone() for k, v in state.items()}


@torch.no_grad()
def _init_new_parts(block: FcaBlock, init: Init, cross_bias_init: float) -> None:
    """Initialise what the conversion added to ``block`` (everything but the timm block's own weights).

    ``"scratch"`` is ``fcaformer_l0``'s from-scratch initialisation. ``"keep"`` keeps the function (see
    ``docs/any_vit.md``): the cross tokens start as (nearly) the block's *mean token* (``norm_cross``: norm1's bias,
    norm1's weight times :data:`CROSS_DEVIATION_SCALE`; :func:`calibrate_` sets the bias to the mean normalised
    token on real images), whose key is the mean key, so that no query can prefer a cross token to its own tokens;
    the cross-token biases are ``cross_bias_init - log(M)`` (closed, but not shut); the merge is a 7x7 average; the
    enhance conv
    is the identity (centre tap 1, BatchNorm scaled by ``sqrt(1 + eps)`` so that it returns its input exactly in
    eval mode); LSFs 1.
    """
    for conv in (block.merge, block.enhance.conv if isinstance(block.enhance, ConvBN) else None):
        if conv is not None:
            init_weights_(conv)
    if init == "scratch":
        return
    if block.merge is not None:
        block.merge.weight.fill_(1.0 / block.merge.weight[0].numel())
    if block.norm_cross is not None:
        block.norm_cross.weight.copy_(block.norm1.weight * CROSS_DEVIATION_SCALE)
        block.norm_cross.bias.copy_(block.norm1.bias)
    if block.attn.cross_bias is not None:
        # spread over the block's M cross tokens: together they start like one token with bias cross_bias_init
        block.attn.cross_bias.fill_(cross_bias_init - math.log(block.attn.cross_bias.shape[-1]))
    if isinstance(block.enhance, ConvBN):
        conv, bn = block.enhance.conv, block.enhance.bn
        conv.weight.zero_()
        conv.weight[:, :, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 1.0
        bn.reset_running_stats()
        bn.weight.fill_((1.0 + bn.eps) ** 0.5)
        bn.bias.zero_()


def _load_block(block: FcaBlock, state: dict[str, torch.Tensor], init: Init, cross_bias_init: float) -> None:
    _init_new_parts(block, init, cross_bias_init)
    unexpected = block.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:  # a naming mistake here would silently drop trained weights
        raise RuntimeError(f"no place for {unexpected} in the Fca block")


def _calibration_pass(model: nn.Module, blocks: list[FcaBlock], images: torch.Tensor,
                      hooks: list[tuple[nn.Module, Any]]) -> dict[int, torch.Tensor]:
    """Run ``images`` through ``model`` in eval mode, with forward ``hooks`` registered and the cross tokens shut
    out (their attention removed from every map before it is used, so the pass computes the original model).

    Returns, per index of a block with cross tokens, the most that any query preferred each cross token to all the
    block's own tokens together, ``log p_cross - log p_own`` at bias 0: ``(heads, M)``.
    """
    preference: dict[int, torch.Tensor] = {}

    def shut(index: int, cross: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], probs: torch.Tensor) -> torch.Tensor:
            own = probs[..., :-cross].sum(-1, keepdim=True)
            best = (probs[..., -cross:].log() - own.log()).amax((0, 2))
            preference[index] = best if index not in preference else torch.maximum(preference[index], best)
            return torch.cat((probs[..., :-cross] / own, torch.zeros_like(probs[..., -cross:])), -1)
        return hook

    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    biases = {i: b.attn.cross_bias for i, b in enumerate(blocks) if b.attn.cross_bias is not None}
    saved = {i: bias.clone() for i, bias in biases.items()}
    handles += [blocks[i].attn.attn_probe.register_forward_hook(shut(i, bias.shape[-1])) for i, bias in biases.items()]
    was_training = model.training
    try:
        for bias in biases.values():
            bias.zero_()
        model.eval()
        for chunk in images.split(CALIBRATION_CHUNK):
            model(chunk)
    finally:
        for handle in handles:
            handle.remove()
        for i, bias in biases.items():
            bias.copy_(saved[i])
        model.train(was_training)
    return preference


@torch.no_grad()
def calibrate_(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Fit the identity-initialised new parts of a converted model to real ``images`` (in place; returns it).

    One forward pass in eval mode that computes the original model (the cross tokens' attention is measured, then
    removed from every attention map before it is used):

    - every cross-token LayerNorm takes as bias the block's mean normalised token (``norm1``'s output averaged
      over the images and tokens);
    - every cross-token bias ``b``, per head and cross token, becomes ``b - p`` (at most 0), where ``p`` is the most
      that any query of ``images`` preferred that cross token to all the block's own tokens together
      (``log p_cross - log p_own`` at bias 0): no query of ``images`` then gives that cross token more than
      ``exp(b)`` of the attention its own tokens get, and a token no query cares for is opened up to that bound;
    - every TME enhance BatchNorm takes the mean and variance of its input as running statistics, weight
      ``sqrt(var + eps)`` and bias ``mean``: still the identity in eval mode, and now also in training mode (up to
      the batch's deviation from these statistics), where an uncalibrated BatchNorm would standardise every
      channel with the batch statistics and change the model at its first training step.

    Run it on a batch of training images (64 to 256, normalised as the model expects) before fine-tuning.
    """
    blocks = [m for m in model.modules() if isinstance(m, FcaBlock)]
    sums: dict[tuple[str, int], list[torch.Tensor]] = {}  # (sum, sum of squares, count) per statistic

    def record(kind: str, index: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            # channels of the enhance input (B, C, H, W) and of norm1's output (B, N, C)
            x = args[0].movedim(1, -1) if kind == "enhance" else out
            x = x.double().reshape(-1, x.shape[-1])
            parts = [x.sum(0), x.square().sum(0), x.new_tensor(x.shape[0])]
            key = (kind, index)
            sums[key] = parts if key not in sums else [a + b for a, b in zip(sums[key], parts)]
        return hook

    hooks = [(block.norm1, record("norm1", i)) for i, block in enumerate(blocks)]
    hooks += [(b.enhance, record("enhance", i)) for i, b in enumerate(blocks) if isinstance(b.enhance, ConvBN)]
    _calibration_pass(model, blocks, images, hooks)
    for i, block in enumerate(blocks):
        if block.norm_cross is not None:
            total, _, count = sums["norm1", i]
            block.norm_cross.bias.copy_(total / count)
        if isinstance(block.enhance, ConvBN):
            total, squares, count = sums["enhance", i]
            mean, var = total / count, (squares / count - (total / count).square()).clamp(min=0.0)
            bn = block.enhance.bn
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.weight.copy_((var + bn.eps).sqrt())
            bn.bias.copy_(mean)
    # a second pass: the cross tokens' keys depend on the cross-token LayerNorm just set
    for i, preference in _calibration_pass(model, blocks, images, []).items():
        bias = blocks[i].attn.cross_bias
        bias.sub_(preference.reshape(bias.shape)).clamp_(max=0.0)
    return model


# ---------------------------------------------------------------------------------------------------- ViT
class FcaVisionTransformer(VisionTransformer):
    """A timm ``VisionTransformer`` whose blocks are one global :class:`~fcaformer.layers.FcaStage`.

    Built by :func:`add_forward_cross_attention`; everything outside the blocks (embedding, prefix tokens, norms,
    pooling, head) is timm's. Attention masks (``attn_mask``, ``is_causal``) are not supported: the patch tokens
    must form their grid.
    """

    blocks: FcaStage

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        grid = self.patch_embed.dynamic_feat_size((x.shape[-2], x.shape[-1]))
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        return x, (grid[0], grid[1])

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        _check_no_mask(attn_mask, is_causal)
        tokens, grid = self._tokens(x)
        tokens, _ = self.blocks.forward_tokens(tokens, grid)
        return self.norm(tokens)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> Any:
        """timm's ``forward_intermediates`` (same arguments and outputs), through the Fca blocks."""
        _check_no_mask(attn_mask, is_causal)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks.blocks), indices)
        tokens, grid = self._tokens(x)
        tokens, taken = self.blocks.forward_tokens(tokens, grid, take_indices, max_index if stop_early else None)
        taken = [self.norm(t) if norm else t for t in taken]
        prefix = self.num_prefix_tokens
        intermediates = [t[:, prefix:] for t in taken]
        if output_fmt == "NCHW":
            intermediates = [t.reshape(t.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
                             for t in intermediates]
        prefix_tokens = [t[:, :prefix] for t in taken] if prefix else None
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self.norm(tokens)
            return result
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(tokens), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        if prune_head:
            self.fc_norm = nn.Identity()
        return prune_stage_model(self, indices, prune_norm, prune_head)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
                    blocks=[(r"^blocks\.blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.blocks.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set(super().no_weight_decay()) | _cross_parameter_names(self)


def _check_no_mask(attn_mask: torch.Tensor | None, is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("a model with forward cross attention takes no attention mask (its patches form a grid)")


def _cross_parameter_names(model: nn.Module) -> set[str]:
    """Cross-token biases and LSFs: no weight decay, as in ``fcaformer_l0``."""
    return {n for n, _ in model.named_parameters() if n.endswith(("cross_bias", "cross_scale"))}


def _check_vit(model: VisionTransformer) -> None:
    if not isinstance(model.patch_embed, TimmPatchEmbed):
        raise _unsupported(model, f"its patch embedding is a {type(model.patch_embed).__name__}, not timm's PatchEmbed")
    if not isinstance(model.patch_drop, nn.Identity):
        raise _unsupported(model, "patch dropout removes tokens from the grid; build it with patch_drop_rate=0")
    for i, block in enumerate(model.blocks):
        problems = []
        if type(block) is not Block:
            problems.append(f"a {type(block).__name__} (only timm's pre-norm Block is supported)")
        elif type(block.attn) is not Attention:
            problems.append(f"{type(block.attn).__name__} attention (only timm's Attention is supported)")
        elif not (isinstance(block.attn.q_norm, nn.Identity) and isinstance(block.attn.k_norm, nn.Identity)
                  and isinstance(block.attn.norm, nn.Identity)):
            problems.append("query/key or attention-output normalisation")
        elif block.attn.proj.bias is None or block.attn.head_dim * block.attn.num_heads != block.norm1.weight.numel():
            problems.append("an attention projection without bias or a head dim other than dim / heads")
        elif type(block.mlp) is not Mlp or not isinstance(block.mlp.norm, nn.Identity) \
                or not isinstance(block.mlp.act, nn.GELU) or block.mlp.fc1.bias is None:
            problems.append(f"a {type(block.mlp).__name__} MLP (only timm's GELU Mlp without norm is supported)")
        elif type(block.norm1) not in (nn.LayerNorm, timm.layers.LayerNorm):
            problems.append(f"{type(block.norm1).__name__} norms (LayerNorm only)")
        if problems:
            raise _unsupported(model, f"block {i} has {problems[0]}")


def _convert_vit(model: VisionTransformer, switches: dict[str, Any]) -> FcaVisionTransformer:
    _check_vit(model)
    init, cross_bias_init = switches.pop("init"), switches.pop("cross_bias_init")
    blocks: list[Block] = list(model.blocks)
    first = blocks[0]
    dim = first.norm1.weight.numel()
    converted = copy.deepcopy(model)
    converted.__class__ = FcaVisionTransformer
    converted.blocks = FcaStage(
        dim,
        dim,
        len(blocks),
        first.attn.num_heads,
        tuple(model.patch_embed.grid_size),
        drop_path_rates=[_drop_prob(b.drop_path1) for b in blocks],
        rel_pos=False,
        num_prefix_tokens=model.num_prefix_tokens,
        mlp_ratio=first.mlp.fc1.out_features / dim,
        ls_init_value=1.0 if isinstance(first.ls1, LayerScale) else None,
        norm_eps=first.norm1.eps,
        attn_drop=first.attn.attn_drop.p,
        proj_drop=first.attn.proj_drop.p,
        **switches,
    ).to(first.norm1.weight.device, first.norm1.weight.dtype)
    for block, fca in zip(blocks, converted.blocks.blocks):
        _load_block(fca, _block_state(block.norm1, block.attn, block.norm2, block.mlp, block.ls1, block.ls2),
                    init, cross_bias_init)
    converted.feature_info = [dict(info, module=f"blocks.blocks.{i}") for i, info in enumerate(model.feature_info)]
    return converted


# --------------------------------------------------------------------------------------------------- Swin
class SwinWindows(nn.Module):
    """The windowing of one timm Swin block: cyclic shift, window partition, relative-position bias, shift mask.

    The relative-position table is the Swin block's own parameter (timm's layout, signed offsets); the mask is the
    shifted-window mask timm computed for the model's fixed input size.
    """

    def __init__(self, block: SwinTransformerBlock) -> None:
        super().__init__()
        attn: WindowAttention = block.attn
        self.window_size: tuple[int, int] = tuple(block.window_size)
        self.shift_size: tuple[int, int] = tuple(block.shift_size)
        self.input_resolution: tuple[int, int] = tuple(block.input_resolution)
        self.relative_position_bias_table = nn.Parameter(attn.relative_position_bias_table.detach().clone())
        self.register_buffer("relative_position_index", attn.relative_position_index.clone(), persistent=False)
        mask = None if block.attn_mask is None else block.attn_mask.clone()
        self.register_buffer("attn_mask", mask, persistent=False)

    def attention_bias(self) -> torch.Tensor:
        """``(windows or 1, heads, N, N)``: the relative-position bias, plus the shift mask of a shifted block."""
        area = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(area, area, -1)
        bias = bias.permute(2, 0, 1).unsqueeze(0)
        return bias if self.attn_mask is None else bias + self.attn_mask.unsqueeze(1).to(bias.dtype)

    def partition(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` map to ``(B * windows, N, C)`` tokens of the (shifted) windows."""
        if any(self.shift_size):
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        windows = window_partition(x, self.window_size)
        return windows.reshape(windows.shape[0], -1, windows.shape[-1])

    def reverse(self, windows: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Inverse of :meth:`partition`."""
        x = window_reverse(windows.reshape(-1, self.window_size[0], self.window_size[1], windows.shape[-1]),
                           self.window_size, height, width)
        if any(self.shift_size):
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x


class FcaSwinStage(nn.Module):
    """A Swin stage (``(B, H, W, C)`` in and out) of Fca blocks, each run on its block's (shifted) windows.

    Block ``i`` attends, within each window, to the window's tokens (with Swin's relative-position bias and shift
    mask) and to the cross tokens that blocks ``i - cab_max_d ... i - 1`` merged from the window of the same index
    (``ceil(ws / 4)^2`` per window and block). Keys ``blocks.<i>.*`` are the Fca blocks; ``windows.<i>.*`` hold
    the Swin blocks' relative-position tables.
    """

    def __init__(self, stage: SwinTransformerStage, switches: dict[str, Any], init: Init,
                 cross_bias_init: float) -> None:
        super().__init__()
        self.downsample = stage.downsample
        cab_max_d = switches.pop("cab_max_d")
        cross_attention = switches.pop("cross_attention")
        depth = len(stage.blocks)
        self.windows = nn.ModuleList(SwinWindows(block) for block in stage.blocks)
        fca_blocks = []
        for i, block in enumerate(stage.blocks):
            fca = FcaBlock(
                block.norm1.weight.numel(),
                block.attn.num_heads,
                tuple(block.window_size),
                min(i, cab_max_d) if cross_attention else 0,
                emits_cross=cross_attention and i < depth - 1,
                rel_pos=False,
                mlp_ratio=block.mlp.fc1.out_features / block.norm1.weight.numel(),
                drop_path=_drop_prob(block.drop_path1),
                ls_init_value=None,
                norm_eps=block.norm1.eps,
                attn_drop=block.attn.attn_drop.p,
                proj_drop=block.attn.proj_drop.p,
                **switches,
            ).to(block.norm1.weight.device, block.norm1.weight.dtype)
            _load_block(fca, _block_state(block.norm1, block.attn, block.norm2, block.mlp, nn.Identity(),
                                          nn.Identity()), init, cross_bias_init)
            fca_blocks.append(fca)
        self.blocks = nn.ModuleList(fca_blocks)

    @property
    def grad_checkpointing(self) -> bool:
        return all(block.grad_checkpointing for block in self.blocks)

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool) -> None:  # timm's SwinTransformer.set_grad_checkpointing sets it
        for block in self.blocks:
            block.grad_checkpointing = enable

    def set_input_size(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("a converted Swin keeps its input size: call set_input_size before the conversion")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        _, height, width, _ = x.shape
        history: list[torch.Tensor] = []
        for block, windows in zip(self.blocks, self.windows):
            tokens, new_cross = block(windows.partition(x), windows.window_size,
                                      gather_cross(history, block.num_sources), windows.attention_bias())
            if new_cross is not None:
                history.append(new_cross)
            x = windows.reverse(tokens, height, width)
        return x


class FcaSwinTransformer(SwinTransformer):
    """A timm ``SwinTransformer`` whose stages are :class:`FcaSwinStage` (built by
    :func:`add_forward_cross_attention`); everything else is timm's."""

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set(super().no_weight_decay()) | _cross_parameter_names(self)


def _check_swin(model: SwinTransformer) -> None:
    for s, stage in enumerate(model.layers):
        if not isinstance(stage, SwinTransformerStage):
            raise _unsupported(model, f"stage {s} is a {type(stage).__name__}")
        for i, block in enumerate(stage.blocks):
            where = f"block {i} of stage {s}"
            if type(block) is not SwinTransformerBlock or type(block.attn) is not WindowAttention:
                raise _unsupported(model, f"{where} is a {type(block).__name__}")
            if block.dynamic_mask:
                raise _unsupported(model, "it builds its shift masks per input size (strict_img_size=False); "
                                          "build it for one img_size")
            height, width = block.input_resolution
            if height % block.window_size[0] or width % block.window_size[1]:
                raise _unsupported(model, f"the {height}x{width} map of stage {s} needs padding to "
                                          f"{block.window_size} windows; choose an img_size whose stage maps "
                                          "are multiples of the window")
            dim = block.norm1.weight.numel()
            if block.attn.qkv.out_features != 3 * dim or type(block.mlp) is not Mlp or block.attn.proj.bias is None:
                raise _unsupported(model, f"{where} has a head dim other than dim / heads or another MLP")


def _convert_swin(model: SwinTransformer, switches: dict[str, Any]) -> FcaSwinTransformer:
    _check_swin(model)
    init, cross_bias_init = switches.pop("init"), switches.pop("cross_bias_init")
    converted = copy.deepcopy(model)
    converted.__class__ = FcaSwinTransformer
    converted.layers = nn.Sequential(*(FcaSwinStage(stage, dict(switches), init, cross_bias_init)
                                       for stage in model.layers))
    return converted


# ------------------------------------------------------------------------------------------------- public
def add_forward_cross_attention(
    model: nn.Module,
    *,
    cab_max_d: int = 12,
    cross_attention: bool = True,
    lsf: LsfPlacement = "release",
    enhance: bool = True,
    init: Init = "keep",
    cross_bias_init: float = CLOSED_CROSS_BIAS,
    calibration_images: torch.Tensor | None = None,
) -> nn.Module:
    """The Fca version of a timm ``VisionTransformer`` or ``SwinTransformer`` (``model`` itself is unchanged).

    Args:
        model: a timm ViT (vit_*, deit_*: class token, register tokens, absolute position embedding, fused qkv,
            pre-norm blocks with GELU MLPs) or Swin Transformer (fixed input size).
        cab_max_d, cross_attention, lsf, enhance: ``fcaformer_l0``'s switches (how many earlier blocks' cross
            tokens a block sees; ``False`` for the same blocks without cross tokens; LSF placement; TME enhance).
        init: ``"keep"`` (default) starts the new parts so that the model computes what ``model`` did (for a
            trained model); ``"scratch"`` gives them ``fcaformer_l0``'s from-scratch initialisation (for a model
            about to be trained from scratch).
        cross_bias_init: how closed the cross tokens start with ``init="keep"`` (see :data:`CLOSED_CROSS_BIAS`):
            lower keeps the original more exactly and gives the new parts smaller gradients.
        calibration_images: training images (64 to 512), normalised as the model expects. With ``init="keep"``
            the new parts are fitted to them (:func:`calibrate_`): every cross-token bias is set so that no query
            of these images prefers its cross tokens, the cross tokens start as the block's mean token, and the
            enhance BatchNorms keep the model unchanged in training mode too. Without them the closing assumes
            that a cross token is no more attractive than an average own token (true of the models measured in
            ``docs/any_vit.md``, not of a model whose attention has collapsed) and training mode differs.

    Returns:
        an :class:`FcaVisionTransformer` or :class:`FcaSwinTransformer` with ``model``'s weights, mode, device and
        dtype.

    Raises:
        ValueError: an unsupported model or switch (the message names it).
    """
    if init not in ("keep", "scratch"):
        raise ValueError(f"init must be 'keep' or 'scratch', got {init!r}")
    if cab_max_d < 1:
        raise ValueError(f"cab_max_d must be >= 1, got {cab_max_d}")
    switches = dict(cab_max_d=cab_max_d, cross_attention=cross_attention, lsf=lsf, enhance=enhance, init=init,
                    cross_bias_init=float(cross_bias_init))
    if isinstance(model, (FcaVisionTransformer, FcaSwinTransformer)):
        raise ValueError("this model already has forward cross attention")
    if isinstance(model, VisionTransformer):
        converted: nn.Module = _convert_vit(model, switches)
    elif isinstance(model, SwinTransformer):
        converted = _convert_swin(model, switches)
    else:
        raise ValueError(f"add_forward_cross_attention supports timm's VisionTransformer and SwinTransformer, "
                         f"got {type(model).__name__}")
    converted.train(model.training)
    if calibration_images is not None and init == "keep":
        calibrate_(converted, calibration_images.to(next(model.parameters()).device))
    return converted


@register_model
def fca_any(pretrained: bool = False, base: str | None = None, **kwargs: Any) -> nn.Module:
    """Any timm ViT or Swin with forward cross attention: ``timm.create_model("fca_any", base=NAME, **kwargs)``.

    ``NAME`` is built with the other keyword arguments (``pretrained`` loads its timm weights), then converted with
    the switches among them (:data:`SWITCHES`; ``init`` defaults to ``"keep"`` for pretrained weights, else
    ``"scratch"``). ``features_only=True`` wraps the converted model in timm's ``FeatureGetterNet``.

    A ``pretrained_cfg`` (what timm passes for a hub folder or ``hf-hub:`` id whose architecture is ``fca_any``,
    e.g. one written by ``fcaformer convert``) holds the *converted* model's weights: the base is built without
    weights, converted, and those weights loaded strictly.
    """
    if not base:
        raise ValueError('fca_any needs base=<timm model name>, e.g. timm.create_model("fca_any", '
                         'base="deit_tiny_patch16_224")')
    switches, base_kwargs = split_switches(kwargs)
    features_only = base_kwargs.pop("features_only", False)
    out_indices: int | Sequence[int] | None = base_kwargs.pop("out_indices", None)
    own_cfg = base_kwargs.pop("pretrained_cfg", None)
    if base_kwargs.get("pretrained_cfg_overlay") is None:  # an overlay is the base's (e.g. its weights' file)
        base_kwargs.pop("pretrained_cfg_overlay", None)
    load_own = pretrained and isinstance(own_cfg, dict)
    switches.setdefault("init", "keep" if pretrained and not load_own else "scratch")
    model = add_forward_cross_attention(timm.create_model(base, pretrained=pretrained and not load_own,
                                                          **base_kwargs), **switches)
    if load_own:
        load_pretrained(model, pretrained_cfg=own_cfg, num_classes=model.num_classes,
                        in_chans=base_kwargs.get("in_chans", 3))
        model.pretrained_cfg = {**model.pretrained_cfg, **own_cfg}
    if features_only:
        default = 3 if isinstance(model, VisionTransformer) else tuple(range(len(model.layers)))
        model = FeatureGetterNet(model, out_indices=default if out_indices is None else out_indices)
    return model

