"""The learnable scale factors (LSFs) and cross-token biases: their values, and what the LSFs change.

In the release placement the LSF multiplies the cross tokens *before* their LayerNorm, which divides each
token by its own scale again: ``LN(a s) = sign(a) LN(s)`` up to LN's eps. :func:`measure_lsf_effect`
measures how much the block's output actually moves when the LSFs are replaced by ones, for any placement.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..layers import FcaBlock, cross_grid_size
from .layout import BlockInfo, find_fca_blocks


def _stats(values: torch.Tensor) -> dict[str, float]:
    values = values.detach().double().flatten()
    return {
        "mean": float(values.mean()),
        "std": float(values.std(unbiased=False)),
        "min": float(values.min()),
        "max": float(values.max()),
        "mean_abs": float(values.abs().mean()),
        "frac_negative": float((values < 0).double().mean()),
    }


def parameter_stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per Fca block with cross tokens: LSF and cross-token-bias statistics, overall and per source block.

    Biases are also given per head, and the layer scales of the attention and FFN branches
    (``attention_layer_scale``, ``ffn_layer_scale``) when the block has them. Blocks without cross tokens are left out.
    """
    out: dict[str, dict[str, Any]] = {}
    for info, block in find_fca_blocks(model):
        if not info.num_sources:
            continue
        entry: dict[str, Any] = {"lsf_placement": info.lsf, "source_blocks": info.source_blocks}
        if block.cross_scale is not None:
            scale = block.cross_scale.reshape(info.num_sources, -1)
            entry["lsf"] = _stats(scale)
            entry["lsf_per_source"] = [_stats(row) for row in scale]
        bias = block.attn.cross_bias.reshape(info.num_heads, info.num_sources, -1)
        entry["bias"] = _stats(bias)
        entry["bias_per_source"] = [_stats(bias[:, j]) for j in range(info.num_sources)]
        entry["bias_per_head"] = [_stats(bias[h]) for h in range(info.num_heads)]
        gamma = getattr(block.ls1, "gamma", None)  # absent once fused (folded into the projection)
        if gamma is not None:
            # the attention branch's layer scale: how loudly whatever attention returns enters the residual
            entry["attention_layer_scale"] = _stats(gamma)
        gamma = getattr(block.ls2, "gamma", None)
        if gamma is not None:
            entry["ffn_layer_scale"] = _stats(gamma)
        out[info.name] = entry
    return out


@contextlib.contextmanager
def lsfs_replaced(blocks: Iterable[FcaBlock], value: float = 1.0) -> Iterator[None]:
    """Temporarily set every LSF of ``blocks`` to ``value`` (restored exactly afterwards, even on error)."""
    saved = [
        (block.cross_scale, block.cross_scale.detach().clone())
        for block in blocks
        if getattr(block, "cross_scale", None) is not None
    ]
    try:
        with torch.no_grad():
            for param, _ in saved:
                param.fill_(value)
        yield
    finally:
        with torch.no_grad():
            for param, original in saved:
                param.copy_(original)


class _SquaredNorms:
    """Pooled ratio sqrt(sum |a - b|^2 / sum |ref|^2) over batches."""

    def __init__(self) -> None:
        self.diff: dict[str, float] = {}
        self.ref: dict[str, float] = {}

    def add(self, key: str, diff: torch.Tensor, ref: torch.Tensor) -> None:
        self.diff[key] = self.diff.get(key, 0.0) + float(diff.double().square().sum())
        self.ref[key] = self.ref.get(key, 0.0) + float(ref.double().square().sum())

    def ratio(self, key: str) -> float | None:
        if key not in self.ref:
            return None
        return (self.diff[key] / self.ref[key]) ** 0.5 if self.ref[key] else float("nan")


