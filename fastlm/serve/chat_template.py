"""The server's chat templates: ``fastlm.tokenizer.chat_template`` (one module for the tokenizer,
the pipelines, the chat command and the server), under the name it has always had here."""
from ..tokenizer.chat_template import PLAIN_STOP, ChatTemplate, ChatTemplateError, encode_text

__all__ = ["ChatTemplate", "ChatTemplateError", "PLAIN_STOP", "encode_text"]
