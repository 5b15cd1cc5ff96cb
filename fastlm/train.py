"""Training: ``TrainConfig`` and ``Trainer(model, config, data)``.

One optimisation step is ``grad_accum`` micro-batches of ``batch_size`` windows of
``block_size`` tokens, forward + backward (``model.loss``: the output layer and the loss
fused), gradient clipping, then AdamW (weight decay on matrices only, ``fused=True``
where torch supports it) at a learning rate that warms up linearly and then follows a
cosine down to ``min_lr``. Losses stay on the device; the host reads them only at
``log_interval`` and at evaluations.

Every ``eval_interval`` steps: val loss, perplexity and bits per byte over ``eval_iters``
batches (the same batches every time, from a generator of their own, so evaluation never
disturbs the training stream), a line in ``OUT/metrics.jsonl``, the loss-curve PNG, TensorBoard
scalars when tensorboard is installed, a checkpoint, the best checkpoint, and early
stopping after ``patience`` evaluations without improvement.

Checkpoints are folders in the Hugging Face layout (``config.json``, ``model.safetensors``,
tokenizer) plus ``optimizer.safetensors`` and ``trainer_state.json`` (step, data and RNG
states, best loss, config): ``OUT/checkpoints/step-NNNNNNN`` (the last ``keep_last``) and
``OUT/best``. A checkpoint is written into a temporary folder and renamed into place, so
a killed run leaves only whole checkpoints; ``resume=True`` continues from the newest one
exactly (same batches, same dropout masks, same losses). Under torchrun the model is
replicated with DDP, or sharded with FSDP2 (``fsdp=True``; see ``fastlm.distributed``), and
the checkpoints are the same whole folders either way.

Model selection reuses the Trainer: ``cross_validate`` trains one model per fold of the
documents and reports the mean and spread of the val loss; ``sweep`` trains one model per
combination of settings and ranks them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from . import distributed, ops
from ._io import CheckpointError, atomic_write_bytes, atomic_write_json, load_tensors, read_json, save_tensors
from .models.checkpoint import load_weights

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
METRICS_NAME = "metrics.jsonl"
TRAIN_LOG_NAME = "train_log.jsonl"
PLOT_NAME = "loss.png"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


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
    # optimiser
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: off
    fused_adamw: bool = True
    # evaluation and stopping
    eval_interval: int = 250
    eval_iters: int = 20
    patience: int | None = None  # evaluations without improvement before stopping
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
    progress: bool = True
    plot: bool = True
    tensorboard: bool = True
    peak_flops: float | None = None  # for MFU; None: measured (CPU) or looked up (GPU)

    def __post_init__(self):
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
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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


# ----------------------------------------------------------------------------- helpers
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_iters``, cosine to ``min_lr`` at ``lr_decay_iters``."""
    decay = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / max(decay - cfg.warmup_iters, 1)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model, cfg: TrainConfig, device: torch.device):
    """AdamW with weight decay on matrices (dim >= 2) only; fused where torch supports it."""
    decay, no_decay = [], []
    seen = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
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


def _autocast_dtype(cfg: TrainConfig, device: torch.device):
    if cfg.dtype == "bfloat16":
        return torch.bfloat16
    if cfg.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


_GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40": 181e12, "A10": 125e12, "4090": 165e12}


def _measure_cpu_flops() -> float:
    """fp32 matmul rate of this machine with the current thread count (a short measurement)."""
    g = torch.Generator().manual_seed(0)  # leaves the global RNG (dropout masks) untouched
    a, b = torch.randn(512, 512, generator=g), torch.randn(512, 512, generator=g)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.15:
        a @ b
        n += 1
    return 2 * 512 ** 3 * n / (time.perf_counter() - t0)


def flops_per_token(model, block_size: int) -> float:
    """Training FLOPs per token: 6 N for the weights plus attention's 12 L H D T (PaLM)."""
    c = model.config
    n = model.num_parameters(exclude_embeddings=True)
    if c.arch != "gpt":  # recurrent baselines: no attention term
        return 6 * n
    return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * block_size


