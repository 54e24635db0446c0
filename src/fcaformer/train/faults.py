"""Hooks for fault-injection runs (``benchmarks/faults.py``, the fault tests): what a run trained on, in order,
and named points where it can be made to wait so that a kill lands there.

Both are off unless their environment variable is set, and cost nothing then.

- ``FCAFORMER_SAMPLE_LOG=DIR``: every rank appends one JSON line per event to ``DIR/rank<r>.jsonl``: ``start``
  (the position it starts from and the state it resumed, if any), ``batch`` (global position, epoch, batch of
  the epoch, the dataset indices trained on, the optimizer step after it), ``state`` (a training state was
  written) and ``eval`` (an evaluation began / ended). Lines are written unbuffered, so a SIGKILL loses at most the
  line being written; readers skip a torn last line.
- ``FCAFORMER_FAULT_DIR=DIR``: at a fault point (``checkpoint``: a training state is written to its temporary
  file but not yet renamed into place; ``eval``: an evaluation has begun), a process that finds ``DIR/arm-<point>``
  writes ``DIR/at-<point>-<pid>`` (its rank inside) and sleeps up to ``FAULT_PAUSE_S`` seconds, for the harness to
  kill it there. The harness removes the arm file once it has killed, so that restarted workers do not stop.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

SAMPLE_LOG_ENV = "FCAFORMER_SAMPLE_LOG"
FAULT_DIR_ENV = "FCAFORMER_FAULT_DIR"
FAULT_PAUSE_S = 60.0
"""Longest wait at an armed fault point (the harness kills within a fraction of a second)."""


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def trace(event: str, **fields: Any) -> None:
    """Append an event to this rank's sample log (a no-op unless ``FCAFORMER_SAMPLE_LOG`` is set)."""
    folder = os.environ.get(SAMPLE_LOG_ENV)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    line = json.dumps({"event": event, "time": time.time(), "pid": os.getpid(), **fields}) + "\n"
    # one write() of the whole line with O_APPEND: a kill tears at most this line
    fd = os.open(Path(folder) / f"rank{_rank()}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def tracing() -> bool:
    """Whether the sample log is on (so that callers compute what they log only then)."""
    return bool(os.environ.get(SAMPLE_LOG_ENV))


def fault_point(name: str) -> None:
    """Wait here to be killed when the harness armed ``name`` (a no-op unless ``FCAFORMER_FAULT_DIR`` is set)."""
    folder = os.environ.get(FAULT_DIR_ENV)
    if not folder or not (Path(folder) / f"arm-{name}").exists():
        return
    marker = Path(folder) / f"at-{name}-{os.getpid()}"
    temporary = marker.with_name(f".{marker.name}")
    temporary.write_text(json.dumps({"rank": _rank(), "pid": os.getpid(), "time": time.time()}))
    temporary.rename(marker)
    deadline = time.monotonic() + FAULT_PAUSE_S
    while time.monotonic() < deadline and (Path(folder) / f"arm-{name}").exists():
        time.sleep(0.05)
    marker.unlink(missing_ok=True)
