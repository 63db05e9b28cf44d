"""The OpenAI wire format: request models, their checks, response bodies and error bodies.

Only text is served: a content part that is not text (image_url, input_audio, file), the legacy `functions`
or `logprobs` is a 400, never fetched or read; unknown extra fields (`user`, `metadata` ...) are accepted and
ignored. `tools` with `tool_choice` auto (the default) or none are served: calls come back as OpenAI
`tool_calls` (arguments as a JSON string) with finish_reason "tool_calls"; `tool` messages carry results.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunestack.data.formats import as_message, turn_order_problem
from tunestack.data.records import RecordProblem
from tunestack.data.tools import Tool, ToolCall, calls_from_dicts, parse_tools
from tunestack.errors import DataError

ROLES = ("system", "developer", "user", "assistant", "tool")
UNSUPPORTED = ("functions", "function_call", "logprobs", "top_logprobs", "echo", "best_of")


class APIError(Exception):
    """An error sent to the client as OpenAI's error JSON with this HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class Sampled(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="allow")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # not OpenAI's; vLLM and others accept it too
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def check(self, max_n: int) -> None:
        extra = self.model_extra or {}
        for name in UNSUPPORTED:
            if extra.get(name) not in (None, False, [], 0):
                raise APIError(400, f"'{name}' is not supported by this server", param=name)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"'{name}' is not supported; use 'repetition_penalty'", param=name)
        fmt = extra.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
            raise APIError(400, "only response_format type 'text' is supported", param="response_format")
        if self.n > max_n:
            raise APIError(400, f"n must be at most {max_n}", param="n")
        if self.stop is not None:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop
            if len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
                raise APIError(400, "stop must be up to 4 non-empty strings", param="stop")

    @property
    def stop_strings(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def requested_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None

    def calls(self, where: str) -> tuple[ToolCall, ...]:
        if self.role != "assistant" or not self.tool_calls:
            return ()
        try:
            return calls_from_dicts(self.tool_calls, f"{where}.tool_calls")
        except DataError as exc:
            raise APIError(400, str(exc), param=f"{where}.tool_calls") from None

    def text(self, where: str) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type", "unknown")
                raise APIError(400, f"{where}: content of type '{kind}' is not supported (text only)", param=where)
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def check(self, max_n: int) -> None:
        super().check(max_n)
        choice = self.tool_choice
        if choice not in (None, "auto", "none"):
            shown = choice if isinstance(choice, str) else (choice.get("type") if isinstance(choice, dict) else choice)
            raise APIError(400, f"tool_choice '{shown}' is not supported (auto or none)", param="tool_choice")

    def tool_list(self) -> tuple[Tool, ...]:
        """The tools offered, checked (each {"type": "function", "function": {"name", ...}})."""
        try:
            return parse_tools(self.tools)
        except RecordProblem as bad:
            raise APIError(400, bad.message, param="tools") from None

    @property
    def calls_wanted(self) -> bool:
        """Whether the answer is read for tool calls: tools offered and tool_choice not none."""
        return bool(self.tools) and self.tool_choice != "none"

    def conversation(self, max_messages: int) -> tuple[str | None, list[dict[str, Any]]]:
        """(system prompt or None when none was sent, turns ending with a user turn or tool results)."""
        if len(self.messages) > max_messages:
            raise APIError(400, f"at most {max_messages} messages per request", param="messages")
        system: list[str] | None = None
        turns: list[dict[str, Any]] = []
        numbers: list[int] = []  # the message index of each turn
        for i, message in enumerate(self.messages):
            where = f"messages[{i}]"
            if message.role not in ROLES:
                raise APIError(
                    400, f"{where}: role '{message.role}' is not supported ({', '.join(ROLES)})", param=where
                )
            text = message.text(where)
            calls = message.calls(where)
            if message.role in ("system", "developer"):
                if turns:
                    raise APIError(400, f"{where}: a system message must come before the conversation", param=where)
                system = [*(system or []), text]
            elif turns and turns[-1]["role"] == message.role != "tool" and not calls and not turns[-1].get("tool_calls"):
                turns[-1]["content"] += "\n" + text  # two turns of one role in a row are joined, as in infer
            else:
                turns.append({"role": message.role, "content": text, **({"tool_calls": calls} if calls else {})})
                numbers.append(i)
        if not turns or turns[0]["role"] != "user":
            raise APIError(400, "the conversation must start with a user message", param="messages")
        if turns[-1]["role"] not in ("user", "tool"):
            raise APIError(400, "the last message must be from the user (or a tool result)", param="messages")
        problem = turn_order_problem([as_message(t) for t in turns], numbers, prompt=True)
        if problem:
            raise APIError(400, re.sub(r"turns? (\d+)", r"messages[\1]", problem), param="messages")
        return ("\n".join(system) if system is not None else None), turns


class CompletionRequest(Sampled):
    prompt: str | list[str]

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise APIError(400, "one prompt per request", param="prompt")
            return self.prompt[0]
        return self.prompt


class ScoreRequest(BaseModel):
    """Conversations that end with an assistant answer; each gets the reward model's score."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    conversations: list[list[ChatMessage]] = Field(min_length=1)


# ---------------------------------------------------------------------------------------------
# Response bodies


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_message(text: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An assistant message; with `calls` (OpenAI tool_calls) its content is None when it has no text."""
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text or None, "tool_calls": calls}


def chat_response(
    rid: str,
    model: str,
    texts: list[str],
    reasons: list[str],
    use: dict[str, int],
    calls: list[list[dict[str, Any]] | None] | None = None,
) -> dict[str, Any]:
    calls = calls or [None] * len(texts)
    choices = [
        {"index": i, "message": chat_message(t, c), "finish_reason": r, "logprobs": None}
        for i, (t, r, c) in enumerate(zip(texts, reasons, calls, strict=True))
    ]
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": use,
    }


def chat_chunk(rid: str, model: str, index: int, delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}],
    }


def completion_response(rid: str, model: str, texts: list[str], reasons: list[str], use: dict | None) -> dict:
    choices = [
        {"index": i, "text": t, "finish_reason": r, "logprobs": None}
        for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
    ]
    body: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if use is not None:
        body["usage"] = use
    return body


def completion_chunk(rid: str, model: str, index: int, text: str, reason: str | None = None) -> dict[str, Any]:
    return completion_response(rid, model, [text], [reason], None) | {
        "choices": [{"index": index, "text": text, "finish_reason": reason, "logprobs": None}]
    }


def usage_chunk(rid: str, model: str, kind: Literal["chat", "text"], use: dict[str, int]) -> dict[str, Any]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": use}
