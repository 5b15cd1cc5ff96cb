"""A chat with a model, turn by turn: the conversation, the window of it that fits the model's
context, and each reply streamed as it is generated (``fastlm chat`` is its terminal front end).

The prompt of a turn is the conversation rendered with the chat template
(``fastlm.tokenizer.chat_template``): the system message, then the latest turns that fit. The
context is shared between the prompt and the reply: the prompt may take ``block_size`` minus
``min(max_new_tokens, block_size // 2)`` tokens, so a reply always has room, and the oldest
turns (a user message and the assistant's reply to it) leave the window until the prompt fits.
The whole conversation is kept (``messages``, what ``save`` writes); only the window is sent.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from .._io import atomic_write_bytes
from ..tokenizer.chat_template import ChatTemplate
from .generate import stream

__all__ = ["ChatSession", "ContextFull"]


class ContextFull(ValueError):
    """The system message and the last user message alone do not fit the model's context."""


class ChatSession:
    """A conversation with ``model``: ``for delta in session.send("Hi"): print(delta, end="")``.

    ``template``: a ``ChatTemplate`` (default: the tokenizer's, else the plain one);
    ``system``: the system message; generation options (``max_new_tokens``, ``do_sample``,
    ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``stop``, ``eos_token_id``,
    ``seed``) are ``stream``'s. With a ``seed`` the n-th reply is drawn with ``seed + n``, so a
    scripted session is reproducible and its replies differ from each other."""

    def __init__(self, model, tokenizer, template: ChatTemplate | None = None, system: str | None = None,
                 max_new_tokens: int = 256, seed: int | None = None, **options):
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        self.model, self.tokenizer = model, tokenizer
        self.template = template if template is not None else ChatTemplate.for_tokenizer(tokenizer)
        self.max_new_tokens, self.seed = max_new_tokens, seed
        options.pop("max_length", None)  # the reply's length is max_new_tokens, bounded by the context
        self.options = options
        self.messages: list[dict] = []
        self.start = 0  # index into the turns (messages after the system message) of the window's first
        self.replies = 0
        self.set_system(system)

    # ------------------------------------------------------------------ the conversation
    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    def set_system(self, text: str | None) -> None:
        """Set (or with None or "" remove) the system message; the turns stay."""
        turns = self._turns()
        self.messages = ([{"role": "system", "content": text}] if text else []) + turns

    def reset(self) -> None:
        """Forget the turns; the system message stays."""
        self.messages = self.messages[:1] if self.system is not None else []
        self.start = 0

    def _turns(self) -> list[dict]:
        return self.messages[1:] if self.system is not None else list(self.messages)

    def window(self) -> list[dict]:
        """The messages the next prompt is made of: the system message and the turns in the window."""
        head = self.messages[:1] if self.system is not None else []
        return head + self._turns()[self.start:]

    def save(self, path) -> Path:
        """Write the whole conversation (system message included) as a JSON list of
        ``{"role", "content"}`` messages, atomically."""
        path = Path(path)
        atomic_write_bytes(path, (json.dumps(self.messages, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
        return path

    # ------------------------------------------------------------------ the context
    @property
    def prompt_budget(self) -> int:
        """Tokens the prompt may take: the context less the room kept for the reply."""
        block = self.model.config.block_size
        return block - min(self.max_new_tokens, block // 2)

    def prompt_ids(self) -> list[int]:
        """The next prompt's ids; the oldest turns leave the window until it fits
        ``prompt_budget``. ``ContextFull`` when the system message and the last message alone
        do not fit (the window is then left as it was)."""
        start = self.start
        while True:
            ids = self.template.encode(self.window(), self.tokenizer, add_generation_prompt=True)
            if len(ids) <= self.prompt_budget:
                return ids
            turns = self._turns()
            if len(turns) - self.start <= 1:
                self.start = start
                raise ContextFull(f"the message does not fit the model's context: the prompt is {len(ids)} tokens, "
                                  f"the room for it {self.prompt_budget} (context {self.model.config.block_size}, "
                                  f"{self.model.config.block_size - self.prompt_budget} kept for the reply)")
            # one turn leaves: its user message and everything up to the next user message
            self.start += 1
            while self.start < len(turns) - 1 and turns[self.start]["role"] != "user":
                self.start += 1

    # ------------------------------------------------------------------ a turn
    def send(self, text: str) -> Iterator[str]:
        """Add the user's message and yield the reply's text as it is generated. The reply
        (whole, or as far as it got when the generator is closed or interrupted, e.g. by
        Ctrl-C) becomes the assistant's message. A message that cannot fit is removed again and
        raises ``ContextFull``."""
        if not isinstance(text, str):
            raise TypeError(f"a message must be a string, got {type(text).__name__}")
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self.prompt_ids()
        except BaseException:
            self.messages.pop()
            raise
        room = self.model.config.block_size - len(ids)
        opts = dict(self.options)
        stop = opts.get("stop")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        opts["stop"] = stop + [s for s in self.template.stop if s not in stop]
        if self.seed is not None:
            opts["seed"] = self.seed + self.replies
        self.replies += 1
        pieces: list[str] = []
        try:
            for delta in stream(self.model, self.tokenizer, ids, max_new_tokens=min(self.max_new_tokens, room), **opts):
                pieces.append(delta)
                yield delta
        finally:
            self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})
