"""Attention mass per key group: regular tokens and the cross tokens of each source block."""

from __future__ import annotations

import torch


def attention_shares(probs: torch.Tensor, num_regular: int, num_sources: int) -> torch.Tensor:
    """Split each query's attention mass into regular tokens and each source block's cross tokens.

    Args:
        probs: ``(..., N + M)`` attention probabilities over ``[regular; cross]`` keys, where the ``M`` cross
            keys are ``num_sources`` equal groups (one per source block, oldest first).
        num_regular: ``N``, the number of regular keys (prefix tokens included).
        num_sources: number of source blocks.

    Returns:
        ``(..., 1 + num_sources)``: mass on the regular keys, then on each source block's keys.
    """
    num_keys = probs.shape[-1]
    num_cross = num_keys - num_regular
    if num_cross < 0 or (num_sources == 0 and num_cross) or (num_sources and num_cross % num_sources):
        raise ValueError(
            f"attention over {num_keys} keys cannot be {num_regular} regular keys plus {num_sources} equal "
            "groups of cross tokens; is the block layout (num_sources) right for this model?"
        )
    regular = probs[..., :num_regular].sum(-1, keepdim=True)
    if not num_sources:
        return regular
    cross = probs[..., num_regular:].unflatten(-1, (num_sources, num_cross // num_sources)).sum(-1)
    return torch.cat((regular, cross), dim=-1)
