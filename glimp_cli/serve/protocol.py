"""The OpenAI wire format: request bodies checked into a `CompletionRequest`, responses and chunks built.

How a request becomes a trace: glimp routes one assistant turn per request. A chat's messages become
a `Conversation` (system and developer texts, then alternating user and assistant turns ending with the
user turn to answer); each model of the pair writes the whole conversation in its own prompt format
(its chat template, or a plain template's `turn` and `system_turn`) and the trace is the new assistant
turn. A single user message stays a plain question, as the completions endpoint's `prompt` is. Tool
calls, tool messages and non-text parts cannot be written in those formats and are refused with a 400
that says so. The response content is the whole trace: every step's text joined by the pair's delimiter.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from glimp_cli.config import PairSpec, PromptFormat, check_pair_values
from glimp_cli.engine import pair_policy
from glimp_cli.errors import ConfigError
from glimp_cli.policies import MODES
from glimp_cli.prompts import Conversation, Turn, conversation_refusal

MODEL_PREFIX = "glimp/"
MAX_STOP_STRINGS = 4
# Fields an OpenAI client may send that glimp accepts at their neutral value only: key -> test.
_NEUTRAL = {
    "frequency_penalty": lambda v: v in (None, 0, 0.0),
    "presence_penalty": lambda v: v in (None, 0, 0.0),
    "logit_bias": lambda v: not v,
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"),
    "logprobs": lambda v: v in (None, False, 0),
    "top_logprobs": lambda v: v in (None, 0),
    "modalities": lambda v: v in (None, ["text"]),
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    "echo": lambda v: v in (None, False),
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: v in (None, ""),
}
_IGNORED = {"user", "metadata", "store", "service_tier", "reasoning_effort", "web_search_options",
            "parallel_tool_calls"}
_STANDARD = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n",
             "stream", "stream_options"}
# glimp's own per-request settings, sent by OpenAI clients as extra body fields.
GLIMP_FIELDS = ("tau", "mode", "large_share", "max_step_tokens")
_CHAT_ONLY = {"messages", "max_completion_tokens", "tools", "tool_choice", "functions", "function_call",
              "parallel_tool_calls", "top_logprobs", "response_format", "modalities", "audio", "prediction",
              "store", "reasoning_effort", "web_search_options", "metadata", "service_tier"}
_TEXT_ONLY = {"prompt", "echo", "best_of", "suffix"}


class ApiError(Exception):
    """A request the API refuses: its HTTP status and OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServedPair:
    """A pair the server holds, with what the API needs to know about it."""

    spec: PairSpec  # the server's settings for the pair (flags > environment > models.yaml)
    formats: dict[str, PromptFormat]  # model name -> its prompt format
    mode_ids: tuple[str, ...] = MODES

    def model_ids(self) -> list[str]:
        base = MODEL_PREFIX + self.spec.name
        return [base] + [f"{base}:{mode}" for mode in self.mode_ids]


@dataclass(frozen=True)
class CompletionRequest:
    """A checked request: the question, the pair with this request's settings, and how to answer."""

    kind: str  # "chat" | "text"
    model: str  # the model id as the client sent it
    pair: PairSpec
    question: str  # the question, or a Conversation (a str whose last user turn is the question)
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    prompt_tokens: dict[str, int] = dataclasses.field(default_factory=dict)  # per model role, set by fit_context


