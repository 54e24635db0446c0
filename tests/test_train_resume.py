"""Crash safety: SIGKILL mid-epoch, resume, and end with the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from fcaformer.train import load_config, train
from fcaformer.train.state import list_states
from tests._train_helpers import tiny_overrides

REPO = Path(__file__).resolve().parents[1]

# Runs training in a child process that SIGKILLs itself right after optimizer step KILL_AT (before that step's
# checkpoint is written): a real, unclean death in the middle of epoch 2.
KILLER = """
import os, signal, sys
from fcaformer.train import load_config, train
from fcaformer.train.engine import Trainer

kill_at = int(sys.argv[1])
original = Trainer._optimizer_step

def step_then_maybe_die(self):
    original(self)
    if kill_at and self.pos.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

Trainer._optimizer_step = step_then_maybe_die
train(load_config("default", sys.argv[2:]))
"""


def _run(kill_at: int, overrides: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", KILLER, str(kill_at), *overrides], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)["state_dict"]


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    # 5 batches per epoch, 2 epochs, a checkpoint every step; EMA and drop path on, so their state and RNG
    # draws must be restored too.
    extra = ["run.epochs=2", "run.ckpt_every_steps=1", "run.deterministic=true", "optim.ema=true",
             "optim.ema_decay=0.8", "model.drop_path_rate=0.2", "aug.color_jitter=0.3"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    train(load_config("default", tiny_overrides(reference, *extra)))  # uninterrupted, in this process

    crashed = _run(8, tiny_overrides(killed, *extra))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    states = list_states(killed / "checkpoints")
    assert [p.name for p in states] == ["state-0000000007.pt", "state-0000000006.pt"]
    assert not (killed / "results.json").exists()

    # The newest checkpoint is truncated (as by a crash of the disk, not of our atomic writer): resume must
    # warn and fall back to the previous one (epoch 2, batch 1), then redo the lost steps identically.
    data = states[0].read_bytes()
    states[0].write_bytes(data[: len(data) // 3])
    resumed = subprocess.run(
        [sys.executable, "-m", "fcaformer", "train", "--resume", str(killed)], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "state-0000000007.pt is unreadable" in resumed.stderr and "falling back" in resumed.stderr

    expected, got = _final_weights(reference), _final_weights(killed)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(value, got[name]), f"{name} differs after resume"
    ref_state = torch.load(list_states(reference / "checkpoints")[0], weights_only=True)
    new_state = torch.load(list_states(killed / "checkpoints")[0], weights_only=True)
    for name, value in ref_state["model"].items():  # raw (non-EMA) weights too
        assert torch.equal(value, new_state["model"][name]), name
    assert new_state["step"] == ref_state["step"] == 10
    assert [h["train_loss"] for h in new_state["history"]][-1] != 0
