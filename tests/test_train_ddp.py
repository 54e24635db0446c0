"""Two-process DDP on CPU (gloo) through torchrun and the ``fcaformer train`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fcaformer.train import load_config
from fcaformer.train.data import ImageDataset, build_eval_transform, eval_loader
from fcaformer.train.datasets import load_image_lists
from fcaformer.train.engine import Trainer
from fcaformer.train.evaluate import evaluate
from fcaformer.weights import load_model
from tests._train_helpers import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
# BatchNorm-free network and SGD: 2 ranks x 4 images must give exactly the update of 1 process x 8 images.
VIT = ["model.name=vit_tiny_patch16_224", "model.kwargs={}", "model.kwargs.patch_size=8",
       "model.kwargs.embed_dim=32", "model.kwargs.depth=1", "model.kwargs.num_heads=1", "optim.opt=sgd",
       "optim.lr_base_batch=8", "optim.warmup_epochs=0", "run.deterministic=true", "run.max_steps=2"]


def test_torchrun_two_processes_gloo(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    overrides = tiny_overrides(out, *VIT, "run.batch_size=4")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "fcaformer", "train", "--config", "default", "--set", *overrides]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["global_batch"] == 8 and results["steps"] == 2

    # Gradients were averaged over ranks: the same 8 samples in one process give the same weights.
    single = Trainer(load_config("default", tiny_overrides(tmp_path / "single", *VIT, "run.batch_size=8")))
    single.fit()
    ddp_model, ckpt = load_model(out / "model.pt")
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(ddp_model.state_dict()[name], value, atol=1e-6, rtol=1e-5, msg=name)

    # Metrics were reduced over the two ranks' disjoint shards: they equal one pass over the whole val set.
    _, val_list = load_image_lists(single.config.data)
    dc = ckpt["data_config"]
    tf = build_eval_transform(dc["img_size"], dc["crop_pct"], dc["interpolation"], dc["mean"], dc["std"])
    full = evaluate(ddp_model, eval_loader(ImageDataset(val_list, tf), 7, 0), 10, torch.device("cpu"))
    assert results["val"]["images"] == full.images == 20
    assert abs(results["val"]["top1"] - full.top1) < 1e-4 and abs(results["val"]["loss"] - full.loss) < 1e-4