def parse_request(kind: str, body: Any, pairs: dict[str, ServedPair]) -> CompletionRequest:
    """Check an OpenAI request body for `/v1/chat/completions` ("chat") or `/v1/completions` ("text")."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    common = _STANDARD | set(_NEUTRAL) | _IGNORED | set(GLIMP_FIELDS)
    allowed = (common - _TEXT_ONLY) | {"messages"} if kind == "chat" else (common - _CHAT_ONLY) | {"prompt"}
    for key in body:
        if key not in allowed:
            raise ApiError(400, f"Unrecognized request argument supplied: {key}", param=key)
    for key, neutral in _NEUTRAL.items():
        if key in body and not neutral(body[key]):
            raise ApiError(400, f"{key} is not supported by glimp (leave it out)", param=key,
                           code="unsupported_parameter")
    served, mode = resolve_model(body.get("model"), pairs)
    question = chat_question(body.get("messages")) if kind == "chat" else text_question(body.get("prompt"))
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise ApiError(400, f"n must be 1: glimp writes one trace per request (got {n!r})", param="n")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise ApiError(400, "stream_options must be an object with include_usage true or false", param="stream_options")
    values = _settings(body, mode)
    pair = served.spec
    try:
        pair = dataclasses.replace(pair, **values)
        check_pair_values(pair, lambda key: key)
    except ConfigError as exc:
        key = str(exc).split(":", 1)[0]
        raise ApiError(400, str(exc), param=key) from None
    if isinstance(question, Conversation):
        check_formats(question, served, pair)
    return CompletionRequest(kind, body["model"], pair, question, _stop(body.get("stop")), bool(stream),
                             bool((options or {}).get("include_usage")))


def resolve_model(model: Any, pairs: dict[str, ServedPair]) -> tuple[ServedPair, str | None]:
    """The served pair and mode a model id names: `glimp/PAIR` or `glimp/PAIR:MODE` (the prefix may be left out)."""
    if model is None:
        raise ApiError(400, "you must provide a model parameter", param="model")
    if not isinstance(model, str):
        raise ApiError(400, "model must be a string", param="model")
    name = model[len(MODEL_PREFIX):] if model.startswith(MODEL_PREFIX) else model
    name, _, mode = name.partition(":")
    served = pairs.get(name)
    if served is None or (mode and mode not in served.mode_ids):
        known = ", ".join(i for p in pairs.values() for i in p.model_ids()[:1])
        raise ApiError(404, f"The model {model!r} does not exist (this server has {known}, each also as "
                            f"{MODEL_PREFIX}PAIR:MODE for a mode of {', '.join(MODES)}; see /v1/models)",
                       param="model", code="model_not_found")
    return served, mode or None


CHAT_ROLES = ("system", "developer", "user", "assistant")


def chat_question(messages: Any) -> str | Conversation:
    """The question of a chat: one user message's text, or the whole conversation.

    System and developer messages, wherever they stand, make the client's system text (in order, a
    blank line between); consecutive messages of one role are joined by a blank line.
    """
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of messages", param="messages")
    system: list[str] = []
    turns: list[Turn] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"{where} must be an object with a role", param=where)
        role = message["role"]
        if role in ("tool", "function") or message.get("tool_calls") or message.get("function_call"):
            what = f"a {role} message" if role in ("tool", "function") else "a tool call"
            raise ApiError(400, f"{where}: {what} cannot be rendered: glimp serve takes no tools, and the pair's "
                                "prompt formats have no tool turns", param=where)
        if role not in CHAT_ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(CHAT_ROLES)} (got {role!r})",
                           param=f"{where}.role")
        text = _text_content(message.get("content"), f"{where}.content")
        if role in ("system", "developer"):
            if text.strip():
                system.append(text)
        elif turns and turns[-1].role == role:
            turns[-1] = Turn(role, turns[-1].content + "\n\n" + text)
        else:
            turns.append(Turn(role, text))
    last = f"messages[{len(messages) - 1}]"
    if not turns or turns[-1].role != "user":
        got = messages[-1]["role"]
        raise ApiError(400, f"the last message must be a user message: glimp writes the next assistant turn "
                            f"(the conversation ends with a {got} message)", param=last)
    _nonempty(turns[-1].content, f"{last}.content")
    if not system and len(turns) == 1:
        return turns[0].content  # one question, exactly as `glimp ask` puts it
    return Conversation("\n\n".join(system), turns)


def check_formats(conversation: Conversation, served: ServedPair, pair: PairSpec) -> None:
    """A 400 when a plain prompt format of a model the mode uses cannot hold the conversation.

    (A chat template is asked when the prompt is rendered, before the request is queued.)
    """
    used = pair_policy(pair).models
    for role in ("small", "large"):
        name = getattr(pair, role)
        if role not in used or name not in served.formats:
            continue
        why = conversation_refusal(served.formats[name], conversation)
        if why:
            raise ApiError(400, f"this conversation cannot be rendered for the {role} model {name!r}: {why}; "
                                "send one user message, or give its prompt format a turn and system_turn in "
                                "models.yaml", param="messages")


def text_question(prompt: Any) -> str:
    """The question of a completions request: `prompt`, a string or a list of one string."""
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise ApiError(400, "prompt must be one string (or a list of one string): glimp writes one trace per "
                                "request and renders the models' prompts itself, so token ids are not accepted",
                           param="prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string: the question", param="prompt")
    return _nonempty(prompt, "prompt")


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"{where}[{j}]: a {kind!r} part cannot be rendered: the pair's models read "
                                    "text only, so only text parts are accepted", param=where)
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(400, f"{where} must be a string or a list of text parts", param=where)


def _nonempty(text: str, where: str) -> str:
    if not text.strip():
        raise ApiError(400, f"{where} is empty: there is no question to answer", param=where)
    return text


def _settings(body: dict, mode_from_id: str | None) -> dict:
    """Pair settings this request overrides (request fields and the model id's mode > the server's)."""
    values: dict[str, Any] = {}
    if "temperature" in body and body["temperature"] is not None:
        values["temperature"] = _number(body, "temperature", 0.0, 2.0)
    if "top_p" in body and body["top_p"] is not None:
        top_p = _number(body, "top_p", 0.0, 1.0)
        if top_p == 0:
            values["temperature"] = 0.0  # a nucleus of no mass holds the most likely token alone: greedy
        else:
            values["top_p"] = top_p
    if "seed" in body and body["seed"] is not None:
        values["seed"] = _integer(body, "seed", 0, 2**63 - 1)
    budgets = {k: body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None}
    for key in budgets:
        values["max_tokens"] = _integer(body, key, 1, None)
    if len(budgets) == 2 and len(set(budgets.values())) == 2:
        raise ApiError(400, "max_tokens and max_completion_tokens differ: give one", param="max_tokens")
    if body.get("tau") is not None:
        values["tau"] = _number(body, "tau", -math.inf, math.inf)
    if body.get("large_share") is not None:
        values["large_share"] = _number(body, "large_share", 0.0, 1.0)
    if body.get("max_step_tokens") is not None:
        values["max_step_tokens"] = _integer(body, "max_step_tokens", 1, None)
    mode = body.get("mode")
    if mode is not None and mode not in MODES:
        raise ApiError(400, f"mode {mode!r} is not one of {', '.join(MODES)}", param="mode")
    if mode and mode_from_id and mode != mode_from_id:
        raise ApiError(400, f"mode {mode!r} differs from the mode {mode_from_id!r} the model id names: give one",
                       param="mode")
    if mode or mode_from_id:
        values["mode"] = mode or mode_from_id
    return values


def _number(body: dict, key: str, lo: float, hi: float) -> float:
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{key} must be a finite number (got {value!r})", param=key)
    if not lo <= value <= hi:
        raise ApiError(400, f"{key} must be between {lo:g} and {hi:g} (got {value!r})", param=key)
    return float(value)


def _integer(body: dict, key: str, lo: int, hi: int | None) -> int:
    value = body[key]
    if not _is_int(value):
        raise ApiError(400, f"{key} must be an integer (got {value!r})", param=key)
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ApiError(400, f"{key} must be {bound} (got {value!r})", param=key)
    return int(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise ApiError(400, "stop must be a non-empty string or a list of non-empty strings", param="stop")
    if len(items) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop holds at most {MAX_STOP_STRINGS} strings (got {len(items)})", param="stop")
    return tuple(items)


def finish_reason(stop_reason: str | None) -> str:
    """OpenAI's finish_reason for how a trace ended."""
    return "length" if stop_reason in ("max_tokens", "context_full") else "stop"


def completion_body(request: CompletionRequest, ident: str, created: int, result: dict) -> dict:
    """The non-streaming response: the whole trace as one choice, with `glimp` and `usage`."""
    if request.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": result["content"], "refusal": None},
                  "logprobs": None, "finish_reason": result["finish_reason"]}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": result["content"], "logprobs": None, "finish_reason": result["finish_reason"]}
        obj = "text_completion"
    return {"id": ident, "object": obj, "created": created, "model": request.model, "choices": [choice],
            "usage": result["usage"], "glimp": result["glimp"]}


def chunk_body(request: CompletionRequest, ident: str, created: int, *, text: str | None = None,
               role: bool = False, finish: str | None = None, glimp: dict | None = None,
               usage: dict | None = None) -> dict:
    """One streamed chunk; `usage` makes the closing usage chunk (no choices)."""
    obj = "chat.completion.chunk" if request.kind == "chat" else "text_completion"
    body: dict = {"id": ident, "object": obj, "created": created, "model": request.model}
    if usage is not None:
        body["choices"] = []
        body["usage"] = usage
        return body
    if request.kind == "chat":
        delta: dict = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    body["choices"] = [choice]
    if glimp is not None:
        body["glimp"] = glimp
    return body
