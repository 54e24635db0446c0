"""Crash safety: SIGKILL mid-epoch, resume, and end with the weights of an uninterrupted run; what a resumed run
says and records; run folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fcaformer.cli import main as cli_main
from fcaformer.train import ConfigError, load_config, train
from fcaformer.train.engine import Trainer
from fcaformer.train.state import list_states, load_latest_state
from tests._train_helpers import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
# the checkout's package first (an installed one may be another checkout's), then the tests
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}

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
    return subprocess.run([sys.executable, "-c", KILLER, str(kill_at), *overrides], capture_output=True,
                          text=True, env=ENV, cwd=REPO, timeout=600)


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
        env=ENV, cwd=REPO, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "state-0000000007.pt is unreadable" in resumed.stderr and "falling back" in resumed.stderr
    # issue 24.9: the log says where the run resumed, and the resumed epoch's record covers the whole epoch
    assert "state-0000000006.pt: epoch 2 of 2, batch 1 of 5, step 6" in resumed.stdout
    records = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (reference, killed)]
    assert [r["train_loss"] for r in records[1]] == [r["train_loss"] for r in records[0]]
    assert records[1][1]["resumed_at_batch"] == [1] and "resumed_at_batch" not in records[0][1]

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


def test_resume_with_more_epochs_follows_the_new_schedule_and_states_follow_the_clock(tmp_path: Path) -> None:
    """Issue 23: a resumed run's lr is its own schedule's from the first resumed step (it was the saved
    schedule's, and a new run.epochs was ignored); run.ckpt_every_minutes writes states by the clock."""
    out = tmp_path / "run"
    train(load_config("default", tiny_overrides(out, "run.ckpt_every_minutes=1e-9")))  # 5 steps
    assert [p.name for p in list_states(out / "checkpoints")] == ["state-0000000005.pt", "state-0000000004.pt"]
    longer = load_config("default", tiny_overrides(out, "run.epochs=3"))
    state, _ = load_latest_state(out)
    fresh = Trainer(longer)
    fresh.scheduler.step_update(5)
    assert Trainer(longer, resume_state=state)._lr() == fresh._lr() > 1e-5  # not the 1-epoch schedule's end
    summary = train(load_config("default", tiny_overrides(out)), resume=out, overrides=["run.epochs=3"])
    assert summary["epochs_done"] == 3 and summary["steps"] == 15
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_default_run_folder_is_named_after_the_data_and_another_runs_folder_is_refused(tmp_path: Path,
                                                                                     capsys) -> None:
    """Issue 24.4: ``--data X`` wrote every dataset to runs/imagenette; now runs/<X's name>, the same for the same
    command (``--resume auto`` relies on it), and a folder holding a run of another config is not overwritten."""
    for name in ("pets", "cars"):
        assert cli_main(["train", "--data", str(tmp_path / name), "--resume", "auto", "--print-config"]) == 0
        assert f"  output: runs/{name}\n" in capsys.readouterr().out
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(load_config("default", tiny_overrides(out)).to_dict()))
    with pytest.raises(ConfigError, match=r"holds a run of another config \(optim.lr: 0.002 in the run, 0.1 now\)"):
        train(load_config("default", tiny_overrides(out, "optim.lr=0.1")))
    assert cli_main(["train", "--set", *tiny_overrides(out, "optim.lr=0.1")]) == 2
    assert "--output" in capsys.readouterr().err
