"""Fine-tuning a GPT for a task: text classification and translation.

The data is a JSONL file of examples (fields ``text`` and ``label``, or ``source`` and
``target``), read by ``read_examples``, whose errors name the line. ``ExampleData`` serves
the encoded examples to ``fastlm.Trainer`` in place of a token folder (the same
``batch(split, batch_size, block_size, rng)``), and the model the Trainer trains is a task
model whose ``loss`` is the task's, so warmup, clipping, evaluation, early stopping and
checkpoints are the Trainer's own:

- ``SequenceClassifier``: the GPT's final hidden states, pooled (``"mean"`` over the text's
  tokens or the ``"last"`` token), then a linear head; cross-entropy over the labels. Batches
  are right-padded with -1, which the model reads as "no token".
- ``TranslationLM``: the GPT itself on ``PROMPT + " " + target + <eot>``, where PROMPT is
  ``"{src_lang}: {source}\\n{tgt_lang}:"``; the loss is on the target tokens only (the prompt's
  and the padding's targets are the ignore index).

Both save as pipeline directories: the GPT in the Hugging Face layout, ``pipeline.json``
with the task's settings, and ``head.safetensors`` for the classifier. So every checkpoint
the Trainer writes, ``OUT/best`` included, loads with ``fastlm.pipelines.load_pipeline``.
``finetune(task, model, data, out_dir, ...)`` runs it all; ``augment=`` perturbs the
training examples (``fastlm.augment``: deletion, swap, insertion, token dropout for
classification; token dropout and span masking of the inputs for translation).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ._io import iter_jsonl
from .augment import Augmentation, AugmentedData, augment_ids
from .models import GPT, GPTConfig
from .models.heads import (HEAD_NAME, IGNORE_INDEX, POOLINGS, PROMPT_TEMPLATE, SequenceClassifier, TranslationLM,
                           translation_prompt)
from .tokenizer import Tokenizer, load_tokenizer
from .train import Trainer, TrainConfig

__all__ = ["read_examples", "ExampleData", "SequenceClassifier", "TranslationLM", "translation_prompt", "finetune",
           "TASK_FIELDS", "POOLINGS"]

TASK_FIELDS = {"classification": ("text", "label"), "translation": ("source", "target")}


# ----------------------------------------------------------------------------- data
def read_examples(path, fields) -> list[dict]:
    """The examples of a JSONL file: one dict per non-blank line with the given string fields
    and ``line`` (its line number). An integer ``label`` is read as its decimal string."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    examples = []
    for n, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            raise ValueError(f"{path} line {n}: expected a JSON object with the fields {', '.join(fields)}")
        missing = [k for k in fields if k not in obj]
        if missing:
            raise ValueError(f"{path} line {n}: missing field {', '.join(repr(k) for k in missing)} "
                             f"(every line needs {', '.join(fields)})")
        ex = {"line": n}
        for k in fields:
            v = obj[k]
            if k == "label" and isinstance(v, int) and not isinstance(v, bool):
                v = str(v)
            if not isinstance(v, str):
                raise ValueError(f"{path} line {n}: field {k!r} must be a string, got {type(v).__name__}")
            ex[k] = v
        examples.append(ex)
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text))


