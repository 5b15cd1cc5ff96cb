"""OpenAI's response shapes for completions and chat completions, whole or as stream chunks.

A ``Format`` records a request's engine events (tokens, log-probabilities, finish reasons)
and gives the chunks each event makes in a stream (``event``) or the whole response at the
end (``final``); ``st`` is the app's state (tokenizer, config), ``sampling`` the request's
validated fields (``fastlm.serve.protocol.Sampling``).
"""
from __future__ import annotations

import json
import secrets
import time

__all__ = ["Format", "CompletionFormat", "ChatFormat", "sse"]


def sse(obj) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


class Format:
    def __init__(self, st, sampling, prompts):
        self.st, self.s, self.prompts = st, sampling, prompts
        self.id = self.prefix + secrets.token_hex(12)
        self.created = int(time.time())
        n = len(prompts) * sampling.n
        self.texts = [[] for _ in range(n)]
        self.tokens = [[] for _ in range(n)]
        self.lps = [[] for _ in range(n)]
        self.tops = [[] for _ in range(n)]
        self.reasons = [None] * n
        self.prompt_lp = [None] * n

    def prompt_of(self, i):
        return self.prompts[i // self.s.n]

    def usage(self):
        p = sum(len(q) for q in self.prompts)
        c = sum(len(t) for t in self.tokens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def record(self, ev):
        if ev[0] == "token":
            _, i, t, delta, lp, top = ev
            self.tokens[i].append(t)
            self.texts[i].append(delta)
            self.lps[i].append(lp)
            self.tops[i].append(top)
        elif ev[0] == "finish":
            self.reasons[ev[1]] = ev[2]
        elif ev[0] == "prompt_logprobs":
            self.prompt_lp[ev[1]] = (ev[2], ev[3])

    def tok_str(self, t):
        return self.st.tokenizer.decode([t])

    def start(self):
        return []

    def usage_chunk(self):
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.st.cfg.model_name,
                "choices": [], "usage": self.usage()}


class CompletionFormat(Format):
    prefix = "cmpl-"
    chunk_object = "text_completion"

    def __init__(self, st, sampling, prompts, texts, echo, logprobs):
        super().__init__(st, sampling, prompts)
        self.echo, self.k = echo, logprobs
        self.prompt_texts = [t if isinstance(t, str) else st.tokenizer.decode(t) for t in texts]
        self.echoed = set()

    def logprobs_obj(self, i, prompt_part: bool, tokens, lps, tops, offset0):
        if self.k is None:
            return None
        toks, tlp, ttop, offs = [], [], [], []
        off = offset0
        seq = []
        if prompt_part:
            plp, ptop = self.prompt_lp[i] or ([None] * len(self.prompt_of(i)), None)
            seq += [(t, plp[j], ptop[j] if ptop else None) for j, t in enumerate(self.prompt_of(i))]
        seq += list(zip(tokens, lps, tops))
        for t, lp, top in seq:
            s = self.tok_str(t)
            toks.append(s)
            tlp.append(lp)
            ttop.append(None if top is None else {self.tok_str(a): b for a, b in top} if self.k else None)
            offs.append(off)
            off += len(s)
        return {"tokens": toks, "token_logprobs": tlp, "top_logprobs": ttop, "text_offset": offs}

    def event(self, ev):
        self.record(ev)
        if not self.s.stream or ev[0] == "prompt_logprobs":
            return []
        i = ev[1]
        chunks = []
        text, lp_obj = "", None
        if self.echo and i not in self.echoed:
            self.echoed.add(i)
            text = self.prompt_texts[i // self.s.n]
            lp_obj = self.logprobs_obj(i, True, [], [], [], 0) if self.k is not None else None
            if lp_obj is not None or text:
                chunks.append(self.chunk(i, text, lp_obj, None))
        if ev[0] == "token":
            lp = self.logprobs_obj(i, False, [ev[2]], [ev[4]], [ev[5]], 0) if self.k is not None else None
            chunks.append(self.chunk(i, ev[3], lp, None))
        elif ev[0] == "finish":
            chunks.append(self.chunk(i, "", None, ev[2]))
        return chunks

    def chunk(self, i, text, lp, reason):
        c = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.st.cfg.model_name,
             "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": reason}]}
        if self.s.include_usage:
            c["usage"] = None
        return c

    def final(self):
        choices = []
        for i in range(len(self.texts)):
            text = "".join(self.texts[i])
            if self.echo:
                text = self.prompt_texts[i // self.s.n] + text
            choices.append({"index": i, "text": text, "finish_reason": self.reasons[i],
                            "logprobs": self.logprobs_obj(i, self.echo, self.tokens[i], self.lps[i], self.tops[i], 0)})
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.st.cfg.model_name,
                "system_fingerprint": None, "choices": choices, "usage": self.usage()}


class ChatFormat(Format):
    prefix = "chatcmpl-"
    chunk_object = "chat.completion.chunk"

    def __init__(self, st, sampling, prompts, logprobs):
        super().__init__(st, sampling, prompts)
        self.want_lp = logprobs

    def lp_entries(self, tokens, lps, tops):
        out = []
        for t, lp, top in zip(tokens, lps, tops):
            s = self.tok_str(t)
            b = list(self.st.tokenizer.decode_bytes([t]))
            out.append({"token": s, "logprob": lp, "bytes": b,
                        "top_logprobs": [{"token": self.tok_str(a), "logprob": v,
                                          "bytes": list(self.st.tokenizer.decode_bytes([a]))} for a, v in (top or [])]})
        return out

    def start(self):
        return [self.chunk(i, {"role": "assistant", "content": ""}, None, None) for i in range(len(self.texts))]

    def event(self, ev):
        self.record(ev)
        if not self.s.stream:
            return []
        i = ev[1]
        if ev[0] == "token":
            lp = {"content": self.lp_entries([ev[2]], [ev[4]], [ev[5]])} if self.want_lp else None
            if not ev[3] and lp is None:
                return []
            return [self.chunk(i, {"content": ev[3]}, lp, None)]
        if ev[0] == "finish":
            return [self.chunk(i, {}, None, ev[2])]
        return []

    def chunk(self, i, delta, lp, reason):
        c = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
             "model": self.st.cfg.model_name, "system_fingerprint": None,
             "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}]}
        if self.s.include_usage:
            c["usage"] = None
        return c

    def final(self):
        choices = []
        for i in range(len(self.texts)):
            lp = {"content": self.lp_entries(self.tokens[i], self.lps[i], self.tops[i])} if self.want_lp else None
            choices.append({"index": i, "message": {"role": "assistant", "content": "".join(self.texts[i])},
                            "logprobs": lp, "finish_reason": self.reasons[i]})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.st.cfg.model_name,
                "system_fingerprint": None, "choices": choices, "usage": self.usage()}
