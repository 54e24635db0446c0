"""What forward cross attention does in a model: attention shares, LSF/bias statistics, attention maps.

Typical use::

    from fcaformer.analysis import analyze, collect_images, load_analysis_model

    loaded = load_analysis_model("checkpoint.pt")
    result = analyze(loaded, collect_images(["val/"], num_images=100))
    result.save("out/")  # analysis.json, analysis.md, PNG figures

The hooks (:class:`AttentionRecorder`) only read the attention probabilities; model outputs are unchanged.
"""

from .ablation import attention_removed, cross_tokens_masked, measure_cross_ablation
from .api import DEFAULT_QUERIES, AnalysisResult, analyze, render_markdown
from .layout import BlockInfo, find_fca_blocks
from .lsf import lsfs_replaced, measure_lsf_effect, parameter_stats
from .recorder import AttentionRecorder, MapCapture, ShareAccumulator, query_cell
from .shares import attention_shares
from .sources import ImageSet, LoadedModel, collect_images, load_analysis_model, load_image

__all__ = [
    "DEFAULT_QUERIES",
    "AnalysisResult",
    "AttentionRecorder",
    "BlockInfo",
    "ImageSet",
    "LoadedModel",
    "MapCapture",
    "ShareAccumulator",
    "analyze",
    "attention_removed",
    "attention_shares",
    "collect_images",
    "cross_tokens_masked",
    "find_fca_blocks",
    "load_analysis_model",
    "load_image",
    "lsfs_replaced",
    "measure_cross_ablation",
    "measure_lsf_effect",
    "parameter_stats",
    "query_cell",
    "render_markdown",
]
