"""torch.distributed set-up from ``torchrun``'s environment (gloo on CPU, nccl on GPU) and small helpers."""

from __future__ import annotations

import copy
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job and its device; ``distributed``: in a process group (under torchrun)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes files and shows progress."""
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks the local GPU when there is one, else the CPU; errors name unavailable devices."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"run.device={name!r} but no CUDA GPU is available; use run.device=cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def join_process_group(backend: str) -> None:
    """``init_process_group`` from torchrun's environment, with this worker group's keys kept apart from those of
    the groups before it.

    torchrun's workers share its agent's key-value store across ``--max-restarts`` restarts, and the keys a process
    group publishes (gloo's listening addresses among them) outlive the workers that wrote them: a restarted group
    could read a killed predecessor's address and fail (``Gloo connectFullMesh failed ... Connection refused``,
    seen with torch 2.14; pytorch issue 167288 reports the same for NCCL). Each restart
    (``TORCHELASTIC_RESTART_COUNT``) gets its own key prefix.
    """
    store, rank, world_size = next(dist.rendezvous("env://"))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"fcaformer/restart{restart}", store), rank=rank,
                            world_size=world_size)


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group when launched by ``torchrun`` (any number of processes, one included: the job then
    runs DDP exactly as it would on more), else run single-process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    launched = world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if launched and not dist.is_initialized():
        join_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, device, distributed=dist.is_available() and dist.is_initialized())


def all_true(flag: bool, device: torch.device) -> bool:
    """Logical AND of ``flag`` over all ranks (so every rank takes the same branch)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


def mean_over_ranks(value: float, device: torch.device) -> float:
    """Average of a scalar over all ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def decided_by_main(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank: for decisions only one clock may make (a checkpoint every T minutes)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item() > 0)


def gather_values(values: list[float], device: torch.device) -> list[list[float]]:
    """``values`` of every rank, indexed by rank (``[values]`` when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [list(values)]
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return [t.tolist() for t in gathered]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _same_layout(shape: torch.Size, strides_a: tuple[int, ...], strides_b: tuple[int, ...]) -> bool:
    """Whether two stride tuples address the same elements of a tensor of ``shape`` (they may differ only in
    dimensions of size 1, whose stride is never used)."""
    return all(size == 1 or a == b for size, a, b in zip(shape, strides_a, strides_b))


def align_parameter_strides(model: nn.Module, example: torch.Tensor,
                            context: AbstractContextManager | None = None) -> int:
    """Give each parameter the strides its gradient will have, where both describe the same memory layout.

    A backward kernel may return a gradient whose strides differ from its parameter's only in dimensions of size 1:
    a depthwise conv weight ``(C, 1, k, k)`` fed channels-last activations gets strides ``(k*k, 1, k, 1)``
    against the parameter's ``(k*k, k*k, k, 1)``. autograd keeps such a gradient as it is, but DDP compares
    strides exactly, warns "Grad strides do not match bucket view strides" and copies the gradient into its
    bucket on every step. One backward pass of ``example`` through a copy of the model (under ``context``, e.g.
    the training autocast) shows each gradient's strides; matching parameters are re-strided in place (same
    memory, same values, same Parameter objects). Returns how many were changed.
    """
    probe = copy.deepcopy(model).train()
    with context or nullcontext():
        output = probe(example)
    outputs = output if isinstance(output, (list, tuple)) else [output]
    sum(out.float().sum() for out in outputs).backward()
    changed = 0
    with torch.no_grad():
        for param, probed in zip(model.parameters(), probe.parameters()):
            grad = probed.grad
            if grad is None or grad.stride() == param.stride() or grad.shape != param.shape:
                continue
            if _same_layout(param.shape, grad.stride(), param.stride()):
                param.data = param.data.as_strided(param.shape, grad.stride())
                changed += 1
    return changed
