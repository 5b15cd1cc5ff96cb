"""Chat messages to prompt text and tokens, rendered as Hugging Face transformers renders them.

A chat template is a Jinja2 template (a model directory's ``chat_template.jinja``, or the
``chat_template`` of its ``tokenizer_config.json``). It is compiled in transformers' environment
(``transformers.utils.chat_template_utils``): ``ImmutableSandboxedEnvironment(trim_blocks=True,
lstrip_blocks=True)`` with the ``loopcontrols`` extension (``{% break %}``, ``{% continue %}``)
and a ``{% generation %}`` block that renders its body; the globals ``raise_exception(msg)``,
``strftime_now(format)``, ``dict`` and ``namespace`` (no underscore names); the filter
``tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)``, plain
``json.dumps`` (no HTML escaping, keys in the caller's order). The template sees ``messages``,
``tools``, ``documents``, ``add_generation_prompt``, the tokenizer's named special tokens
(``bos_token``, ``eos_token``, ``unk_token``, ``sep_token``, ``pad_token``, ``cls_token``,
``mask_token``, those the tokenizer names) and any extra keyword arguments, each rebuilt from
plain JSON types first (a message's keys whose value is None are dropped), as transformers does.
A template's ``raise_exception``, its syntax errors and its failures while rendering are a
``ChatTemplateError`` (a ``ValueError``) naming the cause.

A model without a template (a base model) gets the plain one: ``"User: ...\\n\\nAssistant: ..."``
turns, a system message as a paragraph of its own, and ``"\\nUser:"`` as a stop string.
"""
from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from .._io import MAX_JSON_BYTES, CheckpointError, read_json

__all__ = ["ChatTemplate", "ChatTemplateError", "SPECIAL_TOKEN_NAMES", "PLAIN_STOP", "apply_chat_template",
           "encode_text", "read_chat_template", "special_tokens_map"]

# The named special tokens a template sees (transformers' ``SPECIAL_TOKENS_ATTRIBUTES``).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# The plain template's stop string: the model starting the user's next turn ends its reply.
PLAIN_STOP = "\nUser:"
# Message keys a reasoning text is passed under; templates read the first (transformers' aliases).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class ChatTemplateError(ValueError):
    """A chat template that does not compile, raised an exception (``raise_exception``), or
    failed while rendering the given messages."""


# ----------------------------------------------------------------------------- the Jinja environment
@lru_cache(maxsize=32)
def _compile(source: str):
    """The template compiled in transformers' environment (cached by its text)."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2>=3.1.6: pip install 'jinja2>=3.1.6'") from None
    if tuple(int(x) for x in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        # older versions have known sandbox escapes, and a template from a model directory is untrusted
        raise ImportError(f"chat templates need jinja2>=3.1.6 (its sandbox fixes), found {jinja2.__version__}")

    class GenerationBlock(jinja2.ext.Extension):
        # ``{% generation %}...{% endgeneration %}`` marks the assistant's text for transformers'
        # assistant-token masks; rendering, it is its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class TemplateDict:
        # ``dict(...)`` and ``dict.fromkeys(...)`` without the type itself (no attribute access to it).
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # A namespace that refuses underscore names, which could reach Python's internals.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"a chat template cannot store the underscore name {name!r} on a namespace")

    def raise_exception(message):
        raise _RaisedByTemplate(str(message))

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e.message} (line {e.lineno})") from None


class _RaisedByTemplate(Exception):
    """``raise_exception(message)`` called by a template."""


def _plain(value):
    """``value`` rebuilt from plain JSON types (str, int, float, bool, None, dicts, lists,
    tuples); anything else becomes ``"<TypeName>"``, so a template never reaches an object's
    methods. Subclasses of str, int and float are cut back to their base type."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    item = getattr(value, "item", None)  # numpy and torch scalars
    if callable(item) and getattr(value, "shape", None) == ():
        return _plain(item())
    return f"<{type(value).__name__}>"


def _messages(conversation) -> list:
    """The conversation's messages as transformers hands them to a template: dicts whose
    None-valued keys are dropped, plain data, reasoning copied under its aliases."""
    if not isinstance(conversation, (list, tuple)):
        raise TypeError(f"a conversation must be a list of messages (dicts), got {type(conversation).__name__}")
    out = []
    for i, m in enumerate(conversation):
        if not isinstance(m, Mapping):
            raise TypeError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        m = _plain({k: v for k, v in m.items() if v is not None})
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


