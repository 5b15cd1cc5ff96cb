"""Streaming detokenization: text settled token by token.

Bytes are decoded incrementally (a character split across tokens is emitted only when
complete) and text that might begin a stop string is held back until it is decided, so the
concatenated deltas equal the final text.
"""
from __future__ import annotations

import codecs
from typing import Sequence

__all__ = ["TextStream"]


class TextStream:
    """Incremental detokenizer for one sequence: UTF-8 completed before emission, text that may
    start a stop string held back until decided. ``push`` returns the newly settled text."""

    def __init__(self, token_bytes, stop: Sequence[str] = ()):
        self._bytes = token_bytes
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._pending = ""  # decoded, not yet emitted
        self.pieces: list[str] = []
        self.stopped = False

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._pending += self._dec.decode(self._bytes(token_id))
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self._pending += self._dec.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text, hold = self._pending, 0
        if self._stop:
            hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
            if hits:
                out = text[:min(hits)]
                self._pending, self.stopped = "", True
                self.pieces.append(out)
                return out
            if not final:  # longest tail of the text that begins some stop string
                for s in self._stop:
                    for k in range(min(len(s) - 1, len(text)), hold, -1):
                        if text.endswith(s[:k]):
                            hold = k
                            break
        out = text[:len(text) - hold]
        self._pending = text[len(text) - hold:]
        if out:
            self.pieces.append(out)
        return out
