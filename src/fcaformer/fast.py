"""The fast inference path: fused, reparameterized FcaFormer models that compute what the faithful ones do.

:func:`fuse_model` returns a model whose outputs equal the original's (eval mode, within float rounding) but
that runs faster:

- every conv + BatchNorm pair (stem, downsamples, TME enhance) is folded into one conv with bias;
- every layer scale (ConvNeXt blocks, both branches of the Fca blocks) is folded into the linear layer before it;
- the attention runs PyTorch's fused ``scaled_dot_product_attention`` with one additive bias (relative
  positions and cross-token biases) gathered once per input size and cached; the cache key holds the bias
  parameters' version counters and storage pointers, and ``train()`` / ``load_state_dict`` clear it;
- no query is projected for the cross tokens (the release computes one and discards it);
- parameters (and so activations) are kept channels-last, which removes the NCHW <-> NHWC copies around every
  ConvNeXt block's LayerNorm.

All of this is reached through timm's ``reparameterize_model`` too: the layers expose ``fuse()`` /
``reparameterize()`` and timm calls them. Forward hooks on ``FcaAttention.attn_probe`` keep working: while one
is registered the fast attention computes explicit probabilities and passes them through the probe.

:func:`set_fast_attention` only switches the attention (no folding); it also works for training (same
gradients, without the release's unused cross-token query), where it is about as fast as the faithful path.

:func:`tune_cpu_allocator` is the other CPU-side half of the speed: glibc hands the multi-megabyte activation
buffers of the early stages back to the kernel after every forward and takes page faults to get them again
(about 3,100 faults per L1 forward at batch 1; tuning saves 11 % of the latency there and 25 % at batch 32 on
the project's 2-core machine, see ``docs/allocator.md``).
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import sys

import torch
from timm.utils.model import reparameterize_model
from torch import nn

from .layers.fca import FcaAttention

__all__ = ["fast_attention_modules", "fuse_model", "is_fused", "set_fast_attention", "tune_cpu_allocator"]

# mallopt() parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def fast_attention_modules(model: nn.Module) -> list[FcaAttention]:
    """Every :class:`~fcaformer.layers.FcaAttention` in ``model``."""
    return [module for module in model.modules() if isinstance(module, FcaAttention)]


def set_fast_attention(model: nn.Module, enabled: bool = True, sdpa_bias_grad: bool = False) -> nn.Module:
    """Switch every Fca attention of ``model`` (in place) to the SDPA path, or back to the faithful one.

    Unlike :func:`fuse_model` this keeps all parameters as they are, so it can be used for training: the
    biases are then rebuilt (differentiably) on every forward, the cache is only used without gradients.
    While the bias needs a gradient, attention is computed explicitly (without the release's unused cross-token
    query), unless ``sdpa_bias_grad`` is set and the model runs on CUDA: then SDPA's memory-efficient kernel
    also computes the bias gradient (no attention matrix kept for backward).

    Raises:
        ValueError: if ``model`` has no Fca attention at all (probably not an FcaFormer).
    """
    modules = fast_attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no FcaAttention layers; pass an FcaFormer model")
    for module in modules:
        module.fast = enabled
        module.sdpa_bias_grad = sdpa_bias_grad
        module.clear_bias_cache()
    return model


def is_fused(model: nn.Module) -> bool:
    """Whether every Fca attention of ``model`` runs the fast path."""
    modules = fast_attention_modules(model)
    return bool(modules) and all(module.fast for module in modules)


def fuse_model(model: nn.Module, inplace: bool = False, channels_last: bool = True) -> nn.Module:
    """The fast inference form of an FcaFormer model (see the module docstring), in eval mode.

    Args:
        model: any FcaFormer model (``fcaformer_l0`` ... ``l4``, the dense backbone) or a module holding one.
        inplace: convert ``model`` itself instead of a deep copy.
        channels_last: store the conv weights channels-last (faster on CPU; outputs are unchanged).

    Returns:
        the fused model. BatchNorm layers are gone, so it is for inference: ``train()`` on it would train a
        different parameterisation (fine-tune the original and fuse again instead).

    Raises:
        ValueError: if ``model`` has no Fca attention at all.
    """
    if not fast_attention_modules(model):
        raise ValueError(f"{type(model).__name__} has no FcaAttention layers; pass an FcaFormer model")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    # timm walks the children only, so a model (not a wrapper) is reparameterized through its children; our
    # layers provide fuse()/reparameterize(), so this reaches every fold described above.
    reparameterize_model(model, inplace=True)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def tune_cpu_allocator(threshold_bytes: int = 1 << 30) -> bool:
    """Make glibc keep freed blocks below ``threshold_bytes`` in the process instead of returning them to the OS.

    By default glibc serves large blocks with ``mmap`` and trims the heap top once enough of it is free, so
    every forward pays a page fault per 4 KiB of fresh activation memory. Raising both thresholds keeps the
    memory mapped: repeated forwards reuse it with no faults (what jemalloc or tcmalloc would give, without
    preloading them). The cost is that the process keeps its peak memory until it exits. Process-wide;
    call it once, before the work. Only affects the CPU allocator.

    Returns:
        ``True`` if the thresholds were set; ``False`` where the C library is not glibc (nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    value = ctypes.c_int(min(threshold_bytes, 2**31 - 1))
    # mallopt returns 1 on success; musl's stub returns 0 and does nothing.
    return bool(mallopt(_M_MMAP_THRESHOLD, value)) and bool(mallopt(_M_TRIM_THRESHOLD, value))
