"""Data augmentation for training on few examples: the training batches are perturbed, the
validation batches never are.

``Augmentation`` holds the methods, each off (probability 0) unless set, and a seed:

- ``deletion``: each token is dropped with this probability (at least one token stays);
- ``swap``: each token is swapped, with this probability, with another token of the text
  picked at random;
- ``insertion``: after each token, with this probability, a copy of a token picked at random
  from the same text is inserted (EDA's random insertion, with the text's own tokens for
  the synonyms it has no dictionary for);
- ``token_dropout``: each token is replaced, with this probability, by ``replace_with``
  (a token id) or, when that is None, by a token id drawn uniformly from the vocabulary;
- ``span_mask``: about this share of the tokens is replaced as above in contiguous spans
  whose lengths are drawn from a geometric distribution of mean ``span_length``.

Deletion, swap and insertion change a text's tokens and length, so they serve classification,
where the label does not depend on the exact sequence (``augment_ids`` on one example's ids).
Token dropout and span masking replace tokens in place, so they also serve translation and
language modelling: there ``corrupt_inputs`` replaces tokens of the inputs x and leaves the
targets y as they were, and the model learns to predict the true next token from a noisy
context. ``AugmentedData`` wraps a Trainer's data (``fastlm.data.TokenData``, or the
translation ``ExampleData``) and corrupts its training batches so.

The random draws come from the augmentation's own generator, seeded with ``seed``, so a run
with augmentation samples the same batches as the run without it, and two runs with the
same seed are identical.
"""
from __future__ import annotations

import dataclasses
import numbers

import numpy as np
import torch

__all__ = ["Augmentation", "augment_ids", "corrupt_inputs", "AugmentedData", "parse_augmentation"]

_PROBABILITIES = ("deletion", "swap", "insertion", "token_dropout", "span_mask")
_LENGTH_CHANGING = ("deletion", "swap", "insertion")


