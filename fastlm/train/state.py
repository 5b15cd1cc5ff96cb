"""A training run's checkpoints: what they hold beyond the model, how they are written whole
or not at all, and how a run resumes from one.

A checkpoint is a folder in the Hugging Face layout (``config.json``, ``model.safetensors``,
tokenizer files) plus ``optimizer.safetensors`` (the AdamW state as flat tensors) and
``trainer_state.json`` (step, best loss, data and RNG states, configs). It is written into a
temporary folder beside its final name and renamed into place, so a killed run leaves only
whole checkpoints; what a killed save left behind is cleared when the next run starts.
Resuming restores the model, the optimizer, the step, the data position and the RNG states,
so the run continues with the same batches, dropout masks and losses, and drops the log
lines written after the checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from . import card, distributed
from .._io import CheckpointError, atomic_write_bytes, atomic_write_json, load_tensors, read_json, save_tensors
from ..models.checkpoint import load_weights

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
METRICS_NAME = "metrics.jsonl"
TRAIN_LOG_NAME = "train_log.jsonl"
PLOT_NAME = "loss.svg"  # the run's loss curves, in its out_dir


def _rng_state_to_json(state: torch.Tensor) -> list:
    return state.tolist()


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy a data folder's tokenizer into a checkpoint: only the files ``Tokenizer.save``
    writes, each a regular file (not a link) of at most ``MAX_FILE_BYTES``; anything else in
    ``src`` stays out of the checkpoint."""
    from ..tokenizer import MAX_FILE_BYTES, SAVED_FILES

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


def remove_leftovers(directory: Path) -> None:
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


def trainer_state(trainer) -> dict:
    """What a checkpoint records of the run beside the weights and the optimizer: step, best
    loss, patience, the data and torch RNG states, the configs and the data's identity."""
    state = {
        "step": trainer.step,
        "best_val_loss": trainer.best_val if math.isfinite(trainer.best_val) else None,
        "best_step": trainer.best_step,
        "bad_evals": trainer.bad_evals,
        "data_rng": trainer.train_rng.bit_generator.state,
        "torch_rng": _rng_state_to_json(torch.get_rng_state()),
        "config": trainer.config.to_dict(),
        "model_config": trainer.model.config.to_dict(),
        "data": {"path": str(trainer.data.path.resolve()) if trainer.data.path else None,
                 "vocab_size": trainer.data.vocab_size,
                 "train_tokens": trainer.data.num_tokens("train")},
        "stop_reason": trainer.stop_reason,
    }
    if trainer.device.type == "cuda":
        state["cuda_rng"] = _rng_state_to_json(torch.cuda.get_rng_state(trainer.device))
    return state


def optimizer_tensors(optimizer, state: dict | None = None) -> dict:
    """The optimizer state as flat tensors ``"{param id}.{name}"`` (``state``: a whole state
    ``{param id: {name: value}}``; default ``optimizer``'s own)."""
    tensors = {}
    for pid, st in (optimizer.state_dict()["state"] if state is None else state).items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"{pid}.{k}"] = t
    return tensors


