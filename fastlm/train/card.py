"""Model cards: the ``README.md`` of every checkpoint the Trainer writes (so of ``fastlm train``,
``finetune`` and ``fastlm demo``), in the Hugging Face model-card format: YAML front matter
(``library_name: fastlm``, ``pipeline_tag``, ``license`` when the run names one, ``tags``), then
Markdown: the architecture, the parameter count, the tokenizer, the training data and its size
in tokens, the steps, the last evaluation's losses, perplexity and bits per byte, the loss curve
(linked relatively) and how to load the model.

A card fastlm wrote starts its body with ``CARD_MARK``; a ``README.md`` without it was written
by a person and is kept as it is when the checkpoint is written again.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .._io import atomic_write_bytes
from ..models import GPTConfig

CARD_NAME = "README.md"
CARD_MARK = "<!-- fastlm model card -->"

# pipeline_tag of each kind of model the Trainer trains, by the model's class name.
_TASKS = {"SequenceClassifier": "text-classification", "TranslationLM": "translation"}
# GPTConfig's architecture switches, shown when they differ from GPT-2's.
_SWITCHES = ("norm", "pos", "mlp", "bias", "tie_word_embeddings", "qk_norm", "zero_init_proj", "logit_softcap",
             "rope_theta", "n_kv_head", "n_inner")


def is_fastlm_card(path) -> bool:
    """Whether the file at ``path`` is a card fastlm wrote (it holds ``CARD_MARK``)."""
    try:
        with open(path, "rb") as f:
            return CARD_MARK.encode() in f.read(1 << 16)
    except OSError:
        return False


def write_card(trainer, directory, final=None, plot=None) -> Path:
    """Write the card of ``trainer``'s model into ``directory`` (atomically), unless the
    checkpoint's folder (``final``, default ``directory``) holds a ``README.md`` written by a
    person: that one is then kept (copied into ``directory`` when it is a new folder that will
    replace ``final``). ``plot``: the run's loss-curve SVG, linked when it exists."""
    directory = Path(directory)
    final = directory if final is None else Path(final)
    existing = final / CARD_NAME
    target = directory / CARD_NAME
    if existing.is_file() and not is_fastlm_card(existing):
        if existing != target:
            shutil.copy2(existing, target)
        return target
    atomic_write_bytes(target, model_card(trainer, final, plot).encode("utf-8"))
    return target


def _yaml(value) -> str:
    return json.dumps(str(value))  # a JSON string is a valid YAML double-quoted scalar


