"""Fca layers on their own: grid handling, resizing, research switches, and clear errors."""

from __future__ import annotations

import itertools

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from fcaformer.layers import (
    FcaBlock,
    FcaStage,
    StridedDepthwiseConv2d,
    relative_position_index,
    resize_grid_values,
)
from fcaformer.layers.fca import cross_grid_size

SMALL = dict(dims=(16, 32, 64, 96), depths=(1, 1, 4, 2), num_heads=(2, 3))


def small_model(**kwargs) -> torch.nn.Module:
    return timm.create_model("fcaformer_l1", **{**SMALL, "num_classes": 5, "img_size": 64, **kwargs})


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Make every branch matter: unit layer scales, random attention biases, random positive LSFs, and BN
    statistics calibrated on random images (at init they would shrink activations to ~1e-10)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.fill_(1.0)
            elif name.endswith(("rel_pos_table", "cross_bias")):
                param.normal_()
            elif name.endswith("cross_scale"):
                param.uniform_(0.5, 1.5)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None  # cumulative average over the calibration batches
        model.train()
        for _ in range(2):
            model(torch.randn(4, 3, 64, 64))
    return model.eval()


def test_relative_position_index_matches_definition() -> None:
    grid = (3, 5)
    points = list(itertools.product(range(grid[0]), range(grid[1])))
    expected = torch.tensor([[abs(a[0] - b[0]) * grid[1] + abs(a[1] - b[1]) for b in points] for a in points])
    assert torch.equal(relative_position_index(grid), expected)


def test_resize_grid_values_is_exact_at_native_grid_and_bicubic_elsewhere() -> None:
    values = torch.randn(4, 2, 3 * 5)
    assert resize_grid_values(values, (3, 5), (3, 5)) is values
    resized = resize_grid_values(values, (3, 5), (6, 4))
    expected = F.interpolate(values.reshape(1, 8, 3, 5), size=(6, 4), mode="bicubic", align_corners=False)
    assert torch.allclose(resized, expected.reshape(4, 2, 24))
    constant = torch.full((2, 9), 1.5)
    assert torch.allclose(resize_grid_values(constant, (3, 3), (7, 5)), torch.full((2, 35), 1.5))


@pytest.mark.parametrize("size", [(32, 32), (45, 77), (64, 64), (250, 190)])
def test_any_input_size(size: tuple[int, int]) -> None:
    model = small_model().eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 5)
        windowed = small_model(window_size=(14, 7)).eval()
        assert windowed(torch.randn(1, 3, *size)).shape == (1, 5)
        plain = timm.create_model("fcaformer_l0", embed_dim=48, depth=3, num_heads=2, num_classes=5).eval()
        assert plain(torch.randn(1, 3, *size)).shape == (1, 5)


def test_native_grid_uses_stored_parameters_and_other_grids_interpolate() -> None:
    block = FcaBlock(32, 2, grid_size=(6, 6), num_sources=2, emits_cross=True)
    with torch.no_grad():
        block.attn.rel_pos_table.normal_()
        block.attn.cross_bias.normal_()
    native_bias = block.attn.position_bias((6, 6))
    assert torch.equal(native_bias, block.attn.rel_pos_table[:, relative_position_index((6, 6))])
    assert block.attn.cross_token_bias((2, 2), (2, 2)) is block.attn.cross_bias
    # another grid: the table is resized as a (heads, 6, 6) image, the cross biases per source block
    other = block.attn.position_bias((9, 5))
    table = F.interpolate(block.attn.rel_pos_table.reshape(1, 2, 6, 6), size=(9, 5), mode="bicubic")
    assert torch.allclose(other, table.reshape(2, 45)[:, relative_position_index((9, 5))])
    cross = block.attn.cross_token_bias(cross_grid_size((9, 5)), (2, 2))
    assert cross.shape == (1, 2, 1, 2 * 3 * 2)
    first_source = F.interpolate(block.attn.cross_bias[0, :, 0, :4].reshape(1, 2, 2, 2), size=(3, 2), mode="bicubic")
    assert torch.allclose(cross[0, :, 0, :6], first_source.reshape(2, 6))


