"""timm registration of every FcaFormer model, under timm's module name ``fcaformer``.

timm files each model under the last component of its entry point's module, so the entry points live here:
``timm.list_models(module="fcaformer")`` lists them all. The paper's models are ``fcaformer_l0`` ...
``fcaformer_l4``; ``fcaformer_atto`` and ``fcaformer_femto`` are small hybrids that are not in the paper (see
:data:`~fcaformer.models.hybrid.SMALL_ARCHS`). No weights ship with the project: a pretrained model loads a file
given as ``pretrained_cfg_overlay=dict(file=...)``.
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..layers import conv_out_size
from .hybrid import ARCHS, SMALL_ARCHS, FcaFormer
from .plain import FcaFormerPlain
from .state_dicts import checkpoint_filter_fn

_PAPER = {
    "paper_ids": "arXiv:2211.07198",
    "paper_name": "Fcaformer: Forward Cross Attention in Hybrid Vision Transformer",
}


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1.conv",
        "classifier": "head.fc",
        **_PAPER,
        **kwargs,
    }


def _small_cfg(img_size: int) -> dict[str, Any]:
    side = conv_out_size(img_size, 5)  # stem (2 halvings) and three downsamples
    return _cfg(
        input_size=(3, img_size, img_size),
        pool_size=(side, side),
        crop_pct=1.0 if img_size <= 32 else 0.875,
        license="apache-2.0 (this project's definition; not a model of the paper)",
    )


default_cfgs = generate_default_cfgs(
    {
        "fcaformer_l0.untrained": _cfg(
            pool_size=None,
            first_conv="patch_embed.proj",
            license="apache-2.0 (this project's definition; the paper released no L0 code or weights)",
        ),
        **{
            f"{name}.in1k": _cfg(
                origin_url="https://github.com/hkzhang-git/FcaFormer",
                license="unknown (no license file in the authors' release)",
            )
            for name in ARCHS
        },
        **{f"{name}.untrained": _small_cfg(arch["img_size"]) for name, arch in SMALL_ARCHS.items()},
    }
)


def _create_hybrid(variant: str, pretrained: bool = False, **kwargs: Any) -> FcaFormer:
    arch = {**ARCHS.get(variant, {}), **SMALL_ARCHS.get(variant, {}), **kwargs}
    return build_model_with_cfg(
        FcaFormer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **arch,
    )


@register_model
def fcaformer_l0(pretrained: bool = False, **kwargs: Any) -> FcaFormerPlain:
    """FcaFormer-L0: DeiT-Tiny with forward cross attention (paper: 5.9 M params, 74.3 % top-1)."""
    return build_model_with_cfg(
        FcaFormerPlain,
        "fcaformer_l0",
        pretrained,
        feature_cfg=dict(out_indices=(2, 5, 8, 11), feature_cls="getter"),
        **kwargs,
    )


@register_model
def fcaformer_l1(pretrained: bool = False, **kwargs: Any) -> FcaFormer:
    """FcaFormer-L1: 6.2 M params, 1.37 GMACs at 224, 80.3 % ImageNet top-1 (paper)."""
    return _create_hybrid("fcaformer_l1", pretrained, **kwargs)


@register_model
def fcaformer_l2(pretrained: bool = False, **kwargs: Any) -> FcaFormer:
    """FcaFormer-L2: 16.3 M params, 3.60 GMACs at 224, 83.1 % ImageNet top-1 (paper)."""
    return _create_hybrid("fcaformer_l2", pretrained, **kwargs)


@register_model
def fcaformer_l3(pretrained: bool = False, **kwargs: Any) -> FcaFormer:
    """FcaFormer-L3: 27.9 M params, 6.65 GMACs at 224, 84.2 % ImageNet top-1 (paper)."""
    return _create_hybrid("fcaformer_l3", pretrained, **kwargs)


@register_model
def fcaformer_l4(pretrained: bool = False, **kwargs: Any) -> FcaFormer:
    """FcaFormer-L4: 65.6 M params, 14.5 GMACs at 224, 84.9 % ImageNet top-1 (paper)."""
    return _create_hybrid("fcaformer_l4", pretrained, **kwargs)


@register_model
def fcaformer_atto(pretrained: bool = False, **kwargs: Any) -> FcaFormer:
    """FcaFormer-atto (not in the paper): 0.79 M params (0.66 M with 10 classes), 3.8 MMACs at its native 32 px;
    the model of the embedded digits job."""
    return _create_hybrid("fcaformer_atto", pretrained, **kwargs)


@register_model
def fcaformer_femto(pretrained: bool = False, **kwargs: Any) -> FcaFormer:
    """FcaFormer-femto (not in the paper): 1.11 M params (0.98 M with 10 classes), 56 MMACs at its native 112 px;
    the model of the Imagenette presets."""
    return _create_hybrid("fcaformer_femto", pretrained, **kwargs)
