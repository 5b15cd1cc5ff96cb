"""Training: ``TrainConfig`` and ``Trainer(model, config, data)``.

One optimisation step is ``grad_accum`` micro-batches of ``batch_size`` windows of
``block_size`` tokens, forward + backward (``model.loss``: the output layer and the loss
fused), gradient clipping, then AdamW (weight decay on matrices only, ``fused=True``
where torch supports it), or with ``optimizer="muon"`` Muon for the blocks' matrices and
AdamW for the rest (``fastlm.optim.MuonWithAdamW``), at a learning rate that warms up linearly and then follows a
cosine down to ``min_lr``. Losses stay on the device; the host reads them only at
``log_interval`` and at evaluations.

Every ``eval_interval`` steps: val loss, perplexity and bits per byte over ``eval_iters``
batches (the same batches every time, from a generator of their own, so evaluation never
disturbs the training stream), a line in ``OUT/metrics.jsonl``, the loss-curve PNG, TensorBoard
scalars when tensorboard is installed, a checkpoint, the best checkpoint, and early
stopping after ``patience`` evaluations without improvement or at the first evaluation at or
below ``target_val_loss``.

Checkpoints are folders in the Hugging Face layout (``config.json``, ``model.safetensors``,
tokenizer) plus ``optimizer.safetensors`` and ``trainer_state.json`` (step, data and RNG
states, best loss, config): ``OUT/checkpoints/step-NNNNNNN`` (the last ``keep_last``) and
``OUT/best``. A checkpoint is written into a temporary folder and renamed into place, so
a killed run leaves only whole checkpoints; ``resume=True`` continues from the newest one
exactly (same batches, same dropout masks, same losses). Under torchrun the model is
replicated with DDP, or sharded with FSDP2 (``fsdp=True``; see ``fastlm.distributed``), and
the checkpoints are the same whole folders either way.

The configuration is in ``config.py``, the checkpoint state and resume in ``state.py``,
cross-validation and sweeps (which reuse the Trainer) in ``selection.py``, torchrun in
``distributed.py``.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import ops
from .._io import CheckpointError, atomic_write_bytes
from .._progress import progress_bar, progress_enabled
from ..report import curves_svg
from . import distributed, state
from .config import TrainConfig, autocast_dtype, lr_at, make_optimizer, resolve_device
from .state import METRICS_NAME, PLOT_NAME, TRAIN_LOG_NAME, find_checkpoints


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


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


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Train ``model`` (a ``fastlm.GPT``) on ``data`` (a ``fastlm.data.TokenData`` or the
    path of a prepared folder) as ``config`` says. ``train()`` returns a summary dict.

    Any model with ``config``, ``loss(x, y)`` and ``save_pretrained`` trains, on any data with
    TokenData's ``batch``, ``has_batches``, ``num_tokens``, ``vocab_size``, ``bytes_per_token``
    and ``path``:
    ``fastlm.finetune`` trains task models on labelled examples so."""

    def __init__(self, model, config: TrainConfig | None = None, data=None, tokenizer=None, on_step=None):
        from ..data import TokenData

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
        self.autocast_dtype = autocast_dtype(cfg, self.device)
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
            g["lr"] = lr * g.get("lr_ratio", 1.0)  # the Muon group's schedule is lr's, scaled
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
        if cfg.grad_clip > 0 and getattr(self.optimizer, "max_grad_norm", None) is None:  # else the step clips
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
        # On the CPU (eager) several batches go through the model at once where that leaves the
        # mean unchanged (batches of one shape, no ignored targets): the same rows, with the
        # per-op overhead of small products paid once per group instead of once per batch.
        group = 1 if self.device.type != "cpu" or self.config.compile else 8
        with self._backend():
            done = 0
            while done < iters:
                n = min(group, iters - done)
                batches = [self._batch(split, rng) for _ in range(n)]
                joinable = n > 1 and all(x.shape == batches[0][0].shape and y.shape == batches[0][1].shape
                                         and not bool((y < 0).any()) for x, y in batches)
                if joinable:
                    batches = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
                for x, y in batches:
                    with self._autocast():
                        total += self._loss_fn(x, y).float() * (n if joinable else 1)
                done += n
        self.model.train(was_training)
        return (distributed.all_reduce_mean(total, self.dist) / iters).item()

    # -- checkpoints
    def save_checkpoint(self, path) -> Path:
        """Write a complete checkpoint folder at ``path`` atomically (rank 0 alone under torchrun;
        with FSDP every rank first helps gather the whole state to rank 0)."""
        return state.save_checkpoint(self, path)

    def _save_step_checkpoint(self):
        path = self.save_checkpoint(self.out / "checkpoints" / f"step-{self.step:07d}")
        for old in (find_checkpoints(self.out)[:-self.config.keep_last] if self.dist.is_main else []):
            shutil.rmtree(old, ignore_errors=True)
        return path
    def load_checkpoint(self, path) -> None:
        """Restore model, optimizer, step, data position and RNG states from ``path``;
        a damaged or mismatched checkpoint raises ``CheckpointError``."""
        state.load_checkpoint(self, path)

    def resume(self) -> Path:
        """Load the newest checkpoint in ``OUT/checkpoints``; an error when there is none."""
        return state.resume(self)

    # -- output
    def _append(self, name, record):
        if not self.dist.is_main:
            return
        with open(self.out / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _plot(self):
        self._plotted_len = len(self.history)
        if not self.dist.is_main:
            return
        steps = [r["step"] for r in self.history]
        svg = curves_svg({"train": (steps, [r["train_loss"] for r in self.history]),
                          "val": (steps, [r["val_loss"] for r in self.history])},
                         "step", "loss (nats/token)",
                         f"{self.out.name}: {self.model.num_parameters() / 1e6:.2f}M parameters")
        atomic_write_bytes(self.out / PLOT_NAME, svg.encode("utf-8"))

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
            state.remove_leftovers(self.out / "checkpoints")
            state.remove_leftovers(self.out)
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
        bar = progress_bar(total=cfg.max_iters, initial=self.step, unit="step", desc="training", leave=True,
                           enabled=progress_enabled(cfg.progress) if self.dist.is_main else False)
        self.model.train()
        t_train = 0.0  # training time, evaluations excluded
        t_last, step_last = time.perf_counter(), self.step
        run_loss, run_n = torch.zeros((), device=self.device), 0
        bad_step = None
        tokens_per_s = 0.0
        start_wall = time.perf_counter()
        self._plotted_len = len(self.history)
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
        if cfg.plot and len(self.history) != self._plotted_len:
            self._plot()
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
        if cfg.target_val_loss is not None and val_loss <= cfg.target_val_loss:
            self.stop_reason = f"target val loss {cfg.target_val_loss} reached: {val_loss:.4f} at step {self.step}"
        elif cfg.patience is not None and self.bad_evals >= cfg.patience:
            self.stop_reason = f"early stopping: no val improvement in {cfg.patience} evaluations (best {self.best_val:.4f} at step {self.best_step})"
        record["best_val_loss"] = self.best_val
        self.history.append(record)
        self._append(METRICS_NAME, record)
        if cfg.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            tqdm.write(f"step {self.step}: train {train_loss:.4f}, val {val_loss:.4f} (ppl {record['val_perplexity']:.2f}, "
                       f"{bpb:.3f} bits/byte), lr {lr:.2e}, {tokens_per_s:,.0f} tok/s", file=sys.stderr)
        if cfg.plot:  # before the checkpoints, whose model cards link the curves
            self._plot()
        self._save_step_checkpoint()
        if improved and cfg.save_best:
            self.save_checkpoint(self.out / "best")
        self._tensorboard(record)
        distributed.barrier(self.dist)  # the checkpoint is complete before any rank goes on
