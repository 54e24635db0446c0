"""The name of the network a registered name and keyword arguments really build.

``timm.create_model("fcaformer_l1", dims=...)`` builds something that is not FcaFormer-L1. Logs, plots, result
files and checkpoints therefore name models with :func:`describe_model`: the registered variant whose
architecture it is, plus every architecture argument that differs from that variant's.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from .any_vit import FCA_ENTRY, split_switches
from .hybrid import ARCHS, SMALL_ARCHS, FcaFormer
from .plain import FcaFormerPlain

NOT_ARCHITECTURE = frozenset({
    "num_classes", "img_size", "drop_rate", "drop_path_rate", "proj_drop_rate", "attn_drop_rate",
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "checkpoint_path",
    "cache_dir", "scriptable", "exportable", "no_jit",
})
"""Constructor arguments that do not change which network it is: its classes, its resolution (grid-sized
parameters follow it; the log line states it separately), its regularisation and how it is loaded."""


HYBRID_SIZES = ("dims", "depths", "num_heads", "mlp_ratio")
"""What makes a hybrid variant; the rest (cross_attention, lsf, window_size, ...) are switches on a variant."""


def _normalized(value: Any) -> Any:
    return tuple(_normalized(v) for v in value) if isinstance(value, (list, tuple)) else value


def _constructor_defaults(cls: type) -> dict[str, Any]:
    return {
        name: _normalized(p.default)
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty and name not in NOT_ARCHITECTURE
    }


def registered_architecture(name: str) -> dict[str, Any] | None:
    """Every architecture argument of the registered FcaFormer variant ``name`` (``None`` for other names)."""
    if name in ARCHS or name in SMALL_ARCHS:
        arch = {**_constructor_defaults(FcaFormer), **ARCHS.get(name, {}), **SMALL_ARCHS.get(name, {})}
    elif name == "fcaformer_l0":
        arch = _constructor_defaults(FcaFormerPlain)
    else:
        return None
    return {k: _normalized(v) for k, v in arch.items() if k not in NOT_ARCHITECTURE}


def _canonical(name: str, key: str, value: Any) -> Any:
    value = _normalized(value)
    if key == "num_heads" and name != "fcaformer_l0" and isinstance(value, tuple) and len(value) == 4:
        value = value[2:]  # the release's layout (0, 0, h3, h4)
    if key == "window_size" and not value:
        value = None
    return value


def _differences(built: Mapping[str, Any], variant: str) -> dict[str, Any]:
    reference = registered_architecture(variant)
    return {k: v for k, v in built.items() if reference.get(k) != v}


def describe_model(name: str, kwargs: Mapping[str, Any] | None = None) -> str:
    """A name that says what ``timm.create_model(name, **kwargs)`` builds.

    For FcaFormer models it is the registered variant of the same sizes (``fcaformer_l1`` with femto's dims,
    depths and heads is ``fcaformer_femto``), else the given name, followed by every architecture argument that
    differs from that variant's (``"fcaformer_femto with cross_attention=False"``). Other timm models get
    their name and every architecture argument given; a converted one (``fca_any``) its base's description and
    ``+ forward cross attention`` with the switches given. Classes, resolution and regularisation are not part
    of the name.
    """
    given = {k: v for k, v in (kwargs or {}).items() if k not in NOT_ARCHITECTURE}
    if name == FCA_ENTRY and given.get("base"):  # a converted timm model: the base's name, then the conversion
        switches, base_kwargs = split_switches({k: v for k, v in given.items() if k != "base"})
        settings = ", ".join(f"{k}={v!r}" for k, v in sorted(switches.items()) if k not in ("init", "cross_bias_init"))
        return (f"{describe_model(given['base'], base_kwargs)} + forward cross attention"
                + (f" ({settings})" if settings else ""))
    base = registered_architecture(name)
    if base is None:
        changes = given
    else:
        built = {**base, **{k: _canonical(name, k, v) for k, v in given.items()}}
        if name != "fcaformer_l0":  # a hybrid with another variant's sizes is that variant (L0 has no other)
            sizes = {k: built[k] for k in HYBRID_SIZES}
            name = next((n for n in (name, *ARCHS, *SMALL_ARCHS) if not _differences(sizes, n)), name)
        changes = _differences(built, name)
    if not changes:
        return name
    return f"{name} with " + ", ".join(f"{k}={v!r}" for k, v in sorted(changes.items()))
