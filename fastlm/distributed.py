"""Data-parallel training on PyTorch's own engine, started by torchrun.

``torchrun --nproc_per_node=N -m fastlm train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK;
``init_from_env`` then joins the process group (NCCL on GPUs, gloo on CPUs) and the Trainer
wraps its model in DistributedDataParallel. Every rank draws the same global batch from the shared data RNG and trains on its
own slice of it, so N processes with batch B follow the same loss curve as one process with
batch N x B. Rank 0 alone logs and writes checkpoints. Multi-node runs use torchrun's
rendezvous options (``--nnodes``, ``--rdzv-backend c10d``, ``--rdzv-endpoint HOST:PORT``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """The rank layout torchrun put in the environment (one process when absent)."""
    try:
        return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                        int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as e:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {e}") from None


def init_from_env(device_type: str = "cpu") -> DistInfo:
    """Join the process group when started by torchrun; a no-op for a single process."""
    info = env_info()
    if not info.enabled:
        return info
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed support")
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """Each rank's device: cuda:LOCAL_RANK on GPUs, the CPU otherwise."""
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


class LossModule(torch.nn.Module):
    """``model.loss(x, y)`` as a module's forward, so DDP/FSDP hooks see the call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model.loss(x, y)


def wrap(model, info: DistInfo, device: torch.device):
    """The module that computes the loss on this rank: ``LossModule(model)``, under DDP when
    running distributed (DDP broadcasts rank 0's parameters, so every rank starts equal)."""
    loss_module = LossModule(model)
    if not info.enabled:
        return loss_module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(loss_module, device_ids=ids)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on any (collective decisions, e.g. a time budget)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