def _rng_state_to_json(state: torch.Tensor) -> list:
    return state.tolist()


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy a data folder's tokenizer into a checkpoint: only the files ``Tokenizer.save``
    writes, each a regular file (not a link) of at most ``MAX_FILE_BYTES``; anything else in
    ``src`` stays out of the checkpoint."""
    from .tokenizer import MAX_FILE_BYTES, SAVED_FILES

    for name in SAVED_FILES:
        f = src / name
        if f.is_symlink() or not f.is_file():
            continue
        if f.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"{f} is larger than a tokenizer file may be ({MAX_FILE_BYTES} bytes)")
        shutil.copyfile(f, dst / name, follow_symlinks=False)


def _log_lines(path: Path) -> list[str]:
    """The records of a JSONL log, one JSON object with an integer ``step`` a line. A line that
    is not one (the last line torn by a killed run) is left out with a warning."""
    good, bad = [], 0
    for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except ValueError:
            rec = None
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            good.append(ln)
        else:
            bad += 1
    if bad:
        print(f"fastlm: {path}: skipped {bad} damaged line(s) (a run killed while writing?)", file=sys.stderr)
    return good


def _remove_leftovers(directory: Path) -> None:
    """Clear what killed saves left in ``directory``: temporary checkpoint folders, and
    an older checkpoint set aside for replacement (put back when its replacement never
    arrived)."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        name = p.name
        if not (name.startswith(".") and p.is_dir()):
            continue
        base, sep, pid = name[1:].rpartition(".tmp-")
        if sep and pid.isdigit():
            shutil.rmtree(p, ignore_errors=True)
            continue
        base, sep, pid = name[1:].rpartition(".old-")
        if sep and pid.isdigit():
            if (directory / base).exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.replace(p, directory / base)