@dataclasses.dataclass
class Augmentation:
    """Which augmentations to apply and with which probability (see the module's doc)."""

    deletion: float = 0.0
    swap: float = 0.0
    insertion: float = 0.0
    token_dropout: float = 0.0
    span_mask: float = 0.0
    span_length: float = 3.0
    replace_with: int | None = None
    seed: int = 0

    def __post_init__(self):
        for name in _PROBABILITIES:
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
                raise ValueError(f"augmentation {name} must be a probability in [0, 1], got {p!r}")
            setattr(self, name, float(p))
        if self.span_mask >= 1.0:
            raise ValueError(f"span_mask must be below 1 (the share of tokens masked), got {self.span_mask}")
        sl = self.span_length
        if isinstance(sl, bool) or not isinstance(sl, numbers.Real) or not sl >= 1.0:
            raise ValueError(f"span_length must be a number >= 1 (the mean span), got {sl!r}")
        rw = self.replace_with
        if rw is not None and (isinstance(rw, bool) or not isinstance(rw, numbers.Integral) or rw < 0):
            raise ValueError(f"replace_with must be None or a token id >= 0, got {rw!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    @property
    def enabled(self) -> bool:
        return any(getattr(self, name) > 0 for name in _PROBABILITIES)

    @property
    def changes_length(self) -> bool:
        return any(getattr(self, name) > 0 for name in _LENGTH_CHANGING)

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    @classmethod
    def coerce(cls, value) -> "Augmentation | None":
        """An Augmentation from itself, a dict of its fields, or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"unknown augmentation options {sorted(unknown)}; known: "
                                 f"{[f.name for f in dataclasses.fields(cls)]}")
            return cls(**value)
        raise TypeError(f"augment must be a fastlm.augment.Augmentation, a dict or None, got {type(value).__name__}")


def parse_augmentation(items) -> Augmentation | None:
    """An Augmentation from command-line items ``NAME=VALUE`` (``deletion=0.1 swap=0.05``)."""
    if not items:
        return None
    fields = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--augment takes NAME=VALUE items (e.g. deletion=0.1), got {item!r}")
        name = name.strip().replace("-", "_")
        try:
            fields[name] = int(value) if name in ("seed", "replace_with") else float(value)
        except ValueError:
            raise ValueError(f"--augment {name}: {value!r} is not a number") from None
    return Augmentation.coerce(fields)


def _replacements(aug: Augmentation, rng: np.random.Generator, n: int, vocab_size: int) -> np.ndarray:
    if aug.replace_with is not None:
        return np.full(n, aug.replace_with, dtype=np.int64)
    return rng.integers(0, vocab_size, size=n)


def _span_mask(aug: Augmentation, rng: np.random.Generator, length: int) -> np.ndarray:
    """A boolean mask over ``length`` positions: spans starting with probability
    span_mask / span_length, of geometric length with mean span_length, cover about
    span_mask of the positions."""
    mask = np.zeros(length, dtype=bool)
    if aug.span_mask <= 0 or length == 0:
        return mask
    starts = np.flatnonzero(rng.random(length) < aug.span_mask / aug.span_length)
    lengths = rng.geometric(1.0 / aug.span_length, size=len(starts))
    for s, n in zip(starts, lengths):
        mask[s:s + n] = True
    return mask


def augment_ids(ids, aug: Augmentation, rng: np.random.Generator, vocab_size: int) -> list[int]:
    """One example's token ids, augmented: deletion, swap, insertion, then token dropout and
    span masking (each only when its probability is above 0)."""
    ids = list(ids)
    n = len(ids)
    if n == 0:
        return ids
    if aug.deletion > 0 and n > 1:
        keep = rng.random(n) >= aug.deletion
        if not keep.any():
            keep[rng.integers(n)] = True
        ids = [t for t, k in zip(ids, keep) if k]
        n = len(ids)
    if aug.swap > 0 and n > 1:
        for i in np.flatnonzero(rng.random(n) < aug.swap):
            j = int(rng.integers(n))
            ids[i], ids[j] = ids[j], ids[i]
    if aug.insertion > 0:
        out = []
        source = list(ids)
        for t, ins in zip(ids, rng.random(n) < aug.insertion):
            out.append(t)
            if ins:
                out.append(source[int(rng.integers(len(source)))])
        ids = out
        n = len(ids)
    replace = np.zeros(n, dtype=bool)
    if aug.token_dropout > 0:
        replace |= rng.random(n) < aug.token_dropout
    replace |= _span_mask(aug, rng, n)
    if replace.any():
        new = _replacements(aug, rng, int(replace.sum()), vocab_size)
        for i, t in zip(np.flatnonzero(replace), new):
            ids[i] = int(t)
    return ids


def corrupt_inputs(x: torch.Tensor, aug: Augmentation, rng: np.random.Generator, vocab_size: int,
                   protect: torch.Tensor | None = None) -> torch.Tensor:
    """A copy of the input ids ``x`` (B, T) with token dropout and span masking applied;
    positions where ``protect`` is True (e.g. padding) are left as they are. The targets are
    not touched: the model still learns the true next tokens."""
    if aug.changes_length:
        raise ValueError("deletion, swap and insertion change a text's length and order, which the targets of "
                         "translation and language modelling depend on; use token_dropout and span_mask there")
    B, T = x.shape
    replace = rng.random((B, T)) < aug.token_dropout if aug.token_dropout > 0 else np.zeros((B, T), dtype=bool)
    if aug.span_mask > 0:
        for b in range(B):
            replace[b] |= _span_mask(aug, rng, T)
    replace = torch.from_numpy(replace)
    if protect is not None:
        replace &= ~protect
    out = x.clone()
    n = int(replace.sum())
    if n:
        out[replace] = torch.from_numpy(_replacements(aug, rng, n, vocab_size)).to(x.dtype)
    return out


class AugmentedData:
    """A Trainer's data whose training batches have their inputs corrupted by token dropout and
    span masking (``corrupt_inputs``); validation batches and every other attribute are the
    wrapped data's. For language modelling (``fastlm.data.TokenData``) and translation."""

    def __init__(self, data, augmentation):
        aug = Augmentation.coerce(augmentation)
        if aug is None:
            raise ValueError("AugmentedData needs an augmentation")
        if aug.changes_length:
            raise ValueError("deletion, swap and insertion are for classification; translation and language "
                             "modelling take token_dropout and span_mask")
        self.data, self.augmentation = data, aug
        self._rng = aug.rng()

    def __getattr__(self, name):
        return getattr(self.data, name)

    def __len__(self):
        return len(self.data)

    def batch(self, split: str, batch_size: int, block_size: int, rng: np.random.Generator):
        x, y = self.data.batch(split, batch_size, block_size, rng)
        if split != "train":
            return x, y
        # translation pads x with pad_id where y is ignored: the padding stays as it is
        protect = None
        pad = getattr(self.data, "pad_id", None)
        if pad is not None and y.shape == x.shape:
            protect = (x == pad) & (y < 0)
        return corrupt_inputs(x, self.augmentation, self._rng, self.data.vocab_size, protect), y