@torch.no_grad()
def measure_lsf_effect(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    value: float = 1.0,
    progress: bool = True,
) -> dict[str, Any]:
    """How much the LSFs change each block and the model output, compared with LSFs set to ``value``.

    For every block with LSFs, on the exact inputs it receives in the unmodified model (relative RMS over all
    images, pooled):

    - ``normed_cross_change``: ``|s_hat(a) - s_hat(1)| / |s_hat(a)|`` of the normalised cross tokens fed to
      attention (release placement: ~0 unless an LSF is negative);
    - ``attention_change``: ``|A(a) - A(1)| / |A(a)|`` of the attention branch's output (before the layer
      scale), the part of the block the cross tokens enter;
    - ``output_change``: ``|y(a) - y(1)| / |y(a)|`` of the block's output tokens;
    - ``cross_token_variance``: mean per-token variance (over channels) of the incoming cross tokens, to
      compare with the LayerNorm's ``norm_eps``.

    And for the whole model with all LSFs at ``value`` at once: ``logits_change`` (relative RMS) and
    ``top1_agreement`` (fraction of images with the same arg-max).

    Returns:
        ``{"blocks": {name: {...}}, "model": {...}}``; empty ``blocks`` when the model has no LSFs.
    """
    found = [(info, block) for info, block in find_fca_blocks(model) if getattr(block, "cross_scale", None) is not None]
    norms = _SquaredNorms()
    # "compare": the per-block hooks measure; "rerun": a block is being re-run inside its own hook (the
    # attention hooks store the reference output); "off": the whole-model reference pass, hooks stay silent.
    state = {"mode": "compare"}
    attention_out: dict[str, torch.Tensor] = {}
    spread: dict[str, tuple[float, int]] = {}

    def attention_hook(info: BlockInfo):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if state["mode"] != "off":
                attention_out[info.name] = output

        return hook

    def block_hook(info: BlockInfo, block: FcaBlock):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if state["mode"] != "compare":
                return
            x = args[0]
            grid = args[1] if len(args) > 1 else kwargs["grid"]
            cross = args[2] if len(args) > 2 else kwargs.get("cross")
            if cross is None:
                return
            cross_grid = cross_grid_size(tuple(grid))
            normed = block.normalize_cross(cross, cross_grid)
            attention = attention_out.get(info.name)
            state["mode"] = "rerun"
            try:
                with lsfs_replaced([block], value):
                    normed_ref = block.normalize_cross(cross, cross_grid)
                    out_ref = module(x, grid, cross)[0]
            finally:
                state["mode"] = "compare"
            norms.add(f"{info.name}/normed", normed - normed_ref, normed)
            # per-token variance over channels of the cross tokens entering the LSF + LayerNorm: LN(a s) = LN(s)
            # only while this is large against LN's eps
            variance = cross.double().var(-1, unbiased=False)
            spread[info.name] = (
                spread.get(info.name, (0.0, 0))[0] + float(variance.sum()),
                spread.get(info.name, (0.0, 0))[1] + variance.numel(),
            )
            norms.add(f"{info.name}/output", output[0] - out_ref, output[0])
            if attention is not None:
                norms.add(f"{info.name}/attention", attention - attention_out[info.name], attention)

        return hook

    handles = [block.register_forward_hook(block_hook(info, block), with_kwargs=True) for info, block in found]
    handles += [block.attn.register_forward_hook(attention_hook(info)) for info, block in found]
    logits_norms = _SquaredNorms()
    agree = total = 0
    try:
        for images in tqdm(list(batches), desc="LSF effect", disable=not progress or not found, leave=False):
            if not found:
                break
            out = model(images)
            state["mode"] = "off"
            try:
                with lsfs_replaced([block for _, block in found], value):
                    ref = model(images)
            finally:
                state["mode"] = "compare"
            if isinstance(out, torch.Tensor):
                logits_norms.add("logits", out - ref, out)
                if out.ndim == 2:
                    agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
                    total += out.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    blocks = {
        info.name: {
            "label": info.label,
            "lsf_placement": info.lsf,
            "normed_cross_change": norms.ratio(f"{info.name}/normed"),
            "attention_change": norms.ratio(f"{info.name}/attention"),
            "output_change": norms.ratio(f"{info.name}/output"),
            "cross_token_variance": spread[info.name][0] / spread[info.name][1] if info.name in spread else None,
            "norm_eps": block.norm_cross.eps,
        }
        for info, block in found
    }
    model_level: dict[str, Any] = {"replaced_with": value}
    if found:
        model_level["logits_change"] = logits_norms.ratio("logits")
        model_level["top1_agreement"] = agree / total if total else None
    return {"blocks": blocks, "model": model_level}
