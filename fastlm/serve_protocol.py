"""Former home of the server's request validation, kept so that ``fastlm.serve_protocol``
imports keep working: it is now ``fastlm.serve.protocol``."""
from .serve.protocol import (CHAT_FIELDS, COMPLETION_FIELDS, APIError, Sampling, bad, check_fields, disconnected,
                             get_bool, get_int, is_int, json_body, parse_messages)

__all__ = ["APIError"]

# The former private names.
_CHAT_FIELDS, _COMPLETION_FIELDS, _Sampling = CHAT_FIELDS, COMPLETION_FIELDS, Sampling
_bad, _check_fields, _disconnected, _get_bool = bad, check_fields, disconnected, get_bool
_get_int, _is_int, _json_body, _messages = get_int, is_int, json_body, parse_messages
