"""Chat messages to prompt tokens: the model directory's template (Jinja2, sandboxed) or the
plain one for base models (``fastlm.serve``'s doc)."""
from __future__ import annotations

import re
import secrets
from pathlib import Path

from .._io import read_json

__all__ = ["ChatTemplate", "encode_text"]


class ChatTemplate:
    """Messages to prompt text: the model directory's template (Jinja2) or the plain one."""

    def __init__(self, source: str | None = None, bos_token: str = "", eos_token: str = ""):
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self._template = None
        if source is not None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(msg):
                raise ValueError(msg)

            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(source)

    @property
    def stop(self) -> list:
        return [] if self.source is not None else ["\nUser:"]

    @classmethod
    def from_dir(cls, path, eos_token: str = ""):
        path = Path(path)
        f = path / "chat_template.jinja"
        if f.is_file():
            return cls(f.read_text(), eos_token=eos_token)
        cfg = path / "tokenizer_config.json"
        if cfg.is_file():
            try:
                t = read_json(cfg).get("chat_template")
            except (ValueError, AttributeError, OSError):
                t = None
            if isinstance(t, str):
                return cls(t, eos_token=eos_token)
        return cls(None, eos_token=eos_token)

    def render(self, messages: list) -> str:
        if self._template is not None:
            return self._template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                         eos_token=self.eos_token)
        parts = []
        for m in messages:
            role, content = m["role"], m["content"]
            if role in ("system", "developer"):
                parts.append(f"{content}\n\n")
            elif role == "user":
                parts.append(f"User: {content}\n\n")
            else:
                parts.append(f"Assistant: {content}\n\n")
        parts.append("Assistant:")
        return "".join(parts)

    def encode(self, messages: list, tokenizer) -> list:
        """The prompt's token ids. The messages' content is always ordinary text; of the
        special-token text in the rendered prompt only the template's own becomes special
        tokens. Special-token text inside a message is hidden behind a placeholder while the
        template renders (digits between private-use characters, which no case or whitespace
        filter changes) and restored afterwards as ordinary text. The text between the
        template's special tokens is encoded in one piece, so the tokens are those of
        ``encode(prompt, allowed_special="all")`` whenever no message holds special-token text."""
        if self.source is None:
            return encode_text(tokenizer, self.render(messages))
        specials = _special_tokens(tokenizer)
        if not specials:
            return encode_text(tokenizer, self.render(messages))
        find = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
        nonce = str(secrets.randbelow(10 ** 12))
        hidden: dict = {}

        def hide(m):
            key = f"\ue000{nonce}.{len(hidden)}\ue001"
            hidden[key] = m.group(0)
            return key

        text = self.render([{**m, "content": find.sub(hide, m["content"])} for m in messages])
        placeholder = re.compile("\ue000" + nonce + r"\.\d+\ue001")

        def ordinary(piece):
            if hidden:
                piece = placeholder.sub(lambda k: hidden.get(k.group(0), k.group(0)), piece)
            return encode_text(tokenizer, piece) if piece else []

        ids, pos = [], 0
        for m in find.finditer(text):
            ids += ordinary(text[pos:m.start()])
            ids.append(specials[m.group(0)])
            pos = m.end()
        return ids + ordinary(text[pos:])


def _special_tokens(tokenizer) -> dict:
    """{text: id} of the tokenizer's special tokens (fastlm's ``special_tokens``, or tiktoken's
    ``special_tokens_set`` with ``encode_single_token``)."""
    sp = getattr(tokenizer, "special_tokens", None)
    if isinstance(sp, dict):
        return dict(sp)
    names = getattr(tokenizer, "special_tokens_set", None) or ()
    single = getattr(tokenizer, "encode_single_token", None)
    return {t: single(t) for t in names} if callable(single) else {}


def encode_text(tokenizer, text):
    """Token ids of ``text`` as ordinary text: special-token text is encoded as its characters."""
    try:
        return list(tokenizer.encode(text, disallowed_special=()))
    except TypeError:
        return list(tokenizer.encode(text))
