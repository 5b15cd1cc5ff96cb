"""Models built on a GPT for a task: a sequence classifier and a translation model.

- ``SequenceClassifier``: the GPT's final hidden states, pooled (``"mean"`` over the text's
  tokens or the ``"last"`` token), then a linear head; ``forward(idx)`` gives logits over the
  labels for token ids right-padded with -1 ("no token").
- ``TranslationLM``: the GPT itself, trained on ``translation_prompt(source) + " " + target
  + <eot>``, the loss on the target tokens only.

Both save as pipeline directories: the GPT in the Hugging Face layout, ``pipeline.json``
with the task's settings, and ``head.safetensors`` for the classifier's head. Training them
is ``fastlm.finetune``'s; running them, ``fastlm.pipelines``'.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._io import CheckpointError, load_tensors, save_tensors
from .checkpoint import read_pipeline_config, write_pipeline_config
from .config import GPTConfig
from .gpt import GPT

__all__ = ["SequenceClassifier", "TranslationLM", "translation_prompt", "PROMPT_TEMPLATE", "POOLINGS", "HEAD_NAME",
           "IGNORE_INDEX"]

POOLINGS = ("mean", "last")
HEAD_NAME = "head.safetensors"
PROMPT_TEMPLATE = "{src_lang}: {source}\n{tgt_lang}:"
IGNORE_INDEX = -100


def translation_prompt(source: str, src_lang: str, tgt_lang: str, template: str = PROMPT_TEMPLATE) -> str:
    """The text a translation model continues with the translation of ``source``."""
    return template.format(src_lang=src_lang, tgt_lang=tgt_lang, source=source)


class _TaskModel(nn.Module):
    """What the Trainer needs of a model besides ``loss``: the GPT's config and sizes."""

    gpt: GPT

    @property
    def config(self) -> GPTConfig:
        return self.gpt.config

    @property
    def device(self) -> torch.device:
        return self.gpt.device

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        own = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("gpt."))
        return self.gpt.num_parameters(exclude_embeddings) + own

    def task_config(self) -> dict:
        raise NotImplementedError

    def save_pretrained(self, path, state_dict: dict | None = None) -> None:
        """The GPT (Hugging Face layout), the task's own tensors and ``pipeline.json``.
        ``state_dict``: this model's whole state gathered elsewhere (sharded training)."""
        self.gpt.save_pretrained(path, state_dict=_part(state_dict, "gpt."))
        write_pipeline_config(path, self.task_config())


def _part(state_dict: dict | None, prefix: str) -> dict | None:
    """The entries of ``state_dict`` under ``prefix``, the prefix removed (None for None)."""
    if state_dict is None:
        return None
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


class SequenceClassifier(_TaskModel):
    """A linear head over the pooled final hidden states of a GPT: ``forward(idx)`` gives
    logits (B, len(labels)) for token ids (B, T) right-padded with -1."""

    def __init__(self, gpt: GPT, labels, pooling: str = "mean"):
        super().__init__()
        labels = [str(x) for x in labels]
        if len(labels) < 2:
            raise ValueError(f"a classifier needs at least 2 labels, got {labels}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be distinct, got {labels}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.gpt, self.labels, self.pooling = gpt, labels, pooling
        self.head = nn.Linear(gpt.config.n_embd, len(labels))
        nn.init.normal_(self.head.weight, std=gpt.config.initializer_range)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx):
        mask = idx >= 0
        lengths = mask.sum(1)
        if bool((lengths == 0).any()):
            raise ValueError("every sequence needs at least one token")
        h = self.gpt.hidden_states(idx.clamp(min=0))
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / lengths.unsqueeze(-1).to(h.dtype)
        else:
            pooled = h[torch.arange(h.shape[0], device=h.device), lengths - 1]
        return self.head(pooled.to(self.head.weight.dtype))

    def loss(self, idx, labels):
        return F.cross_entropy(self(idx).float(), labels)

    def task_config(self) -> dict:
        return {"task": "text-classification", "labels": self.labels, "pooling": self.pooling}

    def save_pretrained(self, path, state_dict: dict | None = None) -> None:
        super().save_pretrained(path, state_dict=state_dict)
        head = _part(state_dict, "head.") or {"weight": self.head.weight, "bias": self.head.bias}
        save_tensors(Path(path) / HEAD_NAME, head, {"format": "pt"})

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "SequenceClassifier":
        path = Path(path)
        cfg = read_pipeline_config(path)
        if cfg is None or cfg["task"] != "text-classification":
            raise CheckpointError(f"{path} is not a text-classification pipeline (its pipeline.json says "
                                  f"{None if cfg is None else cfg['task']!r})")
        labels = cfg.get("labels")
        if not isinstance(labels, list) or not labels:
            raise CheckpointError(f"{path / 'pipeline.json'} lists no labels")
        model = cls(GPT.from_pretrained(path), labels, cfg.get("pooling", "mean"))
        if not (path / HEAD_NAME).is_file():
            raise CheckpointError(f"{path} has no {HEAD_NAME} (the classification head)")
        head = load_tensors(path / HEAD_NAME)
        w, b = head.get("weight"), head.get("bias")
        if w is None or b is None:
            raise CheckpointError(f"{path / HEAD_NAME} needs the tensors 'weight' and 'bias'")
        if w.dim() != 2 or w.shape[0] != len(labels) or b.shape != (len(labels),):
            raise CheckpointError(f"{path}: the head has {w.shape[0] if w.dim() else '?'} outputs but pipeline.json "
                                  f"lists {len(labels)} labels {labels}")
        if w.shape[1] != model.config.n_embd:
            raise CheckpointError(f"{path}: the head takes {w.shape[1]} features, "
                                  f"the model gives {model.config.n_embd}")
        with torch.no_grad():
            model.head.weight.copy_(w)
            model.head.bias.copy_(b)
        if dtype is not None:
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        return model.eval()


class TranslationLM(_TaskModel):
    """A GPT trained to continue ``translation_prompt(source)`` with `` target<eot>``."""

    def __init__(self, gpt: GPT, src_lang: str, tgt_lang: str, template: str = PROMPT_TEMPLATE):
        super().__init__()
        for name in ("{source}", "{src_lang}", "{tgt_lang}"):
            if name not in template:
                raise ValueError(f"the prompt template needs {name}, got {template!r}")
        self.gpt, self.src_lang, self.tgt_lang, self.template = gpt, src_lang, tgt_lang, template

    def loss(self, idx, targets):
        return self.gpt.loss(idx, targets, ignore_index=IGNORE_INDEX)

    def task_config(self) -> dict:
        return {"task": "translation", "src_lang": self.src_lang, "tgt_lang": self.tgt_lang, "prompt": self.template}
