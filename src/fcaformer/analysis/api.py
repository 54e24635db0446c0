"""``analyze``: attention shares, LSF/bias statistics, LSF effect and attention maps of one model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..files import atomic_json_dump, atomic_write
from .ablation import measure_cross_ablation
from .layout import find_fca_blocks
from .lsf import measure_lsf_effect, parameter_stats
from .recorder import AttentionRecorder, MapCapture
from .sources import ImageSet, LoadedModel, iter_batches, native_img_size

DEFAULT_QUERIES: tuple[tuple[float, float], ...] = ((0.5, 0.5), (0.2, 0.2))
"""Relative (y, x) query positions of the attention maps: the centre and a point near the top-left corner."""


@dataclass
class AnalysisResult:
    """Everything :func:`analyze` measured.

    ``to_dict`` is the JSON; ``maps`` and ``map_images`` feed the figures.
    """

    model: dict[str, Any]
    images: dict[str, Any]
    blocks: dict[str, dict[str, Any]]
    parameters: dict[str, dict[str, Any]]
    lsf_effect: dict[str, Any] | None
    accuracy: dict[str, Any] | None
    cross_ablation: dict[str, Any] | None = None
    maps: list[MapCapture] = field(default_factory=list, repr=False)
    map_images: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "images": self.images,
            "blocks": self.blocks,
            "parameters": self.parameters,
            "lsf_effect": self.lsf_effect,
            "accuracy": self.accuracy,
            "cross_ablation": self.cross_ablation,
        }

    def cross_blocks(self) -> list[dict[str, Any]]:
        """Blocks that attend to cross tokens."""
        return [b for b in self.blocks.values() if b["num_sources"]]

    def to_markdown(self, figures: Sequence[str] = ()) -> str:
        """A human summary: tables of shares, LSF/bias statistics and LSF effect, then the figures."""
        return render_markdown(self, figures)

    def save(self, out_dir: str | os.PathLike, name: str = "analysis") -> list[Path]:
        """Write ``<name>.json``, ``<name>.md`` and the PNG figures into ``out_dir``; returns the files."""
        from . import plots  # matplotlib (about half a second to import): only when figures are written

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        title = Path(str(self.model.get("source", ""))).name
        figures = [
            plots.plot_share_heatmap(self.blocks, out / f"{name}_share_heatmap.png", title=title),
            plots.plot_share_by_depth({title: self.blocks}, out / f"{name}_share_by_depth.png"),
        ]
        if self.parameters:
            labelled = {k: {**v, "label": self.blocks[k]["label"]} for k, v in self.parameters.items()}
            figures.append(plots.plot_parameters(labelled, out / f"{name}_lsf_bias.png", title=title))
        for index, image in sorted(self.map_images.items()):
            captures = [c for c in self.maps if c.image_index == index]
            if captures:
                figures.append(
                    plots.plot_attention_maps(
                        image,
                        captures,
                        out / f"{name}_maps_image{index}.png",
                        title=f"{title}: {self.images['paths'][index]}",
                    )
                )
        json_path = atomic_json_dump(self.to_dict(), out / f"{name}.json")
        text = self.to_markdown([f.name for f in figures])
        md_path = atomic_write(out / f"{name}.md", lambda handle: handle.write(text), binary=False)
        return [json_path, md_path, *figures]


def _label_indices(images: ImageSet, loaded: LoadedModel | None, num_classes: int) -> tuple[list[int], str] | None:
    """Class indices of the labelled images, or ``None`` when they cannot be matched to the classifier."""
    if not images.labels or any(label is None for label in images.labels):
        return None
    if loaded is not None and loaded.class_names and set(images.labels) <= set(loaded.class_names):
        order, how = list(loaded.class_names), "checkpoint class_names"
    elif images.classes and len(images.classes) == num_classes:
        order, how = images.classes, "sorted class folders (ImageFolder order)"
    else:
        return None
    return [order.index(label) for label in images.labels], how


@torch.no_grad()
def analyze(
    model: nn.Module | LoadedModel,
    images: ImageSet,
    *,
    img_size: int | Sequence[int] | None = None,
    batch_size: int = 16,
    map_images: Sequence[int] = (0, 1),
    map_queries: Sequence[tuple[float, float]] = DEFAULT_QUERIES,
    map_blocks: Sequence[str] | None = None,
    measure_lsf: bool = True,
    measure_ablation: bool = True,
    progress: bool = True,
) -> AnalysisResult:
    """Run the model over ``images`` and measure what forward cross attention does.

    The preprocessed images stay in memory for the extra passes (LSF effect, ablation): 200 images at 224 px
    are about 120 MB.

    Args:
        model: a model (eval mode is set) or a :class:`LoadedModel` from :func:`load_analysis_model`.
        images: from :func:`collect_images`.
        img_size: input size (default: the model's training resolution); images are resized whole, no crop.
        batch_size: images per forward pass.
        map_images: indices into ``images`` whose attention maps to draw.
        map_queries: relative ``(y, x)`` query positions of the maps.
        map_blocks: block names to draw maps for (default: every global block with cross tokens).
        measure_lsf: also measure what the LSFs change (:func:`measure_lsf_effect`; about 3 more passes).
        measure_ablation: also run the model with its cross tokens masked out (:func:`measure_cross_ablation`;
            2 more passes).
        progress: show progress bars.
    """
    loaded = model if isinstance(model, LoadedModel) else None
    net = loaded.model if loaded else model
    net.eval()
    size = img_size if img_size is not None else (loaded.img_size if loaded else native_img_size(net))
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mean, std = (loaded.mean, loaded.std) if loaded else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    bad = [i for i in map_images if not 0 <= i < len(images)]
    if bad:
        raise ValueError(f"map_images {bad} out of range: {len(images)} images were given")
    find_fca_blocks(net)  # fails early, naming the problem, on a model without Fca blocks

    recorder = AttentionRecorder(net, map_images, map_queries, map_blocks)
    batches: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    kept: dict[int, torch.Tensor] = {}
    total = -(-len(images) // batch_size)
    with recorder:
        for start, (batch, raw) in enumerate(
            tqdm(
                iter_batches(images, size, batch_size, mean, std),
                total=total,
                desc="attention",
                disable=not progress,
                leave=False,
            )
        ):
            out = net(batch)
            if isinstance(out, torch.Tensor) and out.ndim == 2:
                logits.append(out)
            batches.append(batch)
            for local in range(raw.shape[0]):
                if start * batch_size + local in recorder.map_images:
                    kept[start * batch_size + local] = raw[local]

    accuracy = labels = None
    if logits:
        labels = _label_indices(images, loaded, logits[0].shape[1])
        if labels is not None:
            predicted = torch.cat(logits).argmax(-1)
            target = torch.tensor(labels[0])
            accuracy = {
                "top1": float((predicted == target).double().mean()),
                "images": len(target),
                "label_order": labels[1],
            }

    names = {info.name: info for info, _ in recorder.blocks}
    parameters = parameter_stats(net)
    for name, entry in parameters.items():
        entry["label"] = names[name].label
    return AnalysisResult(
        model=loaded.describe() if loaded else {"source": type(net).__name__, "class": type(net).__name__},
        images={
            "count": len(images),
            "source": images.root,
            "img_size": list(size),
            "preprocessing": "whole image resized (bicubic) to img_size, ImageNet mean/std",
            "paths": images.names or [p.name for p in images.paths],
        },
        blocks=recorder.summary(),
        parameters=parameters,
        lsf_effect=measure_lsf_effect(net, batches, progress=progress) if measure_lsf else None,
        cross_ablation=(
            measure_cross_ablation(net, batches, labels[0] if labels else None, progress=progress)
            if measure_ablation
            else None
        ),
        accuracy=accuracy,
        maps=recorder.maps,
        map_images=kept,
    )


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def render_markdown(result: AnalysisResult, figures: Sequence[str] = ()) -> str:
    """The markdown summary of :meth:`AnalysisResult.to_markdown`."""
    m, im = result.model, result.images
    described = f"{m.get('class')} ({m.get('kind', 'module')})"
    if "model" in m:  # what a project checkpoint's name and arguments build
        described = f"{m['model']} ({m.get('class')}, {m.get('kind', 'module')})"
    lines = [
        f"# Cross-attention analysis: `{m.get('source')}`",
        "",
        f"- model: {described}, weights "
        f"{'trained' if m.get('trained_weights', True) else 'random (untrained)'}",
        f"- images: {im['count']} from `{im['source']}` at {im['img_size'][0]}x{im['img_size'][1]}",
    ]
    if result.accuracy:
        acc = result.accuracy
        lines.append(
            f"- top-1 on these images: {acc['top1']:.3f} ({acc['images']} images, labels: {acc['label_order']})"
        )
    lines += [
        "",
        "## Attention mass on cross tokens",
        "",
        "Share of each query's softmax mass on cross tokens (mean over heads, images, windows and query"
        " positions; ± std over images; range over heads). *per-token ratio*: attention per cross token over"
        " attention per regular token. *cross output fraction*: |Σ_cross p·v| / |Σ_all p·v|, the share of the"
        " attention output's norm that comes from cross tokens (RMS over queries and heads). *value-norm ratio*:"
        " RMS norm of a cross token's value vector over a regular token's.",
        "",
        "| block | sources | regular keys | cross keys | cross share | head range | per-token ratio "
        "| by source (oldest first) | cross output fraction | value-norm ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for block in result.blocks.values():
        att = block["attention"]
        if "mean" not in att:
            continue
        heads = att.get("cross_share_per_head") or [0.0]
        by_source = " / ".join(f"{v:.3f}" for v in att["mean"][1:]) or "-"
        lines.append(
            f"| {block['label']} | {block['num_sources']} | {att['num_regular_tokens']} | "
            f"{att['tokens_per_source'] * block['num_sources']} | {att['cross_share']:.3f} ± "
            f"{att['cross_share_std_over_images']:.3f} | {min(heads):.3f}-{max(heads):.3f} | "
            f"{_fmt(att['per_token_ratio'], '.2f')} | {by_source} | "
            f"{_fmt(att.get('cross_output_fraction'))} | {_fmt(att.get('value_norm_ratio'), '.2f')} |"
        )
    ablation = result.cross_ablation
    if ablation:
        lines += [
            "",
            "## Without cross tokens",
            "",
            "The same weights with every cross token masked out of the softmax (cross-token bias -1e4): "
            f"output change {ablation['output_change']:.3f} (relative RMS), top-1 agreement with the intact "
            f"model {_fmt(ablation['top1_agreement'])}"
            + (
                f", top-1 {ablation['top1']:.3f} -> {ablation['top1_masked']:.3f} without cross tokens."
                if "top1" in ablation
                else "."
            ),
            "",
            "For scale, with the whole attention branch of every Fca block removed (TME and FFN only): output "
            f"change {ablation['output_change_without_attention']:.3f}"
            + (f", top-1 {ablation['top1_without_attention']:.3f}." if "top1" in ablation else "."),
        ]
    if result.parameters:
        effect = (result.lsf_effect or {}).get("blocks", {})
        lines += [
            "",
            "## LSFs and cross-token biases",
            "",
            "LSF change columns: relative RMS change when this block's LSFs are set to 1, on its real inputs "
            "(normed cross tokens, attention-branch output, block output). Cross-token var.: mean per-token "
            "variance of the incoming cross tokens (LayerNorm eps is 1e-5; the release's LN(a s) = sign(a) LN(s) "
            "only while it is much larger).",
            "",
            "| block | LSF placement | LSF mean ± std [min, max] | LSF < 0 | bias mean ± std [min, max] | "
            "normed-cross change | attention change | output change | cross-token var. "
            "| layer scale mean abs (attn / FFN) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, entry in result.parameters.items():
            lsf, bias, eff = entry.get("lsf"), entry["bias"], effect.get(name, {})
            lsf_text = f"{lsf['mean']:.3f} ± {lsf['std']:.3f} [{lsf['min']:.2f}, {lsf['max']:.2f}]" if lsf else "-"
            lines.append(
                f"| {entry['label']} | {entry['lsf_placement']} | {lsf_text} | "
                f"{_fmt(lsf['frac_negative'] if lsf else None, '.2f')} | "
                f"{bias['mean']:.3f} ± {bias['std']:.3f} [{bias['min']:.2f}, {bias['max']:.2f}] | "
                f"{_fmt(eff.get('normed_cross_change'), '.2e')} | {_fmt(eff.get('attention_change'), '.2e')} | "
                f"{_fmt(eff.get('output_change'), '.2e')} | {_fmt(eff.get('cross_token_variance'), '.2e')} | "
                f"{_fmt(entry.get('attention_layer_scale', {}).get('mean_abs'), '.2e')} / "
                f"{_fmt(entry.get('ffn_layer_scale', {}).get('mean_abs'), '.2e')} |"
            )
        model_effect = (result.lsf_effect or {}).get("model", {})
        if model_effect.get("logits_change") is not None:
            lines += [
                "",
                f"All LSFs set to 1 at once: logits change {model_effect['logits_change']:.3e} (rel. RMS), "
                f"top-1 agreement {_fmt(model_effect.get('top1_agreement'))}.",
            ]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
