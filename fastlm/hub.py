"""Model and tokenizer names resolved as ``transformers`` resolves them.

``resolve_pretrained(name, revision=None, need=...)`` turns what a user passes as ``model=``
into a local directory, in this order:

1. a local path (file or directory) that exists is used as it is;
2. a Hugging Face repo id (``"gpt2"``, ``"openai-community/gpt2"``) is looked up in the local
   Hugging Face cache in its standard layout: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``; there
   ``models--<owner>--<name>/refs/<revision>`` holds a commit hash and
   ``snapshots/<commit>/`` the files. A legacy name and its ``openai-community/`` form share
   one entry (the hub redirects one to the other, so a cache may hold either);
3. otherwise the files are fetched with ``huggingface_hub.snapshot_download`` (an optional
   dependency) into that cache, or, when ``HF_HUB_OFFLINE`` is set, looked up by the hub
   client in its offline mode, whose error is reported.

``"gpt-2"`` names ``"gpt2"`` (with a warning). Repo ids and revisions are validated with the
hub's own rules, and every path read from the cache is confined to the repo's cache folder, so
a crafted ``refs`` file or snapshot symlink cannot point outside it. Only stdlib is imported
here; ``huggingface_hub`` is imported when a download is needed.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

__all__ = ["resolve_pretrained", "hub_cache_dir", "is_repo_id", "HubNotFoundError", "MODEL_FILES", "TOKENIZER_FILES"]

# What makes a snapshot usable: a model needs its config, a tokenizer one of its file sets.
MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
# What a download fetches: configs, safetensors weights, tokenizer files, the chat template; never pickles.
_ALLOW_PATTERNS = ["*.json", "*.safetensors", "merges.txt", "*.tiktoken", "chat_template.jinja"]

# Names users type for GPT-2 that are not repo ids, and the legacy names the hub moved under an
# organisation (the cache keeps the id as it was asked for, so either spelling may be present).
_ALIASES = {"gpt-2": "gpt2", "GPT-2": "gpt2", "GPT2": "gpt2"}
_MOVED = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
          "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
          "distilgpt2": "distilbert/distilgpt2"}
_MOVED.update({v: k for k, v in list(_MOVED.items())})

# The hub's rules for a repo id: one or two parts of letters, digits, "-", "_", "."; a part
# does not start or end with "-" or ".", holds no "--" or "..", and the id is at most 96 long.
_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REVISION = re.compile(r"^[A-Za-z0-9._/-]{1,256}$")
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubNotFoundError(FileNotFoundError):
    """A name that is neither a local path nor a repo id found in the cache or on the hub."""


def is_repo_id(name: str) -> bool:
    """True when ``name`` is a well-formed Hugging Face repo id (``name`` or ``owner/name``)."""
    if not isinstance(name, str) or not name or len(name) > 96:
        return False
    parts = name.split("/")
    return len(parts) <= 2 and all(_PART.match(p) and "--" not in p and ".." not in p for p in parts)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, found from the environment as huggingface_hub finds it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _check_revision(revision: str) -> str:
    if not isinstance(revision, str) or not _REVISION.match(revision) or ".." in revision.split("/") \
            or revision.startswith("/") or "//" in revision:
        raise ValueError(f"invalid revision {revision!r}: a branch, tag or commit hash "
                         "(letters, digits, '.', '_', '-', '/'; no '..' parts)")
    return revision


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop, an unreadable link
        return False


def _cached_snapshot(cache: Path, repo_id: str, revision: str, need) -> Path | None:
    """The snapshot folder of ``repo_id`` at ``revision`` in ``cache`` when it holds one of
    ``need``; None when absent. Raises ValueError for a cache entry that points outside its folder."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    if not repo_dir.is_dir():
        return None
    if _COMMIT.match(revision):
        commit = revision
    else:
        ref = repo_dir / "refs" / revision
        if not ref.is_file():
            return None
        if not _inside(ref, repo_dir):
            raise ValueError(f"{ref} points outside {repo_dir}; refusing to use this cache entry")
        commit = ref.read_text(encoding="ascii", errors="replace").strip()
        if not _COMMIT.match(commit):
            raise ValueError(f"{ref} does not hold a commit hash (40 hex digits); the cache entry is damaged")
    snap = repo_dir / "snapshots" / commit
    if not snap.is_dir():
        return None
    # Every file of the snapshot (symlinks into ../../blobs in the standard layout) must stay
    # inside the repo's folder; a link elsewhere would let a crafted cache read any file.
    for entry in snap.rglob("*"):
        if not _inside(entry, repo_dir):
            raise ValueError(f"{entry} points outside {repo_dir}; refusing to use this cache entry")
    if not any((snap / f).is_file() for f in need):
        return None
    return snap


def _download(repo_id: str, revision: str | None, cache: Path, offline: bool) -> Path:
    try:
        import huggingface_hub
    except ImportError:
        why = "HF_HUB_OFFLINE is set" if offline else "huggingface_hub is not installed (pip install huggingface_hub)"
        raise HubNotFoundError(f"{repo_id!r} is not a local directory nor in the Hugging Face cache at {cache}, "
                               f"and it cannot be downloaded: {why}") from None
    try:
        path = huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=str(cache),
                                                 allow_patterns=_ALLOW_PATTERNS, local_files_only=offline)
    except Exception as e:  # the hub client's errors: offline, not found, gated, network
        how = "looked up offline (HF_HUB_OFFLINE is set)" if offline else "downloaded"
        raise HubNotFoundError(f"{repo_id!r} (revision {revision or 'main'}) is not a local directory nor in the "
                               f"Hugging Face cache at {cache}, and could not be {how}: "
                               f"{type(e).__name__}: {e}") from None
    return Path(path)


def resolve_pretrained(name, revision: str | None = None, need=MODEL_FILES) -> Path:
    """The local path that ``name`` (a path or a Hugging Face repo id) stands for; see the
    module's doc. ``need`` names the files a usable snapshot holds one of."""
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"expected a path or a Hugging Face repo id, got {type(name).__name__}")
    if revision is not None:
        _check_revision(revision)
    local = Path(name)
    if local.exists():
        return local
    text = os.fspath(name)
    if text in _ALIASES:
        warnings.warn(f"{text!r} is not a Hugging Face repo id; using {_ALIASES[text]!r} (GPT-2)", stacklevel=3)
        text = _ALIASES[text]
    if not is_repo_id(text):
        raise HubNotFoundError(
            f"{text} does not exist. fastlm loads a local checkpoint directory or a Hugging Face repo id "
            "('gpt2', 'owner/name') from the cache or the hub")
    cache = hub_cache_dir()
    rev = revision or "main"
    for repo_id in (text, _MOVED.get(text)):
        if repo_id is not None:
            snap = _cached_snapshot(cache, repo_id, rev, need)
            if snap is not None:
                return snap
    snap = _download(text, revision, cache, _offline())
    if not _inside(snap, cache):
        raise ValueError(f"the hub client returned {snap}, outside the cache {cache}")
    return snap
