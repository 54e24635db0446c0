"""Precise BatchNorm statistics before each evaluation: exact batch statistics, nothing else touched, one set of
statistics across DDP processes, EMA weights included, and meaningful validation numbers from the first epoch."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fcaformer.train import load_config, train
from fcaformer.train.engine import Trainer
from fcaformer.train.precise_bn import batchnorm_layers, calibration_size, recalibrate_batchnorm
from tests._train_helpers import tiny_overrides


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.GELU(), nn.Conv2d(4, 2, 1),
                         nn.BatchNorm2d(2))


def test_statistics_are_the_batch_averages_and_nothing_else_changes() -> None:
    net = _net().train()
    batches = [torch.randn(5, 3, 8, 8) * 3 + 1 for _ in range(3)]
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    rng = torch.get_rng_state()
    assert recalibrate_batchnorm(net, [(b, torch.zeros(5)) for b in batches], torch.device("cpu")) == 15
    assert torch.equal(torch.get_rng_state(), rng)  # no dropout draw: a resumed run stays identical
    assert net.training and net[1].momentum == 0.1 and all(torch.equal(v, net.state_dict()[k])
                                                            for k, v in weights.items())
    with torch.no_grad():
        features = [net[0](b) for b in batches]
        means = torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0)
        variances = torch.stack([f.var((0, 2, 3), unbiased=True) for f in features]).mean(0)
    torch.testing.assert_close(net[1].running_mean, means)
    torch.testing.assert_close(net[1].running_var, variances)
    assert int(net[1].num_batches_tracked) == 3
    assert recalibrate_batchnorm(nn.Linear(2, 2), batches, torch.device("cpu")) == 0  # no BatchNorm: no pass


def test_calibration_size_is_automatic_for_short_runs_only() -> None:
    assert calibration_size(None, 12, 1437) == 1024
    assert calibration_size(None, 12, 300) == 300
    assert calibration_size(None, 300, 10**6) == 0  # the paper's ImageNet recipe
    assert calibration_size(0, 12, 1437) == 0 and calibration_size(64, 300, 1437) == 64


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        net = _net()
        torch.manual_seed(100 + rank)  # each process sees other images
        recalibrate_batchnorm(net, [torch.randn(4, 3, 8, 8) + rank], torch.device("cpu"))
        torch.save({k: v for k, v in net.state_dict().items() if "running" in k}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_processes_share_averaged_statistics(tmp_path: Path) -> None:
    # forked, not spawned: the workers need nothing re-imported (spawning re-imports torch and timm per process)
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    local = []
    for rank in range(2):  # what each process would have computed alone
        net = _net()
        torch.manual_seed(100 + rank)
        recalibrate_batchnorm(net, [torch.randn(4, 3, 8, 8) + rank], torch.device("cpu"))
        local.append(net.state_dict())
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key
        torch.testing.assert_close(value, (local[0][key] + local[1][key]) / 2)
    assert not torch.allclose(local[0]["1.running_mean"], local[1]["1.running_mean"])


def test_ema_weights_are_evaluated_with_their_own_statistics(tmp_path: Path) -> None:
    config = load_config("default", tiny_overrides(tmp_path / "run", "optim.ema=true", "optim.ema_decay=0.9"))
    trainer = Trainer(config)
    trainer.fit()
    ema = trainer.eval_model()
    assert ema is trainer.ema.module and trainer.bn_images == 40
    after_fit = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in batchnorm_layers(ema)]
    # the statistics the last evaluation used are those of the EMA weights on the calibration images: computing
    # them again changes nothing (the EMA update would have blended in the trained model's running statistics)
    recalibrate_batchnorm(ema, trainer.bn_loader, trainer.device)
    for (mean, var), bn in zip(after_fit, batchnorm_layers(ema), strict=True):
        torch.testing.assert_close(bn.running_mean, mean)
        torch.testing.assert_close(bn.running_var, var)


def test_digits_job_first_epoch_is_far_above_chance(tmp_path: Path) -> None:
    """The default job (12 epochs) stopped after its first epoch: 10 classes, so chance is 10 %. Without precise
    BN this evaluated to 9.7 % (one class for every image); with it, 89-90 % (measured)."""
    steps_per_epoch = 1437 // 64  # digits: 1,437 training images, batch 64
    summary = train(load_config("default", [f"run.max_steps={steps_per_epoch}", "run.progress=false",
                                            f"run.output={tmp_path / 'run'}", "run.threads=1"]))
    assert summary["model"] == "fcaformer_atto" and summary["steps"] == steps_per_epoch
    assert summary["precise_bn_images"] == 1024
    assert summary["val"]["top1"] > 60


def test_precise_bn_can_be_turned_off(tmp_path: Path) -> None:
    trainer = Trainer(load_config("default", tiny_overrides(tmp_path / "run", "run.precise_bn_images=0")))
    before = [bn.running_mean.clone() for bn in batchnorm_layers(trainer.model)]
    trainer._evaluate(progress=False)
    assert trainer.bn_images == 0
    assert all(torch.equal(a, bn.running_mean) for a, bn in zip(before, batchnorm_layers(trainer.model)))
