"""The pre-tokenizer patterns fastlm's C++ scanners implement (GPT-2's, also called r50k/p50k,
cl100k's and o200k's), and the names and regexes that select them."""
from __future__ import annotations

# The regexes the scanners implement (kept for saving Hugging Face files and for reference).
PATTERNS = {
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "cl100k": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
    # GPT-4o's: words are an optional non-letter prefix, a run of cased-upper (or caseless) letters and
    # marks, then a run of lower (or caseless) ones, then an optional contraction in any case.
    "o200k": "|".join([
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]),
}
_PATTERN_ALIASES = {"gpt2": "gpt2", "r50k": "gpt2", "r50k_base": "gpt2", "p50k": "gpt2", "p50k_base": "gpt2",
                    "p50k_edit": "gpt2", "cl100k": "cl100k", "cl100k_base": "cl100k", "o200k": "o200k",
                    "o200k_base": "o200k"}
_PATTERN_CODE = {"gpt2": 0, "cl100k": 1, "o200k": 2}


def _pattern_name(pattern: str) -> str:
    if pattern in _PATTERN_ALIASES:
        return _PATTERN_ALIASES[pattern]
    for name, pat in PATTERNS.items():
        if pattern in (pat, pat.replace("{1,3}+", "{1,3}")):
            return name
    # cl100k's older spelling (before tiktoken 0.8 it ended in \s+ and had no \s++$).
    if pattern.startswith(r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+"):
        raise ValueError("this is an older spelling of cl100k's pattern; fastlm implements the current one "
                         "(pattern='cl100k')")
    raise ValueError(f"unknown pre-tokenization pattern {pattern!r}; supported: "
                     f"{sorted(_PATTERN_ALIASES)} (the regexes in fastlm.tokenizer.PATTERNS)")
