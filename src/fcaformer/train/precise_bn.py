"""Precise BatchNorm statistics for evaluation: running statistics recomputed for the weights being evaluated.

BatchNorm's running mean and variance are exponential averages over the last few dozen training batches. Early in
training the weights change faster than that average follows, and the lag compounds through the network's BN
layers: the digits job's epoch-2 model scored 10 % top-1 in eval mode with its running statistics and 97.7 % once
they were recomputed on 1,024 training images. Recomputing them before each evaluation (Wu & Johnson, "Rethinking
'Batch' in BatchNorm", 2021, call this precise BN) makes every reported number describe the weights it reports on.

The statistics are computed in eval mode except for the BN layers themselves (no dropout or stochastic depth, no
random draws, so a resumed run stays identical), on a fixed subset of the training images under the evaluation
transform, and averaged over all processes of a distributed run. ``torch.optim.swa_utils.update_bn`` does the
core of this but switches the whole model to train mode and knows nothing of DDP, hence this module.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .evaluate import autocast

DEFAULT_IMAGES = 1024
"""Images recalibrated on when ``run.precise_bn_images`` is left to choose (at most the training set)."""

SHORT_RUN_EPOCHS = 100
"""Runs shorter than this get precise BN by default; in longer ones the running statistics settle long before the
evaluations that matter (and the paper's 300-epoch recipe evaluates its EMA weights without it)."""


def calibration_size(requested: int | None, epochs: int, num_train_images: int) -> int:
    """How many training images to recompute BN statistics from: ``requested`` (0 turns it off), or with
    ``None`` :data:`DEFAULT_IMAGES` for runs shorter than :data:`SHORT_RUN_EPOCHS` epochs and 0 otherwise."""
    if requested is None:
        requested = DEFAULT_IMAGES if epochs < SHORT_RUN_EPOCHS else 0
    return min(requested, num_train_images)


def calibration_indices(num_images: int, count: int, seed: int) -> list[int]:
    """The ``count`` training images recalibrated on: the same ones at every evaluation (a seeded draw)."""
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))[:count].tolist()


def calibration_loader(dataset: Dataset, count: int, batch_size: int, workers: int, seed: int, rank: int = 0,
                       world_size: int = 1) -> DataLoader:
    """This process's share of the :func:`calibration_indices` images of ``dataset``."""
    chosen = calibration_indices(len(dataset), count, seed)
    return DataLoader(Subset(dataset, chosen[rank::world_size]), batch_size=batch_size, shuffle=False,
                      num_workers=workers)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``model`` that keeps running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor] | torch.Tensor],
                          device: torch.device, amp: str = "none", channels_last: bool = False) -> int:
    """Replace the running statistics of every BN layer of ``model`` by their average over ``batches``.

    Only the BN layers run in train mode; the model's mode and the layers' momenta are restored afterwards. In a
    distributed run every process must call this (the statistics are averaged over processes).

    Returns:
        the number of images this process used (0 when ``model`` has no BatchNorm, which is then untouched).
    """
    norms = batchnorm_layers(model)
    if not norms:
        return 0
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the calibration batches
        norm.train()
    seen = 0
    try:
        for batch in batches:
            images = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                model(images)
            seen += len(images)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(was_training)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # every process evaluates its shard of the validation set (and rank 0 saves): one set of statistics
        for norm in norms:
            for stat in (norm.running_mean, norm.running_var):
                dist.all_reduce(stat)
                stat /= dist.get_world_size()
    return seen
