"""The suite's device part: models, fast path, mixed precision, training, resume, compile, export, dense tasks
and DDP on ``$FCAFORMER_TEST_DEVICE`` (default ``cpu``).

On a GPU machine::

    FCAFORMER_TEST_DEVICE=cuda python -m pytest -m "not slow" tests/test_device.py

On the CPU the same tests run at smaller sizes; the CUDA-only ones (fp16 with a grad scaler, inductor,
SDPA's bias gradient) skip.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import fcaformer
from fcaformer.benchmark import randomize_weights_
from fcaformer.fast import fast_attention_modules, fuse_model, set_fast_attention
from fcaformer.train import load_config
from fcaformer.train.engine import Trainer
from fcaformer.train.state import load_latest_state
from tests._train_helpers import tiny_overrides
from tests.conftest import shared_path

REPO = Path(__file__).resolve().parents[1]
MODELS = ["fcaformer_l0", "fcaformer_l1", "fcaformer_l2", "fcaformer_l3", "fcaformer_l4"]
# Full depths on a GPU; on the CPU fewer blocks (same widths, heads and cross-token histories) at 64 px.
CPU_DEPTHS = {"fcaformer_l1": (1, 1, 3, 2), "fcaformer_l2": (1, 1, 3, 2), "fcaformer_l3": (1, 1, 3, 2),
              "fcaformer_l4": (1, 1, 3, 2)}


def on_gpu(device: torch.device) -> bool:
    return device.type == "cuda"


def image_size(device: torch.device) -> int:
    return 224 if on_gpu(device) else 64


def build(name: str, device: torch.device, **kwargs) -> torch.nn.Module:
    """Randomised weights (BN statistics, layer scales and biases far from their inits) on ``device``."""
    if not on_gpu(device) and name in CPU_DEPTHS:
        kwargs.setdefault("depths", CPU_DEPTHS[name])
    model = timm.create_model(name, img_size=image_size(device), **kwargs)
    return randomize_weights_(model).to(device)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def real_batch(device: torch.device, size: int, per_class: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Imagenette val images of two classes, resized to ``size`` and normalised, with their labels."""
    root = shared_path("data", "imagenette-160", "val")
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    images, labels = [], []
    for label, folder in enumerate(sorted(root.iterdir())[:2]):
        for path in sorted(folder.iterdir())[:per_class]:
            pixels = np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)) / 255.0
            images.append(torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1)).float())
            labels.append(label)
    return torch.stack(images).to(device), torch.tensor(labels, device=device)