def _atomic_replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder tmp to final, replacing an older final folder."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoints(out_dir) -> list[Path]:
    d = Path(out_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[5:]))


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Train ``model`` (a ``fastlm.GPT``) on ``data`` (a ``fastlm.data.TokenData`` or the
    path of a prepared folder) as ``config`` says. ``train()`` returns a summary dict.

    Any model with ``config``, ``loss(x, y)`` and ``save_pretrained`` trains, on any data with
    TokenData's ``batch``, ``has_batches``, ``num_tokens``, ``vocab_size``, ``bytes_per_token``
    and ``path``:
    ``fastlm.finetune`` trains task models on labelled examples so."""

    def __init__(self, model, config: TrainConfig | None = None, data=None, tokenizer=None, on_step=None):
        from .data import TokenData

        self.config = cfg = config or TrainConfig()
        if data is None:
            raise ValueError("Trainer needs data: a prepared folder (fastlm prepare) or a TokenData")
        self.data = data if isinstance(data, TokenData) or hasattr(data, "batch") else TokenData(data)
        self.tokenizer = tokenizer
        self.on_step = on_step
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.dist = distributed.init_from_env(resolve_device(cfg.device).type)
        self.device = distributed.device_for(self.dist, resolve_device(cfg.device))
        self.model = model.to(self.device)
        mc = model.config
        if self.data.vocab_size > mc.vocab_size:
            raise ValueError(f"the data's vocabulary ({self.data.vocab_size}) is larger than the model's ({mc.vocab_size})")
        self.block_size = cfg.block_size or mc.block_size
        if self.block_size > mc.block_size:
            raise ValueError(f"block_size {self.block_size} exceeds the model's context {mc.block_size}")
        self.out = Path(cfg.out_dir)
        self.autocast_dtype = _autocast_dtype(cfg, self.device)
        # Under torchrun the loss runs through DDP (gradients averaged across ranks), or through
        # FSDP2 with fsdp=True (each rank holds a shard; the optimizer is built over the shards).
        self.fsdp = cfg.fsdp and self.dist.enabled
        self._ddp = distributed.wrap(self.model, self.dist, self.device, fsdp=self.fsdp) if self.dist.enabled else None
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.step = 0
        self.best_val = float("inf")
        self.best_step = None
        self.bad_evals = 0
        self.history: list[dict] = []
        self.train_rng = np.random.default_rng(cfg.seed)
        self.stop_reason = None
        torch.manual_seed(cfg.seed)
        if self._ddp is not None:
            self._loss_fn = self._ddp
        else:
            self._loss_fn = self.model.loss if hasattr(self.model, "loss") else (lambda x, y: self.model(x, y)[1])
        if cfg.compile:
            self._loss_fn = torch.compile(self._loss_fn)
        self._tb = None
        self._mfu_peak = None

    # -- pieces
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _backend(self):
        if self.config.backend:
            return ops.use_backend(self.config.backend)
        return contextlib.nullcontext()

    def _batch(self, split, rng):
        """This rank's micro-batch: under torchrun every rank draws the same global batch of
        batch_size x world_size rows and takes its own slice, so N ranks see exactly what one
        process with N times the batch would."""
        B, info = self.config.batch_size, self.dist
        x, y = self.data.batch(split, B * info.world_size, self.block_size, rng)
        if info.enabled:
            x, y = x[info.rank * B:(info.rank + 1) * B], y[info.rank * B:(info.rank + 1) * B]
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def train_step(self, lr: float):
        """One optimisation step; returns the mean loss over the micro-batches (a tensor)."""
        cfg = self.config
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        total = None
        for i in range(cfg.grad_accum):
            x, y = self._batch("train", self.train_rng)
            # DDP all-reduces (FSDP reduce-scatters) gradients only on the last micro-batch.
            last = i == cfg.grad_accum - 1
            sync = contextlib.nullcontext()
            if self.fsdp:
                self._ddp.set_requires_gradient_sync(last)
            elif self._ddp is not None and not last:
                sync = self._ddp.no_sync()
            with sync:
                with self._autocast():
                    loss = self._loss_fn(x, y)
                (loss / cfg.grad_accum).backward()
            total = loss.detach() if total is None else total + loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return distributed.all_reduce_mean(total / cfg.grad_accum, self.dist)

    @torch.no_grad()
    def evaluate(self, split: str = "val", iters: int | None = None) -> float:
        """Mean loss over ``iters`` batches of ``split``: the same batches at every evaluation
        (a generator of their own, seeded by ``seed``), so evaluations compare like with like
        and never disturb the training stream."""
        iters = iters or self.config.eval_iters
        rng = np.random.default_rng([self.config.seed, 1])
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros((), device=self.device)
        with self._backend():
            for _ in range(iters):
                x, y = self._batch(split, rng)
                with self._autocast():
                    total += self._loss_fn(x, y).float()
        self.model.train(was_training)
        return (distributed.all_reduce_mean(total, self.dist) / iters).item()

    # -- checkpoints
    def _state(self) -> dict:
        state = {
            "step": self.step,
            "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "data_rng": self.train_rng.bit_generator.state,
            "torch_rng": _rng_state_to_json(torch.get_rng_state()),
            "config": self.config.to_dict(),
            "model_config": self.model.config.to_dict(),
            "data": {"path": str(self.data.path.resolve()) if self.data.path else None,
                     "vocab_size": self.data.vocab_size,
                     "train_tokens": self.data.num_tokens("train")},
            "stop_reason": self.stop_reason,
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = _rng_state_to_json(torch.cuda.get_rng_state(self.device))
        return state

    def _optimizer_tensors(self, state: dict | None = None) -> dict:
        """The optimizer state as flat tensors ``"{param id}.{name}"`` (``state``: a whole state
        ``{param id: {name: value}}``; default this optimizer's own)."""
        tensors = {}
        for pid, st in (self.optimizer.state_dict()["state"] if state is None else state).items():
            for k, v in st.items():
                t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
                tensors[f"{pid}.{k}"] = t
        return tensors

    def save_checkpoint(self, path) -> Path:
        """Write a complete checkpoint folder at ``path`` atomically (rank 0 alone under torchrun;
        with FSDP every rank first helps gather the whole state to rank 0)."""
        final = Path(path)
        model_sd = opt_state = None  # None: the model's and optimizer's own
        if self.fsdp:
            model_sd, opt_state = distributed.full_state(self.model, self.optimizer)
        if not self.dist.is_main:
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            self.model.save_pretrained(tmp, state_dict=model_sd)
            tok = self.tokenizer
            if tok is None:
                tok_dir = getattr(self.data, "tokenizer_dir", None)
                if tok_dir is not None and tok_dir.is_dir():
                    _copy_tokenizer_files(tok_dir, tmp)
            else:
                tok.save(str(tmp))
            save_tensors(tmp / OPTIMIZER_NAME, self._optimizer_tensors(opt_state), {"format": "pt"})
            atomic_write_json(tmp / STATE_NAME, self._state())
            _atomic_replace_dir(tmp, final)
        except BaseException:
            # A failed save (a full disk, an interrupt) leaves the older checkpoint as it was
            # and no half-written folder beside it.
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _save_step_checkpoint(self):
        path = self.save_checkpoint(self.out / "checkpoints" / f"step-{self.step:07d}")
        for old in (find_checkpoints(self.out)[:-self.config.keep_last] if self.dist.is_main else []):
            shutil.rmtree(old, ignore_errors=True)
        return path

    def load_checkpoint(self, path) -> None:
        """Restore model, optimizer, step, data position and RNG states from ``path``;
        a damaged or mismatched checkpoint raises ``CheckpointError``."""
        path = Path(path)
        for name in ("config.json", STATE_NAME, OPTIMIZER_NAME):
            if not (path / name).is_file():
                raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        state = read_json(path / STATE_NAME)
        try:
            want, have = state["model_config"], self.model.config.to_dict()
            diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k) and k != "dropout")
            if diff:
                raise CheckpointError(
                    f"checkpoint {path} was trained with a different model: "
                    + ", ".join(f"{k}={want.get(k)!r} (now {have.get(k)!r})" for k in diff))
            if state["data"]["vocab_size"] != self.data.vocab_size:
                raise CheckpointError(f"checkpoint {path} was trained on data with vocabulary "
                                      f"{state['data']['vocab_size']}, this data has {self.data.vocab_size}")
            sd = load_weights(path)
            model_sd = self.model.state_dict()

            full = {}  # the checkpoint's tensors in the model's names and layout
            with torch.no_grad():
                for k, p in model_sd.items():
                    key = k
                    if key not in sd:
                        if k == "lm_head.weight" and self.model.config.tie_word_embeddings:
                            continue
                        raise CheckpointError(f"checkpoint {path} lacks the tensor {k}")
                    v = sd[key]
                    if v.shape != p.shape:
                        raise CheckpointError(f"checkpoint {path}: tensor {k} has shape {tuple(v.shape)}, "
                                              f"the model needs {tuple(p.shape)}")
                    full[k] = v
                    if not self.fsdp:
                        p.copy_(v)
            opt_t = load_tensors(path / OPTIMIZER_NAME)
            osd = self.optimizer.state_dict()
            new_state = {}
            for pid in range(sum(len(g["params"]) for g in osd["param_groups"])):
                st = {k.split(".", 1)[1]: v for k, v in opt_t.items() if k.split(".", 1)[0] == str(pid)}
                if st:
                    new_state[pid] = st
            if opt_t and not new_state:
                raise CheckpointError(f"checkpoint {path}: optimizer state does not fit the model")
            osd["state"] = new_state
            try:
                if self.fsdp:  # every rank read the whole state; each keeps its shard
                    if self.model.config.tie_word_embeddings:
                        full.setdefault("lm_head.weight", full.get("transformer.wte.weight"))
                    distributed.load_full_state(self.model, self.optimizer, full, new_state)
                else:
                    self.optimizer.load_state_dict(osd)
            except (ValueError, RuntimeError, KeyError) as e:
                raise CheckpointError(f"checkpoint {path}: optimizer state does not fit: {e}") from None
            for group in ([] if self.fsdp else self.optimizer.state.values()):
                for k, v in list(group.items()):
                    if isinstance(v, torch.Tensor) and k != "step":
                        group[k] = v.to(self.device)
            self.step = int(state["step"])
            self.best_val = state["best_val_loss"] if state["best_val_loss"] is not None else float("inf")
            self.best_step = state["best_step"]
            self.bad_evals = int(state["bad_evals"])
            self.train_rng = np.random.default_rng()
            self.train_rng.bit_generator.state = state["data_rng"]
            torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
            if "cuda_rng" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(torch.tensor(state["cuda_rng"], dtype=torch.uint8), self.device)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"checkpoint {path} has a damaged {STATE_NAME} or optimizer state: {e!r}") from None

    def resume(self) -> Path:
        """Load the newest checkpoint in ``OUT/checkpoints``; an error when there is none."""
        found = find_checkpoints(self.out)
        if not found:
            raise CheckpointError(f"nothing to resume: no checkpoint in {self.out / 'checkpoints'}")
        self.load_checkpoint(found[-1])
        # logs after the checkpoint's step belong to the run that died: drop them
        for name in (METRICS_NAME, TRAIN_LOG_NAME):
            f = self.out / name
            if f.is_file():
                keep = [ln for ln in _log_lines(f) if json.loads(ln)["step"] <= self.step]
                if self.dist.is_main:
                    atomic_write_bytes(f, "".join(ln + "\n" for ln in keep).encode())
                if name == METRICS_NAME:
                    self.history = [json.loads(ln) for ln in keep]
        return found[-1]

    # -- output
    def _append(self, name, record):
        if not self.dist.is_main:
            return
        with open(self.out / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _plot(self):
        if not self.dist.is_main:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            if not getattr(self, "_plot_warned", False):
                print("fastlm: matplotlib is not installed, so no loss.png (pip install matplotlib)", file=sys.stderr)
                self._plot_warned = True
            return
        steps = [r["step"] for r in self.history]
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
        ax.plot(steps, [r["train_loss"] for r in self.history], label="train", marker=".")
        ax.plot(steps, [r["val_loss"] for r in self.history], label="val", marker=".")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"{self.out.name}: {self.model.num_parameters() / 1e6:.2f}M parameters")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        atomic_write_bytes(self.out / PLOT_NAME, buf.getvalue())

    def _tensorboard(self, record):
        if not self.config.tensorboard or not self.dist.is_main:
            return
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except (ImportError, ModuleNotFoundError):
                self._tb = False
                return
            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        if self._tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, record["step"])
            self._tb.flush()

    def _mfu(self, tokens_per_s: float) -> float | None:
        if self._mfu_peak is None:
            if self.config.peak_flops:
                self._mfu_peak = self.config.peak_flops
            elif self.device.type == "cuda":
                name = torch.cuda.get_device_name(self.device)
                self._mfu_peak = next((v for k, v in _GPU_PEAK_BF16.items() if k in name), 0.0)
            else:
                self._mfu_peak = _measure_cpu_flops()
        if not self._mfu_peak:
            return None
        return tokens_per_s * flops_per_token(self.model, self.block_size) / self._mfu_peak

    # -- the loop
    def train(self) -> dict:
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            _remove_leftovers(self.out / "checkpoints")
            _remove_leftovers(self.out)
        distributed.barrier(self.dist)
        if cfg.resume:
            path = self.resume()
            if self.dist.is_main:
                print(f"resumed from {path} at step {self.step}", file=sys.stderr)
        elif find_checkpoints(self.out):
            raise CheckpointError(f"{self.out} already holds checkpoints; pass --resume to continue that run, "
                                  f"or choose another --out")
        elif self.dist.is_main:
            for name in (METRICS_NAME, TRAIN_LOG_NAME):
                if (self.out / name).exists():
                    (self.out / name).unlink()
        if self.data.num_tokens("val") == 0:
            print("fastlm: the data has no val split; evaluating on train batches", file=sys.stderr)
        val_split = "val" if self.data.has_batches("val", self.block_size) else "train"
        tokens_per_step = cfg.batch_size * self.block_size * cfg.grad_accum
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_iters, initial=self.step, disable=not cfg.progress or not self.dist.is_main,
                   dynamic_ncols=True,
                   unit="step", desc="training")
        self.model.train()
        t_train = 0.0  # training time, evaluations excluded
        t_last, step_last = time.perf_counter(), self.step
        run_loss, run_n = torch.zeros((), device=self.device), 0
        bad_step = None
        tokens_per_s = 0.0
        start_wall = time.perf_counter()
        try:
            with self._backend():
                while self.step < cfg.max_iters and self.stop_reason is None:
                    lr = lr_at(self.step, cfg)
                    loss = self.train_step(lr)
                    self.step += 1
                    run_loss += loss
                    run_n += 1
                    if self.on_step is not None:
                        self.on_step(self)
                    at_eval = self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters
                    at_log = self.step % cfg.log_interval == 0
                    out_of_time = cfg.max_minutes is not None and distributed.any_rank(
                        (time.perf_counter() - start_wall) >= 60 * cfg.max_minutes, self.dist)
                    if at_log or at_eval or out_of_time:
                        value = loss.item()
                        if not math.isfinite(value) or not math.isfinite(run_loss.item()):
                            bad_step = self.step
                            raise NonFiniteLossError(f"the training loss became non-finite (within the steps up "
                                                     f"to step {self.step})")
                        now = time.perf_counter()
                        t_train += now - t_last
                        tokens_per_s = (self.step - step_last) * tokens_per_step / max(now - t_last, 1e-9)
                        t_last, step_last = now, self.step
                        if at_log:
                            self._append(TRAIN_LOG_NAME, {"step": self.step, "loss": value, "lr": lr})
                            post = {"loss": f"{value:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_s:,.0f}"}
                            if cfg.progress:
                                mfu = self._mfu(tokens_per_s)
                                if mfu is not None:
                                    post["mfu"] = f"{100 * mfu:.1f}%"
                            bar.set_postfix(post, refresh=False)
                        bar.update(self.step - bar.n)
                    if at_eval or out_of_time:
                        self._evaluate_and_save(run_loss / max(run_n, 1), lr, tokens_per_s, val_split)
                        run_loss, run_n = torch.zeros((), device=self.device), 0
                        t_last = time.perf_counter()
                        if out_of_time and self.stop_reason is None:
                            self.stop_reason = f"time budget of {cfg.max_minutes:.2f} minutes used"
        except NonFiniteLossError as e:
            bar.close()
            last = find_checkpoints(self.out)
            where = f"; the last good checkpoint is {last[-1]}" if last else "; no checkpoint was written before it"
            raise NonFiniteLossError(f"{e}: training stopped at step {bad_step}{where}. Lower --lr or check the data.") from None
        bar.close()
        if self._tb:
            self._tb.close()
        if self.stop_reason is None:
            self.stop_reason = "max_iters reached"
        summary = {
            "step": self.step,
            "stop_reason": self.stop_reason,
            "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
            "best_step": self.best_step,
            "out_dir": str(self.out),
            "best_dir": str(self.out / "best") if (self.out / "best").is_dir() else None,
            "last_checkpoint": str(find_checkpoints(self.out)[-1]) if find_checkpoints(self.out) else None,
            "train_seconds": t_train,
            "tokens_per_s": tokens_per_s,
        }
        return summary

    def _evaluate_and_save(self, train_loss_t, lr, tokens_per_s, val_split):
        cfg = self.config
        train_loss = train_loss_t.item()
        if not math.isfinite(train_loss):
            raise NonFiniteLossError("the training loss became non-finite")
        val_loss = self.evaluate(val_split)
        if not math.isfinite(val_loss):
            raise NonFiniteLossError("the validation loss became non-finite")
        bpb = val_loss / math.log(2) / self.data.bytes_per_token
        record = {"step": self.step, "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
                  "tokens_per_s": tokens_per_s, "val_perplexity": math.exp(min(val_loss, 50.0)),
                  "val_bits_per_byte": bpb, "tokens_seen": self.step * cfg.batch_size * self.block_size * cfg.grad_accum}
        improved = val_loss < self.best_val - cfg.min_delta
        if improved:
            self.best_val, self.best_step, self.bad_evals = val_loss, self.step, 0
        else:
            self.bad_evals += 1
        if cfg.patience is not None and self.bad_evals >= cfg.patience:
            self.stop_reason = f"early stopping: no val improvement in {cfg.patience} evaluations (best {self.best_val:.4f} at step {self.best_step})"
        record["best_val_loss"] = self.best_val
        self.history.append(record)
        self._append(METRICS_NAME, record)
        if cfg.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            tqdm.write(f"step {self.step}: train {train_loss:.4f}, val {val_loss:.4f} (ppl {record['val_perplexity']:.2f}, "
                       f"{bpb:.3f} bits/byte), lr {lr:.2e}, {tokens_per_s:,.0f} tok/s", file=sys.stderr)
        self._save_step_checkpoint()
        if improved and cfg.save_best:
            self.save_checkpoint(self.out / "best")
        if cfg.plot:
            self._plot()
        self._tensorboard(record)
        distributed.barrier(self.dist)  # the checkpoint is complete before any rank goes on