class ExampleData:
    """Encoded examples split into train and val, served as the Trainer's batches.

    Classification rows are ``(ids, label_index)``: a batch is x (B, T) right-padded with -1
    and y (B,) the label indices. Translation rows are ``(ids, n_prompt)``: a batch is x (B, T)
    = ids[:-1] padded with ``pad_id`` and y (B, T) = ids[1:] with the prompt's targets and the
    padding set to -100 (ignored by the loss).

    ``augment`` (classification only; an ``Augmentation``): each training example of a batch
    is augmented afresh (``fastlm.augment.augment_ids``); validation examples never are."""

    def __init__(self, rows, kind: str, vocab_size: int, val_fraction: float = 0.1, seed: int = 0,
                 pad_id: int = 0, n_bytes: int = 0, path=None, augment: Augmentation | None = None):
        if kind not in TASK_FIELDS:
            raise ValueError(f"kind must be one of {sorted(TASK_FIELDS)}, got {kind!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.kind, self.vocab_size, self.pad_id = kind, int(vocab_size), int(pad_id)
        self.path = Path(path).resolve() if path is not None else None
        self.augment = Augmentation.coerce(augment)
        if self.augment is not None and kind != "classification":
            raise ValueError("ExampleData augments classification examples; wrap translation data in "
                             "fastlm.augment.AugmentedData")
        self._aug_rng = self.augment.rng() if self.augment is not None else None
        self.meta = {}
        order = np.random.default_rng(seed).permutation(len(rows))
        n_val = int(round(len(rows) * val_fraction))
        if val_fraction > 0 and len(rows) >= 2:
            n_val = min(max(n_val, 1), len(rows) - 1)
        self.splits = {"val": [rows[i] for i in order[:n_val]], "train": [rows[i] for i in order[n_val:]]}
        n_tokens = sum(len(r[0]) for r in rows)
        self._bytes_per_token = n_bytes / n_tokens if n_bytes and n_tokens else 1.0

    @classmethod
    def for_classification(cls, examples, tokenizer, labels, block_size: int, **kw) -> "ExampleData":
        index = {label: i for i, label in enumerate(labels)}
        rows, n_bytes = [], 0
        for ex in examples:
            if ex["label"] not in index:
                raise ValueError(f"line {ex['line']}: label {ex['label']!r} is not one of the labels {list(labels)}")
            ids = _encode(tokenizer, ex["text"])[:block_size]
            if not ids:
                raise ValueError(f"line {ex['line']}: the text is empty")
            rows.append((ids, index[ex["label"]]))
            n_bytes += len(ex["text"].encode("utf-8"))
        return cls(rows, "classification", tokenizer.n_vocab, n_bytes=n_bytes, **kw)

    @classmethod
    def for_translation(cls, examples, tokenizer, src_lang: str, tgt_lang: str, block_size: int,
                        template: str = PROMPT_TEMPLATE, **kw) -> "ExampleData":
        eot = tokenizer.eot_token
        if eot is None:
            raise ValueError("translation fine-tuning needs a tokenizer with an end-of-text token")
        rows, n_bytes = [], 0
        for ex in examples:
            prompt = _encode(tokenizer, translation_prompt(ex["source"], src_lang, tgt_lang, template))
            target = _encode(tokenizer, " " + ex["target"]) + [eot]
            ids = prompt + target
            if len(ids) - 1 > block_size:
                raise ValueError(f"line {ex['line']}: prompt and target are {len(ids)} tokens, more than the model's "
                                 f"context of {block_size} + 1")
            rows.append((ids, len(prompt)))
            n_bytes += len(ex["source"].encode("utf-8")) + len(ex["target"].encode("utf-8"))
        return cls(rows, "translation", tokenizer.n_vocab, pad_id=eot, n_bytes=n_bytes, **kw)

    def __len__(self):
        return len(self.splits["train"])

    def has_batches(self, split: str, block_size: int) -> bool:
        return bool(self.splits[split])

    def num_tokens(self, split: str = "train") -> int:
        return sum(len(r[0]) for r in self.splits[split])

    @property
    def bytes_per_token(self) -> float:
        return self._bytes_per_token

    def batch(self, split: str, batch_size: int, block_size: int, rng: np.random.Generator):
        rows = self.splits[split]
        if not rows:
            raise ValueError(f"the {split} split has no examples")
        picked = [rows[i] for i in rng.integers(0, len(rows), size=batch_size)]
        if self.kind == "classification" and split == "train" and self.augment is not None and self.augment.enabled:
            picked = [(augment_ids(ids, self.augment, self._aug_rng, self.vocab_size)[:block_size], label)
                      for ids, label in picked]
        if self.kind == "classification":
            T = min(max(len(ids) for ids, _ in picked), block_size)
            x = torch.full((batch_size, T), -1, dtype=torch.long)
            for r, (ids, _) in enumerate(picked):
                x[r, :min(len(ids), T)] = torch.tensor(ids[:T])
            return x, torch.tensor([label for _, label in picked], dtype=torch.long)
        T = max(len(ids) for ids, _ in picked) - 1
        x = torch.full((batch_size, T), self.pad_id, dtype=torch.long)
        y = torch.full((batch_size, T), IGNORE_INDEX, dtype=torch.long)
        for r, (ids, n_prompt) in enumerate(picked):
            t = torch.tensor(ids)
            x[r, :len(ids) - 1] = t[:-1]
            y[r, n_prompt - 1:len(ids) - 1] = t[n_prompt:]
        return x, y


# ----------------------------------------------------------------------------- task models
# ----------------------------------------------------------------------------- the run
FINETUNE_DEFAULTS = {"max_iters": 300, "batch_size": 16, "lr": 3e-4, "min_lr": 3e-5, "warmup_iters": 20,
                     "eval_interval": 50, "eval_iters": 10, "weight_decay": 0.0}


def _tokenizer_for(model, tokenizer, texts, vocab_size):
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if isinstance(model, (str, os.PathLike)):
        return load_tokenizer(model)
    if isinstance(model, GPTConfig):
        return Tokenizer.train(texts, vocab_size=vocab_size or 512)
    raise ValueError("finetune: pass tokenizer= when model is a GPT object")


def finetune(task: str, model, data, out_dir, *, tokenizer=None, vocab_size: int | None = None, labels=None,
             pooling: str = "mean", src_lang: str = "source", tgt_lang: str = "target", val_fraction: float = 0.1,
             augment=None, train_config=None, **train_options) -> dict:
    """Fine-tune ``model`` for ``task`` ("classification" or "translation") on the JSONL file
    ``data`` with ``fastlm.Trainer``; checkpoints and logs go to ``out_dir``.

    ``model``: a ``fastlm.GPT``, a checkpoint directory, or a ``GPTConfig`` (a fresh model; its
    vocab_size becomes the tokenizer's). ``tokenizer``: an object or a directory; by default the
    model directory's, or, for a fresh model, one trained on the data (``vocab_size``, default
    512). ``labels``: the classes in order (default: the sorted labels of the data; a label
    outside them is an error). ``train_config`` a ``TrainConfig``, or ``train_options`` its
    fields (defaults ``FINETUNE_DEFAULTS``). ``augment``: a ``fastlm.augment.Augmentation`` (or a
    dict of its fields) applied to the training examples; classification takes every method,
    translation token dropout and span masking (of its inputs). Returns the Trainer's summary plus ``pipeline_dir``
    (the best checkpoint, a pipeline directory) and ``task_model``."""
    if task not in TASK_FIELDS:
        raise ValueError(f"task must be one of {sorted(TASK_FIELDS)}, got {task!r}")
    augment = Augmentation.coerce(augment)
    if augment is not None and task == "translation" and augment.changes_length:
        raise ValueError("translation takes token_dropout and span_mask; deletion, swap and insertion are for "
                         "classification (they would misalign source and target)")
    examples = read_examples(data, TASK_FIELDS[task])
    texts = [ex[f] for ex in examples for f in TASK_FIELDS[task] if f != "label"]
    tok = _tokenizer_for(model, tokenizer, texts, vocab_size)
    if train_config is None:
        train_config = TrainConfig(**{**FINETUNE_DEFAULTS, **train_options, "out_dir": str(out_dir)})
    elif train_options:
        raise TypeError("pass either train_config or TrainConfig fields, not both")
    if train_config.resume:
        raise ValueError("finetune does not resume a run; start it again with another out_dir")
    torch.manual_seed(train_config.seed)
    if isinstance(model, GPTConfig):
        cfg = GPTConfig.from_dict({**model.to_dict(), "vocab_size": tok.n_vocab, "eos_token_id": tok.eot_token})
        model = GPT(cfg)
    elif isinstance(model, (str, os.PathLike)):
        model = GPT.from_pretrained(model)
    elif not isinstance(model, GPT):
        raise TypeError(f"model must be a fastlm.GPT, a checkpoint directory or a GPTConfig, "
                        f"got {type(model).__name__}")
    if tok.n_vocab > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.n_vocab} ids, more than the model's vocabulary "
                         f"{model.config.vocab_size}")
    block = model.config.block_size
    split = dict(val_fraction=val_fraction, seed=train_config.seed, path=data)
    if task == "classification":
        labels = sorted({ex["label"] for ex in examples}) if labels is None else [str(x) for x in labels]
        task_model = SequenceClassifier(model, labels, pooling)
        dataset = ExampleData.for_classification(examples, tok, labels, block, augment=augment, **split)
    else:
        task_model = TranslationLM(model, src_lang, tgt_lang)
        dataset = ExampleData.for_translation(examples, tok, src_lang, tgt_lang, block, **split)
        if augment is not None and augment.enabled:
            dataset = AugmentedData(dataset, augment)
    trainer = Trainer(task_model, train_config, dataset, tokenizer=tok)
    summary = trainer.train()
    summary["pipeline_dir"] = summary["best_dir"] or summary["last_checkpoint"]
    summary["task_model"] = task_model
    return summary
