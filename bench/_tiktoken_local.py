"""tiktoken encodings built from the rank files in ../shared/data (no network)."""
import base64
import gzip
import pathlib

_CACHE = {}


def load_ranks(path: pathlib.Path) -> dict:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return {base64.b64decode(t): int(r) for t, r in (line.split() for line in data.splitlines() if line)}


def tiktoken_encoding(name: str, data_dir: pathlib.Path):
    """tiktoken's own constructor for ``name`` (its pattern and specials), ranks read locally."""
    import tiktoken
    import tiktoken_ext.openai_public as op

    key = (name, str(data_dir))
    if key not in _CACHE:
        ranks = load_ranks(data_dir / f"{name}.tiktoken.gz")
        orig = op.load_tiktoken_bpe
        op.load_tiktoken_bpe = lambda *a, **k: ranks
        try:
            spec = getattr(op, name)()
        finally:
            op.load_tiktoken_bpe = orig
        _CACHE[key] = tiktoken.Encoding(**spec)
    return _CACHE[key]
