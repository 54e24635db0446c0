"""Forward cross attention: the Fca block and the Fca stage.

These layers are usable on their own. An :class:`FcaStage` turns a ``(B, C, H, W)`` map into a map of the same
shape; inside it, every block attends to its own tokens *and* to the cross tokens merged (depthwise 7x7,
stride 4) from the outputs of the earlier blocks of the stage.

Grid-sized parameters (the relative-position table, the cross-token biases and the learnable scale factors)
are stored for a *native* grid. On any other grid they are resized by bicubic interpolation over the grid; on
the native grid the stored values are used exactly.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale
from torch import nn
from torch.utils.checkpoint import checkpoint

from .conv import ConvBN, StridedDepthwiseConv2d

LsfPlacement = Literal["release", "post_norm", "none"]
LSF_PLACEMENTS: tuple[str, ...] = ("release", "post_norm", "none")

Grid = tuple[int, int]


def cross_grid_size(grid: Grid) -> Grid:
    """Grid of the cross tokens a block emits from a ``grid`` map (depthwise 7x7, stride 4, padding 3)."""
    return math.ceil(grid[0] / 4), math.ceil(grid[1] / 4)


def resize_grid_values(values: torch.Tensor, old_grid: Grid, new_grid: Grid) -> torch.Tensor:
    """Resize values laid out on a grid along the last dim (``(..., oh*ow) -> (..., nh*nw)``).

    Bicubic interpolation (no antialiasing, so the op exports to ONNX); identity on the native grid.
    """
    if tuple(old_grid) == tuple(new_grid):
        return values
    lead = values.shape[:-1]
    grid = values.reshape(1, -1, old_grid[0], old_grid[1])
    resized = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False)
    return resized.to(values.dtype).reshape(*lead, new_grid[0] * new_grid[1])


def relative_position_index(grid: Grid, device: torch.device | None = None) -> torch.Tensor:
    """``(N, N)`` index into a ``(heads, H*W)`` table: ``|r1 - r2| * W + |c1 - c2|`` for row-major tokens."""
    h, w = grid
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    row_offsets = (rows[:, None] - rows[None, :]).abs()
    col_offsets = (cols[:, None] - cols[None, :]).abs()
    index = row_offsets[:, None, :, None] * w + col_offsets[None, :, None, :]
    return index.reshape(h * w, h * w)


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
        table = resize_grid_values(self.rel_pos_table, self.grid_size, grid)
        return table[:, relative_position_index(grid, table.device)]

    def cross_token_bias(self, cross_grid: Grid, native_cross_grid: Grid) -> torch.Tensor:
        """``(1, heads, 1, M)`` cross-token bias, each source block's part resized to ``cross_grid``."""
        bias = self.cross_bias
        if tuple(cross_grid) == tuple(native_cross_grid):
            return bias
        num_sources = bias.shape[-1] // (native_cross_grid[0] * native_cross_grid[1])
        per_source = bias.reshape(self.num_heads, num_sources, -1)
        resized = resize_grid_values(per_source, native_cross_grid, cross_grid)
        return resized.reshape(1, self.num_heads, 1, -1)

    def forward(
        self,
        x: torch.Tensor,
        grid: Grid,
        cross: torch.Tensor | None = None,
        cross_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``x`` (B, N, C) over ``x`` and the normalised cross tokens ``cross`` (B, M, C).

        On the fast path ``cross_bias`` is ignored: the attention gathers (and caches) it itself.
        """
        if self.fast:
            return self._forward_fast(x, grid, cross)
        batch, num_tokens, channels = x.shape
        q, k, v = (
            self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )
        logits = (q * self.scale) @ k.transpose(-2, -1)
        position_bias = self.position_bias(grid)
        if position_bias is not None:
            # Prefix tokens (a class token) sit outside the grid: zero bias to and from them.
            prefix = self.num_prefix_tokens
            logits = logits + (F.pad(position_bias, (prefix, 0, prefix, 0)) if prefix else position_bias)
        if cross is not None:
            # Like the release, project a query for the cross tokens too and discard it: this path mirrors the
            # release's cost (a fused fast path skips it).
            _, k_cross, v_cross = (
                self.qkv(cross)
                .reshape(batch, cross.shape[1], 3, self.num_heads, self.head_dim)
                .permute(2, 0, 3, 1, 4)
            )
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
        parts = []
        prefix = self.num_prefix_tokens
        num_queries = prefix + grid[0] * grid[1]
        position_bias = self.position_bias(grid)
        if position_bias is not None:
            parts.append(F.pad(position_bias, (prefix, 0, prefix, 0)) if prefix else position_bias)
        elif num_cross:
            parts.append(self.qkv.weight.new_zeros(self.num_heads, num_queries, num_queries))
        if num_cross:
            native_cross_grid = cross_grid_size(self.grid_size)
            cross_bias = self.cross_token_bias(cross_grid_size(grid), native_cross_grid)
            if cross_bias.shape[-1] != num_cross:
                raise ValueError(
                    f"got {num_cross} cross tokens but the cross-token bias covers {cross_bias.shape[-1]} on a "
                    f"{tuple(grid)} grid; pass the cross tokens of the earlier blocks of this stage"
                )
            parts.append(cross_bias[0].expand(-1, num_queries, -1))
        if not parts:
            return None
        return torch.cat(parts, dim=-1).unsqueeze(0)

    def cached_attention_bias(self, grid: Grid, num_cross: int) -> torch.Tensor | None:
        """:meth:`attention_bias`, gathered once per grid and reused while the parameters are unchanged.

        The key holds each bias parameter's version counter and storage pointer, so in-place updates
        (optimizer steps, ``load_state_dict``'s ``copy_``) and replaced or moved parameters all miss the cache;
        ``train()`` and ``load_state_dict`` also clear it.
        """
        params = tuple(p for p in (self.rel_pos_table, self.cross_bias) if p is not None)
        key = (tuple(grid), num_cross, *((p._version, p.data_ptr(), p.device, p.dtype) for p in params))
        bias = self._bias_cache.get(key)
        if bias is None:
            with torch.no_grad():
                bias = self.attention_bias(grid, num_cross)
            self._bias_cache.clear()  # one grid at a time: a model fed many sizes must not grow without bound
            self._bias_cache[key] = bias
        return bias

    def _forward_fast(self, x: torch.Tensor, grid: Grid, cross: torch.Tensor | None) -> torch.Tensor:
        batch, num_tokens, channels = x.shape
        num_cross = 0 if cross is None else cross.shape[1]
        bias_needs_grad = torch.is_grad_enabled() and any(
            p.requires_grad for p in (self.rel_pos_table, self.cross_bias) if p is not None
        )
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or bias_needs_grad:
            # Graph capture must see the bias built from the parameters, and training needs its gradient.
            bias = self.attention_bias(grid, num_cross)
        else:
            bias = self.cached_attention_bias(grid, num_cross)
        q, k, v = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if cross is not None:
            # Keys and values only: the release's query for the cross tokens is never used.
            kv_cross = F.linear(cross, self.qkv.weight[channels:], self.qkv.bias[channels:])
            k_cross, v_cross = kv_cross.reshape(batch, num_cross, 2, self.num_heads, self.head_dim).permute(
                2, 0, 3, 1, 4
            )
            k = torch.cat((k, k_cross), dim=2)
            v = torch.cat((v, v_cross), dim=2)
        explicit_for_grad = bias_needs_grad and not (self.sdpa_bias_grad and x.device.type == "cuda")
        if self.attn_probe._forward_hooks or self.attn_probe._forward_pre_hooks or explicit_for_grad:
            # Analysis hooks need the probabilities themselves. And with a bias that needs a gradient, PyTorch's
            # CPU SDPA falls back to a slower unfused kernel than these three ops (measured on L1 training).
            logits = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                logits = logits + bias
            attn = self.attn_drop(self.attn_probe(logits.softmax(dim=-1)))
            out = attn @ v
        else:
            dropout = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), dropout_p=dropout
            )
        out = out.transpose(1, 2)
        if torch.compiler.is_compiling():
            # Graph decompositions of SDPA (ONNX export) return another memory layout than the eager kernel the
            # graph was traced with; an explicit copy keeps the reshape below from being recorded as a view.
            out = out.clone(memory_format=torch.contiguous_format)
        out = out.reshape(batch, num_tokens, channels)
        return self.proj_drop(self.proj(out))


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

        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        if num_sources:
            self.norm_cross = nn.LayerNorm(dim, eps=norm_eps)
            self.cross_scale = nn.Parameter(torch.ones(1, native_cross, 1)) if lsf != "none" else None
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
        scale = self.cross_scale
        if tuple(cross_grid) == self.cross_grid:
            return scale
        per_source = scale.reshape(self.num_sources, -1)
        return resize_grid_values(per_source, self.cross_grid, cross_grid).reshape(1, -1, 1)

    def normalize_cross(self, cross: torch.Tensor, cross_grid: Grid) -> torch.Tensor:
        """LSF and LayerNorm of the incoming cross tokens, in the configured order."""
        if self.cross_scale is None:
            return self.norm_cross(cross)
        scale = self.scale_factors(cross_grid)
        if self.lsf == "release":
            return self.norm_cross(cross * scale)
        return self.norm_cross(cross) * scale

    def forward(
        self, x: torch.Tensor, grid: Grid, cross: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the block.

        Args:
            x: ``(B, P + H*W, C)`` tokens (``P`` prefix tokens first, then the grid row-major).
            grid: ``(H, W)``.
            cross: ``(B, M, C)`` cross tokens of earlier blocks, oldest first (required iff
                ``num_sources > 0``).

        Returns:
            the new tokens and the ``(B, T, C)`` cross tokens this block emits (``None`` if it emits none).
        """
        if (cross is None) != (self.num_sources == 0):
            raise ValueError(
                f"block expects cross tokens from {self.num_sources} earlier blocks, got "
                f"{'none' if cross is None else tuple(cross.shape)}"
            )
        cross_grid = cross_grid_size(grid)
        cross_normed = cross_bias = None
        if cross is not None:
            cross_normed = self.normalize_cross(cross, cross_grid)
            if not self.attn.fast:  # the fast path gathers (and caches) the cross-token bias itself
                cross_bias = self.attn.cross_token_bias(cross_grid, self.cross_grid)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), grid, cross_normed, cross_bias)))

        prefix, tokens = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        batch, _, channels = tokens.shape
        feature_map = tokens.transpose(1, 2).reshape(batch, channels, grid[0], grid[1])
        new_cross = self.merge(feature_map).flatten(2).transpose(1, 2) if self.merge is not None else None
        tokens = self.enhance(feature_map).flatten(2).transpose(1, 2)
        x = torch.cat((prefix, tokens), dim=1) if self.num_prefix_tokens else tokens

        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, new_cross


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
        window_size: window side for windowed mode (``None``: global attention over the whole map).
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
        self.window_size = window_size
        self.cab_max_d = cab_max_d
        self.cross_attention = cross_attention
        self.grad_checkpointing = False
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

    def _run_block(
        self, block: FcaBlock, x: torch.Tensor, grid: Grid, history: list[torch.Tensor]
    ) -> torch.Tensor:
        cross = torch.cat(history[-block.num_sources :], dim=1) if block.num_sources else None
        if self.grad_checkpointing and torch.is_grad_enabled():
            x, new_cross = checkpoint(block, x, grid, cross, use_reentrant=False)
        else:
            x, new_cross = block(x, grid, cross)
        if new_cross is not None:
            history.append(new_cross)
        return x

    def iter_tokens(self, x: torch.Tensor, grid: Grid) -> Iterator[torch.Tensor]:
        """Run the blocks in global mode on ``(B, P + H*W, C)`` tokens, yielding the tokens after each block."""
        history: list[torch.Tensor] = []
        for block in self.blocks:
            x = self._run_block(block, x, grid, history)
            yield x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim, H, W) -> (B, dim, H', W')`` (``H' = ceil(H/2)`` with a downsample)."""
        x = self.downsample(x)
        if self.window_size:
            return self._forward_windowed(x)
        batch, channels, height, width = x.shape
        tokens = deque(self.iter_tokens(x.flatten(2).transpose(1, 2), (height, width)), maxlen=1).pop()
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
            padding = (pad_w, 0, pad_h, 0) if top_left else (0, pad_w, 0, pad_h)
            padded = F.pad(x, padding)
            windows = (
                padded.reshape(batch, channels, rows, ws, cols, ws)
                .permute(0, 2, 4, 3, 5, 1)
                .reshape(batch * rows * cols, ws * ws, channels)
            )
            windows = self._run_block(block, windows, (ws, ws), history)
            padded = (
                windows.reshape(batch, rows, cols, ws, ws, channels)
                .permute(0, 5, 1, 3, 2, 4)
                .reshape(batch, channels, rows * ws, cols * ws)
            )
            x = padded[:, :, pad_h:, pad_w:] if top_left else padded[:, :, :height, :width]
        return x
