"""Run records: per-epoch JSON lines, training-curve and confusion-matrix PNGs (matplotlib, headless)."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write, pyplot, save_figure


def write_jsonl(path: str | os.PathLike, records: Sequence[dict[str, Any]]) -> Path:
    """Rewrite the whole JSON-lines file atomically (so a kill never leaves half a line)."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    return atomic_write(path, lambda handle: handle.write(text), binary=False)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def summarise_seeds(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One configuration trained under several seeds: the :func:`~fcaformer.train.train` summaries, each with a
    ``seed`` key added, reduced to top-1 per seed, its mean and sample std, the top-5 mean, the mean time per epoch
    and what every run shares (params, MACs, image and step counts)."""
    top1 = [r["val"]["top1"] for r in results]
    first = results[0]
    return {
        "seeds": [r["seed"] for r in results],
        "top1": top1,
        "top1_mean": statistics.mean(top1),
        "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
        "top5_mean": statistics.mean(r["val"]["top5"] for r in results),
        "epoch_time_s": statistics.mean(r["mean_epoch_time_s"] for r in results),
        **{key: first.get(key) for key in ("params", "macs", "train_images", "val_images", "steps")},
    }


def welch_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any] | None:
    """Welch's two-sided t-test of ``a`` against ``b``: ``t``, ``p``, ``diff`` = mean(a) - mean(b), the
    Welch-Satterthwaite degrees of freedom ``df`` and the 95 % confidence interval ``ci95`` of ``diff``; None when
    an arm has fewer than two values or neither varies."""
    if min(len(a), len(b)) < 2 or statistics.stdev(a) + statistics.stdev(b) == 0:
        return None
    from scipy.stats import ttest_ind

    test = ttest_ind(a, b, equal_var=False)
    interval = test.confidence_interval(0.95)
    return {"t": float(test.statistic), "p": float(test.pvalue), "diff": statistics.mean(a) - statistics.mean(b),
            "df": float(test.df), "ci95": [float(interval.low), float(interval.high)]}


def plot_seed_panel(ax: Any, arms: Mapping[str, Sequence[float]], title: str, ylabel: str,
                    reference: tuple[float, str] | None = None, ylim: tuple[float, float] | None = None,
                    legend_loc: str = "best") -> None:
    """One bar per arm (labelled with its key): its mean ± sample std over seeds, with every seed as a dot, and an
    optional dotted ``(value, label)`` reference line. ``ylim`` defaults to 3 points around all values."""
    for i, values in enumerate(arms.values()):
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        ax.bar(i, statistics.mean(values), yerr=spread, capsize=6, alpha=0.6, color=f"C{i}")
        ax.scatter([i] * len(values), values, color="black", zorder=3, s=14)
    if reference is not None:
        ax.axhline(reference[0], color="grey", lw=1, ls=":", label=reference[1])
    ax.set_xticks(range(len(arms)), list(arms))
    if ylim is None:
        values = [v for seeds in arms.values() for v in seeds] + ([reference[0]] if reference else [])
        ylim = (min(values) - 3, max(values) + 3)
    ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}: mean ± std over seeds (dots = seeds)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if reference is not None:
        ax.legend(loc=legend_loc, fontsize=8)


def plot_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Train/val loss and val top-1 per epoch, side by side."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = pyplot().subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    val = [(h["epoch"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if val:
        ax_loss.plot(*zip(*val), "s-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    acc = [(h["epoch"], h["val_top1"]) for h in history if h.get("val_top1") is not None]
    if acc:
        ax_acc.plot(*zip(*acc), "s-", color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="validation top-1")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str | os.PathLike,
                   title: str = "confusion matrix") -> Path:
    """Row-normalised confusion matrix (rows: true class) with counts; labels omitted beyond 40 classes."""
    matrix = np.asarray(matrix, dtype=np.float64)
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    size = min(max(4.0, 0.45 * n + 2), 16)
    fig, ax = pyplot().subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n), class_names, rotation=90)
        ax.set_yticks(range(n), class_names)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return save_figure(fig, path)
