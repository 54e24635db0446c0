"""FcaFormer models; importing this registers them with timm."""

from .hybrid import ARCHS, ConvStage, FcaFormer, FcaFormerDense, create_dense_backbone
from .plain import FcaFormerPlain

MODEL_NAMES: tuple[str, ...] = ("fcaformer_l0", *ARCHS)
"""Every registered model name (timm ``create_model`` builds each)."""

__all__ = ["ARCHS", "MODEL_NAMES", "ConvStage", "FcaFormer", "FcaFormerDense", "FcaFormerPlain",
           "create_dense_backbone"]