# ----------------------------------------------------------------------------- files
def _token_text(value):
    """A special token's text from ``tokenizer_config.json``: a string, or an AddedToken
    written as a dict with ``content``; None otherwise."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def special_tokens_map(config) -> dict:
    """{name: text} of the named special tokens (``bos_token``, ``eos_token``, ...) a
    ``tokenizer_config.json`` object names."""
    if not isinstance(config, Mapping):
        return {}
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        text = _token_text(config.get(name))
        if text is not None:
            out[name] = text
    return out


def _pick_template(value, where):
    """The template text from ``tokenizer_config.json``'s ``chat_template``: a string, or a list
    of ``{"name", "template"}`` (several named templates), of which the one named "default"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ChatTemplateError(f"{where}: several chat templates ({sorted(map(str, named))}) and none named "
                                "'default'; pass chat_template=")
    raise ChatTemplateError(f"{where}: chat_template must be a string or a list of named templates")


def read_chat_template(directory) -> tuple:
    """(template text or None, {name: special token text}) of a tokenizer or model directory:
    ``chat_template.jinja`` wins over ``tokenizer_config.json``'s ``chat_template``, as in
    transformers; the special tokens are ``tokenizer_config.json``'s. Files are read up to
    ``MAX_JSON_BYTES``; a damaged one is a ``ValueError`` naming it."""
    d = Path(directory)
    config = {}
    cfg_path = d / "tokenizer_config.json"
    if cfg_path.is_file():
        config = read_json(cfg_path)
        if not isinstance(config, dict):
            raise CheckpointError(f"{cfg_path} must hold a JSON object")
    source = _pick_template(config.get("chat_template"), cfg_path)
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        with open(jinja, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise CheckpointError(f"{jinja} is longer than a chat template may be ({MAX_JSON_BYTES} bytes)")
        try:
            source = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{jinja} is not UTF-8 text: {e}") from None
    return source, special_tokens_map(config)


# ----------------------------------------------------------------------------- the template
class ChatTemplate:
    """Messages to prompt text: a Jinja2 chat template rendered as transformers renders it, or
    the plain template for base models (``source=None``).

    ``special_tokens``: {name: text} of the named special tokens the template sees
    (``bos_token``, ``eos_token``, ...); ``bos_token``/``eos_token`` fill those two when the map
    does not name them."""

    def __init__(self, source: str | None = None, bos_token: str | None = None, eos_token: str | None = None,
                 special_tokens: Mapping | None = None):
        if source is not None and not isinstance(source, str):
            raise TypeError(f"a chat template must be a string, got {type(source).__name__}")
        self.source = source
        tokens = {k: str(v) for k, v in (special_tokens or {}).items() if v is not None}
        unknown = set(tokens) - set(SPECIAL_TOKEN_NAMES)
        if unknown:
            raise ValueError(f"special_tokens names {sorted(unknown)}; the names are {list(SPECIAL_TOKEN_NAMES)}")
        for name, value in (("bos_token", bos_token), ("eos_token", eos_token)):
            if value and name not in tokens:
                tokens[name] = value
        self.special_tokens = tokens
        self._template = _compile(source) if source is not None else None

    @property
    def bos_token(self) -> str:
        return self.special_tokens.get("bos_token", "")

    @property
    def eos_token(self) -> str:
        return self.special_tokens.get("eos_token", "")

    @property
    def stop(self) -> list:
        """Stop strings a reply needs beyond the end-of-text token: the plain template's next turn."""
        return [] if self.source is not None else [PLAIN_STOP]

    @classmethod
    def from_dir(cls, path, bos_token: str | None = None, eos_token: str | None = None):
        """The template of a model or tokenizer directory (``read_chat_template``), the plain one
        when it has none; ``bos_token``/``eos_token`` stand in for tokens its
        ``tokenizer_config.json`` does not name."""
        path = Path(path)
        if not path.is_dir():
            return cls(None, bos_token=bos_token, eos_token=eos_token)
        source, tokens = read_chat_template(path)
        return cls(source, bos_token=bos_token, eos_token=eos_token, special_tokens=tokens)

    @classmethod
    def for_tokenizer(cls, tokenizer, model_dir=None):
        """The template that goes with ``tokenizer``: its own (a ``fastlm.Tokenizer`` loaded from a
        directory holding one, or given one), else ``model_dir``'s, else the plain one. The
        special tokens are the tokenizer's named ones, else the directory's; the tokenizer's
        end-of-text token stands in for an ``eos_token`` neither names."""
        eot = getattr(tokenizer, "eot_token", None)
        eos = None
        if eot is not None:
            try:
                eos = tokenizer.decode([eot])
            except Exception:  # a tokenizer that cannot decode its own id: no stand-in
                eos = None
        own = getattr(tokenizer, "chat_template", None)
        tokens = getattr(tokenizer, "special_tokens_map", None)
        tokens = dict(tokens) if isinstance(tokens, Mapping) else None
        if isinstance(own, str):
            return cls(own, eos_token=eos, special_tokens=tokens)
        if model_dir is not None and Path(model_dir).is_dir():
            source, dir_tokens = read_chat_template(model_dir)
            return cls(source, eos_token=eos, special_tokens=tokens if tokens is not None else dir_tokens)
        return cls(None, eos_token=eos, special_tokens=tokens)

    # ------------------------------------------------------------------ rendering
    def render(self, messages, add_generation_prompt: bool = True, *, tools=None, documents=None,
               continue_final_message: bool | str = False, **kwargs) -> str:
        """The prompt text of one conversation (a list of ``{"role", "content", ...}`` dicts).

        ``add_generation_prompt``: end with the header of the assistant's turn (the template
        decides what that is; the plain template's is ``"Assistant:"``).
        ``continue_final_message``: end inside the last message, so the model continues it
        (a prefill); True continues its ``content``, a string names another field.
        ``tools``, ``documents`` and ``kwargs`` are passed to the template as transformers does."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set: a prompt either "
                             "continues the last message or starts the assistant's turn")
        chat = _messages(messages)
        if not chat:
            raise ValueError("cannot apply a chat template to an empty conversation")
        if self._template is None:
            return self._render_plain(chat, add_generation_prompt, continue_final_message)
        if tools is not None:
            if not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) for t in tools):
                raise TypeError("tools must be a list of JSON schemas (dicts)")
        if documents is not None:
            if not isinstance(documents, (list, tuple)) or not all(isinstance(d, Mapping) for d in documents):
                raise TypeError("documents must be a list of dicts (with 'title' and 'text')")
        final = None
        if continue_final_message:
            final = self._tag_final(chat, continue_final_message)
        variables = _plain({**self.special_tokens, **kwargs})
        text = self._render(chat, _plain(tools), _plain(documents), add_generation_prompt, variables)
        if continue_final_message:
            text = self._cut_at_tag(text, final)
        return text

    def _render(self, chat, tools, documents, add_generation_prompt, variables) -> str:
        import jinja2

        try:
            return self._template.render(messages=chat, tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except _RaisedByTemplate as e:
            raise ChatTemplateError(f"the chat template refused the messages: {e}") from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None
        except (TypeError, ValueError, LookupError, ArithmeticError, AttributeError, RecursionError) as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None

    def _tag_final(self, chat, continue_final_message):
        """Mark the end of the last message with a tag (transformers' way of finding where to
        cut the rendered prompt); returns the message's text before the tag."""
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final = chat[-1].get(field)
        if final is None:
            raise ValueError(f"continue_final_message: the last message has no {field!r} to continue")
        fields = [field]
        if field in _REASONING_FIELDS:
            fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final]
        if not any(f in self.source for f in fields):
            raise ValueError(f"continue_final_message: the chat template does not read {field!r}")
        if isinstance(final, (list, tuple)):
            for block in reversed(final):
                if isinstance(block, dict) and "text" in block:
                    final = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise ValueError("continue_final_message: the last message has no text to continue")
        else:
            for f in fields:
                chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
        return final

    @staticmethod
    def _cut_at_tag(text, final) -> str:
        if str(final).strip() not in text or _CONTINUE_TAG.strip() not in text:
            raise ChatTemplateError("continue_final_message: the chat template does not render the last message "
                                    "as given, so the prompt cannot end inside it")
        at = text.rindex(_CONTINUE_TAG.strip())
        if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            return text[:at]
        return text[:at].rstrip()  # the template trimmed the message's trailing space

    @staticmethod
    def _render_plain(chat, add_generation_prompt, continue_final_message) -> str:
        parts = []
        for i, m in enumerate(chat):
            role, content = m.get("role"), m.get("content", "")
            if not isinstance(content, str):
                raise ValueError(f"message {i}: the plain chat template takes string content, "
                                 f"got {type(content).__name__}")
            last = continue_final_message and i == len(chat) - 1
            if role in ("system", "developer"):
                parts.append(content if last else f"{content}\n\n")
            elif role == "user":
                parts.append(f"User: {content}" if last else f"User: {content}\n\n")
            else:
                parts.append(f"Assistant: {content}" if last else f"Assistant: {content}\n\n")
        if add_generation_prompt:
            parts.append("Assistant:")
        return "".join(parts)

    # ------------------------------------------------------------------ tokens
    def encode(self, messages, tokenizer, add_generation_prompt: bool = True, **kwargs) -> list:
        """The prompt's token ids. The messages' content is always ordinary text; of the
        special-token text in the rendered prompt only the template's own becomes special
        tokens. Special-token text inside a message is hidden behind a placeholder while the
        template renders (digits between private-use characters, which no case or whitespace
        filter changes) and restored afterwards as ordinary text. The text between the
        template's special tokens is encoded in one piece, so the tokens are those of
        ``encode(prompt, allowed_special="all")`` whenever no message holds special-token text.
        ``add_generation_prompt`` and ``kwargs`` are ``render``'s."""
        if self.source is None:
            return encode_text(tokenizer, self.render(messages, add_generation_prompt, **kwargs))
        specials = _special_tokens(tokenizer)
        if not specials:
            return encode_text(tokenizer, self.render(messages, add_generation_prompt, **kwargs))
        find = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
        nonce = str(secrets.randbelow(10 ** 12))
        hidden: dict = {}

        def hide(m):
            key = f"\ue000{nonce}.{len(hidden)}\ue001"
            hidden[key] = m.group(0)
            return key

        def hide_all(value):
            if isinstance(value, str):
                return find.sub(hide, value)
            if isinstance(value, Mapping):
                return {k: hide_all(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [hide_all(v) for v in value]
            return value

        text = self.render(hide_all(_messages(messages)), add_generation_prompt, **kwargs)
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


def apply_chat_template(tokenizer, conversation, add_generation_prompt: bool = True, tokenize: bool = False, *,
                        chat_template: str | None = None, tools=None, documents=None,
                        continue_final_message: bool | str = False, **kwargs):
    """``tokenizer.apply_chat_template``: one conversation (a list of message dicts) or a batch
    (a list of them) rendered with ``chat_template``, else the tokenizer's own template, else
    the plain one; the template sees the tokenizer's ``special_tokens_map``. Returns the text
    (a list of texts for a batch), or with ``tokenize=True`` the ids (``ChatTemplate.encode``:
    special-token text inside a message stays ordinary text)."""
    if not isinstance(conversation, (list, tuple)):
        raise TypeError(f"apply_chat_template takes a list of messages or a list of conversations, "
                        f"got {type(conversation).__name__}")
    if not conversation:
        raise ValueError("cannot apply a chat template to an empty conversation")
    batched = isinstance(conversation[0], (list, tuple))
    conversations = list(conversation) if batched else [conversation]
    source = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    tokens = getattr(tokenizer, "special_tokens_map", None)
    template = ChatTemplate(source, special_tokens=tokens if isinstance(tokens, Mapping) else None)
    opts = dict(tools=tools, documents=documents, continue_final_message=continue_final_message, **kwargs)
    if tokenize:
        out = [template.encode(c, tokenizer, add_generation_prompt, **opts) for c in conversations]
    else:
        out = [template.render(c, add_generation_prompt, **opts) for c in conversations]
    return out if batched else out[0]
