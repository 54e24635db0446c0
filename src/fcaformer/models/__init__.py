"""FcaFormer models; importing this registers them with timm (module name ``fcaformer``)."""

from . import fcaformer as _registry  # noqa: F401  (the timm entry points)
from .any_vit import FCA_ENTRY, FcaSwinTransformer, FcaVisionTransformer, add_forward_cross_attention
from .hybrid import ARCHS, SMALL_ARCHS, ConvStage, FcaFormer, FcaFormerDense, create_dense_backbone
from .plain import FcaFormerPlain

PAPER_MODELS: tuple[str, ...] = ("fcaformer_l0", *ARCHS)
"""The paper's models, L0 (plain) and L1-L4 (hybrid)."""

SMALL_MODELS: tuple[str, ...] = tuple(SMALL_ARCHS)
"""Small hybrids that are not in the paper, sized for CPU training (see :data:`SMALL_ARCHS`)."""

MODEL_NAMES: tuple[str, ...] = PAPER_MODELS + SMALL_MODELS
"""Every registered model name (timm ``create_model`` builds each)."""

__all__ = ["ARCHS", "FCA_ENTRY", "MODEL_NAMES", "PAPER_MODELS", "SMALL_ARCHS", "SMALL_MODELS", "ConvStage", "FcaFormer",
           "FcaFormerDense", "FcaFormerPlain", "FcaSwinTransformer", "FcaVisionTransformer",
           "add_forward_cross_attention", "create_dense_backbone"]