# ----------------------------------------------------------------------------- model selection
def model_for_data(data, seed: int = 1337, **model_kw):
    """A freshly initialised model for ``data`` (a ``TokenData``): its vocabulary and end-of-text
    token, the other ``GPTConfig`` fields from ``model_kw``, the weights drawn from ``seed``."""
    from .models import GPTConfig, build_model

    torch.manual_seed(seed)
    return build_model(GPTConfig(vocab_size=data.vocab_size, eos_token_id=data.eot_token,
                                 bos_token_id=data.eot_token, **model_kw))


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for one value)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def cross_validate(config: TrainConfig, data, folds: int = 5, model: dict | None = None) -> dict:
    """k-fold cross-validation by document: the documents of ``data`` (a prepared folder; its
    train and val splits together) are dealt into ``folds`` disjoint folds
    (``fastlm.data.assign_folds``); fold I trains a fresh model (``model``: ``GPTConfig``
    fields, the same initial weights for every fold) on the other folds and validates on
    fold I, in ``config.out_dir/fold-I`` (its data in ``config.out_dir/folds/fold-I``). Returns the per-fold
    best val losses and their mean and sample standard deviation; also written to
    ``config.out_dir/cross_validation.json``."""
    from .data import TokenData, write_folds
    from .report import write_json

    data_path = data.path if isinstance(data, TokenData) else Path(data)
    out = Path(config.out_dir)
    fold_dirs = write_folds(data_path, folds, out / "folds")
    rows = []
    for i, fold_dir in enumerate(fold_dirs):
        fd = TokenData(fold_dir)
        m = model_for_data(fd, config.seed, **(model or {}))
        block = config.block_size or m.config.block_size
        if fd.num_tokens("val") <= block + 1:  # else the Trainer would validate on train batches
            raise ValueError(f"fold {i} holds {fd.num_tokens('val')} val tokens, too few for windows of {block + 1}; "
                             f"use fewer folds, more data or a smaller block size")
        cfg = dataclasses.replace(config, out_dir=str(out / f"fold-{i}"))
        summary = Trainer(m, cfg, fd).train()
        rows.append({"fold": i, "val_loss": summary["best_val_loss"], "best_step": summary["best_step"],
                     "train_documents": fd.meta["counts"]["train"]["documents"],
                     "val_documents": fd.meta["counts"]["val"]["documents"],
                     "val_tokens": fd.num_tokens("val"), "out_dir": cfg.out_dir})
    mean, std = _mean_std([r["val_loss"] for r in rows])
    result = {"folds": rows, "val_loss_mean": mean, "val_loss_std": std, "k": folds}
    write_json(out / "cross_validation.json", result)
    return result


