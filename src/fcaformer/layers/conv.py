"""Convolutional pieces of the hybrid FcaFormer: conv+BN, the stride-4 stem and the stage downsample."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch import nn


@torch.fx.wrap
@register_notrace_function
def conv2d_outside_cpu_autocast(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """``F.conv2d``, run in ``weight``'s dtype with CPU autocast off while it is on (see
    :class:`StridedDepthwiseConv2d`). An FX leaf: the autocast state is read when the graph runs, not traced."""
    # Nested, not `and`: TorchScript drops only the body under `not is_scripting()`, and this condition is not
    # scriptable.
    if not torch.jit.is_scripting():  # noqa: SIM102
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return F.conv2d(x.to(weight.dtype), weight, bias, stride, padding, dilation, groups)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class StridedDepthwiseConv2d(nn.Conv2d):
    """A strided depthwise ``Conv2d`` that runs outside CPU autocast, in its weights' dtype.

    oneDNN's bf16 weight gradient of strided depthwise convs can leave the kernel taps that only ever see padding
    unwritten (stale memory: often NaN, possibly wrong finite values) when the map is only a few pixels across,
    e.g. the stride-4 cross-token merge of a 2x2 grid or a stride-2 downsample of a 1x1 map. These convs are a
    tiny share of the MACs, so under CPU autocast they keep full precision. Same parameters as ``nn.Conv2d``
    (zero padding only).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d_outside_cpu_autocast(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class ConvBN(nn.Sequential):
    """A bias-free ``Conv2d`` followed by ``BatchNorm2d`` (eps 1e-5).

    Kept as a pair (rather than a conv with bias) so that checkpoints store the BN statistics and a fast path
    can fold them with :meth:`fuse`.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        conv = StridedDepthwiseConv2d if groups > 1 and stride > 1 else nn.Conv2d
        self.conv = conv(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """Return a single ``Conv2d`` (with bias) computing what this pair computes in eval mode."""
        scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        conv = self.conv
        fused = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            groups=conv.groups,
            bias=True,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        fused.bias.copy_(self.bn.bias - self.bn.running_mean * scale)
        return fused


class Stem(nn.Module):
    """Stride-4 stem: conv 3x3 s2 + BN, GELU, conv 3x3 s2 + BN (channels ``in_chs -> dim/2 -> dim``)."""

    def __init__(self, in_chs: int, dim: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(in_chs, dim // 2, 3, stride=2)
        self.act = nn.GELU()
        self.conv2 = ConvBN(dim // 2, dim, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


class Downsample(nn.Module):
    """Stride-2 downsample between stages: 1x1 conv+BN, GELU, depthwise 3x3 s2 conv+BN, GELU, 1x1 conv+BN."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(in_chs, out_chs, 1)
        self.conv2 = ConvBN(out_chs, out_chs, 3, stride=2, groups=out_chs)
        self.conv3 = ConvBN(out_chs, out_chs, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))


def conv_out_size(size: int, num_halvings: int) -> int:
    """Size after ``num_halvings`` stride-2 convs with kernel 3 and padding 1 (each maps n to ceil(n/2))."""
    for _ in range(num_halvings):
        size = (size + 1) // 2
    return size
