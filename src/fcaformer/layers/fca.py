"""Forward cross attention: the Fca block and the Fca stage.

These layers are usable on their own. An :class:`FcaStage` turns a ``(B, C, H, W)`` map into a map of the same
shape; inside it, every block attends to its own tokens *and* to the cross tokens merged (depthwise 7x7,
stride 4) from the outputs of the earlier blocks of the stage.

Grid-sized parameters (the relative-position table, the cross-token biases and the learnable scale factors)
are stored for a *native* grid. On any other grid they are resized by bicubic interpolation over the grid; on
the native grid the stored values are used exactly.

The layers script with ``torch.jit.script`` and trace with ``torch.fx``: the functions that compare the input's
grid with the native one (:func:`resize_grid_values`, :func:`relative_position_bias`,
:func:`resize_cross_values`) are FX leaves (``torch.fx.wrap`` for every tracer, timm's
``register_notrace_function`` for timm's), so a traced graph decides at run time, per input size, exactly as
the eager module does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, register_notrace_function
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from .conv import ConvBN, StridedDepthwiseConv2d

LsfPlacement = Literal["release", "post_norm", "none"]
LSF_PLACEMENTS: tuple[str, ...] = ("release", "post_norm", "none")

Grid = tuple[int, int]


def cross_grid_size(grid: Grid) -> Grid:
    """Grid of the cross tokens a block emits from a ``grid`` map (depthwise 7x7, stride 4, padding 3)."""
    # integer ceil division: stays symbolic under FX tracing and torch.export
    return -(-grid[0] // 4), -(-grid[1] // 4)


@torch.fx.wrap
@register_notrace_function
def resize_grid_values(values: torch.Tensor, old_grid: Grid, new_grid: Grid) -> torch.Tensor:
    """Resize values laid out on a grid along the last dim (``(..., oh*ow) -> (..., nh*nw)``).

    Bicubic interpolation (no antialiasing, so the op exports to ONNX); identity on the native grid.
    """
    if old_grid[0] == new_grid[0] and old_grid[1] == new_grid[1]:
        return values
    grid = values.reshape(1, -1, old_grid[0], old_grid[1])
    resized = F.interpolate(grid.float(), size=[new_grid[0], new_grid[1]], mode="bicubic", align_corners=False)
    return resized.to(values.dtype).reshape(list(values.shape[:-1]) + [new_grid[0] * new_grid[1]])


def relative_position_index(grid: Grid, device: torch.device | None = None) -> torch.Tensor:
    """``(N, N)`` index into a ``(heads, H*W)`` table: ``|r1 - r2| * W + |c1 - c2|`` for row-major tokens."""
    h, w = grid
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    row_offsets = (rows[:, None] - rows[None, :]).abs()
    col_offsets = (cols[:, None] - cols[None, :]).abs()
    index = row_offsets[:, None, :, None] * w + col_offsets[None, :, None, :]
    return index.reshape(h * w, h * w)


@torch.fx.wrap
@register_notrace_function
def relative_position_bias(table: torch.Tensor, native_grid: Grid, grid: Grid) -> torch.Tensor:
    """``(heads, N, N)`` bias of a ``(heads, native H*W)`` relative-position table on ``grid`` (resized first)."""
    table = resize_grid_values(table, native_grid, grid)
    return table[:, relative_position_index(grid, table.device)]


@torch.fx.wrap
@register_notrace_function
def resize_cross_values(values: torch.Tensor, native_cross_grid: Grid, cross_grid: Grid) -> torch.Tensor:
    """Per-cross-token values ``(..., M)`` (M = sources x native cross grid) with each source block's part
    resized to ``cross_grid``; the same tensor on the native cross grid."""
    if native_cross_grid[0] == cross_grid[0] and native_cross_grid[1] == cross_grid[1]:
        return values
    per_source = values.reshape(-1, native_cross_grid[0] * native_cross_grid[1])
    resized = resize_grid_values(per_source, native_cross_grid, cross_grid)
    return resized.reshape(list(values.shape[:-1]) + [-1])


@torch.no_grad()
def fold_scale_into_linear_(linear: nn.Linear, scale: torch.Tensor) -> None:
    """Make ``linear`` compute ``linear(x) * scale`` (per output channel) by scaling its weight and bias."""
    linear.weight.mul_(scale.reshape(-1, 1))
    if linear.bias is not None:
        linear.bias.mul_(scale.reshape(-1))


def _clear_bias_cache_hook(module: FcaAttention, *args: object) -> None:
    module.clear_bias_cache()


class FcaAttention(nn.Module):
    """Multi-head attention of regular tokens over ``[regular; cross]`` keys.

    Queries come only from the regular tokens; keys and values of the cross tokens come from the same
    ``qkv`` projection. Logits get a relative-position bias between regular
    tokens and one learnable bias per head and cross token.

    Args:
        dim: channels.
        num_heads: attention heads (``dim`` must divide evenly).
        grid_size: native token grid of the relative-position table.
        num_cross_tokens: native number of cross tokens attended (0: plain self-attention).
        rel_pos: whether to use a relative-position bias (``False`` for the plain L0 model).
        num_prefix_tokens: leading tokens (e.g. a class token) outside the grid; they get no position bias.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: Grid,
        num_cross_tokens: int = 0,
        rel_pos: bool = True,
        num_prefix_tokens: int = 0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rel_pos_table = (
            nn.Parameter(torch.zeros(num_heads, grid_size[0] * grid_size[1])) if rel_pos else None
        )
        self.cross_bias = nn.Parameter(torch.zeros(1, num_heads, 1, num_cross_tokens)) if num_cross_tokens else None
        # Forward hooks on this identity see the attention probabilities (B, heads, N, N + M): the analysis
        # tools read them there without changing the computation.
        self.attn_probe = nn.Identity()
        # Fast path (see fcaformer.fast): off by default, so the faithful computation runs unless asked for.
        self.fast = False
        # Fast path in training on CUDA: SDPA also when the bias needs a gradient (the memory-efficient kernel
        # computes it) instead of explicit attention. Opt-in, see fcaformer.fast.set_fast_attention.
        self.sdpa_bias_grad = False
        self._bias_cache: dict[tuple, torch.Tensor] = {}
        # A module-level hook (it gets the module as an argument) so that deep copies clear their own cache.
        self.register_load_state_dict_pre_hook(_clear_bias_cache_hook)

    def position_bias(self, grid: Grid) -> torch.Tensor | None:
        """``(heads, N, N)`` relative-position bias for ``grid`` (``None`` without a table)."""
        if self.rel_pos_table is None:
            return None
        return relative_position_bias(self.rel_pos_table, self.grid_size, grid)

    def cross_token_bias(self, cross_grid: Grid, native_cross_grid: Grid) -> torch.Tensor:
        """``(1, heads, 1, M)`` cross-token bias, each source block's part resized to ``cross_grid``."""
        if self.cross_bias is None:
            raise ValueError("this attention has no cross-token bias (built with num_cross_tokens=0)")
        return resize_cross_values(self.cross_bias, native_cross_grid, cross_grid)

    def forward(
        self, x: torch.Tensor, grid: Grid, cross: torch.Tensor | None = None, attn_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend from ``x`` (B, N, C) over ``x`` and the normalised cross tokens ``cross`` (B, M, C).

        ``attn_bias`` is an optional additive bias ``(G, heads or 1, N, N)`` on the logits among the regular tokens
        (not the cross tokens); batch item ``b`` takes ``attn_bias[b % G]``, so ``G`` must divide ``B``. A Swin
        block passes its relative positions and shifted-window mask this way, ``G`` windows per image.
        """
        if self.fast:
            return self._forward_fast(x, grid, cross, attn_bias)
        batch, num_tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        position_bias = self.position_bias(grid)
        if position_bias is not None:
            # Prefix tokens (a class token) sit outside the grid: zero bias to and from them.
            prefix = self.num_prefix_tokens
            logits = logits + (F.pad(position_bias, [prefix, 0, prefix, 0]) if prefix else position_bias)
        if attn_bias is not None:
            logits = add_grouped_bias(logits, attn_bias)
        if cross is not None:
            # Like the release, project a query for the cross tokens too and discard it: this path mirrors the
            # release's cost (a fused fast path skips it).
            _, k_cross, v_cross = (
                self.qkv(cross)
                .reshape(batch, cross.shape[1], 3, self.num_heads, self.head_dim)
                .permute(2, 0, 3, 1, 4)
                .unbind(0)
            )
            cross_bias = self.cross_token_bias(cross_grid_size(grid), cross_grid_size(self.grid_size))
            cross_logits = (q * self.scale) @ k_cross.transpose(-2, -1) + cross_bias
            logits = torch.cat((logits, cross_logits), dim=-1)
            v = torch.cat((v, v_cross), dim=-2)
        attn = self.attn_drop(self.attn_probe(logits.softmax(dim=-1)))
        out = (attn @ v).transpose(1, 2).reshape(batch, num_tokens, channels)
        return self.proj_drop(self.proj(out))

    # ------------------------------------------------------------------------------------------- fast path
    def reparameterize(self) -> None:
        """Switch to the fast path in place (timm's ``reparameterize_model`` calls this)."""
        self.fast = True

    def train(self, mode: bool = True) -> FcaAttention:
        self.clear_bias_cache()
        return super().train(mode)

    def clear_bias_cache(self) -> None:
        """Forget the gathered biases (they are rebuilt on the next fast forward)."""
        self._bias_cache.clear()

    def attention_bias(self, grid: Grid, num_cross: int) -> torch.Tensor | None:
        """``(1, heads, P + N, P + N + M)`` additive bias: position bias, then the cross-token bias.

        ``None`` when there is neither a table nor cross tokens. Differentiable; :meth:`cached_attention_bias`
        memoises it for inference.
        """
        parts: list[torch.Tensor] = []
        prefix = self.num_prefix_tokens
        num_queries = prefix + grid[0] * grid[1]
        position_bias = self.position_bias(grid)
        if position_bias is not None:
            parts.append(F.pad(position_bias, [prefix, 0, prefix, 0]) if prefix else position_bias)
        elif num_cross > 0:
            parts.append(self.qkv.weight.new_zeros(self.num_heads, num_queries, num_queries))
        if num_cross > 0:
            cross_bias = self.cross_token_bias(cross_grid_size(grid), cross_grid_size(self.grid_size))
            if not torch.jit.is_scripting():
                _check_cross_count(cross_bias, num_cross, grid)
            parts.append(cross_bias[0].expand(-1, num_queries, -1))
        if len(parts) == 0:
            return None
        return torch.cat(parts, dim=-1).unsqueeze(0)

    @torch.jit.unused
    def cached_attention_bias(self, grid: Grid, num_cross: int) -> torch.Tensor | None:
        """:meth:`attention_bias`, gathered once per grid and reused while the parameters are unchanged.

        The key holds each bias parameter's version counter and storage pointer, so in-place updates
        (optimizer steps, ``load_state_dict``'s ``copy_``) and replaced or moved parameters all miss the cache;
        ``train()`` and ``load_state_dict`` also clear it.
        """
        key = (tuple(grid), num_cross, *((p._version, p.data_ptr(), p.device, p.dtype) for p in self._bias_params()))
        bias = self._bias_cache.get(key)
        if bias is None:
            with torch.no_grad():
                bias = self.attention_bias(grid, num_cross)
            self._bias_cache.clear()  # one grid at a time: a model fed many sizes must not grow without bound
            self._bias_cache[key] = bias
        return bias

    @torch.jit.unused
    def _bias_params(self) -> list[nn.Parameter]:
        return [p for p in (self.rel_pos_table, self.cross_bias) if p is not None]

    @torch.jit.unused
    def _eager_fast_bias(self, grid: Grid, num_cross: int) -> tuple[torch.Tensor | None, bool]:
        """The bias of the fast path in eager mode, and whether to compute explicit probabilities."""
        bias_needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self._bias_params())
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or bias_needs_grad:
            # Graph capture must see the bias built from the parameters, and training needs its gradient.
            bias = self.attention_bias(grid, num_cross)
        else:
            bias = self.cached_attention_bias(grid, num_cross)
        # Analysis hooks need the probabilities themselves. And with a bias that needs a gradient, PyTorch's CPU
        # SDPA falls back to a slower unfused kernel than three explicit ops (measured on L1 training); on CUDA
        # ``sdpa_bias_grad`` lets the memory-efficient kernel differentiate the bias instead.
        explicit_for_grad = bias_needs_grad and not (self.sdpa_bias_grad and self.qkv.weight.is_cuda)
        explicit = bool(self.attn_probe._forward_hooks or self.attn_probe._forward_pre_hooks or explicit_for_grad)
        return bias, explicit

    def _forward_fast(
        self, x: torch.Tensor, grid: Grid, cross: torch.Tensor | None, attn_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch, num_tokens, channels = x.shape
        num_cross = 0 if cross is None else cross.shape[1]
        explicit = False
        if torch.jit.is_scripting():  # a scripted model has no bias cache and no Python hooks
            bias = self.attention_bias(grid, num_cross)
        else:
            bias, explicit = self._eager_fast_bias(grid, num_cross)
        groups = 1
        if attn_bias is not None:
            # the caller's bias covers the regular keys only: zero for the cross tokens
            extra = F.pad(attn_bias, [0, num_cross]) if num_cross > 0 else attn_bias
            bias = extra if bias is None else bias + extra
            groups = attn_bias.shape[0]
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if cross is not None:
            # Keys and values only: the release's query for the cross tokens is never used.
            kv_cross = F.linear(cross, self.qkv.weight[channels:], self.qkv.bias[channels:])
            k_cross, v_cross = (
                kv_cross.reshape(batch, num_cross, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            )
            k = torch.cat((k, k_cross), dim=2)
            v = torch.cat((v, v_cross), dim=2)
        if explicit:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                logits = add_grouped_bias(logits, bias)
            attn = self.attn_drop(self.attn_probe(logits.softmax(dim=-1)))
            out = attn @ v
        else:
            dropout = self.attn_drop.p if self.training else 0.0
            if groups > 1:  # (B/G, G, heads, L, d): SDPA broadcasts the (G, heads, N, S) bias over the images
                q, k, v = _split_groups(q, groups), _split_groups(k, groups), _split_groups(v, groups)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), dropout_p=dropout
            )
            if groups > 1:
                out = out.flatten(0, 1)
        out = out.transpose(1, 2)
        if not torch.jit.is_scripting() and torch.compiler.is_compiling():
            # Graph decompositions of SDPA (ONNX export) return another memory layout than the eager kernel the
            # graph was traced with; an explicit copy keeps the reshape below from being recorded as a view.
            out = out.clone(memory_format=torch.contiguous_format)
        out = out.reshape(batch, num_tokens, channels)
        return self.proj_drop(self.proj(out))


def _split_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, ...) -> (B / groups, groups, ...)``."""
    return x.reshape([-1, groups] + list(x.shape[1:]))


def add_grouped_bias(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``logits`` ``(B, heads, N, S)`` plus ``bias`` ``(G, heads or 1, N, S)``, batch item ``b`` taking
    ``bias[b % G]`` (timm's window order: the windows of one image are consecutive)."""
    groups = bias.shape[0]
    if groups == 1:
        return logits + bias
    return (_split_groups(logits, groups) + bias).flatten(0, 1)


