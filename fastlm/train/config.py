"""What a training run is told: ``TrainConfig`` (batches, schedule, optimiser, evaluation,
checkpoints, machine, output), config files, and the pieces the config determines: the
learning-rate schedule, the optimiser, the device and the autocast dtype."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch


# Named recipes: GPTConfig switches ("model") and TrainConfig settings ("train"). "fast" is the
# modded-nanogpt speedrun's algorithm at the small end: Muon for the hidden matrices, RMSNorm,
# rotary positions, QK-norm, ReLU^2 MLP, an untied zero-initialised output layer and
# zero-initialised projections, no biases, warmup then linear decay to zero. Its settings are
# checked on character-level tiny Shakespeare at 4 layers x 4 heads x 128 wide, context 64,
# batch 12 (bench/RESULTS.md): the 360 steps are the schedule that ends at or below validation
# 1.88 there (nanoGPT's recipe needs 2200), and the three evaluations over it (every 120 steps)
# are what each costs next to a step at that size (50 batches of forward passes, about 15
# steps' time). Longer runs want a longer max_iters; the decay follows it. configs/fast.toml
# holds the same settings for --config.
RECIPES = {
    "fast": {
        "model": dict(norm="rmsnorm", pos="rope", qk_norm=True, mlp="relu2", bias=False,
                      tie_word_embeddings=False, zero_init_proj=True),
        "train": dict(optimizer="muon", muon_lr=0.02, muon_momentum=0.85, lr=3e-3, min_lr=0.0, warmup_iters=10,
                      lr_schedule="linear", max_iters=360, weight_decay=0.0, eval_interval=120),
    },
}


@dataclass
class TrainConfig:
    out_dir: str = "out"
    # batches
    batch_size: int = 12
    block_size: int | None = None  # None: the model's context
    grad_accum: int = 1
    # schedule
    max_iters: int = 2000
    max_minutes: float | None = None  # stop (and save) after this much training time
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None: max_iters
    lr_schedule: str = "cosine"  # after the warmup, "cosine" or "linear" down to min_lr at lr_decay_iters
    # optimiser
    optimizer: str = "adamw"  # "adamw" | "muon" (Muon for the blocks' matrices, AdamW at lr for the rest)
    muon_lr: float = 0.02  # the Muon group's peak learning rate (it follows the schedule scaled by muon_lr / lr)
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5  # Newton-Schulz steps of Muon's orthogonalisation (fewer: cheaper, rougher)
    # dtype of those steps' products: "auto" (bf16 where the device multiplies it natively: CUDA,
    # CPUs with AVX512_BF16 or AMX; float32 elsewhere), "float32" or "bfloat16"
    muon_ns_dtype: str = "auto"
    weight_decay: float = 0.1  # AdamW's, on matrices (embeddings, output layer) only
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: off
    fused_adamw: bool = True
    # evaluation and stopping
    eval_interval: int = 250
    eval_iters: int = 20
    patience: int | None = None  # evaluations without improvement before stopping
    target_val_loss: float | None = None  # stop at the first evaluation whose val loss is at or below it
    min_delta: float = 0.0
    log_interval: int = 10
    # checkpoints
    keep_last: int = 2
    save_best: bool = True
    resume: bool = False
    # machine
    seed: int = 1337
    device: str = "auto"  # "auto" | "cpu" | "cuda" | ...
    dtype: str = "auto"  # "auto" (bf16 autocast on CUDA GPUs that support it) | "float32" | "bfloat16"
    backend: str | None = None  # fastlm.ops backend; None: the fastest available
    compile: bool = False  # torch.compile the loss function
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    threads: int | None = None  # torch.set_num_threads
    # output
    progress: bool = True  # a bar (shown on a terminal) and a line per evaluation; False: neither
    plot: bool = True
    license: str | None = None  # the model card's license (e.g. "mit", "apache-2.0"); None: not stated
    tensorboard: bool = True
    peak_flops: float | None = None  # for MFU; None: measured (CPU) or looked up (GPU)

    def __post_init__(self):
        from ..optim import NS_DTYPES  # the one list of Newton-Schulz dtypes
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.max_iters >= 0, "max_iters must be >= 0"),
            (self.lr >= 0 and self.min_lr >= 0, "lr and min_lr must be >= 0"),
            (self.warmup_iters >= 0, "warmup_iters must be >= 0"),
            (self.eval_interval >= 1, "eval_interval must be >= 1"),
            (self.eval_iters >= 1, "eval_iters must be >= 1"),
            (self.log_interval >= 1, "log_interval must be >= 1"),
            (self.keep_last >= 1, "keep_last must be >= 1"),
            (self.patience is None or self.patience >= 1, "patience must be >= 1"),
            (self.dtype in ("auto", "float32", "bfloat16"), "dtype must be 'auto', 'float32' or 'bfloat16'"),
            (self.block_size is None or self.block_size >= 1, "block_size must be >= 1"),
            (self.lr_schedule in ("cosine", "linear"), f"lr_schedule must be 'cosine' or 'linear', got {self.lr_schedule!r}"),
            (self.target_val_loss is None or (isinstance(self.target_val_loss, (int, float))
                                              and math.isfinite(self.target_val_loss)),
             f"target_val_loss must be None or a finite number, got {self.target_val_loss!r}"),
            (self.optimizer in ("adamw", "muon"), f"optimizer must be 'adamw' or 'muon', got {self.optimizer!r}"),
            (self.optimizer != "muon" or self.lr > 0, "optimizer='muon' needs lr > 0 (the Muon group's schedule is "
                                                      "lr's scaled by muon_lr / lr)"),
            (self.muon_lr > 0, "muon_lr must be > 0"),
            (0 <= self.muon_momentum < 1, "muon_momentum must be in [0, 1)"),
            (isinstance(self.muon_ns_steps, int) and 1 <= self.muon_ns_steps <= 20,
             f"muon_ns_steps must be an integer in [1, 20], got {self.muon_ns_steps!r}"),
            (self.muon_ns_dtype in NS_DTYPES,
             f"muon_ns_dtype must be one of {', '.join(NS_DTYPES)}, got {self.muon_ns_dtype!r}"),
            # Muon orthogonalises each whole matrix; FSDP leaves each rank a shard of it.
            (self.optimizer != "muon" or not self.fsdp,
             "optimizer='muon' does not run with fsdp=True (FSDP shards the matrices Muon orthogonalises "
             "whole); train Muon with DDP (drop --fsdp) or use optimizer='adamw'"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def fast(cls, **overrides) -> "TrainConfig":
        """The ``fast`` recipe's training settings (``RECIPES["fast"]["train"]``: Muon for the
        blocks' matrices, AdamW for the rest, a short warmup, then a linear decay to zero over
        ``max_iters``), with ``overrides`` on top. Its model switches are
        ``RECIPES["fast"]["model"]``."""
        return cls(**{**RECIPES["fast"]["train"], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"TrainConfig: unknown keys {sorted(unknown)}")
        return cls(**d)


def load_config_file(path) -> dict:
    """A flat mapping from a TOML or JSON file; TOML tables ``[model]``, ``[train]`` and
    ``[data]`` are flattened (their keys are the CLI flags' names with underscores)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} not found")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            d = json.loads(text)
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10: the same parser, as the tomli package
                import tomli as tomllib

            d = tomllib.loads(text)
    except (json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"cannot parse config file {p}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"config file {p} must hold a table/object")
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("model", "train", "data"):
            flat.update({kk.replace("-", "_"): vv for kk, vv in v.items()})
        else:
            flat[k.replace("-", "_")] = v
    return flat


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_iters``, then cosine (``lr_schedule="cosine"``) or
    linear (``"linear"``) decay to ``min_lr`` at ``lr_decay_iters``."""
    decay = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / max(decay - cfg.warmup_iters, 1)
    if cfg.lr_schedule == "linear":
        return cfg.lr + ratio * (cfg.min_lr - cfg.lr)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def muon_parameters(model) -> set:
    """The ids of the parameters Muon trains: every 2-D parameter except those of embeddings
    (``nn.Embedding``) and of the output layer (``model.lm_head``, tied or not), which stay
    with AdamW as in the modded-nanogpt recipe. For a GPT these are the blocks' projection
    matrices."""
    keep_out = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    head = getattr(model, "lm_head", None)
    if isinstance(head, torch.nn.Module):
        keep_out |= {id(p) for p in head.parameters()}
    return {id(p) for p in model.parameters() if p.requires_grad and p.dim() == 2 and id(p) not in keep_out}


def make_optimizer(model, cfg: TrainConfig, device: torch.device):
    """AdamW with weight decay on matrices (dim >= 2) only: ``fastlm.optim.AdamW`` (clipping to
    ``grad_clip`` inside its step) for CPU float32 parameters, else torch's, fused where torch
    supports it.
    With ``optimizer="muon"``: ``fastlm.optim.MuonWithAdamW``, Muon (``muon_lr``,
    ``muon_momentum``, no weight decay) for ``muon_parameters(model)``, AdamW (``lr``, decay
    on matrices only) for the rest. Every group's lr is scaled by its ``lr_ratio`` when the
    Trainer sets the schedule's lr."""
    muon = muon_parameters(model) if cfg.optimizer == "muon" else set()
    decay, no_decay, matrices = [], [], []
    seen = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (matrices if id(p) in muon else decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.optimizer == "muon":
        from ..optim import MuonWithAdamW

        if not matrices:
            raise ValueError("optimizer='muon': the model has no weight matrices for Muon (2-D parameters "
                             "outside its embeddings and output layer)")
        adam = [dict(g, use_muon=False, **kw) for g in groups if g["params"]]
        return MuonWithAdamW([{"params": matrices, "use_muon": True, "lr": cfg.muon_lr, "lr_ratio": cfg.muon_lr / cfg.lr,
                               "momentum": cfg.muon_momentum, "ns_steps": cfg.muon_ns_steps, "ns_dtype": cfg.muon_ns_dtype,
                               "weight_decay": 0.0}] + adam)
    if cfg.fused_adamw and not cfg.fsdp:
        from ..optim import AdamW, fits_native_adamw

        if fits_native_adamw(decay + no_decay):  # CPU float32: clipping and update in C++
            return AdamW(groups, max_grad_norm=cfg.grad_clip if cfg.grad_clip > 0 else None,
                         **kw)
    if cfg.fused_adamw:
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, ValueError, TypeError):
            pass
    return torch.optim.AdamW(groups, **kw)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(name)


def autocast_dtype(cfg: TrainConfig, device: torch.device):
    if cfg.dtype == "bfloat16":
        return torch.bfloat16
    if cfg.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None
