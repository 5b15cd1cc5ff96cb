"""The server's request protocol: OpenAI's error shape, and the validation of request bodies
(JSON parsing with a nesting limit and lone surrogates made U+FFFD, known, ignored and refused
fields, sampling options and their bounds, chat messages). Front end only: ``fastlm.serve.app``
builds the application from it."""
from __future__ import annotations

import json
import math
import re

from ..generation.sampling import GREEDY_TEMPERATURE, sampling_options

__all__ = ["APIError", "Sampling", "bad", "json_body", "parse_messages", "check_fields", "COMPLETION_FIELDS",
           "CHAT_FIELDS"]


# ----------------------------------------------------------------------------- errors
class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message, param=None, code=None):
    return APIError(400, message, "invalid_request_error", param, code)


# ----------------------------------------------------------------------------- request parsing
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options", "top_k",
           "min_p", "repetition_penalty", "ignore_eos", "presence_penalty", "frequency_penalty", "logit_bias",
           "logprobs"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                          "tool_choice"}
# Accepted and ignored: they label, store or route a request elsewhere, and change no token of
# the answer. Each one present is named in the X-Fastlm-Ignored-Fields response header.
_IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
            "parallel_tool_calls"}
_REPETITION_PENALTY = (0.01, 10.0)  # below the floor, logits divided by it lose all sense
_MAX_LOGIT_BIAS = 1024  # entries of logit_bias


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def get_int(body, name, default, lo, hi):
    v = body.get(name)
    if v is None:
        return default
    if not is_int(v):
        raise bad(f"'{name}' must be an integer, got {json.dumps(v)[:50]}", name, "invalid_type")
    if not lo <= v <= hi:
        raise bad(f"'{name}' must be between {lo} and {hi}, got {v}", name, "invalid_value")
    return v


