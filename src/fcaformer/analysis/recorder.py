"""Forward hooks that record where every Fca block's attention goes, without changing any output.

Every :class:`~fcaformer.layers.FcaAttention` passes its softmax probabilities ``(B', heads, N, N + M)``
through ``attn_probe`` (an ``nn.Identity``). A forward hook there reads them and returns nothing, so the
computation is untouched. ``B'`` is the batch, or batch x windows in windowed mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..layers import cross_grid_size
from .layout import BlockInfo, find_fca_blocks
from .shares import attention_shares

Grid = tuple[int, int]


@dataclass
class ShareAccumulator:
    """Running sums of one block's attention shares over images, windows and query positions.

    ``K = 1 + num_sources`` columns: regular keys, then each source block oldest first.
    """

    info: BlockInfo
    num_regular: int = 0
    tokens_per_source: int = 0
    windows: int = 1
    grid: Grid | None = None
    count: int = 0  # query samples seen (images x windows x queries)
    head_sum: torch.Tensor | None = None  # (heads, K)
    head_sumsq: torch.Tensor | None = None
    mean_sum: torch.Tensor | None = None  # (K,) of the head-averaged share
    mean_sumsq: torch.Tensor | None = None
    per_image: list[torch.Tensor] = field(default_factory=list)  # (B, heads, K) means over windows and queries
    # value-weighted: squared norms of the attention output from the cross keys and from all keys, and of
    # the value vectors of regular and cross tokens (summed over heads, queries / keys)
    cross_output_sq: float = 0.0
    total_output_sq: float = 0.0
    regular_value_sq: float = 0.0
    regular_value_count: int = 0
    cross_value_sq: float = 0.0
    cross_value_count: int = 0

    def add_values(self, probs: torch.Tensor, values: torch.Tensor, num_regular: int) -> None:
        """Add how much the cross tokens contribute to the attention output, given the ``(B', heads, N + M, d)``
        values the probabilities weigh."""
        probs, values = probs.double(), values.double()
        cross_out = probs[..., num_regular:] @ values[:, :, num_regular:]
        total_out = probs @ values
        self.cross_output_sq += float(cross_out.square().sum())
        self.total_output_sq += float(total_out.square().sum())
        self.regular_value_sq += float(values[:, :, :num_regular].square().sum(-1).sum())
        self.regular_value_count += values[:, :, :num_regular].shape[:3].numel()
        self.cross_value_sq += float(values[:, :, num_regular:].square().sum(-1).sum())
        self.cross_value_count += values[:, :, num_regular:].shape[:3].numel()

    def add(self, shares: torch.Tensor) -> None:
        """Add ``(B, windows, heads, N, K)`` shares."""
        shares = shares.double()
        samples = shares.shape[0] * shares.shape[1] * shares.shape[3]
        head_sum = shares.sum((0, 1, 3))
        head_sumsq = shares.square().sum((0, 1, 3))
        averaged = shares.mean(2)
        mean_sum, mean_sumsq = averaged.sum((0, 1, 2)), averaged.square().sum((0, 1, 2))
        if self.head_sum is None:
            self.head_sum, self.head_sumsq = head_sum, head_sumsq
            self.mean_sum, self.mean_sumsq = mean_sum, mean_sumsq
        else:
            self.head_sum += head_sum
            self.head_sumsq += head_sumsq
            self.mean_sum += mean_sum
            self.mean_sumsq += mean_sumsq
        self.count += samples
        self.per_image.append(shares.mean((1, 3)).float())

    def summary(self) -> dict[str, Any]:
        """Means and spreads as plain lists (JSON ready).

        Columns: ``regular``, then ``block j`` per source block.
        """
        info = self.info
        columns = ["regular"] + [f"block {j}" for j in info.source_blocks]
        out: dict[str, Any] = {
            "columns": columns,
            "num_regular_tokens": self.num_regular,
            "tokens_per_source": self.tokens_per_source,
            "windows_per_image": self.windows,
            "grid": list(self.grid) if self.grid else None,
            "query_samples": self.count,
        }
        if not self.count:
            return out

        def std(total: torch.Tensor, total_sq: torch.Tensor) -> torch.Tensor:
            mean = total / self.count
            return (total_sq / self.count - mean.square()).clamp_min(0).sqrt()

        per_image = torch.cat(self.per_image)  # (images, heads, K)
        image_means = per_image.mean(1).double()  # head-averaged
        cross_per_image = image_means[:, 1:].sum(-1)
        head_cross = per_image[..., 1:].sum(-1).double()  # (images, heads)
        mean = self.mean_sum / self.count
        num_cross = self.tokens_per_source * info.num_sources
        cross = float(mean[1:].sum())
        regular = float(mean[0])
        out.update(
            mean=mean.tolist(),
            std_over_queries=std(self.mean_sum, self.mean_sumsq).tolist(),
            std_over_images=image_means.std(0, unbiased=False).tolist(),
            per_head_mean=(self.head_sum / self.count).tolist(),
            per_head_std_over_queries=std(self.head_sum, self.head_sumsq).tolist(),
            cross_share=cross,
            cross_share_std_over_images=float(cross_per_image.std(unbiased=False)),
            cross_share_min_image=float(cross_per_image.min()),
            cross_share_max_image=float(cross_per_image.max()),
            cross_share_per_head=head_cross.mean(0).tolist(),
            cross_share_per_image=cross_per_image.tolist(),  # head-averaged, in image order
            # Attention a single cross token gets relative to a single regular token: > 1 means a cross token
            # attracts more than its number alone would give it.
            per_token_ratio=(cross / num_cross) / (regular / self.num_regular) if num_cross and regular else None,
            # |sum over cross keys of p v| / |sum over all keys of p v| (RMS over queries and heads): how much of
            # what attention returns comes from the cross tokens, as opposed to how much mass they get
            cross_output_fraction=(
                (self.cross_output_sq / self.total_output_sq) ** 0.5 if self.total_output_sq and num_cross else None
            ),
            # RMS norm of a cross token's value vector over a regular token's
            value_norm_ratio=(
                (self.cross_value_sq / self.cross_value_count) ** 0.5
                / (self.regular_value_sq / self.regular_value_count) ** 0.5
                if self.cross_value_count and self.regular_value_sq
                else None
            ),
        )
        return out


@dataclass
class MapCapture:
    """The attention of one query position of one image in one block (all heads)."""

    image_index: int
    block: BlockInfo
    grid: Grid  # the block's attention grid (the window in windowed mode)
    query: Grid  # (row, col) on the block's grid
    probs: torch.Tensor  # (heads, N + M), keys: prefix, grid row-major, then cross tokens oldest source first
    map_grid: Grid | None = None  # the whole token map, when ``grid`` is a window of it
    origin: Grid = (0, 0)  # map position of the window's top-left token (negative inside the padding)
    # the same for each source block's window: its cross tokens were merged from that block's own windows,
    # padded on its own side
    source_origins: tuple[Grid, ...] = ()

    @property
    def image_grid(self) -> Grid:
        """The token grid covering the image (the whole map)."""
        return self.map_grid or self.grid

    @property
    def cross_grid(self) -> Grid:
        return cross_grid_size(self.grid)


def _padding(map_grid: Grid, window: int, top_left: bool) -> tuple[int, int, int]:
    """Windows per row, and the padding on the top and on the left, of one block's windowed layout."""
    height, width = map_grid
    rows, cols = math.ceil(height / window), math.ceil(width / window)
    top, left = (rows * window - height, cols * window - width) if top_left else (0, 0)
    return cols, top, left


def window_origin(index: int, map_grid: Grid, window: int, top_left: bool) -> Grid:
    """Top-left position, on the unpadded map, of window ``index`` of a block (negative inside the padding)."""
    cols, top, left = _padding(map_grid, window, top_left)
    return (index // cols) * window - top, (index % cols) * window - left


def window_query(position: tuple[float, float], map_grid: Grid, window: int, top_left: bool) -> tuple[int, Grid]:
    """Where a relative image position falls in the windowed layout of one block (SPEC section 3).

    The map is zero padded up to multiples of ``window`` on the top/left (``top_left``: even blocks) or on the
    bottom/right, then split into windows, row-major.

    Returns:
        the window's index and the query's cell inside it.
    """
    cols, top, left = _padding(map_grid, window, top_left)
    row, col = query_cell(position, map_grid)
    padded_row, padded_col = row + top, col + left
    return (padded_row // window) * cols + padded_col // window, (padded_row % window, padded_col % window)


def query_cell(position: tuple[float, float], grid: Grid) -> Grid:
    """Grid cell ``(row, col)`` of a relative image position ``(y, x)`` in ``[0, 1]``."""
    y, x = position
    if not (0 <= y <= 1 and 0 <= x <= 1):
        raise ValueError(f"query positions are relative (y, x) in [0, 1], got {position}; e.g. (0.5, 0.5) = centre")
    return min(int(y * grid[0]), grid[0] - 1), min(int(x * grid[1]), grid[1] - 1)


class AttentionRecorder:
    """Context manager collecting attention shares (and optional attention maps) of every Fca block.

    Args:
        model: an FcaFormer (hybrid, plain or dense backbone).
        map_images: indices (counted over all images passed through the model while recording) whose
            attention maps to keep.
        map_queries: relative query positions ``(y, x)`` in ``[0, 1]`` for those maps.
        map_blocks: block names whose maps to keep (default: every block with cross tokens).

    In windowed mode a map shows the window the query falls in. Use as::

        with AttentionRecorder(model) as recorder:
            model(images)
        summary = recorder.summary()
    """

    def __init__(
        self,
        model: nn.Module,
        map_images: Sequence[int] = (),
        map_queries: Sequence[tuple[float, float]] = (),
        map_blocks: Sequence[str] | None = None,
    ) -> None:
        self.model = model
        self.blocks = find_fca_blocks(model)
        for position in map_queries:
            query_cell(position, (1, 1))  # validate early
        names = {info.name for info, _ in self.blocks}
        unknown = sorted(set(map_blocks or ()) - names)
        if unknown:
            raise ValueError(f"unknown blocks {unknown}; the model's Fca blocks are {sorted(names)}")
        self.map_images = set(map_images)
        self.map_queries = list(map_queries)
        self.map_blocks = set(map_blocks) if map_blocks is not None else None
        self.accumulators = {info.name: ShareAccumulator(info) for info, _ in self.blocks}
        self.maps: list[MapCapture] = []
        self.images_seen = 0
        self._batch = 0
        self._batch_offset = 0
        self._grids: dict[str, Grid] = {}
        self._values: dict[str, torch.Tensor] = {}
        self._map_sizes: dict[str, Grid] = {}
        self._handles: list[Any] = []

    # ------------------------------------------------------------------------------------------- hooks
    def __enter__(self) -> AttentionRecorder:
        self._handles.append(self.model.register_forward_pre_hook(self._on_model))
        modules = dict(self.model.named_modules())
        for stage_name in sorted({info.stage for info, _ in self.blocks if info.windowed}):
            # the windowed stage's map size (after its downsample) places the windows on the image
            self._handles.append(modules[stage_name].downsample.register_forward_hook(self._map_size_hook(stage_name)))
        for info, block in self.blocks:
            self._handles.append(block.register_forward_pre_hook(self._grid_hook(info), with_kwargs=True))
            self._handles.append(block.attn.attn_probe.register_forward_hook(self._probe_hook(info)))
            if info.num_sources:
                self._handles.append(block.attn.register_forward_pre_hook(self._values_hook(info), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_model(self, module: nn.Module, args: tuple) -> None:
        images = args[0] if args else None
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            return
        self._batch = images.shape[0]
        self._batch_offset = self.images_seen
        self.images_seen += self._batch

    def _map_size_hook(self, stage_name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._map_sizes[stage_name] = (int(output.shape[-2]), int(output.shape[-1]))

        return hook

    def _grid_hook(self, info: BlockInfo):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            grid = args[1] if len(args) > 1 else kwargs.get("grid")
            self._grids[info.name] = (int(grid[0]), int(grid[1]))

        return hook

    def _values_hook(self, info: BlockInfo):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0]
            cross = args[2] if len(args) > 2 else kwargs.get("cross")
            if cross is None:
                return
            # The value rows of the shared qkv projection (q, k, v stacked), applied to the normed regular and
            # cross tokens the attention receives: exactly the values its probabilities weigh.
            with torch.no_grad():
                channels = x.shape[-1]
                weight, bias = module.qkv.weight[2 * channels :], module.qkv.bias[2 * channels :]
                tokens = torch.cat((x, cross), dim=1).detach()
                values = torch.nn.functional.linear(tokens, weight, bias)
                self._values[info.name] = values.unflatten(-1, (module.num_heads, -1)).transpose(1, 2)

        return hook

    def _probe_hook(self, info: BlockInfo):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._record(info, output.detach())

        return hook

    # ----------------------------------------------------------------------------------------- records
    def _record(self, info: BlockInfo, probs: torch.Tensor) -> None:
        if not self._batch:
            raise RuntimeError("AttentionRecorder saw attention before any image batch; call the model itself")
        grid = self._grids[info.name]
        windowed_batch, _, num_queries, num_keys = probs.shape
        if windowed_batch % self._batch:
            raise RuntimeError(f"{info.name}: attention batch {windowed_batch} is not a multiple of {self._batch}")
        windows = windowed_batch // self._batch
        num_regular = info.num_prefix_tokens + grid[0] * grid[1]
        if num_queries != num_regular:
            raise RuntimeError(f"{info.name}: {num_queries} queries but the grid {grid} implies {num_regular}")
        if num_keys - num_regular != expected_cross_tokens(grid, info.num_sources):
            raise RuntimeError(
                f"{info.name}: {num_keys - num_regular} cross keys, expected "
                f"{expected_cross_tokens(grid, info.num_sources)} for {info.num_sources} sources, grid {grid}"
            )
        shares = attention_shares(probs.float(), num_regular, info.num_sources)
        acc = self.accumulators[info.name]
        acc.num_regular, acc.windows, acc.grid = num_regular, windows, grid
        acc.tokens_per_source = (num_keys - num_regular) // info.num_sources if info.num_sources else 0
        acc.add(shares.unflatten(0, (self._batch, windows)))
        values = self._values.pop(info.name, None)
        if values is not None:
            acc.add_values(probs, values, num_regular)
        self._capture_maps(info, grid, probs, windows)

    def _capture_maps(self, info: BlockInfo, grid: Grid, probs: torch.Tensor, windows: int) -> None:
        if not self.map_queries:
            return
        if self.map_blocks is not None and info.name not in self.map_blocks:
            return
        if self.map_blocks is None and not info.num_sources:
            return
        map_grid = self._map_sizes.get(info.stage) if info.windowed else None
        if info.windowed and map_grid is None:
            return
        for local in range(self._batch):
            image_index = self._batch_offset + local
            if image_index not in self.map_images:
                continue
            for position in self.map_queries:
                if map_grid is None:
                    item, (row, col), origin = local, query_cell(position, grid), (0, 0)
                    sources: tuple[Grid, ...] = ((0, 0),) * info.num_sources
                else:
                    window, (row, col) = window_query(position, map_grid, grid[0], info.index % 2 == 0)
                    item = local * windows + window
                    origin = window_origin(window, map_grid, grid[0], info.index % 2 == 0)
                    sources = tuple(window_origin(window, map_grid, grid[0], j % 2 == 0) for j in info.source_blocks)
                query = info.num_prefix_tokens + row * grid[1] + col
                probs_row = probs[item, :, query].float().cpu()
                self.maps.append(MapCapture(image_index, info, grid, (row, col), probs_row, map_grid, origin, sources))

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per block (by name): its layout and attention shares (:meth:`ShareAccumulator.summary`)."""
        return {
            info.name: {**info.to_dict(), "attention": self.accumulators[info.name].summary()}
            for info, _ in self.blocks
        }


def expected_cross_tokens(grid: Grid, num_sources: int) -> int:
    """``M`` for a block on ``grid`` seeing ``num_sources`` earlier blocks (``ceil(H/4) ceil(W/4)`` each)."""
    return num_sources * math.ceil(grid[0] / 4) * math.ceil(grid[1] / 4)
