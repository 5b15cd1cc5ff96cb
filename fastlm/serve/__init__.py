"""``fastlm serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn, ``pip install fastlm[serve]``).

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (plain JSON or
server-sent events with ``"stream": true``), ``GET /health``, ``GET /metrics`` (Prometheus text), and
``GET /`` the playground, a web page that streams chats and completions through those routes
(``fastlm.serve.playground``; off with ``ServeConfig(playground=False)``).
Requests and responses have OpenAI's shapes, so the ``openai`` client, LangChain and
lm-evaluation-harness (``local-completions``: ``echo`` + ``logprobs`` give the prompt's
per-token log-probabilities) work unchanged. Sampling follows OpenAI: a ``temperature`` below
``GREEDY_TEMPERATURE`` (0 included) decodes greedily and the other sampling options are then
unused; otherwise the server samples. Besides OpenAI's ``presence_penalty``,
``frequency_penalty`` and ``logit_bias``, extra sampling fields as vLLM names them:
``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``. Harmless fields that change
nothing here (``user``, ``metadata``, ``store``, ...) are accepted and ignored, and named in
the ``X-Fastlm-Ignored-Fields`` response header; fields whose meaning would be lost
(``tools``, a ``response_format`` other than text, unknown names) get 400.

The model runs in one worker thread, ``fastlm.generation.Engine``: concurrent requests are decoded
together in one batched forward per step, joining and leaving the batch between steps. The
event loop only parses, tokenizes (in a thread pool), queues and formats; the engine hands
tokens back with ``loop.call_soon_threadsafe``. A client that disconnects frees its rows at the
next step.

Requests are validated by ``fastlm.serve.protocol``. Limits (``ServeConfig``): prompt tokens,
``max_tokens``, ``n``, concurrent sequences (cache rows) and waiting queue (beyond it 503 with
``Retry-After``), request body size (413) and nesting depth (400), request time (504, or an
error event in a stream); per connection (``fastlm.serve.net``): open connections (503), the
deadlines for headers (closed), body (408), idle keep-alive (closed), and each write of a
stream (a client that stops reading is dropped and its rows freed, as is one whose unsent
events pile past ``max_stream_events``). Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.

Security defaults: bound to loopback; the ``Host`` header must name an allowed host (by
default the loopback names, so a web page cannot reach the server by DNS rebinding); JSON
bodies need ``Content-Type: application/json`` (a cross-site form post cannot send it without
a CORS preflight, and CORS is off unless ``cors_origins`` is given). With an API key
(``--api-key`` or ``FASTLM_API_KEY``) every ``/v1`` route requires ``Authorization: Bearer <key>``.

One request cannot fail another (``fastlm.generation.engine``): ids the tokenizer cannot decode are
refused in prompts and never generated, sampling options are bounded, and an error in one
row ends its request alone. A model whose config names an end-of-text id outside its
vocabulary has it dropped with a warning when it loads.

Chat template: the tokenizer's, else the model directory's ``chat_template.jinja`` or the
``chat_template`` of its ``tokenizer_config.json`` (Hugging Face's convention, rendered exactly
as transformers renders it by ``fastlm.tokenizer.chat_template``, with the named special tokens
of ``tokenizer_config.json``; a template's ``raise_exception`` is a 400) when present; only the
template's own special tokens are encoded as special tokens, the messages' content always as
ordinary text (a user who types ``<|endoftext|>`` gets those characters, not the control
token). Otherwise the plain template for base models::

    {system message}\\n\\n            (each system/developer message, if any)
    User: {content}\\n\\n
    Assistant: {content}\\n\\n
    ...
    Assistant:

with ``"\\nUser:"`` as an extra stop string, so that a base model does not write the user's turn.

The package: ``app.py`` (routes, authentication, limits, server-sent events), ``protocol.py``
(request validation), ``responses.py`` (response shapes), ``chat_template.py`` (a re-export of
``fastlm.tokenizer.chat_template``), ``metrics.py``,
``net.py`` (connection limits and deadlines under uvicorn), ``config.py`` (``ServeConfig``),
``server.py`` (``serve``, ``ServerThread``), ``playground.py`` (the web page; its files in ``static/``).
"""
from .app import create_app
from .chat_template import ChatTemplate
from .config import ServeConfig
from .server import ServerThread, load, serve

__all__ = ["ServeConfig", "create_app", "serve", "ServerThread", "ChatTemplate", "load"]