def sweep_trials(grid: dict, random: int | None = None, seed: int = 0) -> list[dict]:
    """The settings of each trial: every combination of the ``grid``'s values (``{name: [values]}``,
    in the grid's order), or ``random`` of them drawn without replacement (all when the grid
    has no more)."""
    import itertools
    import random as _random

    if not grid or any(not list(v) for v in grid.values()):
        raise ValueError("a sweep needs at least one setting with at least one value")
    combos = [dict(zip(grid, values)) for values in itertools.product(*(list(v) for v in grid.values()))]
    if random is not None:
        if random < 1:
            raise ValueError(f"random must be >= 1, got {random}")
        if random < len(combos):
            combos = [combos[i] for i in sorted(_random.Random(seed).sample(range(len(combos)), random))]
    return combos


SWEEP_NAME = "sweep"


def sweep(config: TrainConfig, data, grid: dict, model: dict | None = None, random: int | None = None,
          seed: int = 0) -> list[dict]:
    """A grid (or, with ``random=N``, random) search: one training a trial, each in
    ``config.out_dir/trial-NNN`` with its own checkpoints. Settings named in ``grid`` are
    ``GPTConfig`` fields (``n_layer``, ``n_embd``, ``block_size``, ...) or ``TrainConfig`` fields
    (``lr``, ``batch_size``, ``weight_decay``, ...) and override ``model`` and ``config``.
    Returns the trials ranked by best val loss; ``sweep.json``, ``sweep.csv`` and ``sweep.png``
    (best val loss per trial) are written into ``config.out_dir``."""
    from .data import TokenData
    from .models import GPTConfig
    from .report import points_png, write_csv, write_json

    model_keys = {f.name for f in fields(GPTConfig)} - {"vocab_size", "eos_token_id", "bos_token_id"}
    train_keys = {f.name for f in fields(TrainConfig)} - {"out_dir", "resume"}
    unknown = [k for k in grid if k not in model_keys | train_keys]
    if unknown:
        raise ValueError(f"sweep: unknown settings {unknown}; use GPTConfig or TrainConfig field names")
    data = data if isinstance(data, TokenData) else TokenData(data)
    out = Path(config.out_dir)
    rows = []
    for i, params in enumerate(sweep_trials(grid, random, seed)):
        model_kw = {**(model or {}), **{k: v for k, v in params.items() if k in model_keys}}
        train_kw = {k: v for k, v in params.items() if k in train_keys and k not in model_keys}
        cfg = dataclasses.replace(config, out_dir=str(out / f"trial-{i:03d}"), **train_kw)
        if cfg.progress:
            print(f"trial {i}: {params}", file=sys.stderr)
        summary = Trainer(model_for_data(data, cfg.seed, **model_kw), cfg, data).train()
        rows.append({"trial": i, **params, "best_val_loss": summary["best_val_loss"], "best_step": summary["best_step"],
                     "steps": summary["step"], "train_seconds": round(summary["train_seconds"], 2),
                     "out_dir": cfg.out_dir})
    ranked = sorted(rows, key=lambda r: (r["best_val_loss"] is None, r["best_val_loss"] or 0.0, r["trial"]))
    ranked = [{"rank": n + 1, **r} for n, r in enumerate(ranked)]
    write_json(out / f"{SWEEP_NAME}.json", {"grid": {k: list(v) for k, v in grid.items()}, "random": random,
                                            "seed": seed, "trials": ranked})
    write_csv(out / f"{SWEEP_NAME}.csv", ranked)
    if config.plot:
        try:
            points_png(out / f"{SWEEP_NAME}.png",
                    [", ".join(f"{k}={r[k]}" for k in grid) for r in rows],
                    [r["best_val_loss"] if r["best_val_loss"] is not None else float("nan") for r in rows],
                    "best val loss (nats/token)", f"sweep: {len(rows)} trials")
        except ImportError as e:
            print(f"fastlm: {e}; no {SWEEP_NAME}.png", file=sys.stderr)
    return ranked
