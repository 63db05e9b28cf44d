"""Named tool formats (`--tool_format`): how the tool list, a call and a tool's result are written as chat text
for a template that has no tool support of its own, and how a model's answer is read back into calls.

* ``default``: ``Action: name`` / ``Action Input: {json}`` lines (the form MedicalGPT and LLaMA-Factory use);
* ``qwen``: ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks, results in ``<tool_response>``;
* ``glm4``: the function name on one line, its JSON arguments on the next;
* ``llama3``: one ``{"name": ..., "parameters": ...}`` JSON object per call.

A format lowers a conversation with tools to plain user / assistant turns (`lower`): the tool list joins the
system prompt, calls become the assistant's text, results become a user turn. The same lowering exists as a jinja
preamble (`jinja_preamble`) saved in front of the chat template, so ``apply_chat_template(messages, tools=...)``
renders what training rendered, for tunestack and for any other reader of the model folder (tool_jinja.py).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tunestack.data.formats import Message
from tunestack.data.tools import Tool, ToolCall
from tunestack.errors import ConfigError

TOOL_FORMAT_CHOICES = ("auto", "default", "qwen", "glm4", "llama3")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_DECODER = json.JSONDecoder()


def lit(text: str) -> str:
    """A jinja string literal."""
    return json.dumps(text, ensure_ascii=False)


def _json_object(text: str, pos: int) -> tuple[dict | None, int]:
    """The JSON object starting at `pos` (after whitespace) and where it ends; (None, pos) when there is none."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    try:
        value, end = _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError:
        return None, pos
    return (value, end) if isinstance(value, dict) else (None, pos)


def _call(name: object, arguments: object) -> ToolCall | None:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not _NAME.fullmatch(name.strip()) or not isinstance(arguments, dict):
        return None
    return ToolCall.of(name.strip(), arguments)


@dataclass(frozen=True)
class ToolFormat:
    """One named format. Subclasses fill in the text of the tool list, of the calls and of the results."""

    name: str
    # jinja: the tool list (`_ts_f` is one function schema inside the loop), one call (`_ts_c`: its name,
    # `_ts_a`: its arguments as JSON text), and one result (`_ts_r`).
    result_prefix: str = "Observation: "
    result_suffix: str = ""

    # -- text --------------------------------------------------------------------------------------

    def tools_text(self, tools: Sequence[Tool]) -> str:
        raise NotImplementedError

    def call_text(self, call: ToolCall) -> str:
        raise NotImplementedError

    def calls_text(self, calls: Sequence[ToolCall]) -> str:
        return "\n".join(self.call_text(c) for c in calls)

    def results_text(self, results: Sequence[str]) -> str:
        return "\n".join(self.result_prefix + r + self.result_suffix for r in results)

    # -- reading an answer back ----------------------------------------------------------------------

    def parse(self, text: str) -> tuple[str, tuple[ToolCall, ...]] | None:
        """(text before the calls, the calls) of a model's answer, or None when it makes no well-formed call."""
        raise NotImplementedError

    def hold_from(self, text: str) -> int:
        """While streaming: where a call may begin in the answer so far (text from there is held back)."""
        raise NotImplementedError

    # -- the same as jinja ---------------------------------------------------------------------------

    def jinja_tools(self) -> tuple[str, str, str]:
        """Jinja expressions: (before the list, one tool `_ts_f`, after the list; `_ts.names` lists the names)."""
        raise NotImplementedError

    def jinja_call(self) -> str:
        """A jinja expression of one call from `_ts_c` (name) and `_ts_a` (arguments JSON)."""
        raise NotImplementedError


def _marker_hold(text: str, marker: str) -> int:
    """The start of `marker` in `text`, or of a tail of `text` that may grow into it; else len(text)."""
    k = text.find(marker)
    if k >= 0:
        return k
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return len(text) - n
    return len(text)


