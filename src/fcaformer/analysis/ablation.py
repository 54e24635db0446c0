"""How much a model relies on its cross tokens: the same forward pass with the cross tokens masked out.

Attention share says where the mass goes; this says whether it matters. Every cross-token bias is set to a
large negative value, so each block's softmax gives its cross tokens (numerically) zero weight and the block
attends to its own tokens only, as the ``cross_attention=False`` network would, but with the trained weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .layout import find_fca_blocks

MASK_BIAS = -1e4
"""Added to every cross-token logit: exp(-1e4) underflows to 0 in float32."""


@contextlib.contextmanager
def cross_tokens_masked(model: nn.Module) -> Iterator[int]:
    """Temporarily mask every cross token of ``model`` (restored exactly afterwards); yields how many blocks."""
    biases = [block.attn.cross_bias for info, block in find_fca_blocks(model) if info.num_sources]
    saved = [bias.detach().clone() for bias in biases]
    try:
        with torch.no_grad():
            for bias in biases:
                bias.fill_(MASK_BIAS)
        yield len(biases)
    finally:
        with torch.no_grad():
            for bias, original in zip(biases, saved, strict=True):
                bias.copy_(original)


@contextlib.contextmanager
def attention_removed(model: nn.Module) -> Iterator[int]:
    """Temporarily drop the attention branch of every Fca block (its output replaced by zeros, so the block is
    its TME and FFN only); yields how many blocks. A reference for how much cross tokens matter."""
    blocks = [block for _, block in find_fca_blocks(model)]
    handles = [block.attn.register_forward_hook(lambda module, args, out: torch.zeros_like(out)) for block in blocks]
    try:
        yield len(blocks)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def measure_cross_ablation(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    labels: Sequence[int] | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Outputs with and without cross tokens (3 forward passes per batch).

    Returns:
        ``None`` when the model has no cross tokens; else ``output_change`` (relative RMS over all images),
        ``top1_agreement`` and, with ``labels``, ``top1`` and ``top1_masked`` (accuracy without cross tokens).
        For reference, ``output_change_without_attention`` / ``top1_without_attention``: the same with every Fca
        block's whole attention branch removed (:func:`attention_removed`).
    """
    if not any(info.num_sources for info, _ in find_fca_blocks(model)):
        return None
    diff = diff_bare = ref = 0.0
    same = total = correct_bare = 0
    is_logits = False
    correct = correct_masked = 0
    for images in tqdm(list(batches), desc="cross ablation", disable=not progress, leave=False):
        out = model(images)
        with cross_tokens_masked(model):
            masked = model(images)
        with attention_removed(model):
            bare = model(images)
        is_logits = isinstance(out, torch.Tensor) and out.ndim == 2
        if not isinstance(out, torch.Tensor):  # dense backbones return a list of maps
            out, masked, bare = (torch.cat([o.flatten(1) for o in maps], 1) for maps in (out, masked, bare))
        diff += float((out - masked).double().square().sum())
        diff_bare += float((out - bare).double().square().sum())
        ref += float(out.double().square().sum())
        if is_logits:
            same += int((out.argmax(-1) == masked.argmax(-1)).sum())
            if labels is not None:
                target = torch.as_tensor(labels[total : total + out.shape[0]])
                correct += int((out.argmax(-1) == target).sum())
                correct_masked += int((masked.argmax(-1) == target).sum())
                correct_bare += int((bare.argmax(-1) == target).sum())
        total += out.shape[0]
    result: dict[str, Any] = {
        "output_change": (diff / ref) ** 0.5 if ref else float("nan"),
        "output_change_without_attention": (diff_bare / ref) ** 0.5 if ref else float("nan"),
        "top1_agreement": same / total if is_logits and total else None,
        "images": total,
    }
    if labels is not None and is_logits and total:
        result.update(
            top1=correct / total, top1_masked=correct_masked / total, top1_without_attention=correct_bare / total
        )
    return result