def _check_cross_count(cross_bias: torch.Tensor, num_cross: int, grid: Grid) -> None:
    if cross_bias.shape[-1] != num_cross:
        raise ValueError(
            f"got {num_cross} cross tokens but the cross-token bias covers {cross_bias.shape[-1]} on a "
            f"{tuple(grid)} grid; pass the cross tokens of the earlier blocks of this stage"
        )


class FcaMlp(nn.Module):
    """The Fca block's FFN: its own LayerNorm, then Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden_dim: int, norm_eps: float = 1e-5, drop: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(self.norm(x))))))


class FcaBlock(nn.Module):
    """One Fca block (SPEC section 2) on a token sequence laid out on a grid.

    Args:
        dim: channels ``C``.
        num_heads: attention heads.
        grid_size: native grid ``(H, W)`` of the regular tokens (sizes the grid-shaped parameters).
        num_sources: how many earlier blocks' cross tokens this block attends to (0 for the first block).
        emits_cross: whether this block merges its output into cross tokens for later blocks.
        lsf: where the learnable scale factors act: ``"release"`` (before the cross-token LayerNorm, as in the
            authors' release), ``"post_norm"`` (after it) or ``"none"``.
        enhance: apply the TME enhance conv (depthwise 3x3 + BN, replacing the tokens).
        rel_pos: use a relative-position bias.
        num_prefix_tokens: leading tokens outside the grid (a class token): they attend and are attended to,
            but are never merged into cross tokens nor enhanced.
        mlp_ratio: FFN hidden size over ``dim``.
        drop_path: stochastic-depth rate of both residual branches.
        ls_init_value: initial layer scale of both branches (``0`` or ``None``: no layer scale).
        norm_eps: eps of the block's LayerNorms.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: Grid,
        num_sources: int = 0,
        emits_cross: bool = False,
        *,
        lsf: LsfPlacement = "release",
        enhance: bool = True,
        rel_pos: bool = True,
        num_prefix_tokens: int = 0,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        ls_init_value: float | None = 1e-6,
        norm_eps: float = 1e-5,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if lsf not in LSF_PLACEMENTS:
            raise ValueError(f"lsf must be one of {LSF_PLACEMENTS}, got {lsf!r}")
        self.grid_size = tuple(grid_size)
        self.cross_grid = cross_grid_size(self.grid_size)
        self.num_sources = num_sources
        self.lsf = lsf
        self.num_prefix_tokens = num_prefix_tokens
        native_cross = num_sources * self.cross_grid[0] * self.cross_grid[1]

        self.grad_checkpointing = False
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        # None (not absent) without sources: TorchScript and FX then drop the cross-token branch statically
        self.norm_cross = nn.LayerNorm(dim, eps=norm_eps) if num_sources else None
        self.cross_scale = (
            nn.Parameter(torch.ones(1, native_cross, 1)) if num_sources and lsf != "none" else None
        )
        self.attn = FcaAttention(
            dim, num_heads, self.grid_size, native_cross, rel_pos, num_prefix_tokens, attn_drop, proj_drop
        )
        self.ls1 = LayerScale(dim, ls_init_value) if ls_init_value else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.merge = StridedDepthwiseConv2d(dim, dim, 7, 4, 3, groups=dim, bias=False) if emits_cross else None
        self.enhance = ConvBN(dim, dim, 3, groups=dim) if enhance else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = FcaMlp(dim, int(dim * mlp_ratio), norm_eps, proj_drop)
        self.ls2 = LayerScale(dim, ls_init_value) if ls_init_value else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Inference form, in place (timm's ``reparameterize_model`` calls this): layer scales folded into the
        linear layers before them, and the attention switched to its fast path. Outputs are unchanged."""
        for name, linear in (("ls1", self.attn.proj), ("ls2", self.mlp.fc2)):
            layer_scale = getattr(self, name)
            if isinstance(layer_scale, LayerScale):
                fold_scale_into_linear_(linear, layer_scale.gamma)
                setattr(self, name, nn.Identity())
        self.attn.reparameterize()

    def scale_factors(self, cross_grid: Grid) -> torch.Tensor:
        """``(1, M, 1)`` LSFs, each source block's part resized to ``cross_grid``."""
        if self.cross_scale is None:
            raise ValueError("this block has no LSFs (no cross-token sources, or lsf='none')")
        return resize_cross_values(self.cross_scale.reshape(1, -1), self.cross_grid, cross_grid).reshape(1, -1, 1)

    def normalize_cross(self, cross: torch.Tensor, cross_grid: Grid) -> torch.Tensor:
        """LSF and LayerNorm of the incoming cross tokens, in the configured order."""
        if self.norm_cross is None:
            raise ValueError("this block attends to no cross tokens (num_sources=0)")
        if self.cross_scale is None:
            return self.norm_cross(cross)
        scale = self.scale_factors(cross_grid)
        if self.lsf == "release":
            return self.norm_cross(cross * scale)
        return self.norm_cross(cross) * scale

    def forward(
        self,
        x: torch.Tensor,
        grid: Grid,
        cross: torch.Tensor | None = None,
        attn_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the block (recomputed in backward while ``grad_checkpointing`` is set).

        Args:
            x: ``(B, P + H*W, C)`` tokens (``P`` prefix tokens first, then the grid row-major).
            grid: ``(H, W)``.
            cross: ``(B, M, C)`` cross tokens of earlier blocks, oldest first (required iff
                ``num_sources > 0``).
            attn_bias: an additive bias on the attention logits among the regular tokens (see
                :meth:`FcaAttention.forward`).

        Returns:
            the new tokens and the ``(B, T, C)`` cross tokens this block emits (``None`` if it emits none).
        """
        if not torch.jit.is_scripting():
            if (cross is None) != (self.num_sources == 0):
                raise ValueError(
                    f"block expects cross tokens from {self.num_sources} earlier blocks, got "
                    f"{'none' if cross is None else tuple(cross.shape)}"
                )
            if self.grad_checkpointing and torch.is_grad_enabled():
                return checkpoint(self._forward, x, grid, cross, attn_bias, use_reentrant=False)
        return self._forward(x, grid, cross, attn_bias)

    def _forward(
        self, x: torch.Tensor, grid: Grid, cross: torch.Tensor | None, attn_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cross_normed: torch.Tensor | None = None
        if cross is not None:
            cross_normed = self.normalize_cross(cross, cross_grid_size(grid))
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), grid, cross_normed, attn_bias)))

        prefix, tokens = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        batch, _, channels = tokens.shape
        feature_map = tokens.transpose(1, 2).reshape(batch, channels, grid[0], grid[1])
        new_cross: torch.Tensor | None = None
        if self.merge is not None:
            new_cross = self.merge(feature_map).flatten(2).transpose(1, 2)
        tokens = self.enhance(feature_map).flatten(2).transpose(1, 2)
        x = torch.cat((prefix, tokens), dim=1) if self.num_prefix_tokens > 0 else tokens

        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, new_cross


def gather_cross(history: list[torch.Tensor], num_sources: int) -> torch.Tensor | None:
    """The cross tokens a block with ``num_sources`` sources attends to: the newest entries of ``history``."""
    if num_sources == 0:
        return None
    return torch.cat(history[-num_sources:], dim=1)


class FcaStage(nn.Module):
    """A stage of Fca blocks with forward cross attention, on ``(B, C, H, W)`` maps of any size.

    Block ``i`` attends to the cross tokens of the last ``min(i, cab_max_d)`` blocks before it (global mode),
    or, in windowed mode, runs on ``window_size`` windows (zero padded, alternating top-left / bottom-right
    padding per block) with per-window cross tokens from all earlier blocks.

    Args:
        in_dim: input channels (a :class:`~fcaformer.layers.Downsample` to ``dim`` is applied first when
            ``downsample`` is set).
        dim: channels of the stage.
        depth: number of blocks.
        num_heads: attention heads.
        grid_size: native grid (global mode); ignored in windowed mode, where it is the window.
        downsample: module applied to the input first (``None``: identity).
        window_size: window side for windowed mode (``None`` or 0: global attention over the whole map; the
            attribute is then 0).
        cab_max_d: most recent blocks whose cross tokens are kept (global mode).
        cross_attention: ``False`` builds the same stage without cross tokens (the paper's baseline).
        drop_path_rates: per-block stochastic-depth rates (default all 0).
        block_kwargs: passed to every :class:`FcaBlock` (``lsf``, ``enhance``, ``ls_init_value``, ...).
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        grid_size: Grid,
        *,
        downsample: nn.Module | None = None,
        window_size: int | None = None,
        cab_max_d: int = 12,
        cross_attention: bool = True,
        drop_path_rates: Sequence[float] | None = None,
        **block_kwargs,
    ) -> None:
        super().__init__()
        if cab_max_d < 1:
            raise ValueError(f"cab_max_d must be >= 1, got {cab_max_d}")
        self.in_dim = in_dim
        self.dim = dim
        self.window_size = window_size or 0  # 0: global attention
        self.cab_max_d = cab_max_d
        self.cross_attention = cross_attention
        self.downsample = downsample if downsample is not None else nn.Identity()
        block_grid = (window_size, window_size) if window_size else tuple(grid_size)
        rates = list(drop_path_rates) if drop_path_rates is not None else [0.0] * depth

        def sources(i: int) -> int:
            if not cross_attention:
                return 0
            return i if window_size else min(i, cab_max_d)

        self.blocks = nn.ModuleList(
            FcaBlock(
                dim,
                num_heads,
                block_grid,
                sources(i),
                emits_cross=cross_attention and i < depth - 1,
                drop_path=rates[i],
                **block_kwargs,
            )
            for i in range(depth)
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (outputs and gradients are unchanged)."""
        for block in self.blocks:
            block.grad_checkpointing = enable

    def prune_blocks(self, indices: int | list[int]) -> list[int]:
        """Drop the blocks after the last one that timm's ``indices`` take (for ``prune_intermediate_layers``);
        returns the block indices to take."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        return take_indices

    def forward_tokens(
        self,
        x: torch.Tensor,
        grid: Grid,
        take_indices: list[int] | None = None,
        stop_index: int | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the blocks in global mode on ``(B, P + H*W, C)`` tokens.

        Returns:
            the tokens after the last block run (block ``stop_index``, or the last block), and the tokens after
            each block listed in ``take_indices``.
        """
        taken: list[torch.Tensor] = []
        history: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            # a guard rather than `break`: TorchScript unrolls loops over a ModuleList and cannot break out
            if stop_index is None or i <= stop_index:
                x, new_cross = block(x, grid, gather_cross(history, block.num_sources))
                if new_cross is not None:
                    history.append(new_cross)
                if take_indices is not None and i in take_indices:
                    taken.append(x)
        return x, taken

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim, H, W) -> (B, dim, H', W')`` (``H' = ceil(H/2)`` with a downsample)."""
        x = self.downsample(x)
        if self.window_size > 0:
            return self._forward_windowed(x)
        batch, channels, height, width = x.shape
        tokens, _ = self.forward_tokens(x.flatten(2).transpose(1, 2), (height, width))
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)

    def _forward_windowed(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        ws = self.window_size
        # Integer ceil division (not math.ceil of a float) keeps the sizes symbolic under torch.export.
        rows, cols = -(-height // ws), -(-width // ws)
        pad_h, pad_w = rows * ws - height, cols * ws - width
        history: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            top_left = i % 2 == 0
            padding = [pad_w, 0, pad_h, 0] if top_left else [0, pad_w, 0, pad_h]
            padded = F.pad(x, padding)
            windows = (
                padded.reshape(batch, channels, rows, ws, cols, ws)
                .permute(0, 2, 4, 3, 5, 1)
                .reshape(batch * rows * cols, ws * ws, channels)
            )
            windows, new_cross = block(windows, (ws, ws), gather_cross(history, block.num_sources))
            if new_cross is not None:
                history.append(new_cross)
            padded = (
                windows.reshape(batch, rows, cols, ws, ws, channels)
                .permute(0, 5, 1, 3, 2, 4)
                .reshape(batch, channels, rows * ws, cols * ws)
            )
            x = padded[:, :, pad_h:, pad_w:] if top_left else padded[:, :, :height, :width]
        return x