def get_num(body, name, default, lo, hi, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    if not is_num(v):
        raise bad(f"'{name}' must be a number, got {json.dumps(v)[:50]}", name, "invalid_type")
    if not (lo < v if lo_open else lo <= v) or not v <= hi:
        raise bad(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name, "invalid_value")
    return float(v)


def get_bool(body, name, default):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean, got {json.dumps(v)[:50]}", name, "invalid_type")
    return v


def check_fields(body, allowed) -> list:
    """Refuse unknown fields; returns the names of the ignored ones present (sorted)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_json")
    for k in body:
        if k not in allowed and k not in _IGNORED:
            raise bad(f"Unrecognized request argument supplied: {k}", k, "unknown_parameter")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("'user' must be a string", "user", "invalid_type")
    return sorted(k for k in body if k in _IGNORED and body[k] is not None)


def _logit_bias(body, valid_id) -> dict | None:
    """OpenAI's ``logit_bias``: {"token id": bias in [-100, 100]} -> {id: bias}."""
    lb = body.get("logit_bias")
    if lb is None or lb == {}:
        return None
    if not isinstance(lb, dict):
        raise bad("'logit_bias' must be an object mapping token ids to numbers", "logit_bias", "invalid_type")
    if len(lb) > _MAX_LOGIT_BIAS:
        raise bad(f"'logit_bias' takes at most {_MAX_LOGIT_BIAS} entries", "logit_bias", "invalid_value")
    out = {}
    for k, v in lb.items():
        if not (isinstance(k, str) and k.isdigit() and len(k) <= 12 and valid_id(int(k))):
            raise bad(f"'logit_bias' keys must be token ids of this model's tokenizer, got {k[:20]!r}",
                       "logit_bias", "invalid_value")
        if not is_num(v) or not -100 <= v <= 100:
            raise bad(f"'logit_bias' values must be numbers in [-100, 100], got {json.dumps(v)[:40]}",
                       "logit_bias", "invalid_value")
        out[int(k)] = float(v)
    return out


class Sampling:
    """The options shared by both routes, validated."""

    def __init__(self, body, cfg, max_tokens, valid_id, extra_stop=()):  # cfg: a fastlm.serve.ServeConfig
        self.temperature = get_num(body, "temperature", 1.0, 0.0, 2.0)
        self.top_p = get_num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
        self.top_k = get_int(body, "top_k", -1, -1, 1 << 30)
        self.min_p = get_num(body, "min_p", 0.0, 0.0, 1.0)
        self.repetition_penalty = get_num(body, "repetition_penalty", 1.0, *_REPETITION_PENALTY)
        self.presence_penalty = get_num(body, "presence_penalty", 0.0, -2.0, 2.0)
        self.frequency_penalty = get_num(body, "frequency_penalty", 0.0, -2.0, 2.0)
        self.logit_bias = _logit_bias(body, valid_id)
        self.n = get_int(body, "n", 1, 1, cfg.max_n)
        self.seed = get_int(body, "seed", None, -(1 << 63), (1 << 63) - 1)
        self.stream = get_bool(body, "stream", False)
        so = body.get("stream_options")
        self.include_usage = False
        if so is not None:
            if not isinstance(so, dict) or set(so) - {"include_usage", "continuous_usage_stats"}:
                raise bad("'stream_options' must be an object with 'include_usage'", "stream_options", "invalid_type")
            if not self.stream:
                raise bad("'stream_options' is only allowed with 'stream': true", "stream_options", "invalid_value")
            self.include_usage = get_bool(so, "include_usage", False)
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
        if len(stop) > 16 or any(len(s) > 256 for s in stop):
            raise bad("'stop' takes at most 16 strings of at most 256 characters", "stop", "invalid_value")
        self.stop = [s for s in stop if s] + list(extra_stop)
        self.max_tokens = max_tokens
        self.ignore_eos = get_bool(body, "ignore_eos", False)

    def options(self, model, eos, prompt_lens, tokenizer, logprobs: bool, top_logprobs: int, max_new_tokens):
        """The engine's options. OpenAI's rule: the server samples unless the temperature is
        (below ``GREEDY_TEMPERATURE``, as vLLM rules) zero."""
        return sampling_options(model, prompt_lens, max_new_tokens, None, self.temperature >= GREEDY_TEMPERATURE,
                        self.temperature, self.top_k if self.top_k > 0 else None,
                        self.top_p if self.top_p < 1.0 else None, self.repetition_penalty, self.stop or None,
                        [] if self.ignore_eos else eos, tokenizer, logprobs, top_logprobs, "stop",
                        min_p=self.min_p or None, presence_penalty=self.presence_penalty,
                        frequency_penalty=self.frequency_penalty, logit_bias=self.logit_bias)


# ----------------------------------------------------------------------------- bodies
def json_body(raw: bytes, max_depth: int):
    """Parse a request body: nesting past ``max_depth`` is refused, and lone surrogates
    (``"\ud800"`` escapes, which no UTF-8 response can carry back) become U+FFFD, as the
    tokenizer reads them."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise bad(f"the request body is nested deeper than {max_depth} levels", None, "invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"invalid JSON in the request body: {e}", None, "invalid_json") from None
    fix = _SURROGATE_ESCAPE.search(raw) is not None
    if isinstance(body, str):
        return _fix_surrogates(body) if fix else body
    if not fix and raw.count(b"[") + raw.count(b"{") <= max_depth:
        return body  # too few brackets to nest deeper, and nothing to fix
    stack = [(body, 1)] if isinstance(body, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise bad(f"the request body is nested deeper than {max_depth} levels", None, "invalid_json")
        if isinstance(node, dict):
            if fix:
                for k in [k for k in node if _has_surrogate(k)]:
                    node[_fix_surrogates(k)] = node.pop(k)
            items = node.items()
        else:
            items = enumerate(node)
        for k, v in list(items):
            if isinstance(v, (dict, list)):
                stack.append((v, depth + 1))
            elif fix and isinstance(v, str) and _has_surrogate(v):
                node[k] = _fix_surrogates(v)
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _fix_surrogates(text: str) -> str:
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def disconnected():
    return APIError(499, "the client closed the connection", "invalid_request_error", None, "client_disconnected")


def parse_messages(messages):
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages",
                   "invalid_type" if messages is not None else "missing")
    out = []
    for i, m in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{p} must be an object", p, "invalid_type")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"{p}.role must be 'system', 'developer', 'user' or 'assistant', got {json.dumps(role)[:40]}",
                       f"{p}.role", "invalid_value")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise bad(f"{p} has unsupported fields {sorted(extra)}", p, "unknown_parameter")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise bad(f"{p}.content parts must be {{'type': 'text', 'text': ...}}", f"{p}.content",
                               "invalid_type")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise bad(f"{p}.content must be a string or a list of text parts", f"{p}.content", "invalid_type")
        out.append({"role": role, "content": content})
    return out