class DefaultFormat(ToolFormat):
    HEAD = "You can use these tools (one JSON schema per line):\n"

    TAIL = (
        "To use a tool, answer with exactly these two lines:\nAction: the tool's name (one of {names})\n"
        "Action Input: its arguments as one JSON object"
    )

    def tools_text(self, tools: Sequence[Tool]) -> str:
        names = ", ".join(t["name"] for t in tools)
        lines = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tools)
        return self.HEAD + lines + self.TAIL.replace("{names}", names)

    def call_text(self, call: ToolCall) -> str:
        return f"Action: {call.name}\nAction Input: {call.arguments}"

    def parse(self, text: str) -> tuple[str, tuple[ToolCall, ...]] | None:
        first = text.find("Action:")
        if first < 0:
            return None
        calls, pos = [], first
        while pos < len(text):
            m = re.compile(r"Action:[ \t]*([^\n]*?)[ \t]*\n[ \t]*Action Input:").match(text, pos)
            if m is None:
                return None
            args, end = _json_object(text, m.end())
            call = _call(m.group(1), args) if args is not None else None
            if call is None:
                return None
            calls.append(call)
            pos = end
            while pos < len(text) and text[pos].isspace():
                pos += 1
        return text[:first].strip(), tuple(calls)

    def hold_from(self, text: str) -> int:
        return _marker_hold(text, "Action:")

    def jinja_tools(self) -> tuple[str, str, str]:
        before, after = self.TAIL.split("{names}")
        return lit(self.HEAD), "(_ts_f|tojson) + '\\n'", f"{lit(before)} + _ts.names + {lit(after)}"

    def jinja_call(self) -> str:
        return "'Action: ' + _ts_c + '\\nAction Input: ' + _ts_a"


class QwenFormat(ToolFormat):
    HEAD = (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    )
    TAIL = (
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
        "\n</tool_call>"
    )

    def tools_text(self, tools: Sequence[Tool]) -> str:
        body = "".join("\n" + json.dumps({"type": "function", "function": t}, ensure_ascii=False) for t in tools)
        return self.HEAD + body + self.TAIL

    def call_text(self, call: ToolCall) -> str:
        return f'<tool_call>\n{{"name": {json.dumps(call.name, ensure_ascii=False)}, "arguments": {call.arguments}}}\n</tool_call>'

    def parse(self, text: str) -> tuple[str, tuple[ToolCall, ...]] | None:
        first = text.find("<tool_call>")
        if first < 0:
            return None
        calls, pos = [], first
        while pos < len(text):
            if not text.startswith("<tool_call>", pos):
                return None
            obj, end = _json_object(text, pos + len("<tool_call>"))
            call = _call(obj.get("name"), obj.get("arguments", {})) if obj is not None else None
            if call is None:
                return None
            calls.append(call)
            rest = text[end:].lstrip()
            if rest.startswith("</tool_call>"):
                rest = rest[len("</tool_call>") :]
            elif rest:  # only the last block may miss its closing tag
                return None
            pos = len(text) - len(rest.lstrip())
        return text[:first].strip(), tuple(calls)

    def hold_from(self, text: str) -> int:
        return _marker_hold(text, "<tool_call>")

    def jinja_tools(self) -> tuple[str, str, str]:
        return lit(self.HEAD), "'\\n' + ({'type': 'function', 'function': _ts_f}|tojson)", lit(self.TAIL)

    def jinja_call(self) -> str:
        return "'<tool_call>\\n{\"name\": ' + (_ts_c|tojson) + ', \"arguments\": ' + _ts_a + '}\\n</tool_call>'"


class GLM4Format(ToolFormat):
    HEAD = "# 可用工具"
    NOTE = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"

    def tools_text(self, tools: Sequence[Tool]) -> str:
        body = "".join(f"\n\n## {t['name']}\n\n{json.dumps(t, ensure_ascii=False, indent=4)}{self.NOTE}" for t in tools)
        return self.HEAD + body

    def call_text(self, call: ToolCall) -> str:
        return f"{call.name}\n{call.arguments}"

    def parse(self, text: str) -> tuple[str, tuple[ToolCall, ...]] | None:
        calls, pos, text = [], 0, text.strip()
        while pos < len(text):
            newline = text.find("\n", pos)
            if newline < 0:
                return None
            args, end = _json_object(text, newline + 1)
            call = _call(text[pos:newline], args) if args is not None else None
            if call is None:
                return None
            calls.append(call)
            pos = end
            while pos < len(text) and text[pos].isspace():
                pos += 1
        return ("", tuple(calls)) if calls else None

    def hold_from(self, text: str) -> int:
        head, newline, rest = text.lstrip().partition("\n")
        if head and not _NAME.fullmatch(head):
            return len(text)  # the first line is no function name: plain text
        if newline and rest.strip() and not rest.lstrip().startswith("{"):
            return len(text)
        return 0

    def jinja_tools(self) -> tuple[str, str, str]:
        return (
            lit(self.HEAD),
            "'\\n\\n## ' + _ts_f['name'] + '\\n\\n' + (_ts_f|tojson(indent=4)) + " + lit(self.NOTE),
            "",
        )

    def jinja_call(self) -> str:
        return "_ts_c + '\\n' + _ts_a"


