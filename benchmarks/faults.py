"""Fault injection: do training runs survive workers killed at random, with no person involved, and end where
uninterrupted runs end?

Each job is a real ``fcaformer`` training command (``--resume auto``) under ``torchrun --standalone
--nproc_per_node 2 --max-restarts N`` (gloo on the CPU):

- ``digits``: ``fcaformer train``'s digits demo (``fcaformer_atto``, 32 px, deterministic), 4 epochs;
- ``imagenette``: ``fcaformer_femto`` at 64 px on 40 training / 10 val images per class of Imagenette-160;
- ``detection``: a small Mask R-CNN (``fcaformer_l1`` with small dims) on voc-mini, 100 iterations, validated every
  25;
- ``segmentation``: a small UperNet on voc-mini, 40 iterations, validated every 10.

For every job the script runs the command once without faults (the reference) and ``--runs`` times with faults.
A faulted run gets ``--kills`` SIGKILLs of a random worker process at random moments, spread over the run by
training progress: one aimed at a training-state write (rank 0 paused in it through the trainer's fault hook, see
:mod:`fcaformer.train.faults`), one at an evaluation, the rest at a random instant after a random batch. torchrun
restarts the worker group each time with the same command. Afterwards it checks, from the trainers' sample logs
and files:

- finished: torchrun exited 0 (every restart by itself);
- equal: the final weights (``model.pt``) are bitwise those of the reference, else the largest difference; the
  final metrics are compared too;
- work lost per fault: the batches trained after the state the restart resumed from (bound: the state interval)
  and the seconds from writing that state to the kill (bound: the longest time between two states of the
  reference plus its longest evaluation);
- sample order: per rank, the batches that count (those before the next restart's resume point) are exactly the
  reference's, in order: no batch trained twice, none skipped;
- states: every state file left is readable, no restart fell back from an unreadable one, and no temporary file
  of an interrupted write is left.

Writes ``<out>.json`` and ``<out>.md`` (default ``docs/faults``). The runs take about 20 minutes on 2 CPU cores:

    nohup nice -n 10 python benchmarks/faults.py > runs/faults.log 2>&1 &
    python benchmarks/faults.py --jobs quick --runs 1 --kills 1 --out /tmp/faults   # the test's version (~40 s)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path("..") / "shared" / "data"  # relative to the repository, where the jobs run (no machine paths in reports)
SMALL_BACKBONE = json.dumps(dict(dims=[32, 64, 96, 128], depths=[1, 1, 2, 1], num_heads=[3, 4]))
SMALL_HEADS = json.dumps(dict(fpn_channels=64, box_head_dim=128, mask_head_channels=32, rpn_batch_size_per_image=64,
                              box_batch_size_per_image=64, rpn_post_nms_top_n_test=100, box_detections_per_img=20))
TINY_ATTO = ["model.kwargs.dims=[16,16,32,32]", "model.kwargs.depths=[1,1,2,1]", "model.kwargs.num_heads=[1,1]"]
CLASSIFIER = ["run.deterministic=true", "run.ckpt_every_minutes=0", "run.progress=false", "run.threads=1"]


@dataclass
class Job:
    """A training command (after ``python -m fcaformer``, without its run folder) and what to check in its run."""

    name: str
    task: str  # classification, detection or segmentation
    args: list[str]
    out_flag: str  # the option naming the run folder
    interval: int  # batches (iterations) between training states

    def command(self, run: Path) -> list[str]:
        return [*self.args, self.out_flag, str(run)]


def _dense(task: str, iterations: int, interval: int, eval_every: int) -> list[str]:
    voc = DATA / "voc-mini"
    data = (["--data-root", str(voc), "--ann", str(voc / "annotations.json"), "--val-ann",
             str(voc / "annotations.json"), "--backbone-kwargs", SMALL_BACKBONE, "--detector-kwargs", SMALL_HEADS,
             "--min-size", "128", "--max-size", "192"] if task == "detect" else
            ["--img-dir", str(voc / "JPEGImages"), "--ann-dir", str(voc / "SegmentationClass"), "--val-img-dir",
             str(voc / "JPEGImages"), "--val-ann-dir", str(voc / "SegmentationClass"), "--num-classes", "21",
             "--backbone-kwargs", SMALL_BACKBONE, "--decoder-channels", "32", "--decoder-norm", "identity",
             "--crop-size", "96", "--base-size", "96"])
    return [task, "train", *data, "--model", "fcaformer_l1", "--iterations", str(iterations), "--batch-size", "1",
            "--workers", "0", "--lr", "5e-4", "--checkpoint-every", str(interval), "--checkpoint-minutes", "0",
            "--eval-every", str(eval_every), "--device", "cpu", "--resume", "auto"]


JOBS = {
    "digits": Job("digits", "classification",
                  ["train", "--resume", "auto", "--epochs", "4", "--set", *CLASSIFIER, "run.ckpt_every_steps=4"],
                  "--output", 4),
    "imagenette": Job("imagenette", "classification",
                      ["train", "--resume", "auto", "--data", str(DATA / "imagenette-160"), "--epochs", "3",
                       "--img-size", "64", "--batch-size", "16", "--workers", "0", "--set", *CLASSIFIER,
                       "run.ckpt_every_steps=4", "data.train_per_class=40", "data.val_per_class=10",
                       "data.verify_images=false"], "--output", 4),
    "detection": Job("detection", "detection", _dense("detect", 100, 5, 25), "--out", 5),
    "segmentation": Job("segmentation", "segmentation", _dense("segment", 40, 4, 10), "--out", 4),
    # the default test suite's version: a tiny digits job, states every 2 steps
    "quick": Job("quick", "classification",
                 ["train", "--resume", "auto", "--epochs", "2", "--set", *CLASSIFIER, *TINY_ATTO,
                  "run.ckpt_every_steps=2", "data.train_per_class=8", "data.val_per_class=2", "run.batch_size=8",
                  "run.precise_bn_images=0"], "--output", 2),
}


# ------------------------------------------------------------------------------------------------- running
def read_events(folder: Path) -> dict[int, list[dict[str, Any]]]:
    """The sample log of each rank (see :mod:`fcaformer.train.faults`); a line torn by a kill is skipped."""
    events: dict[int, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        events[rank] = []
        for line in path.read_text().splitlines():
            try:
                events[rank].append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def _workers(agent: psutil.Process) -> list[psutil.Process]:
    try:
        return [p for p in agent.children() if p.is_running()]
    except psutil.NoSuchProcess:
        return []


def _rank_of(process: psutil.Process) -> int | None:
    try:
        return int(process.environ().get("RANK", "-1"))
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


@dataclass
class Kill:
    """One planned fault: after the batch at ``target`` (a position of the run), kill a worker ``kind``-wise."""

    kind: str  # random, checkpoint or eval
    target: int
    time: float | None = None
    pid: int | None = None
    rank: int | None = None
    note: str = ""


@dataclass
class Controller:
    """Carries out the planned kills on a running torchrun job."""

    agent: subprocess.Popen
    samples: Path
    faults: Path
    step_s: float
    rng: random.Random
    kills: list[Kill] = field(default_factory=list)

    def _alive(self) -> bool:
        return self.agent.poll() is None

    def _reached(self, position: int, since: float) -> bool:
        """Whether a worker started after ``since`` has trained the batch at ``position`` (a worker of the group
        that was killed may still log a batch after the kill)."""
        events = [e for rank_events in read_events(self.samples).values() for e in rank_events]
        new = {e["pid"] for e in events if e["event"] == "start" and e["time"] > since}
        return any(e["event"] == "batch" and e["pid"] in new and e["position"] >= position for e in events)

    def _restarted(self, since: float) -> bool:
        return any(e["event"] == "start" and e["time"] > since
                   for events in read_events(self.samples).values() for e in events)

    def _markers(self, kind: str) -> list[Path]:
        return list(self.faults.glob(f"at-{kind}-*"))

    def run(self, plan: list[Kill], point_timeout: float = 300.0) -> None:
        agent = psutil.Process(self.agent.pid)
        since = 0.0
        for kill in plan:
            while self._alive() and not self._reached(kill.target, since):
                time.sleep(0.05)
            if not self._alive():
                kill.note = "the job ended before this kill"
                break
            victim = None
            if kill.kind == "random":
                time.sleep(self.rng.uniform(0, self.step_s))  # somewhere within the next step
                workers = _workers(agent)
                victim = self.rng.choice(workers) if workers else None
            else:
                arm = self.faults / f"arm-{kill.kind}"
                arm.write_text("")
                deadline = time.monotonic() + point_timeout
                while self._alive() and not self._markers(kill.kind) and time.monotonic() < deadline:
                    time.sleep(0.02)
                time.sleep(0.1)  # a classifier's evaluation runs on every rank: let the others arrive too
                markers = self._markers(kill.kind)
                if markers:
                    info = json.loads(self.rng.choice(markers).read_text())
                    victim = psutil.Process(info["pid"]) if psutil.pid_exists(info["pid"]) else None
            if victim is None:
                kill.note = "no worker to kill"
            else:
                kill.rank = _rank_of(victim)
                kill.pid, kill.time = victim.pid, time.time()
                os.kill(victim.pid, signal.SIGKILL)
            for path in [self.faults / f"arm-{kill.kind}", *self._markers(kill.kind)]:
                path.unlink(missing_ok=True)
            self.kills.append(kill)
            since = time.time()
            while self._alive() and not self._restarted(since - 0.001 if kill.time is None else kill.time):
                time.sleep(0.05)


def launch(job: Job, run: Path, max_restarts: int) -> tuple[subprocess.Popen, Path, Path]:
    """Start the job under torchrun (2 processes, gloo) with its sample log and fault hooks."""
    run.mkdir(parents=True, exist_ok=True)
    samples, faults = run / "samples", run / "faults"
    faults.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FCAFORMER_SAMPLE_LOG": str(samples),
           "FCAFORMER_FAULT_DIR": str(faults),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--max-restarts", str(max_restarts), "-m", "fcaformer", *job.command(run / "run")]
    log = open(run / "torchrun.log", "w")  # noqa: SIM115  (closed when the process has ended, in run_job)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO), samples, faults


def plan_kills(total: int, kills: int, rng: random.Random) -> list[Kill]:
    """``kills`` faults at distinct random positions of a run of ``total`` batches: one at a state write, one at
    an evaluation (when there are at least 3), the others at random moments."""
    kinds = (["checkpoint", "eval"] + ["random"] * (kills - 2)) if kills >= 3 else ["checkpoint", "random"][:kills]
    rng.shuffle(kinds)
    targets = sorted(rng.sample(range(1, total - 1), kills))
    return [Kill(kind, target) for kind, target in zip(kinds, targets)]


def run_job(job: Job, run: Path, plan: list[Kill], seed: int, step_s: float) -> dict[str, Any]:
    """Run the job once (with the planned kills; none: the reference) and collect what the analysis needs."""
    start = time.monotonic()
    agent, samples, faults = launch(job, run, max_restarts=len(plan) + 2)
    controller = Controller(agent, samples, faults, step_s, random.Random(seed))
    controller.run(plan)
    returncode = agent.wait()
    return {"returncode": returncode, "wall_s": time.monotonic() - start,
            "kills": [vars(k) for k in controller.kills]}


# ------------------------------------------------------------------------------------------------ analysis
def segments(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One rank's log cut into the lives of its processes: ``start`` (position and time) and ``batches``."""
    lives: dict[int, dict[str, Any]] = {}
    for event in events:
        life = lives.setdefault(event["pid"], {"pid": event["pid"], "start": None, "batches": [], "evals": [],
                                               "states": []})
        if event["event"] == "start":
            life["start"] = event
        elif event["event"] == "batch":
            life["batches"].append(event)
        elif event["event"] == "eval":
            life["evals"].append(event)
        elif event["event"] == "state":
            life["states"].append(event)
    return [life for life in lives.values() if life["start"] is not None]