def test_fca_stage_on_any_token_grid() -> None:
    stage = FcaStage(8, 32, depth=3, num_heads=2, grid_size=(7, 7), cab_max_d=1)
    assert [b.num_sources for b in stage.blocks] == [0, 1, 1]
    assert stage.blocks[-1].merge is None and stage.blocks[0].merge is not None
    x = torch.randn(2, 32, 13, 9, requires_grad=True)
    out = stage(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    tokens = torch.randn(1, 30, 32)
    last, taken = stage.forward_tokens(tokens, (5, 6), take_indices=[0, 2])
    assert len(taken) == 2 and torch.equal(taken[-1], last) and last.shape == (1, 30, 32)
    first, _ = stage.forward_tokens(tokens, (5, 6), stop_index=0)  # stops after block 0
    assert torch.equal(first, taken[0])


def test_cross_attention_off_is_the_same_network_without_cross_tokens() -> None:
    with_cross = randomize_(small_model())
    without = small_model(cross_attention=False).eval()
    extra = set(with_cross.state_dict()) - set(without.state_dict())
    assert extra and all(k.endswith(("cross_bias", "cross_scale", "merge.weight")) or ".norm_cross." in k
                         for k in extra)
    assert set(without.state_dict()) <= set(with_cross.state_dict())
    without.load_state_dict(with_cross.state_dict(), strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(with_cross(x), without(x), atol=1e-3)
        # masking every cross token out of the softmax turns the Fca model into the baseline exactly
        for name, param in with_cross.named_parameters():
            if name.endswith("cross_bias"):
                param.fill_(-1e4)
        assert torch.allclose(with_cross(x), without(x), atol=1e-5)


def test_lsf_placements() -> None:
    x = torch.randn(2, 3, 64, 64)

    def output_with_scaled_lsf(lsf: str, factor: float) -> torch.Tensor:
        torch.manual_seed(0)
        model = randomize_(small_model(lsf=lsf))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("cross_scale"):
                    param.abs_().mul_(factor)
            return model(x)

    def relative_change(lsf: str) -> float:
        before, after = output_with_scaled_lsf(lsf, 1.0), output_with_scaled_lsf(lsf, 3.0)
        assert before.std(0).mean() > 1e-2  # the output depends on the input
        return ((after - before).norm() / before.norm()).item()

    # release order: the LSF acts before the cross-token LayerNorm, which divides a positive per-token scale away
    # (only LN's eps lets it through); after the norm it calibrates the cross tokens for real
    release, post_norm = relative_change("release"), relative_change("post_norm")
    assert release < 0.05 * post_norm
    assert post_norm > 0.005
    none = small_model(lsf="none")
    assert not any(n.endswith("cross_scale") for n, _ in none.named_parameters())
    with pytest.raises(ValueError, match="lsf must be one of"):
        small_model(lsf="pre")


def test_cab_max_d_enhance_and_layer_scale_switches() -> None:
    capped = small_model(cab_max_d=2)
    stage = capped.stages[2]
    assert [b.num_sources for b in stage.blocks] == [0, 1, 2, 2]
    grid = stage.blocks[0].grid_size
    tokens_per_block = cross_grid_size(grid)[0] * cross_grid_size(grid)[1]
    assert stage.blocks[3].attn.cross_bias.shape[-1] == 2 * tokens_per_block
    with torch.no_grad():
        assert capped.eval()(torch.randn(1, 3, 80, 80)).shape == (1, 5)

    plain = small_model(enhance=False)
    assert not any(".enhance." in n for n, _ in plain.named_parameters())

    scaled = small_model(ls_init_value=0.5)
    gammas = [p for n, p in scaled.named_parameters() if n.endswith("gamma")]
    assert gammas and all(torch.all(g == 0.5) for g in gammas)
    no_scale = small_model(ls_init_value=0)
    assert not any(n.endswith("gamma") for n, _ in no_scale.named_parameters())


def test_block_requires_matching_cross_tokens() -> None:
    block = FcaBlock(32, 2, grid_size=(4, 4), num_sources=1)
    with pytest.raises(ValueError, match="expects cross tokens from 1"):
        block(torch.randn(1, 16, 32), (4, 4))


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.randn(3, 64, 64), "4-D"),
        (torch.randn(1, 1, 3, 64, 64), "4-D"),
        (torch.randint(0, 255, (1, 3, 64, 64)), "floating-point"),
        (torch.randn(1, 4, 64, 64), "expected 3 input channels, got 4"),
        (torch.randn(1, 3, 31, 64), ">= 32"),
    ],
)
@pytest.mark.parametrize("name", ["fcaformer_l1", "fcaformer_l0"])
def test_bad_input_raises_value_error(name: str, x: torch.Tensor, message: str) -> None:
    model = timm.create_model(name, **(SMALL if name == "fcaformer_l1" else dict(embed_dim=48, depth=2, num_heads=2)))
    with pytest.raises(ValueError, match=message):
        model(x)


def _poison_allocator() -> None:
    for size in (32 * 49, 32 * 49 * 2, 8 * 32 * 4, 4096, 1 << 14, 1 << 16):
        for dtype in (torch.float32, torch.bfloat16):
            del_me = torch.full((size,), float("nan"), dtype=dtype)
            del del_me


@pytest.mark.parametrize(("kernel", "stride", "size"), [(7, 4, 2), (3, 2, 1), (3, 2, 2)])
def test_strided_depthwise_weight_gradient_is_exact_under_cpu_bf16_autocast(kernel: int, stride: int,
                                                                           size: int) -> None:
    # On maps this small some taps see only padding; oneDNN's bf16 strided depthwise weight gradient leaves those
    # unwritten (stale memory: with the allocator poisoned by NaNs, the 3x3 stride-2 conv of a 1x1 map gets NaN
    # every time). StridedDepthwiseConv2d keeps full precision under CPU autocast, so it equals the fp32 gradient.
    torch.manual_seed(0)
    conv = StridedDepthwiseConv2d(32, 32, kernel, stride, kernel // 2, groups=32, bias=False)
    feature_map = torch.randn(8, size * size, 32).transpose(1, 2).reshape(8, 32, size, size)
    _poison_allocator()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(feature_map)
    assert out.dtype == torch.float32
    out.square().sum().backward()
    grad = conv.weight.grad.clone()
    conv.weight.grad = None
    F.conv2d(feature_map, conv.weight, stride=stride, padding=kernel // 2, groups=32).square().sum().backward()
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, conv.weight.grad, rtol=1e-5, atol=1e-6)


def test_every_strided_depthwise_conv_of_the_models_keeps_full_precision() -> None:
    model = timm.create_model("fcaformer_l1")
    strided_depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1 and m.stride[0] > 1]
    # three downsamples, then the merges of every block but the last: 5 of stage 3's 6 blocks, 1 of stage 4's 2
    assert len(strided_depthwise) == 3 + 5 + 1
    assert all(isinstance(m, StridedDepthwiseConv2d) for m in strided_depthwise)
