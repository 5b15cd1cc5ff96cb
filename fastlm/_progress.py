"""Progress bars for long work (cleaning and tokenizing data, perplexity, fine-tuning, lm-eval
requests): one way to make a tqdm bar, so every bar is quiet in the same cases.

A bar is shown when ``enabled`` is True; when it is None (the default) it is shown when its
stream (stderr unless ``file`` is given) is a terminal, or when the environment sets
``FASTLM_PROGRESS=1`` (``FASTLM_PROGRESS=0`` hides it); when it is False it is never shown.
Library functions take ``progress: bool = True`` and pass ``enabled=None if progress else
False`` (``progress_enabled``), so ``--quiet`` (``progress=False``) always wins.
"""
from __future__ import annotations

import os
import sys

# tqdm options every bar starts from (a caller's own options win): bars vanish when done.
BAR_DEFAULTS = {"leave": False, "dynamic_ncols": True}


def progress_enabled(progress: bool) -> bool | None:
    """The ``enabled`` of a bar for a function's ``progress`` flag: None (show on a terminal)
    for True, False for False."""
    return None if progress else False


def _shown(enabled: bool | None, stream) -> bool:
    if enabled is not None:
        return bool(enabled)
    env = os.environ.get("FASTLM_PROGRESS")
    if env in ("0", "1"):
        return env == "1"
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable=None, *, enabled: bool | None = None, file=None, **kw):
    """A tqdm bar over ``iterable`` (or a manual one with ``total=``) on ``file`` (default
    stderr), shown as the module's docstring says; tqdm's other options pass through."""
    from tqdm.auto import tqdm

    stream = sys.stderr if file is None else file
    return tqdm(iterable, disable=not _shown(enabled, stream), file=stream, **{**BAR_DEFAULTS, **kw})
