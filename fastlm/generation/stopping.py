"""The stop rules: when a sequence is finished, and why.

One function for generation and the server's engine alike. After each new token a sequence
stops with finish reason ``"stop"`` on an EOS token, on a stop string (matched on the text
settled so far, ``TextStream``) or on a stop token sequence; and with ``"length"`` once it
holds ``max_new_tokens`` new tokens or fills the context it runs in.
"""
from __future__ import annotations

__all__ = ["stop_reason"]


def stop_reason(opts, tokens: list, text, context_full: bool) -> tuple[str | None, str]:
    """The finish reason of a sequence whose newest token is ``tokens[-1]`` (None while it goes
    on), and the text that token settles (all the rest when it finishes). ``opts``: its
    ``SamplingOptions``; ``text``: its ``TextStream`` or None; ``context_full``: whether prompt
    and new tokens fill the context."""
    t = tokens[-1]
    reason, delta = None, ""
    if t in opts.eos:
        reason = "stop"  # the EOS token's own text is not shown
    else:
        if text is not None:
            delta = text.push(t)
            if text.stopped:
                reason = "stop"
        if reason is None and any(len(tokens) >= len(s) and tuple(tokens[-len(s):]) == s
                                  for s in opts.stop_token_seqs):
            reason = "stop"
    if reason is None and (len(tokens) >= opts.max_new_tokens or context_full):
        reason = "length"
    if reason is not None and text is not None:
        delta += text.finish()
    return reason, delta
