"""Building blocks: conv pieces and forward-cross-attention layers that work on any token grid."""

from .conv import ConvBN, Downsample, Stem, StridedDepthwiseConv2d, conv_out_size
from .fca import (
    LSF_PLACEMENTS,
    FcaAttention,
    FcaBlock,
    FcaMlp,
    FcaStage,
    LsfPlacement,
    cross_grid_size,
    relative_position_index,
    resize_grid_values,
)

__all__ = [
    "LSF_PLACEMENTS",
    "ConvBN",
    "Downsample",
    "FcaAttention",
    "FcaBlock",
    "FcaMlp",
    "FcaStage",
    "LsfPlacement",
    "Stem",
    "StridedDepthwiseConv2d",
    "conv_out_size",
    "cross_grid_size",
    "relative_position_index",
    "resize_grid_values",
]