def save_checkpoint(trainer, path) -> Path:
    """Write a complete checkpoint folder at ``path`` atomically (rank 0 alone under torchrun;
    with FSDP every rank first helps gather the whole state to rank 0)."""
    final = Path(path)
    model_sd = opt_state = None  # None: the model's and optimizer's own
    if trainer.fsdp:
        model_sd, opt_state = distributed.full_state(trainer.model, trainer.optimizer)
    if not trainer.dist.is_main:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        trainer.model.save_pretrained(tmp, state_dict=model_sd)
        tok = trainer.tokenizer
        if tok is None:
            tok_dir = getattr(trainer.data, "tokenizer_dir", None)
            if tok_dir is not None and tok_dir.is_dir():
                _copy_tokenizer_files(tok_dir, tmp)
        else:
            tok.save(str(tmp))
        save_tensors(tmp / OPTIMIZER_NAME, optimizer_tensors(trainer.optimizer, opt_state), {"format": "pt"})
        atomic_write_json(tmp / STATE_NAME, trainer_state(trainer))
        card.write_card(trainer, tmp, final, plot=trainer.out / PLOT_NAME if trainer.config.plot else None)
        _atomic_replace_dir(tmp, final)
    except BaseException:
        # A failed save (a full disk, an interrupt) leaves the older checkpoint as it was
        # and no half-written folder beside it.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_checkpoint(trainer, path) -> None:
    """Restore model, optimizer, step, data position and RNG states from ``path``;
    a damaged or mismatched checkpoint raises ``CheckpointError``."""
    path = Path(path)
    for name in ("config.json", STATE_NAME, OPTIMIZER_NAME):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    state = read_json(path / STATE_NAME)
    try:
        want, have = state["model_config"], trainer.model.config.to_dict()
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k) and k != "dropout")
        if diff:
            raise CheckpointError(
                f"checkpoint {path} was trained with a different model: "
                + ", ".join(f"{k}={want.get(k)!r} (now {have.get(k)!r})" for k in diff))
        saved_opt = state["config"].get("optimizer", "adamw")
        if saved_opt != trainer.config.optimizer:
            raise CheckpointError(f"checkpoint {path} was trained with optimizer={saved_opt!r}, this run has "
                                  f"optimizer={trainer.config.optimizer!r} (--optimizer {saved_opt}, or its --recipe)")
        if state["data"]["vocab_size"] != trainer.data.vocab_size:
            raise CheckpointError(f"checkpoint {path} was trained on data with vocabulary "
                                  f"{state['data']['vocab_size']}, this data has {trainer.data.vocab_size}")
        sd = load_weights(path)  # in the model's names and layout (the one key map)
        model_sd = trainer.model.state_dict()

        full = {}  # the checkpoint's tensors in the model's names and layout
        with torch.no_grad():
            for k, p in model_sd.items():
                key = k
                if key not in sd:
                    if k == "lm_head.weight" and trainer.model.config.tie_word_embeddings:
                        continue
                    raise CheckpointError(f"checkpoint {path} lacks the tensor {k}")
                v = sd[key]
                if v.shape != p.shape:
                    raise CheckpointError(f"checkpoint {path}: tensor {k} has shape {tuple(v.shape)}, "
                                          f"the model needs {tuple(p.shape)}")
                full[k] = v
                if not trainer.fsdp:
                    p.copy_(v)
        opt_t = load_tensors(path / OPTIMIZER_NAME)
        osd = trainer.optimizer.state_dict()
        new_state = {}
        for pid in range(sum(len(g["params"]) for g in osd["param_groups"])):
            st = {k.split(".", 1)[1]: v for k, v in opt_t.items() if k.split(".", 1)[0] == str(pid)}
            if st:
                new_state[pid] = st
        if opt_t and not new_state:
            raise CheckpointError(f"checkpoint {path}: optimizer state does not fit the model")
        osd["state"] = new_state
        try:
            if trainer.fsdp:  # every rank read the whole state; each keeps its shard
                if trainer.model.config.tie_word_embeddings:
                    full.setdefault("lm_head.weight", full.get("transformer.wte.weight"))
                distributed.load_full_state(trainer.model, trainer.optimizer, full, new_state)
            else:
                trainer.optimizer.load_state_dict(osd)
        except (ValueError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path}: optimizer state does not fit: {e}") from None
        for group in ([] if trainer.fsdp else trainer.optimizer.state.values()):
            for k, v in list(group.items()):
                if isinstance(v, torch.Tensor) and k != "step":
                    group[k] = v.to(trainer.device)
        trainer.step = int(state["step"])
        trainer.best_val = state["best_val_loss"] if state["best_val_loss"] is not None else float("inf")
        trainer.best_step = state["best_step"]
        trainer.bad_evals = int(state["bad_evals"])
        trainer.train_rng = np.random.default_rng()
        trainer.train_rng.bit_generator.state = state["data_rng"]
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        if "cuda_rng" in state and trainer.device.type == "cuda":
            torch.cuda.set_rng_state(torch.tensor(state["cuda_rng"], dtype=torch.uint8), trainer.device)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path} has a damaged {STATE_NAME} or optimizer state: {e!r}") from None


def resume(trainer) -> Path:
    """Load the newest checkpoint in ``OUT/checkpoints``; an error when there is none."""
    found = find_checkpoints(trainer.out)
    if not found:
        raise CheckpointError(f"nothing to resume: no checkpoint in {trainer.out / 'checkpoints'}")
    load_checkpoint(trainer, found[-1])
    # logs after the checkpoint's step belong to the run that died: drop them
    for name in (METRICS_NAME, TRAIN_LOG_NAME):
        f = trainer.out / name
        if f.is_file():
            keep = [ln for ln in _log_lines(f) if json.loads(ln)["step"] <= trainer.step]
            if trainer.dist.is_main:
                atomic_write_bytes(f, "".join(ln + "\n" for ln in keep).encode())
            if name == METRICS_NAME:
                trainer.history = [json.loads(ln) for ln in keep]
    return found[-1]
