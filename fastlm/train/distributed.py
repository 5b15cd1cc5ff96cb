"""Data-parallel training on PyTorch's own engine, started by torchrun.

``torchrun --nproc_per_node=N -m fastlm train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK;
``init_from_env`` then joins the process group (NCCL on GPUs, gloo on CPUs) and the Trainer
wraps its model in DistributedDataParallel. Every rank draws the same global batch from the shared data RNG and trains on its
own slice of it, so N processes with batch B follow the same loss curve as one process with
batch N x B. Rank 0 alone logs and writes checkpoints. Multi-node runs use torchrun's
rendezvous options (``--nnodes``, ``--rdzv-backend c10d``, ``--rdzv-endpoint HOST:PORT``).

With ``fsdp=True`` the model is sharded instead of replicated (FSDP2, ``fully_shard``): each
transformer block is one unit of parameters, gathered for its forward and backward and
freed after, then the root (embeddings, final norm, output layer); every rank keeps only its
shard of the parameters, gradients and AdamW state. Checkpoints stay whole: the full state
dict is gathered to the CPU of rank 0 and written in the ordinary layout, and a resumed run
loads that full state and shards it again.
"""
from __future__ import annotations

import contextlib
import datetime
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


def wrap(model, info: DistInfo, device: torch.device, fsdp: bool = False):
    """The module that computes the loss on this rank: ``LossModule(model)``, under DDP when
    running distributed (DDP broadcasts rank 0's parameters, so every rank starts equal), or
    sharded with FSDP2 when ``fsdp`` (``model``'s parameters become DTensor shards; build the
    optimizer after this)."""
    loss_module = LossModule(model)
    if not info.enabled:
        return loss_module
    if fsdp:
        return shard(loss_module)
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


@contextlib.contextmanager
def main_process_first(info: DistInfo, timeout_s: float = 24 * 3600):
    """Run the block on rank 0 first and on the other ranks once rank 0's block has ended
    (transformers' ``main_process_first``): for work one process does whose result the others
    then read, such as preparing a data folder. The other ranks wait on a CPU (gloo) group of
    their own with a timeout of ``timeout_s``, not the training group's (which may be NCCL's,
    with a shorter one), since the work may take long. When rank 0's block raises, the others
    raise ``RuntimeError`` instead of waiting on. One process: the block runs, nothing waits."""
    if not info.enabled:
        yield
        return
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))

    def rank0_failed(failed: bool) -> bool:
        t = torch.tensor([1 if failed else 0], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return bool(t.item())

    try:
        if info.is_main:
            try:
                yield
            except BaseException:
                rank0_failed(True)
                raise
            rank0_failed(False)
        else:
            if rank0_failed(False):
                raise RuntimeError(f"rank 0 failed in the work it does before the other ranks (its error says "
                                   f"why); rank {info.rank} stops too")
            yield
    finally:
        dist.destroy_process_group(group)


# ----------------------------------------------------------------------------- FSDP2
def shard(loss_module: LossModule) -> LossModule:
    """``fully_shard`` each transformer block (``model.transformer.h``), then the root; the
    parameters of every rank start equal because each rank built the model from the same seed
    (or loads the same checkpoint afterwards)."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    # A block returns views of its norm's outputs; the model never changes a block's outputs in
    # place, so the pre-backward hook FSDP puts on them always runs (the loss curves match DDP's).
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    blocks = getattr(getattr(loss_module.model, "transformer", None), "h", None)
    for block in blocks or []:
        fully_shard(block)
    fully_shard(loss_module)
    return loss_module


def _full_options(cpu_offload: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def _param_names(model, optimizer) -> list[str]:
    """The name of each parameter in the optimizer's order (its state dict's ids 0, 1, ...)."""
    names = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), n)
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_state(model, optimizer) -> tuple[dict, dict]:
    """The whole model state dict and optimizer state (``{param id: {name: tensor}}``, ids in
    the optimizer's order as ``optimizer.state_dict()`` numbers them) of a sharded model,
    gathered to rank 0's CPU. A collective: every rank calls it; ranks but 0 get empty dicts."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_sd = get_model_state_dict(model, options=_full_options(True))
    osd = get_optimizer_state_dict(model, optimizer, options=_full_options(True))
    state = osd.get("state", {})
    opt = {pid: state[name] for pid, name in enumerate(_param_names(model, optimizer)) if name in state}
    return model_sd, opt


def load_full_state(model, optimizer, model_sd: dict, opt_state: dict | None) -> None:
    """Shard a whole model state dict and optimizer state (as ``full_state`` returns them)
    into a sharded model and its optimizer; every rank passes the same full state."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_sd, options=_full_options(False))
    if opt_state is None:
        return
    names = _param_names(model, optimizer)
    groups, i = [], 0
    for g in optimizer.state_dict()["param_groups"]:
        groups.append({**g, "params": names[i:i + len(g["params"])]})
        i += len(g["params"])
    osd = {"state": {names[pid]: st for pid, st in opt_state.items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, osd, options=_full_options(False))
