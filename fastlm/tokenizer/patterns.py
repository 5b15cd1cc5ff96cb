"""The pre-tokenizer patterns fastlm's C++ scanners implement (GPT-2's, also called r50k/p50k,
and cl100k's), and the names and regexes that select them."""
from __future__ import annotations

# The regexes the scanners implement (kept for saving Hugging Face files and for reference).
PATTERNS = {
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "cl100k": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
}
_PATTERN_ALIASES = {"gpt2": "gpt2", "r50k": "gpt2", "r50k_base": "gpt2", "p50k": "gpt2", "p50k_base": "gpt2",
                    "p50k_edit": "gpt2", "cl100k": "cl100k", "cl100k_base": "cl100k"}
_PATTERN_CODE = {"gpt2": 0, "cl100k": 1}


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