class Llama3Format(ToolFormat):
    HEAD = (
        "You have access to the following functions. To call a function, please respond with JSON for a function "
        'call. Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
        "value}. Do not use variables."
    )

    def tools_text(self, tools: Sequence[Tool]) -> str:
        return self.HEAD + "".join(
            "\n\n" + json.dumps({"type": "function", "function": t}, ensure_ascii=False, indent=4) for t in tools
        )

    def call_text(self, call: ToolCall) -> str:
        return f'{{"name": {json.dumps(call.name, ensure_ascii=False)}, "parameters": {call.arguments}}}'

    def parse(self, text: str) -> tuple[str, tuple[ToolCall, ...]] | None:
        calls, pos = [], 0
        while True:
            obj, end = _json_object(text, pos)
            if obj is None:
                break
            call = _call(obj.get("name"), obj.get("parameters", obj.get("arguments", {})))
            if call is None:
                return None
            calls.append(call)
            pos = end
        return ("", tuple(calls)) if calls and not text[pos:].strip() else None

    def hold_from(self, text: str) -> int:
        stripped = text.lstrip()
        return 0 if not stripped or stripped.startswith("{") else len(text)

    def jinja_tools(self) -> tuple[str, str, str]:
        return lit(self.HEAD), "'\\n\\n' + ({'type': 'function', 'function': _ts_f}|tojson(indent=4))", ""

    def jinja_call(self) -> str:
        return "'{\"name\": ' + (_ts_c|tojson) + ', \"parameters\": ' + _ts_a + '}'"


TOOL_FORMATS: dict[str, ToolFormat] = {
    "default": DefaultFormat("default"),
    "qwen": QwenFormat("qwen", "<tool_response>\n", "\n</tool_response>"),
    "glm4": GLM4Format("glm4"),
    "llama3": Llama3Format("llama3"),
}
_ALIASES = {"qwen2": "qwen", "qwen2.5": "qwen", "qwen3": "qwen", "qwen3.5": "qwen", "llama3.1": "llama3", "glm": "glm4"}


def get_tool_format(name: str) -> ToolFormat:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in TOOL_FORMATS:
        close = difflib.get_close_matches(key, list(TOOL_FORMATS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown tool_format '{name}'{hint}; expected one of {', '.join(TOOL_FORMAT_CHOICES)}")
    return TOOL_FORMATS[key]


def tool_format_problems(name: str | None) -> list[str]:
    """Flag check for the option dataclasses."""
    if name in (None, "", "auto"):
        return []
    try:
        get_tool_format(name)
    except ConfigError as exc:
        return [f"--{exc}"]
    return []


def place_tools(system: str | None, text: str) -> str:
    """The system prompt with the tool list after it."""
    return f"{system}\n\n{text}" if system else text


def lower(
    fmt: ToolFormat, system: str | None, messages: Sequence[Message], tools: Sequence[Tool]
) -> tuple[str | None, list[Message]]:
    """(system, plain user/assistant turns) of a conversation with tools, written in `fmt`."""
    if tools:
        system = place_tools(system, fmt.tools_text(tools))
    out: list[Message] = []
    results: list[str] = []
    for m in messages:
        if m.role == "tool":
            results.append(m.content)
            continue
        if results:
            out.append(Message("user", fmt.results_text(results)))
            results = []
        if m.role == "assistant" and m.tool_calls:
            calls, body = fmt.calls_text(m.tool_calls), m.content.strip()
            out.append(Message("assistant", f"{body}\n{calls}" if body else calls))
        else:
            out.append(Message(m.role, m.content))
    if results:
        out.append(Message("user", fmt.results_text(results)))
    return system, out