# ------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("name", [*MODELS, "dense"])
def test_forward_backward_every_model(device: torch.device, name: str) -> None:
    size = image_size(device)
    if name == "dense":
        model = randomize_weights_(fcaformer.create_dense_backbone(
            "fcaformer_l1", img_size=size, **({} if on_gpu(device) else {"depths": CPU_DEPTHS["fcaformer_l1"]})
        )).to(device)
    else:
        model = build(name, device)
    model.train()
    x = torch.randn(2, 3, size, size, device=device)
    out = model(x)
    outputs = out if isinstance(out, list) else [out]
    if name == "dense":
        assert [o.shape[-1] for o in outputs] == [size // 4, size // 8, size // 16, size // 32]
    else:
        assert out.shape == (2, 1000)
    assert all(o.device.type == device.type and torch.isfinite(o).all() for o in outputs)
    sum(o.float().square().mean() for o in outputs).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    # the cross-token parameters learn (nothing is silently detached on this device)
    cross = [g for n, g in grads.items() if n.endswith(("cross_bias", "cross_scale"))]
    assert cross and all(g.abs().sum() > 0 for g in cross)


# ---------------------------------------------------------------------------------------- fast path
@pytest.mark.parametrize("name", ["fcaformer_l0", "fcaformer_l1", "fcaformer_l2"])
def test_fast_path_equals_faithful_in_fp32(device: torch.device, name: str, exact_fp32) -> None:
    model = build(name, device).eval()
    fused = fuse_model(model)
    size = image_size(device)
    for x in (torch.randn(4, 3, size, size, device=device), torch.randn(2, 3, size + 32, size - 16, device=device)):
        with torch.no_grad():
            assert relative_error(fused(x), model(x)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["fcaformer_l0", "fcaformer_l1", "fcaformer_l2"])
def test_fast_path_is_as_accurate_as_faithful_in_half_precision(device: torch.device, name: str,
                                                                dtype: torch.dtype, exact_fp32) -> None:
    """Under autocast both paths round activations to ``dtype``; the fast path must not add error of its own.

    Tolerance: its error against the fp32 model may exceed the faithful path's own error in the same precision
    by at most 50 % (different fusions round at different places), and stay below what the format allows over
    a network of this depth (bf16: 8 mantissa bits, fp16: 11).
    """
    if dtype == torch.float16 and not on_gpu(device):
        pytest.skip("fp16 autocast is a GPU feature here (run.amp=fp16 needs CUDA)")
    model = build(name, device).eval()
    fused = fuse_model(model)
    size = image_size(device)
    x = torch.randn(8, 3, size, size, device=device)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast(device.type, dtype=dtype):
            faithful, fast = model(x), fused(x)
    assert fast.dtype == dtype and torch.isfinite(fast).all()
    faithful_error, fast_error = relative_error(faithful, reference), relative_error(fast, reference)
    assert fast_error <= 1.5 * faithful_error + 1e-3, (fast_error, faithful_error)
    assert fast_error < (0.05 if dtype == torch.bfloat16 else 0.01)


def test_bias_cache_follows_device_and_dtype(device: torch.device, exact_fp32) -> None:
    model = build("fcaformer_l1", torch.device("cpu")).eval()
    fused = fuse_model(model)
    size = image_size(device)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference = fused(x)
        fused.to(device)
        on_device = fused(x.to(device))
    modules = [m for m in fast_attention_modules(fused) if m._bias_cache]
    assert modules
    for module in modules:
        (bias,) = module._bias_cache.values()
        assert bias.device.type == device.type and bias.dtype == torch.float32
    assert relative_error(on_device.cpu(), reference) < 1e-5
    half = torch.float16 if on_gpu(device) else torch.bfloat16
    with torch.no_grad():
        low = fused.to(half)(x.to(device, half))
    for module in modules:
        (bias,) = module._bias_cache.values()
        assert bias.dtype == half  # rebuilt, not a stale fp32 entry
    assert relative_error(low.float().cpu(), reference) < 0.05


@pytest.mark.skipif(os.environ.get("FCAFORMER_TEST_DEVICE", "cpu") == "cpu", reason="CUDA-only kernel path")
def test_sdpa_bias_gradient_matches_explicit_attention(device: torch.device) -> None:
    """``sdpa_bias_grad`` (CUDA): SDPA's memory-efficient kernel differentiates the bias. Run in a child process,
    because a faulting kernel takes the CUDA context (and every later test of this process) with it."""
    code = f"""
import copy, torch, timm, fcaformer
from fcaformer.benchmark import randomize_weights_
from fcaformer.fast import set_fast_attention
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
model = randomize_weights_(timm.create_model("fcaformer_l1", img_size=224)).to("{device}").train()
explicit = set_fast_attention(copy.deepcopy(model))
sdpa = set_fast_attention(copy.deepcopy(model), sdpa_bias_grad=True)
x = torch.randn(4, 3, 224, 224, device="{device}")
grads = []
for m in (explicit, sdpa):
    torch.manual_seed(0)
    m(x).logsumexp(-1).sum().backward()
    grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
error = float((grads[1] - grads[0]).norm() / grads[0].norm())
cross = [p.grad for n, p in sdpa.named_parameters() if n.endswith("cross_bias")]
print("RESULT", error, all(float(g.abs().sum()) > 0 for g in cross))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    _, error, cross_ok = done.stdout.split("RESULT")[-1].split()
    assert float(error) < 1e-4 and cross_ok == "True"


# ------------------------------------------------------------------------------------------ training
def _train_steps(device: torch.device, dtype: torch.dtype | None, steps: int = 12) -> list[float]:
    """AdamW steps of a small L1 on one real batch under autocast ``dtype`` (fp16 with a grad scaler)."""
    torch.manual_seed(0)
    model = timm.create_model("fcaformer_l1", num_classes=2, img_size=image_size(device),
                              dims=(32, 64, 96, 128), depths=(1, 1, 3, 2), num_heads=(3, 4)).to(device)
    set_fast_attention(model)
    model.to(memory_format=torch.channels_last)
    images, labels = real_batch(device, image_size(device))
    images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    losses = []
    for _ in range(steps):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16+GradScaler"])
def test_mixed_precision_training_loss_falls_on_real_images(device: torch.device, dtype: torch.dtype) -> None:
    if dtype == torch.float16 and not on_gpu(device):
        pytest.skip("fp16 with a grad scaler is the GPU recipe")
    losses = _train_steps(device, dtype)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


def test_trainer_resume_on_device_equals_uninterrupted(device: torch.device, tmp_path: Path) -> None:
    """The trainer with on-device data: 2 epochs in one go == stopped after epoch 1, then resumed."""
    extra = [f"run.device={device}", "run.deterministic=true", "model.drop_path_rate=0.1", "data.on_device=true",
             "run.log_every=3", "run.epochs=2"]
    if on_gpu(device):
        extra += ["run.amp=bf16", "run.channels_last=true"]
    whole = Trainer(load_config("default", tiny_overrides(tmp_path / "whole", *extra)))
    whole.fit()
    Trainer(load_config("default", tiny_overrides(tmp_path / "split", *extra, "run.max_steps=5"))).fit()
    state, _ = load_latest_state(tmp_path / "split")
    resumed = Trainer(load_config("default", tiny_overrides(tmp_path / "split", *extra)), resume_state=state)
    assert (resumed.pos.epoch, resumed.pos.step) == (1, 5)
    resumed.fit()
    # bit-identical on the CPU; on a GPU, deterministic mode still leaves cuBLAS' reduction order to chance
    rtol, atol = (1e-3, 1e-4) if on_gpu(device) else (0.0, 0.0)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol), name


# --------------------------------------------------------------------------------- compile and export
def _tiny_fused(device: torch.device) -> torch.nn.Module:
    return fuse_model(build("fcaformer_l1", device, dims=(32, 64, 96, 128), depths=(1, 1, 3, 2),
                            num_heads=(3, 4)).eval())


def test_torch_compile_inductor_on_device(device: torch.device, exact_fp32) -> None:
    if not on_gpu(device):
        pytest.skip("inductor on the CPU is covered by tests/test_export.py (eager backend, no graph breaks)")
    fused = _tiny_fused(device)
    x = torch.randn(8, 3, 224, 224, device=device)
    compiled = torch.compile(fused, fullgraph=True)
    with torch.no_grad():
        assert relative_error(compiled(x), fused(x)) < 1e-4


def test_torch_export_runs_on_device(device: torch.device, exact_fp32) -> None:
    fused = _tiny_fused(device)
    size = image_size(device)
    x = torch.randn(2, 3, size, size, device=device)
    program = torch.export.export(fused, (x,))
    with torch.no_grad():
        assert relative_error(program.module()(x), fused(x)) < 1e-5


# ------------------------------------------------------------------------------------- dense tasks
SMALL = dict(dims=(32, 64, 96, 128), depths=(1, 1, 2, 1), num_heads=(3, 4))


def _voc_image(index: int, size: tuple[int, int]) -> torch.Tensor:
    root = shared_path("data", "voc-mini", "JPEGImages")
    path = sorted(root.iterdir())[index]
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB").resize(size))).permute(2, 0, 1) / 255.0


def _adamw_steps(model: torch.nn.Module, loss_fn, steps: int, lr: float) -> list[float]:
    """``steps`` AdamW updates of ``loss_fn()``; every loss must be finite. Returns the losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_mask_rcnn_training_steps_on_device(device: torch.device) -> None:
    from fcaformer.detection import mask_rcnn

    torch.manual_seed(0)
    model = mask_rcnn("fcaformer_l1", 3, backbone_kwargs=SMALL, min_size=160, max_size=240, fpn_channels=64,
                      box_head_dim=128, mask_head_channels=32).to(device).train()
    images = [_voc_image(i, (200, 150)).to(device) for i in range(2)]
    masks = torch.zeros(2, 150, 200, dtype=torch.uint8)
    masks[0, 20:90, 30:120] = 1
    masks[1, 60:140, 100:190] = 1
    targets = [{"boxes": torch.tensor([[30.0, 20.0, 120.0, 90.0]], device=device),
                "labels": torch.tensor([1], device=device), "masks": masks[:1].to(device)},
               {"boxes": torch.tensor([[100.0, 60.0, 190.0, 140.0]], device=device),
                "labels": torch.tensor([2], device=device), "masks": masks[1:].to(device)}]

    def loss() -> torch.Tensor:
        losses = model(images, targets)
        assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"}
        return sum(losses.values())

    totals = _adamw_steps(model, loss, steps=4, lr=1e-4)
    assert totals[-1] < totals[0], totals


def test_upernet_training_steps_on_device(device: torch.device) -> None:
    from fcaformer.segmentation import upernet

    torch.manual_seed(0)
    model = upernet("fcaformer_l1", 4, backbone_kwargs=SMALL, decoder_channels=32).to(device).train()
    images = torch.stack([_voc_image(i, (128, 128)) for i in range(2)]).to(device)
    labels = (images.mean(1) * 4).long().clamp(max=3)  # a learnable dense target: brightness bands
    losses = _adamw_steps(model, lambda: torch.nn.functional.cross_entropy(model(images), labels), steps=5, lr=1e-3)
    assert losses[-1] < losses[0], losses


# ------------------------------------------------------------------------------------------------- DDP
def test_torchrun_ddp_digits_job_without_gradient_copies(device: torch.device, tmp_path: Path) -> None:
    """``torchrun -m fcaformer train``: one nccl process on a GPU, two gloo processes on the CPU. DDP must not warn
    that gradient strides differ from its buckets' (that warning means a gradient copy on every step)."""
    processes = 1 if on_gpu(device) else 2
    out = tmp_path / "ddp"
    overrides = tiny_overrides(out, f"run.device={device.type}")  # the default job: NCHW weights
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "fcaformer", "train", "--config", "default", "--set", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "Grad strides do not match" not in done.stderr, done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == processes and results["steps"] == 5 // processes
    assert results["distributed"] is True


def test_align_parameter_strides_only_restrides_equivalent_layouts() -> None:
    from fcaformer.train.distributed import align_parameter_strides

    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.Conv2d(8, 4, 1))
    reference = copy.deepcopy(model)
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    params = list(model.parameters())
    changed = align_parameter_strides(model, x)
    assert [p is q for p, q in zip(params, model.parameters())] == [True] * len(params)  # same Parameters
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)  # same values
    model(x).sum().backward()
    for p in model.parameters():  # every gradient now has its parameter's strides
        assert p.grad.stride() == p.stride()
    # the depthwise weight (8, 1, 3, 3) always gets channels-last gradient strides; whether the 1x1 conv's does
    # depends on the kernel oneDNN picks
    assert changed >= 1
