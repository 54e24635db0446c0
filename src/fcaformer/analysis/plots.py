"""Figures (matplotlib, Agg backend): share heat maps, share by depth, LSFs, attention maps over the image."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ..files import atomic_write  # noqa: E402
from .recorder import MapCapture  # noqa: E402


def _save(fig: plt.Figure, path: str | os.PathLike, dpi: int = 110, palette: bool = False) -> Path:
    """Write ``fig`` as a PNG; ``palette`` stores it with an adaptive 256-colour palette (photo overlays are
    several MB as RGBA, a few hundred kB this way)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    if palette:
        with Image.open(io.BytesIO(buffer.getvalue())) as image:
            buffer = io.BytesIO()
            image.convert("RGB").quantize(256).save(buffer, format="png", optimize=True)
    return atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def _stages(blocks: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    stages: dict[str, list[dict[str, Any]]] = {}
    for block in blocks.values():
        stages.setdefault(block["stage"], []).append(block)
    return stages


def plot_share_heatmap(blocks: dict[str, dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Block x source-block heat map of attention share (head-averaged), one panel per Fca stage.

    Column ``self`` is the mass on the block's own (regular) tokens; column ``j`` the mass on block ``j``'s
    cross tokens. Cells that are not sources of the block are blank.
    """
    stages = _stages(blocks)
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages) + 1, 4.2), squeeze=False, layout="constrained")
    image = None
    for ax, (stage, members) in zip(axes[0], stages.items(), strict=False):
        depth = len(members)
        grid = np.full((depth, depth), np.nan)  # columns: self, then source blocks 0 .. depth-2
        for block in members:
            mean = block["attention"].get("mean")
            if mean is None:
                continue
            grid[block["index"], 0] = mean[0]
            for j, value in zip(block["source_blocks"], mean[1:], strict=False):
                grid[block["index"], 1 + j] = value
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        for (r, c), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(
                    c,
                    r,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if value < 0.6 else "black",
                )
        ax.set_xticks(range(depth), ["self"] + [str(j) for j in range(depth - 1)])
        ax.set_yticks(range(depth), [str(i) for i in range(depth)])
        ax.set_xlabel("keys: own tokens / cross tokens of block")
        ax.set_ylabel("query block")
        ax.set_title(members[0]["label"].split(".")[0] + f" ({stage})")
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label="share of attention mass")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_share_by_depth(
    results: dict[str, dict[str, dict[str, Any]]], path: str | os.PathLike, title: str = ""
) -> Path:
    """Cross-token share per block (x) for one or more models: mean over heads, with the head range shaded
    and the spread over images as error bars."""
    fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
    labels: list[str] = []
    for name, blocks in results.items():
        ordered = list(blocks.values())
        labels = [b["label"] for b in ordered] if len(ordered) > len(labels) else labels
        x = np.arange(len(ordered))
        mean = np.array([b["attention"].get("cross_share", np.nan) for b in ordered], dtype=float)
        spread = np.array([b["attention"].get("cross_share_std_over_images", np.nan) for b in ordered], dtype=float)
        heads = [b["attention"].get("cross_share_per_head") for b in ordered]
        low = np.array([min(h) if h else np.nan for h in heads], dtype=float)
        high = np.array([max(h) if h else np.nan for h in heads], dtype=float)
        line = ax.errorbar(x, mean, yerr=spread, marker="o", capsize=3, label=name)
        ax.fill_between(x, low, high, alpha=0.15, color=line[0].get_color())
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_ylabel("attention mass on cross tokens")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "cross-token share by block (bars: std over images, band: min-max over heads)")
    return _save(fig, path)


def plot_parameters(params: dict[str, dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """LSF and cross-token-bias mean (with min-max range) per block and source block."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    for ax, key, label in (
        (axes[0], "lsf_per_source", "LSF"),
        (axes[1], "bias_per_source", "cross-token bias"),
    ):
        ticks: list[str] = []
        position = 0
        for name, entry in params.items():
            for j, stats in zip(entry["source_blocks"], entry.get(key, []), strict=False):
                ax.errorbar(
                    position,
                    stats["mean"],
                    yerr=[[stats["mean"] - stats["min"]], [stats["max"] - stats["mean"]]],
                    marker="o",
                    color="C0",
                    capsize=2,
                )
                ticks.append(f"{entry.get('label', name)}<{j}")
                position += 1
        ax.axhline(1.0 if key.startswith("lsf") else 0.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(ticks)), ticks, rotation=90, fontsize=7)
        ax.set_title(f"{label}: mean and min-max per (block < source)")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _overlay(
    ax: plt.Axes,
    image: np.ndarray,
    values: np.ndarray,
    extent: tuple[float, float, float, float],
    vmax: float,
) -> None:
    ax.imshow(image)
    ax.imshow(values, cmap="inferno", alpha=0.6, extent=extent, vmin=0, vmax=vmax, interpolation="nearest")
    ax.set_xlim(0, image.shape[1])
    ax.set_ylim(image.shape[0], 0)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_attention_maps(
    image: torch.Tensor, captures: Sequence[MapCapture], path: str | os.PathLike, title: str = ""
) -> Path:
    """One row per capture (block, query): the image with the query marked, the attention over the block's own
    tokens, then over each source block's cross tokens, all overlaid on the image (mean over heads).

    Each panel's title gives its share of the attention mass; colours share one scale per row, in attention
    per token, so a bright cross token attracts as much as an equally bright regular token.
    ``image`` is ``(3, H, W)`` in ``[0, 1]``.
    """
    if not captures:
        raise ValueError("no attention maps captured; pass map_images and map_queries to the recorder")
    picture = image.permute(1, 2, 0).clamp(0, 1).numpy()
    height, width = picture.shape[:2]
    columns = 2 + max(c.block.num_sources for c in captures)
    fig, axes = plt.subplots(
        len(captures), columns, figsize=(1.9 * columns, 2.0 * len(captures)), squeeze=False, layout="constrained"
    )
    for row, capture in zip(axes, captures, strict=False):
        probs = capture.probs.mean(0).numpy()  # mean over heads
        gh, gw = capture.grid
        prefix = capture.block.num_prefix_tokens
        regular = probs[prefix : prefix + gh * gw].reshape(gh, gw)
        cross = probs[prefix + gh * gw :]
        ch, cw = capture.cross_grid
        sources = cross.reshape(capture.block.num_sources, ch, cw) if capture.block.num_sources else []
        vmax = float(max(regular.max(), max((s.max() for s in sources), default=0)))
        map_h, map_w = capture.image_grid
        tok_h, tok_w = height / map_h, width / map_w
        top, left = capture.origin
        qr, qc = capture.query
        row[0].imshow(picture)
        row[0].add_patch(
            plt.Rectangle(((left + qc) * tok_w, (top + qr) * tok_h), tok_w, tok_h, fill=False, color="cyan", lw=2)
        )
        where = f" in window at ({top},{left})" if capture.map_grid else ""
        row[0].set_title(f"{capture.block.label} query ({qr},{qc}){where}", fontsize=8)
        row[0].set_xticks([])
        row[0].set_yticks([])
        extent = (left * tok_w, (left + gw) * tok_w, (top + gh) * tok_h, top * tok_h)
        _overlay(row[1], picture, regular, extent, vmax)
        own = f"own tokens {regular.sum() + probs[:prefix].sum():.2f}"
        row[1].set_title(own + (f" (cls {probs[:prefix].sum():.2f})" if prefix else ""), fontsize=8)
        origins = capture.source_origins or ((0, 0),) * len(sources)
        for ax, j, values, (s_top, s_left) in zip(row[2:], capture.block.source_blocks, sources, origins, strict=False):
            # Cross token (r, c) is the stride-4 depthwise 7x7 merge centred on (window) token (4r, 4c).
            extent = (
                (s_left - 1.5) * tok_w,
                (s_left + 4 * cw - 1.5) * tok_w,
                (s_top + 4 * ch - 1.5) * tok_h,
                (s_top - 1.5) * tok_h,
            )
            _overlay(ax, picture, values, extent, vmax)
            ax.set_title(f"cross from block {j}: {values.sum():.2f}", fontsize=8)
        for ax in row[2 + capture.block.num_sources :]:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi=90, palette=True)
