"""Device choice and torch.distributed set-up.

Launched by `torchrun --nproc-per-node N`, each process finds RANK, WORLD_SIZE
and LOCAL_RANK in its environment and joins a process group (NCCL on GPUs,
Gloo on CPUs). Launched plainly, it is a group of one and nothing is set up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from binarylm.errors import BinaryLMError


@dataclass
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise BinaryLMError(f"unknown device {preference!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BinaryLMError("device cuda was asked for but no CUDA GPU is visible; use --train.device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup(preference: str = "auto") -> Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank, device)


def mean_across_processes(value: float, group: Distributed, device: torch.device) -> float:
    """The average of `value` over all processes (itself when there is one)."""
    if not group.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / group.world_size


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
