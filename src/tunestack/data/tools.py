"""Tool (function) calling in records: the `tools` field, the calls an assistant makes, and their checks.

Shapes accepted in data files:

* a `tools` field: a list of function schemas (``{"name", "description", "parameters"}``, or OpenAI's
  ``{"type": "function", "function": {...}}``), or that list as a JSON string (glaive / MedicalGPT files);
* ShareGPT ``function_call`` turns whose value is ``{"name", "arguments"}`` (a JSON string or an object; a list
  for parallel calls), and ``observation`` turns holding the tool's result;
* OpenAI assistant messages with ``tool_calls`` (``{"type": "function", "function": {"name", "arguments"}}``,
  arguments a JSON string or an object) and ``tool`` messages with the result.

A problem raises `RecordProblem`, so the loader reports it as ``file:line: reason`` like any other bad record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunestack.data.records import RecordProblem
from tunestack.errors import DataError


@dataclass(frozen=True)
class ToolCall:
    """One call: the function's name and its arguments as canonical JSON text (an object)."""

    name: str
    arguments: str = "{}"

    @classmethod
    def of(cls, name: str, arguments: Mapping[str, Any]) -> ToolCall:
        return cls(name, json.dumps(dict(arguments), ensure_ascii=False))

    @property
    def args(self) -> dict[str, Any]:
        return json.loads(self.arguments)

    def as_dict(self) -> dict[str, Any]:
        """{"name", "arguments": {...}}: the shape of a ShareGPT function_call value and of infer's output."""
        return {"name": self.name, "arguments": self.args}

    def as_template_call(self) -> dict[str, Any]:
        """The shape chat templates read: {"type": "function", "function": {"name", "arguments": {...}}}."""
        return {"type": "function", "function": self.as_dict()}


Tool = dict[str, Any]  # one function schema: {"name", "description", "parameters"}


def _json_value(value: Any, what: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise RecordProblem("bad tool call", f"{what} is not JSON ({exc.msg} at column {exc.colno})") from None
    return value


def parse_tools(value: Any) -> tuple[Tool, ...]:
    """The `tools` field as function schemas; () for a missing or empty field."""
    if value is None or value == "" or value == []:
        return ()
    what = '\'tools\' must be a list of function schemas ({"name", "description", "parameters"})'
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RecordProblem("bad tools", f"{what}; it is a string that is not JSON ({exc.msg})") from None
    if not isinstance(value, list):
        raise RecordProblem("bad tools", f"{what}, got {type(value).__name__}")
    tools = []
    for i, raw in enumerate(value, start=1):
        tool = raw.get("function") if isinstance(raw, dict) and raw.get("type") == "function" else raw
        if not isinstance(tool, dict):
            raise RecordProblem("bad tools", f"{what}; tools[{i}] is a {type(raw).__name__}")
        name = tool.get("name")
        if not isinstance(name, str) or not name.strip():
            raise RecordProblem("bad tools", f"{what}; tools[{i}] has no 'name'")
        params = tool.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise RecordProblem("bad tools", f"tools[{i}] ({name}): 'parameters' must be a JSON schema object")
        tools.append(dict(tool))
    return tuple(tools)


def _one_call(raw: Any, what: str) -> ToolCall:
    if isinstance(raw, ToolCall):
        return raw
    raw = _json_value(raw, what)
    if isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("function"), dict):
        raw = raw["function"]  # OpenAI's wrapping
    if not isinstance(raw, dict):
        raise RecordProblem("bad tool call", f"{what} must be an object with 'name' and 'arguments'")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RecordProblem("bad tool call", f"{what} has no 'name' (keys: {sorted(raw)})")
    args = raw.get("arguments", raw.get("parameters", {}))
    args = _json_value(args, f"{what} 'arguments'") if args != "" else {}
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RecordProblem("bad tool call", f"{what} 'arguments' must be a JSON object, got {type(args).__name__}")
    return ToolCall.of(name.strip(), args)


def parse_calls(value: Any, what: str) -> tuple[ToolCall, ...]:
    """A function_call turn's value or an OpenAI `tool_calls` list: one call, or a list of them."""
    value = _json_value(value, what)
    items = value if isinstance(value, list) else [value]
    if not items:
        raise RecordProblem("bad tool call", f"{what} holds no call")
    return tuple(_one_call(item, what if len(items) == 1 else f"{what} call {k}") for k, item in enumerate(items, 1))


def template_tools(tools: Iterable[Tool]) -> list[dict[str, Any]]:
    """Tools as chat templates (and OpenAI) take them: {"type": "function", "function": schema}."""
    return [{"type": "function", "function": dict(t)} for t in tools]


def calls_from_dicts(raw: Sequence[Any] | None, what: str = "tool_calls") -> tuple[ToolCall, ...]:
    """Calls of a message dict (`tool_calls` in OpenAI's shape or as {"name", "arguments"}); DataError when bad."""
    if not raw:
        return ()
    try:
        return parse_calls(list(raw), what)
    except RecordProblem as bad:
        raise DataError(bad.message) from None


def load_tools_file(path: str | Path) -> tuple[Tool, ...]:
    """A JSON file of tools (a list of schemas, or {"tools": [...]}), checked; DataError naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"--tools {path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a JSON file ({exc})") from None
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    try:
        tools = parse_tools(data)
    except RecordProblem as bad:
        raise DataError(f"{path}: {bad.message}") from None
    if not tools:
        raise DataError(f"{path}: the file lists no tools")
    return tools
