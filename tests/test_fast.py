"""The fast inference path (fcaformer.fast): equal outputs everywhere, cache invalidation, hooks, timm reach."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import timm
import torch
from timm.layers import LayerScale
from timm.utils.model import reparameterize_model
from torch import nn

import fcaformer
from fcaformer.benchmark import randomize_weights_ as randomize_
from fcaformer.fast import fast_attention_modules, fuse_model, is_fused, set_fast_attention
from fcaformer.layers import FcaAttention
from tests.conftest import shared_path

TOLERANCE = 1e-5

# Reduced depths keep the big variants cheap while keeping their widths, heads and cross-token histories
# (stage 3 keeps >= 3 blocks so blocks see cross tokens from several sources).
SMALL_DEPTHS = {"fcaformer_l2": (1, 1, 4, 2), "fcaformer_l3": (1, 1, 3, 2), "fcaformer_l4": (1, 1, 3, 2)}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def make_model(name: str, img_size: int = 224, **kwargs) -> nn.Module:
    if name in SMALL_DEPTHS:
        kwargs.setdefault("depths", SMALL_DEPTHS[name])
    return randomize_(timm.create_model(name, img_size=img_size, **kwargs))


def assert_same_outputs(model: nn.Module, fused: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref, out = model(x), fused(x)
    refs, outs = (ref, out) if isinstance(ref, list) else ([ref], [out])
    assert len(refs) == len(outs)
    for r, o in zip(refs, outs):
        assert o.shape == r.shape
        assert relative_error(o, r) < TOLERANCE


# ------------------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("name", ["fcaformer_l0", "fcaformer_l1", "fcaformer_l2", "fcaformer_l3", "fcaformer_l4"])
def test_fused_equals_faithful_every_variant(name: str) -> None:
    """Native size (the model's img_size) and another, non-square size, through all cross-token histories."""
    model = make_model(name, img_size=64)
    fused = fuse_model(model)
    assert is_fused(fused) and not is_fused(model)
    assert_same_outputs(model, fused, torch.randn(2, 3, 64, 64))
    assert_same_outputs(model, fused, torch.randn(1, 3, 112, 80))


def test_fused_equals_faithful_l1_native_224() -> None:
    model = make_model("fcaformer_l1")
    assert_same_outputs(model, fuse_model(model), torch.randn(1, 3, 224, 224))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fcaformer_l0", "fcaformer_l2", "fcaformer_l3", "fcaformer_l4"])
def test_fused_equals_faithful_full_models_224(name: str) -> None:
    model = randomize_(timm.create_model(name))
    fused = fuse_model(model)
    assert_same_outputs(model, fused, torch.randn(1, 3, 224, 224))
    assert_same_outputs(model, fused, torch.randn(1, 3, 288, 256))


@pytest.mark.parametrize("name", ["fcaformer_l1", "fcaformer_l2"])
def test_fused_equals_faithful_windowed(name: str) -> None:
    """Windowed (dense) backbone at a window-aligned size and at sizes that need top-left/bottom-right padding."""
    kwargs = {"depths": SMALL_DEPTHS[name]} if name in SMALL_DEPTHS else {}
    model = randomize_(fcaformer.create_dense_backbone(name, window_size=(14, 7), **kwargs))
    fused = fuse_model(model)
    for size in ((224, 224), (200, 260)) if name == "fcaformer_l1" else ((130, 100),):
        assert_same_outputs(model, fused, torch.randn(1, 3, *size))


@pytest.mark.parametrize(
    "fixture", ["official_fcaformer_l1_cls.pt", "official_custom_cls_cab2.pt", "official_seg_backbone_small.pt"]
)
def test_fused_matches_release_outputs(fixture: str) -> None:
    """The fused model still reproduces the authors' release outputs (history truncation, windows, padding)."""
    data = torch.load(shared_path("parity", fixture), weights_only=True)
    fused = fuse_model(fcaformer.load_official(data["state_dict"]))
    cases = data.get("cases") or [{"input": data["input"], "features": [data["logits"]]}]
    with torch.no_grad():
        for case in cases:
            outputs = fused(case["input"])
            outputs = outputs if isinstance(outputs, list) else [outputs]
            for out, ref in zip(outputs, case["features"], strict=True):
                assert relative_error(out, ref) < TOLERANCE


# --------------------------------------------------------------------------------------- what fusing does
def test_fuse_removes_batchnorm_and_layer_scale_and_keeps_original() -> None:
    model = make_model("fcaformer_l1", img_size=64)
    before = copy.deepcopy(model.state_dict())
    fused = fuse_model(model)
    kinds = {type(m) for m in fused.modules()}
    assert nn.BatchNorm2d not in kinds and LayerScale not in kinds
    assert all(block.gamma is None for stage in fused.stages[:2] for block in stage.blocks)
    assert all(m.fast for m in fast_attention_modules(fused))
    # the original is untouched (not inplace)
    assert not is_fused(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_timm_reparameterize_model_reaches_fast_path() -> None:
    model = make_model("fcaformer_l1", img_size=64)
    reparam = reparameterize_model(model)
    assert is_fused(reparam)
    assert not any(isinstance(m, (nn.BatchNorm2d, LayerScale)) for m in reparam.modules())
    assert_same_outputs(model, reparam, torch.randn(2, 3, 64, 64))


def test_model_fuse_method_is_inplace() -> None:
    model = make_model("fcaformer_l0", img_size=64)
    ref = copy.deepcopy(model)
    assert model.fuse() is model and is_fused(model)
    assert_same_outputs(ref, model, torch.randn(1, 3, 64, 64))


def test_fast_path_skips_cross_token_query() -> None:
    """The fast attention projects keys and values only for cross tokens: 2C outputs instead of 3C."""
    attn = FcaAttention(64, 2, (4, 4), num_cross_tokens=4).eval()
    attn.fast = True
    seen: list[tuple[int, ...]] = []
    attn.qkv.register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    x, cross = torch.randn(1, 16, 64), torch.randn(1, 4, 64)
    with torch.no_grad():
        attn(x, (4, 4), cross)
    assert seen == [(1, 16, 192)]  # only the regular tokens go through the full qkv projection


def test_fuse_rejects_non_fcaformer() -> None:
    with pytest.raises(ValueError, match="no FcaAttention"):
        fuse_model(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no FcaAttention"):
        set_fast_attention(nn.Sequential(nn.Conv2d(3, 3, 1)))


# ----------------------------------------------------------------------------------------- bias cache
def warm_fused_l1() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A small L1, its fused copy after one forward (bias cache filled), and the input used."""
    model = make_model("fcaformer_l1", img_size=64)
    fused = fuse_model(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fused(x)
    return model, fused, x


def test_bias_cache_reused_then_invalidated_by_parameter_change() -> None:
    model, fused, x = warm_fused_l1()
    with torch.no_grad():
        attn = fused.stages[2].blocks[1].attn
        cached = next(iter(attn._bias_cache.values()))
        fused(x)
        assert next(iter(attn._bias_cache.values())) is cached  # reused, not rebuilt
        # in-place parameter updates (what an optimizer step does) must miss the cache
        for m in (model, fused):
            m.stages[2].blocks[1].attn.rel_pos_table.add_(0.5)
            m.stages[2].blocks[2].attn.cross_bias.mul_(-2.0)
    assert_same_outputs(model, fused, x)
    # a replaced parameter (new storage) must miss the cache too
    with torch.no_grad():
        new_table = nn.Parameter(torch.randn_like(attn.rel_pos_table))
        attn.rel_pos_table = new_table
        model.stages[2].blocks[1].attn.rel_pos_table = nn.Parameter(new_table.detach().clone())
    assert_same_outputs(model, fused, x)


def test_bias_cache_invalidated_by_load_state_dict_and_train() -> None:
    model, fused, x = warm_fused_l1()
    attn = fused.stages[2].blocks[1].attn
    assert attn._bias_cache
    fused.train()
    assert not attn._bias_cache
    fused.eval()
    with torch.no_grad():
        fused(x)
    other = randomize_(timm.create_model("fcaformer_l1", img_size=64), seed=1)
    other_fused = fuse_model(other)
    fused.load_state_dict(other_fused.state_dict())
    assert not attn._bias_cache
    assert_same_outputs(other, fused, x)


def test_bias_cache_follows_input_size() -> None:
    model = make_model("fcaformer_l1", img_size=64)
    fused = fuse_model(model)
    for size in (64, 96, 64, 128):
        assert_same_outputs(model, fused, torch.randn(1, 3, size, size))


# ------------------------------------------------------------------------------------------ hooks / train
def test_attn_probe_hooks_see_same_probabilities_on_fast_path() -> None:
    model = make_model("fcaformer_l1", img_size=64)
    fused = fuse_model(model)
    probs: dict[str, list[torch.Tensor]] = {"faithful": [], "fast": []}
    for key, m in (("faithful", model), ("fast", fused)):
        for attn in fast_attention_modules(m):
            attn.attn_probe.register_forward_hook(lambda mod, args, out, key=key: probs[key].append(out))
    assert_same_outputs(model, fused, torch.randn(2, 3, 64, 64))
    assert len(probs["fast"]) == len(probs["faithful"]) == len(fast_attention_modules(model))
    for ref, out in zip(probs["faithful"], probs["fast"]):
        assert out.shape == ref.shape
        assert torch.allclose(out.sum(-1), torch.ones(()), atol=1e-5)
        assert relative_error(out, ref) < TOLERANCE


def test_fast_attention_training_gradients_match() -> None:
    """set_fast_attention (no folding) trains: same loss and same gradients, bias parameters included."""
    model = make_model("fcaformer_l1", img_size=64, depths=(1, 1, 3, 2)).train()
    fast = set_fast_attention(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 64)
    losses = []
    for m in (model, fast):
        loss = m(x).logsumexp(-1).sum()
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    ref_params = dict(model.named_parameters())
    names = [name for name, _ in fast.named_parameters()]
    fast_grads = dict(fast.named_parameters())
    assert all(fast_grads[n].grad is not None for n in names)
    flat_ref = torch.cat([ref_params[n].grad.flatten() for n in names])
    flat_fast = torch.cat([fast_grads[n].grad.flatten() for n in names])
    assert relative_error(flat_fast, flat_ref) < 1e-4
    # per parameter, relative to the overall gradient scale (some gradients are zero up to rounding, e.g.
    # biases right before a train-mode BatchNorm)
    atol = 1e-5 * flat_ref.abs().max().item()
    for n in names:
        assert torch.allclose(fast_grads[n].grad, ref_params[n].grad, rtol=1e-3, atol=atol), n
    # the bias parameters the fast path gathers itself receive their gradients
    for n in ("stages.2.blocks.1.attn.rel_pos_table", "stages.2.blocks.2.attn.cross_bias"):
        assert fast_grads[n].grad.abs().sum() > 0
    assert not any(m._bias_cache for m in fast_attention_modules(fast))  # nothing cached while training


def test_bf16_autocast_fast_path_close_to_fp32() -> None:
    model = make_model("fcaformer_l1", img_size=64)
    fused = fuse_model(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fused(x)
    assert out.dtype == torch.bfloat16
    assert relative_error(out.float(), ref) < 0.05  # bf16 keeps ~3 significant digits


# --------------------------------------------------------------------------------- benchmark harness
def test_timing_summary_and_interleaving() -> None:
    from statistics import median

    from fcaformer.benchmark import Timing, interleaved_timings

    samples = [0.005, 0.001, 0.003, 0.002, 0.004, 0.010, 0.006, 0.007, 0.008, 0.009, 0.0095]
    timing = Timing.from_seconds(samples)
    assert timing.median_ms == pytest.approx(1e3 * median(samples))
    assert timing.min_ms == pytest.approx(1.0) and timing.samples == 11
    assert timing.p90_ms == pytest.approx(9.5)  # 90th percentile of 11 sorted samples: index 9
    order: list[str] = []
    timings = interleaved_timings({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3, 1)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rounds with rotating order
    assert {k: t.samples for k, t in timings.items()} == {"a": 3, "b": 3}
    with pytest.raises(ValueError, match="no candidates"):
        interleaved_timings({})


def test_peak_activation_memory_counts_live_tensors() -> None:
    from fcaformer.benchmark import peak_activation_mib

    def two_then_one() -> torch.Tensor:
        a = torch.zeros(2**20)  # 4 MiB
        b = a + 1  # 4 MiB more while a is alive
        del a
        return b * 2  # a freed: peak stays 8 MiB

    assert peak_activation_mib(two_then_one) == pytest.approx(8.0, abs=0.01)


def test_cli_benchmark_writes_table_json_and_chart(tmp_path, capsys) -> None:
    import json

    from fcaformer.cli import main

    out = tmp_path / "zoo"
    assert main(["benchmark", "--models", "fcaformer_l1", "--peers", "--img-size", "64", "--repeats", "2",
                 "--warmup", "1", "--throughput-repeats", "0", "--onnx", "--threads", "1", "-o", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    names = [row["name"] for row in data["rows"]]
    assert names == ["fcaformer_l1 (faithful)", "fcaformer_l1"]
    assert all(row["latency"]["samples"] == 2 for row in data["rows"])
    assert data["rows"][1]["params_m"] == pytest.approx(6.19, abs=0.01)
    assert "loadavg_before" in data["info"] and out.with_suffix(".png").stat().st_size > 0
    assert "| fcaformer_l1 |" in out.with_suffix(".md").read_text()

    # Re-plotting from the JSON measures nothing and reproduces the table.
    again = tmp_path / "again"
    assert main(["benchmark", "--replot", str(out.with_suffix(".json")), "-o", str(again)]) == 0
    assert again.with_suffix(".md").read_text() == out.with_suffix(".md").read_text()
    assert again.with_suffix(".png").stat().st_size > 0 and not again.with_suffix(".json").exists()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a JSON file written by fcaformer benchmark"):
        main(["benchmark", "--replot", str(tmp_path / "bad.json"), "-o", str(again)])


def test_fast_path_follows_dtype_changes() -> None:
    """No hidden float32 in the fast path (float64 agrees to 1e-12), and the cached bias follows a dtype change."""
    model = make_model("fcaformer_l1", img_size=64, depths=(1, 1, 3, 2)).double()
    fused = fuse_model(model)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ref, out = model(x), fused(x)
        assert out.dtype == torch.float64 and relative_error(out, ref) < 1e-12
        model, fused = model.float(), fused.float()
        ref, out = model(x.float()), fused(x.float())
    assert out.dtype == torch.float32 and relative_error(out, ref) < TOLERANCE
    assert all(key[2][3] == torch.float32 for m in fast_attention_modules(fused) for key in m._bias_cache)


# Allocates, fills and frees a 64 MiB block (a batch's activation): above glibc's largest dynamic mmap threshold
# (32 MiB), so by default every round maps fresh pages. Prints the minor page faults of 5 rounds before and after
# tune_cpu_allocator().
_FAULTS_SCRIPT = """
import resource, torch
from fcaformer.fast import tune_cpu_allocator

def faults():
    for _ in range(2):
        torch.ones(1 << 24)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(1 << 24)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

print(faults(), tune_cpu_allocator(), faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt and ru_minflt are Linux facts")
def test_tune_cpu_allocator_removes_page_faults_on_reused_activation_memory() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's defaults
    result = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True, env=env,
                            check=True, timeout=120)
    before, tuned, after = result.stdout.split()
    assert tuned == "True"
    assert int(before) >= 5 * 16384 * 0.9, "glibc's default maps (and faults in) every 64 MiB block afresh"
    # Tuned, the block stays in the heap: at most one more growth while the heap settles, then no faults.
    assert int(after) <= 16384 + 100
