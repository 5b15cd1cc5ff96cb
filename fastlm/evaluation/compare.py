"""Comparing checkpoints on the same text: perplexity, NLL per token, bits per byte and scored
tokens of each, every model with its own tokenizer (bits per byte compares across
tokenizers)."""
from __future__ import annotations

from pathlib import Path

from .scoring import _read_texts, perplexity

LM_COLUMNS = ["model", "perplexity", "nll", "bits_per_byte", "tokens"]


def _eval_texts(data) -> list[str]:
    """Texts to evaluate: a prepared folder's val documents (train's when it has no val),
    decoded with its tokenizer, or what ``perplexity`` reads (texts, files, folders)."""
    from ..data import TokenData, is_prepared

    if isinstance(data, (str, Path)) and is_prepared(data):
        td = TokenData(data)
        split = "val" if td.num_tokens("val") else "train"
        ids = td.splits[split].astype("int64").tolist()
        tok, eot = td.tokenizer(), td.eot_token
        docs, cur = [], []
        for t in ids:
            if t == eot:
                docs.append(cur)
                cur = []
            else:
                cur.append(t)
        docs.append(cur)
        return [tok.decode(d) for d in docs if d]
    return _read_texts(data)


def compare_checkpoints(model_dirs, data, stride: int | None = None, max_length: int | None = None,
                        batch_size: int = 8, device=None, progress: bool = True) -> list[dict]:
    """Perplexity, NLL per token, bits per byte and scored tokens of each checkpoint on the same
    text, each model with its own tokenizer (bits per byte compares across tokenizers). Rows in
    the order given, with the columns of ``LM_COLUMNS``. ``progress``: a bar over each model's
    windows on a terminal; False never shows one."""
    from ..models import load_model
    from ..tokenizer import load_tokenizer

    texts = _eval_texts(data)
    if not texts:
        raise ValueError(f"no text to evaluate in {data}")
    rows = []
    for d in model_dirs:
        model = load_model(d, device=device)
        r = perplexity(model, texts, tokenizer=load_tokenizer(d), stride=stride, max_length=max_length,
                       batch_size=batch_size, progress=progress)
        rows.append({"model": str(d), "perplexity": r["perplexity"], "nll": r["nll"],
                     "bits_per_byte": r.get("bits_per_byte"), "tokens": r["tokens"]})
    return rows
