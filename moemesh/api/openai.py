"""The OpenAI API's shapes: a completion or chat request checked field by field (`parse`), the errors in
OpenAI's `{"error": {...}}` shape, and the response and stream-chunk bodies. Plain dicts in, plain dicts out:
no web framework here."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error"}
# Fields we do not implement: a request that sets one to anything but its default is refused, naming it.
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None, ""), "tools": (None, []), "functions": (None, []), "logit_bias": (None, {}),
               "presence_penalty": (None, 0), "frequency_penalty": (None, 0)}


class ApiError(Exception):
    """An error answered in OpenAI's shape: HTTP `status`, a message, the request field at fault (`param`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class Params:
    """What one completion asks for, checked; the prompt not yet tokenized."""

    model: str
    chat: bool
    messages: list[dict] = field(default_factory=list)  # chat: [{"role", "content": str}]
    prompt: str | list[int] = ""  # completions: text, or token ids
    max_tokens: int | None = None  # None: completions 16 (OpenAI's default), chat up to the context
    temperature: float = 1.0  # OpenAI's default; 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # not OpenAI's; llama.cpp and vLLM take it too
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"'{param}': {message}", param=param)


def _text(content: Any, param: str) -> str:
    """A message's content: a string, or a list of parts of which only text parts are taken."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(param, "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(param, "must be a string or a list of text parts")


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _bad("messages", "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "must be an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise _bad(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        out.append({"role": m["role"], "content": _text(m.get("content"), f"messages[{i}].content")})
    return out


def _prompt(value: Any) -> str | list[int]:
    """A string or a list of token ids; a list holding one of those is taken as that one (n = 1)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        return value
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise _bad("prompt", "one prompt per request (a batch of prompts is not supported)")
    raise _bad("prompt", "must be a non-empty string or a non-empty list of token ids")


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and len(value) <= 4 and all(isinstance(s, str) for s in value):
        return [s for s in value if s]
    raise _bad("stop", "must be a string or a list of at most 4 strings")


def parse(body: Any, chat: bool) -> Params:
    """Check a /v1/chat/completions (`chat`) or /v1/completions request body; ApiError(400) names the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "required: the model's name (GET /v1/models lists it)")
    for name, defaults in UNSUPPORTED.items():
        if name in body and body[name] not in defaults:
            raise _bad(name, "is not supported by this server")
    p = Params(model=model, chat=chat)
    if chat:
        p.messages = _messages(body.get("messages"))
    else:
        p.prompt = _prompt(body.get("prompt"))
    limit = body.get("max_completion_tokens") if body.get("max_completion_tokens") is not None else body.get("max_tokens")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise _bad(name, f"must be an integer >= 1, got {limit!r}")
    p.max_tokens = limit
    n = body.get("n")
    if n is not None and n != 1:
        raise _bad("n", f"only n = 1 is supported, got {n!r}")
    temperature = body.get("temperature")
    if temperature is not None:
        if not _is_number(temperature) or not 0 <= temperature <= 2:
            raise _bad("temperature", f"must be a number in [0, 2], got {temperature!r}")
        p.temperature = float(temperature)
    top_p = body.get("top_p")
    if top_p is not None:
        if not _is_number(top_p) or not 0 < top_p <= 1:
            raise _bad("top_p", f"must be a number in (0, 1], got {top_p!r}")
        p.top_p = float(top_p)
    top_k = body.get("top_k")
    if top_k is not None:
        if not _is_int(top_k) or top_k < 0:
            raise _bad("top_k", f"must be an integer >= 0, got {top_k!r}")
        p.top_k = top_k
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _bad("seed", f"must be an integer, got {seed!r}")
    p.seed = seed
    p.stop = _stop(body.get("stop"))
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", f"must be true or false, got {stream!r}")
    p.stream = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise _bad("stream_options", "must be an object like {\"include_usage\": true}")
        p.include_usage = options.get("include_usage", False)
    return p


# ---- responses
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(p: Params, rid: str, text: str, finish_reason: str, use: dict) -> dict:
    """The whole answer of a request that did not stream."""
    if p.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "chat.completion" if p.chat else "text_completion", "created": int(time.time()),
            "model": p.model, "choices": [choice], "usage": use}


def chunk(p: Params, rid: str, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
    """One streamed chunk: a text delta (`role`: the chat stream's first, naming the assistant), or the last one
    with the finish reason (text None)."""
    if p.chat:
        delta: dict = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    body = {"id": rid, "object": "chat.completion.chunk" if p.chat else "text_completion",
            "created": int(time.time()), "model": p.model, "choices": [choice]}
    if p.include_usage:
        body["usage"] = None  # as OpenAI: every chunk has the key, only the last carries the counts
    return body


def usage_chunk(p: Params, rid: str, use: dict) -> dict:
    """The stream's last chunk when stream_options.include_usage: no choices, the token counts."""
    return {"id": rid, "object": "chat.completion.chunk" if p.chat else "text_completion",
            "created": int(time.time()), "model": p.model, "choices": [], "usage": use}