def _fmt(x, digits=4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _params(model) -> int:
    fn = getattr(model, "num_parameters", None)
    return int(fn()) if callable(fn) else sum(p.numel() for p in model.parameters())


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _architecture(cfg: dict) -> list[str]:
    arch = cfg.get("arch", "gpt")
    lines = [f"- architecture: {'GPT (decoder-only transformer)' if arch == 'gpt' else arch.upper()}",
             f"- layers: {cfg.get('n_layer')}, width (n_embd): {cfg.get('n_embd')}"]
    if arch == "gpt":
        lines[-1] += f", heads: {cfg.get('n_head')}"
    lines.append(f"- context: {cfg.get('block_size')} tokens, vocabulary: {cfg.get('vocab_size')} ids")
    if arch == "gpt":
        base = GPTConfig().to_dict()
        shown = {k: cfg[k] for k in _SWITCHES if k in cfg and cfg[k] != base.get(k)}
        if shown.get("n_kv_head") == cfg.get("n_head"):  # plain multi-head attention, spelled out
            del shown["n_kv_head"]
        if cfg.get("pos") != "rope":
            shown.pop("rope_theta", None)
        switches = [f"{k}={v}" for k, v in shown.items()]
        lines.append(f"- switches: {', '.join(switches) if switches else 'none (GPT-2: LayerNorm, learned positions, GELU)'}")
    return lines


def _tokenizer_line(trainer) -> str:
    tok = trainer.tokenizer
    if tok is None:
        where = getattr(trainer.data, "tokenizer_dir", None)
        return f"the data's tokenizer ({trainer.data.vocab_size} ids)" + (f", files copied from `{where}`" if where else "")
    parts = [type(tok).__name__]
    if getattr(tok, "name", None):
        parts.append(f"`{tok.name}`")
    desc = " ".join(parts) + f", {tok.n_vocab} ids"
    if getattr(tok, "pattern", None):
        desc += f", byte-level BPE with the {tok.pattern} pre-tokenizer"
    return desc


def _data_lines(trainer) -> list[str]:
    data = trainer.data
    path = getattr(data, "path", None)
    train, val = data.num_tokens("train"), data.num_tokens("val")
    lines = [f"- data: `{path}`" if path is not None else "- data: in memory"]
    sources = (getattr(data, "meta", None) or {}).get("sources") or []
    for s in sources[:10]:
        if isinstance(s, dict) and "source" in s:
            extra = f" ({s['documents']:,} documents)" if isinstance(s.get("documents"), int) else ""
            lines.append(f"  - source: `{s['source']}`{extra}")
    lines.append(f"- size: {train:,} training tokens, {val:,} validation tokens")
    return lines


def _how_to_load(task: str, where: str) -> str:
    if task == "text-generation":
        return f"""```python
from fastlm import GPT, Tokenizer, pipeline

generator = pipeline("text-generation", model={where!r})
print(generator("Once upon a time", max_new_tokens=40))
model, tokenizer = GPT.from_pretrained({where!r}), Tokenizer.load({where!r})
```

```sh
fastlm generate --model {where} --prompt "Once upon a time"
```"""
    return f"""```python
from fastlm.pipelines import load_pipeline

pipe = load_pipeline({where!r})  # the {task} pipeline this checkpoint holds
```"""


def model_card(trainer, directory, plot=None) -> str:
    """The card (YAML front matter and Markdown) of ``trainer``'s model as saved at ``directory``;
    ``plot``: the loss-curve SVG to link (relative to ``directory``) when it exists."""
    directory = Path(directory)
    cfg = trainer.config
    model = trainer.model
    task = _TASKS.get(type(model).__name__, "text-generation")
    mc = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(vars(model.config))
    n_params = _params(model)
    last = trainer.history[-1] if trainer.history else None
    tags = ["fastlm", "gpt" if mc.get("arch", "gpt") == "gpt" else mc["arch"], task]
    front = ["---", "library_name: fastlm", f"pipeline_tag: {task}"]
    if getattr(cfg, "license", None):
        front.append(f"license: {_yaml(cfg.license)}")
    front += ["tags:"] + [f"  - {_yaml(t)}" for t in dict.fromkeys(tags)] + ["---"]
    body = [CARD_MARK, "", f"# {directory.name}", "",
            f"A {_count(n_params)}-parameter {task} model trained with fastlm for {trainer.step:,} steps.", "",
            "## Architecture", "", *_architecture(mc), f"- parameters: {n_params:,}", "",
            "## Tokenizer", "", f"- {_tokenizer_line(trainer)}", "",
            "## Training data", "", *_data_lines(trainer), "",
            "## Training", "",
            f"- steps: {trainer.step:,} of {cfg.max_iters:,}, batch {cfg.batch_size} x {trainer.block_size} tokens"
            f" x {cfg.grad_accum} accumulation, learning rate {cfg.lr:g}, seed {cfg.seed}"]
    if last is not None:
        body += [f"- tokens seen: {last['tokens_seen']:,}",
                 f"- final train loss: {_fmt(last['train_loss'])}, val loss: {_fmt(last['val_loss'])} "
                 f"(nats/token, at step {last['step']:,})",
                 f"- val perplexity: {_fmt(last.get('val_perplexity'), 2)}, "
                 f"val bits per byte: {_fmt(last.get('val_bits_per_byte'), 3)}"]
        if trainer.best_step is not None:
            body.append(f"- best val loss: {_fmt(trainer.best_val)} at step {trainer.best_step:,}")
    else:
        body.append("- not evaluated yet")
    if plot is not None and Path(plot).is_file():
        rel = Path(os.path.relpath(plot, directory)).as_posix()
        body += ["", f"![loss curves]({rel})"]
    body += ["", "## How to use", "", _how_to_load(task, str(directory)), ""]
    return "\n".join(front + body)
