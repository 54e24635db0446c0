"""FcaFormer: forward cross attention in a hybrid vision transformer (arXiv 2211.07198).

Importing the package registers the paper's ``fcaformer_l0`` ... ``fcaformer_l4`` and the small non-paper
``fcaformer_atto`` and ``fcaformer_femto`` with timm (module name ``fcaformer``), and ``fca_any``: any timm ViT or
Swin with forward cross attention (:func:`add_forward_cross_attention`).

Layers, bottom to top, each importing only the ones below it: :mod:`fcaformer.errors` and :mod:`fcaformer.files`
(no model knowledge) -> :mod:`fcaformer.layers` -> :mod:`fcaformer.models` (with :mod:`fcaformer.fast`,
:mod:`fcaformer.lean`, :mod:`fcaformer.profile`) -> :mod:`fcaformer.weights` -> the tasks (:mod:`fcaformer.train`,
:mod:`fcaformer.analysis`, :mod:`fcaformer.detection`, :mod:`fcaformer.segmentation`, :mod:`fcaformer.deploy`,
:mod:`fcaformer.export`) -> :mod:`fcaformer.cli`.
"""

from .errors import CheckpointError
from .layers import FcaBlock, FcaStage
from .models import (
    MODEL_NAMES,
    FcaFormer,
    FcaFormerDense,
    FcaFormerPlain,
    add_forward_cross_attention,
    create_dense_backbone,
)
from .models.state_dicts import checkpoint_filter_fn
from .weights import WeightsRecord, load_official, read_weights

__version__ = "0.1.0"

__all__ = [
    "MODEL_NAMES",
    "CheckpointError",
    "FcaBlock",
    "FcaFormer",
    "FcaFormerDense",
    "FcaFormerPlain",
    "FcaStage",
    "WeightsRecord",
    "add_forward_cross_attention",
    "checkpoint_filter_fn",
    "create_dense_backbone",
    "load_official",
    "read_weights",
]
