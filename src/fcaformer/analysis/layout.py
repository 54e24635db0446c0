"""Where the forward-cross-attention blocks of a model are, and what their cross tokens are made of."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ..layers import FcaBlock, FcaStage


@dataclass(frozen=True)
class BlockInfo:
    """One Fca block as the analysis sees it.

    Attributes:
        name: module path of the block (``stages.2.blocks.3``).
        stage: module path of its :class:`~fcaformer.layers.FcaStage`.
        stage_position: 0 for the model's first Fca stage, 1 for the second, ...
        index: position of the block in its stage.
        num_heads: attention heads.
        num_sources: how many earlier blocks' cross tokens it attends to.
        num_prefix_tokens: leading non-grid tokens (the class token of L0).
        windowed: whether its stage runs on windows.
        lsf: LSF placement (``release``, ``post_norm`` or ``none``).
    """

    name: str
    stage: str
    stage_position: int
    index: int
    num_heads: int
    num_sources: int
    num_prefix_tokens: int
    windowed: bool
    lsf: str

    @property
    def source_blocks(self) -> list[int]:
        """Indices (in the stage) of the blocks whose cross tokens this block sees, oldest first.

        The stage keeps the most recent ``num_sources`` blocks' cross tokens, concatenated oldest first.
        """
        return list(range(self.index - self.num_sources, self.index))

    @property
    def label(self) -> str:
        """Short label: ``S3.B2`` for block 2 of the stage module ``stages.2`` (stages counted from 1)."""
        last = self.stage.rsplit(".", 1)[-1]
        stage = f"S{int(last) + 1}" if last.isdigit() else self.stage
        return f"{stage}.B{self.index}"

    def to_dict(self) -> dict:
        return {**asdict(self), "label": self.label, "source_blocks": self.source_blocks}


def find_fca_blocks(model: nn.Module) -> list[tuple[BlockInfo, FcaBlock]]:
    """Every :class:`~fcaformer.layers.FcaBlock` of ``model`` in forward order, with its description.

    Raises:
        ValueError: the model has no Fca stage (it is not an FcaFormer).
    """
    found: list[tuple[BlockInfo, FcaBlock]] = []
    stages = [(name, module) for name, module in model.named_modules() if isinstance(module, FcaStage)]
    for position, (stage_name, stage) in enumerate(stages):
        for index, block in enumerate(stage.blocks):
            if not isinstance(block, FcaBlock):
                continue
            prefix = f"{stage_name}." if stage_name else ""
            info = BlockInfo(
                name=f"{prefix}blocks.{index}",
                stage=stage_name or "blocks",
                stage_position=position,
                index=index,
                num_heads=block.attn.num_heads,
                num_sources=block.num_sources,
                num_prefix_tokens=block.num_prefix_tokens,
                windowed=bool(stage.window_size),
                lsf=block.lsf,
            )
            found.append((info, block))
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no FcaStage/FcaBlock modules; the analysis needs an FcaFormer "
            "(fcaformer_l0 ... fcaformer_l4, a project checkpoint or a release checkpoint)"
        )
    return found
