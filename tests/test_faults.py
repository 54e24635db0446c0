"""Training that survives faults by itself (issue 23): ``--resume auto`` under ``torchrun --max-restarts``, states
that bound the lost work, exact mid-epoch resume checked from the logged sample order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.faults import counted_batches, main, read_events, segments
from fcaformer.detection import training
from fcaformer.segmentation.engine import SegmentTrainConfig, train_segmentor
from fcaformer.train.faults import SAMPLE_LOG_ENV
from fcaformer.train.state import list_states, remove_partial_states, save_state
from tests.conftest import shared_path

SMALL = dict(dims=(32, 64, 96, 128), depths=(1, 1, 2, 1), num_heads=(3, 4), drop_path_rate=0.1)


def test_a_worker_killed_in_a_state_write_is_restarted_by_torchrun_and_ends_bitwise_equal(tmp_path: Path) -> None:
    """benchmarks/faults.py's short version: the digits job (tiny) under ``torchrun --nproc_per_node 2
    --max-restarts``, rank 0 SIGKILLed while it writes a mid-epoch training state; the same command restarts
    with ``--resume auto``."""
    assert main(["--jobs", "quick", "--runs", "1", "--kills", "1", "--work", str(tmp_path / "work"),
                 "--out", str(tmp_path / "faults")]) == 0
    [run] = json.loads((tmp_path / "faults.json").read_text())["jobs"]["quick"]["runs"]
    assert run["finished"] and run["kill_count"] == 1
    assert run["kills"][0]["kind"] == "checkpoint" and run["kills"][0]["rank"] == 0
    assert run["weights_equal"] and run["metrics_equal"]  # bitwise: deterministic mode
    assert run["sample_order_equal"]  # no batch twice, none skipped, on both ranks
    assert run["states_ok"]  # every state readable, no fallback, no temporary file left
    [fault] = run["faults"]
    assert fault["lost_batches"] == 2  # the interval: the interrupted write's batches
    log = (tmp_path / "work" / "quick" / "faulted0" / "torchrun.log").read_text()
    assert "--resume auto: no training state in" in log  # the first start
    assert f"state-{fault['resumed_at']:010d}.pt: epoch" in log and "step" in log  # the restart says where


def _segment_config(out: Path) -> SegmentTrainConfig:
    voc = shared_path("data", "voc-mini")
    # batch 1 on 3 photos: 3 iterations an epoch, so iteration 2 is mid-epoch; drop path: random draws per step;
    # a state after every iteration through the time-based trigger
    return SegmentTrainConfig(img_dir=str(voc / "JPEGImages"), ann_dir=str(voc / "SegmentationClass"),
                              num_classes=21, out_dir=str(out), variant="fcaformer_l1", backbone_kwargs=SMALL,
                              decoder_channels=32, decoder_norm="identity", crop_size=(64, 64), base_size=96,
                              iterations=5, batch_size=1, lr=1e-3, warmup_iters=1, workers=0, checkpoint_every=0,
                              checkpoint_minutes=1e-9, resume="auto")


def test_dense_resume_auto_continues_mid_epoch_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A segmentation run that dies right after its state of iteration 2 (mid-epoch) and is started again with the
    same ``resume="auto"`` config ends with the weights, losses and sample order of an uninterrupted run."""
    # deterministic kernels: with two threads the CPU backward of the relative-position gather accumulates in a
    # varying order, and two uninterrupted runs already differ by ~1e-9 in rel_pos_table
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _check_dense_resume(tmp_path, monkeypatch)
    finally:
        torch.use_deterministic_algorithms(previous)


def _check_dense_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SAMPLE_LOG_ENV, str(tmp_path / "samples_reference"))
    reference = train_segmentor(_segment_config(tmp_path / "reference"), show_progress=False)
    assert reference["start_iteration"] == 0

    original = training.save_state

    def crash_after_second_state(directory: Path, position: int, state: dict, keep: int = 2) -> Path:
        path = original(directory, position, state, keep)
        if position == 2:
            raise RuntimeError("simulated crash")
        return path

    monkeypatch.setenv(SAMPLE_LOG_ENV, str(tmp_path / "samples_crashed"))
    monkeypatch.setattr(training, "save_state", crash_after_second_state)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_segmentor(_segment_config(tmp_path / "crashed"), show_progress=False)
    monkeypatch.setattr(training, "save_state", original)
    resumed = train_segmentor(_segment_config(tmp_path / "crashed"), show_progress=False)

    assert resumed["start_iteration"] == 2 and resumed["losses"] == reference["losses"]
    expected = torch.load(tmp_path / "reference" / "model.pt", weights_only=True)["state_dict"]
    got = torch.load(tmp_path / "crashed" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(value, got[name]) for name, value in expected.items())
    order = [counted_batches(segments(read_events(tmp_path / name)[0]))[0]
             for name in ("samples_reference", "samples_crashed")]
    key = [[(b["position"], b["epoch"], b["batch"], b["samples"]) for b in batches] for batches in order]
    assert key[0] == key[1] and [p for p, *_ in key[1]] == list(range(5))
    assert [(p, e, b) for p, e, b, _ in key[1][2:4]] == [(2, 0, 2), (3, 1, 0)]  # resumed mid-epoch 0
    assert [p.name for p in list_states(tmp_path / "crashed" / "checkpoints")] == ["state-0000000005.pt",
                                                                                    "state-0000000004.pt"]


def test_temporary_files_of_interrupted_state_writes_are_removed(tmp_path: Path) -> None:
    save_state(tmp_path, 3, {"step": 3})
    (tmp_path / ".state-0000000004.pt.x1y2.tmp").write_bytes(b"half a state")  # a write killed midway
    (tmp_path / "notes.tmp").write_text("not ours")
    assert remove_partial_states(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp", "state-0000000003.pt"]