def counted_batches(lives: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """The batches that count (each life's, up to where the next life resumed) and each life's lost batches."""
    counted, lost = [], []
    for life, after in zip(lives, [*lives[1:], None]):
        resume = after["start"]["position"] if after else None
        counted += [b for b in life["batches"] if resume is None or b["position"] < resume]
        lost.append([b for b in life["batches"] if resume is not None and b["position"] >= resume])
    return counted, lost


def _order(batches: list[dict[str, Any]]) -> list[tuple[int, int, int, tuple[int, ...]]]:
    return [(b["position"], b["epoch"], b["batch"], tuple(b["samples"])) for b in batches]


def _final(job: Job, run: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    model = torch.load(run / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
    if job.task == "classification":
        val = json.loads((run / "results.json").read_text())["val"]
        metrics = {"top1": val["top1"], "val_loss": val["loss"]}
    else:
        log = json.loads((run / "train_log.json").read_text())["metrics"]
        names = ("bbox_AP", "bbox_AP50", "segm_AP") if job.task == "detection" else ("mIoU", "pixel_acc")
        metrics = {k: log[k] for k in names}
    return model, metrics


def reference_timing(events: dict[int, list[dict[str, Any]]]) -> dict[str, float]:
    """Median step time, longest state interval (seconds between states, rank 0) and longest evaluation."""
    rank0 = events[0]
    batch_times = [e["time"] for e in rank0 if e["event"] == "batch"]
    steps = [b - a for a, b in zip(batch_times, batch_times[1:])]
    start = next(e["time"] for e in rank0 if e["event"] == "start")
    state_times = [start] + [e["time"] for e in rank0 if e["event"] == "state"]
    evals = [e for e in rank0 if e["event"] == "eval"]
    eval_s = [b["time"] - a["time"] for a, b in zip(evals, evals[1:]) if a["phase"] == "start" and b["phase"] == "end"]
    return {"step_s": statistics.median(steps), "state_interval_s": max(b - a for a, b in
                                                                        zip(state_times, state_times[1:])),
            "eval_s": max(eval_s, default=0.0)}


def analyse(job: Job, run: Path, reference: Path, outcome: dict[str, Any], timing: dict[str, float]) -> dict:
    """Everything checked of one faulted run against the reference run."""
    from fcaformer.errors import CheckpointError
    from fcaformer.train.state import list_states
    from fcaformer.weights.reading import read_torch_file

    events, ref_events = read_events(run / "samples"), read_events(reference / "samples")
    result: dict[str, Any] = {"finished": outcome["returncode"] == 0, "wall_s": outcome["wall_s"],
                              "kills": outcome["kills"]}
    done_kills = [k for k in outcome["kills"] if k["time"] is not None]
    result["kill_count"] = len(done_kills)
    # sample order, per rank
    order_ok, lost_by_life = True, {}
    for rank, rank_events in ref_events.items():
        expected, _ = counted_batches(segments(rank_events))
        lives = segments(events.get(rank, []))
        got, lost = counted_batches(lives)
        order_ok &= _order(got) == _order(expected)
        lost_by_life[rank] = (lives, lost)
    result["sample_order_equal"] = order_ok
    # work lost per fault: the life a kill ended, its batches after the next resume point
    bound_s = timing["state_interval_s"] + timing["eval_s"]
    per_fault = []
    lives0 = lost_by_life[0][0]
    for kill in done_kills:
        ended = [i for i, life in enumerate(lives0) if life["start"]["time"] < kill["time"]]
        if not ended or ended[-1] + 1 >= len(lives0):
            continue
        index = ended[-1]
        resume = lives0[index + 1]["start"]["position"]
        batches = max(len(lost_by_life[r][1][index]) for r in lost_by_life if index < len(lost_by_life[r][1]))
        # the work since the state it resumed from was written (or since this life began, when it is older)
        written = [s["time"] for s in lives0[index]["states"] if s["position"] == resume]
        since = max([lives0[index]["start"]["time"], *written])
        restarted = lives0[index + 1]["start"]["time"]
        per_fault.append({"kind": kill["kind"], "rank": kill["rank"], "resumed_at": resume, "lost_batches": batches,
                          "lost_s": kill["time"] - since, "restart_s": restarted - kill["time"]})
    result["faults"] = per_fault
    result["max_lost_batches"] = max((f["lost_batches"] for f in per_fault), default=0)
    result["max_lost_s"] = max((f["lost_s"] for f in per_fault), default=0.0)
    result["lost_batches_within_bound"] = result["max_lost_batches"] <= job.interval
    result["lost_s_within_bound"] = result["max_lost_s"] <= bound_s
    result["bound"] = {"batches": job.interval, "seconds": bound_s}
    # states
    states = run / "run" / "checkpoints"
    unreadable = []
    for path in list_states(states):
        try:
            read_torch_file(path)
        except (CheckpointError, FileNotFoundError) as error:
            unreadable.append(f"{path.name}: {error}")
    log = (run / "torchrun.log").read_text()
    result["states"] = {"unreadable": unreadable, "fallbacks": log.count("is unreadable"),
                        "partial_files": len(list(states.glob(".state-*.tmp")))}
    result["states_ok"] = not unreadable and not result["states"]["fallbacks"] and not result["states"]["partial_files"]
    # final weights and metrics
    if result["finished"]:
        weights, metrics = _final(job, run / "run")
        ref_weights, ref_metrics = _final(job, reference / "run")
        diffs = [float((weights[k].double() - v.double()).abs().max()) if v.is_floating_point()
                 else float((weights[k] != v).sum()) for k, v in ref_weights.items()]
        result["weights_equal"] = all(torch.equal(weights[k], v) for k, v in ref_weights.items())
        result["max_weight_diff"] = max(diffs, default=0.0)
        result["metrics"], result["reference_metrics"] = metrics, ref_metrics
        result["metrics_equal"] = metrics == ref_metrics
    else:
        result.update(weights_equal=False, metrics_equal=False)
    return result


# -------------------------------------------------------------------------------------------------- report
def machine() -> str:
    from fcaformer.benchmark import machine_info

    info = machine_info()
    return f"{info['cpu']}, {info['cpu_count']} cores, torch {info['torch']}"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Fault injection (`benchmarks/faults.py`), measured on {report['machine']}: each job under `torchrun "
             "--standalone --nproc_per_node 2 --max-restarts N` (gloo, CPU), one reference run without faults and "
             "faulted runs with SIGKILLs of a random worker (one during a training-state write, one during an "
             "evaluation, the rest at random moments).", "",
             "| job | runs | kills | finished | weights equal to uninterrupted | metrics equal | work lost per fault, "
             "max (batches / s) | bound (state interval / + one evaluation, s) | sample order | states "
             "readable | restart, median s |",
             "|---|---:|---:|---|---|---|---|---|---|---|---:|"]
    for name, job in report["jobs"].items():
        runs = job["runs"]
        kills = sum(r["kill_count"] for r in runs)
        restarts = [f["restart_s"] for r in runs for f in r["faults"]]

        def yes(key: str, runs: list[dict[str, Any]] = runs) -> str:
            return f"{sum(bool(r[key]) for r in runs)}/{len(runs)}"

        lost_b = max((r["max_lost_batches"] for r in runs), default=0)
        lost_s = max((r["max_lost_s"] for r in runs), default=0.0)
        bound = runs[0]["bound"] if runs else {"batches": 0, "seconds": 0.0}
        diff = max((r.get("max_weight_diff", float("nan")) for r in runs), default=0.0)
        equal = yes("weights_equal") + ("" if all(r["weights_equal"] for r in runs) else f" (max diff {diff:.2e})")
        lines.append(f"| {name} | {len(runs)} | {kills} | {yes('finished')} | {equal} | {yes('metrics_equal')} | "
                     f"{lost_b} / {lost_s:.1f} | {bound['batches']} / {bound['seconds']:.1f} | "
                     f"{yes('sample_order_equal')} | {yes('states_ok')} | "
                     f"{statistics.median(restarts) if restarts else float('nan'):.1f} |")
    lines += ["", "Work lost per fault: the batches trained after the state the restart resumed from, and the seconds "
              "from writing that state to the kill (a kill during an evaluation or a state write loses the batches "
              "since the last state plus that evaluation or write). Restart: from the kill to "
              "the restarted workers' first training step (torchrun noticing, new processes, imports, data scan, "
              "model build, reading the state)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", nargs="+", default=["digits", "imagenette", "detection", "segmentation"],
                        choices=list(JOBS))
    parser.add_argument("--runs", type=int, default=2, help="faulted runs per job")
    parser.add_argument("--kills", type=int, default=6, help="faults per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "faults", help="run folders (replaced)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "faults", help="report stem (.json, .md)")
    args = parser.parse_args(argv)
    from fcaformer.files import atomic_report

    report: dict[str, Any] = {"machine": machine(), "kills_per_run": args.kills, "jobs": {}}
    rng = random.Random(args.seed)
    for name in args.jobs:
        job = JOBS[name]
        work = args.work / name
        shutil.rmtree(work, ignore_errors=True)
        reference = work / "reference"
        reference_outcome = run_job(job, reference, [], args.seed, 0.0)
        if reference_outcome["returncode"] != 0:
            raise SystemExit(f"{name}: the reference run failed; see {reference / 'torchrun.log'}")
        timing = reference_timing(read_events(reference / "samples"))
        total = len(counted_batches(segments(read_events(reference / "samples")[0]))[0])
        runs = []
        for index in range(args.runs):
            run = work / f"faulted{index}"
            plan = plan_kills(total, args.kills, rng)
            outcome = run_job(job, run, plan, args.seed + index, timing["step_s"])
            runs.append(analyse(job, run, reference, outcome, timing))
            print(f"--- {name} run {index}: {json.dumps({k: v for k, v in runs[-1].items() if k != 'kills'})}",
                  flush=True)
        report["jobs"][name] = {"command": ["fcaformer", *job.command(Path("RUN"))], "batches": total,
                                "reference_wall_s": reference_outcome["wall_s"], "reference_timing": timing,
                                "runs": runs}
        atomic_report(report, markdown(report), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
