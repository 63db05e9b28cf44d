"""`tunestack infer`: answer every prompt of a file, in batches, into a jsonl file.

Input (--data_file): .txt (one prompt per line) or .jsonl/.json/.csv/.parquet records whose prompt is
`prompt`, `instruction` (+ `input`), `question` or `query` (with an optional `history` of
[question, answer] pairs and `system`/`system_prompt`), or a `messages`/`conversations` record whose
last user turn is the prompt (earlier turns are the history; a record ending with a tool result is a prompt as
it stands). Records may offer `tools` and hold tool calls and results (tunestack.data.tools). Output: one JSON
object per line, {"prompt", "response"} (+ "tool_calls" when the model calls tools, + "reference" /
"reference_tool_calls" when the record has an answer), in input order.
MedicalGPT's inference.py flags are accepted: --interactive runs the chat, --single_tune without history.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunestack.atomic import write_jsonl_atomic
from tunestack.config.infer import ChatArguments, GenerationArguments, InferArguments, ModelSelection
from tunestack.data.records import RecordProblem
from tunestack.data.tools import Tool, ToolCall, parse_calls, parse_tools
from tunestack.errors import ConfigError, DataError
from tunestack.infer.generate import ChatModel, describe
from tunestack.infer.tool_calls import read_answer

PROMPT_KEYS = ("instruction", "prompt", "question", "query")
REFERENCE_KEYS = ("output", "response", "answer", "chosen", "response_chosen")
TURN_KEYS = ("messages", "conversations")
_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_ROLES |= {"function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool"}


@dataclass
class PromptItem:
    messages: list[dict[str, Any]]
    system: str | None
    where: str
    reference: str | None = None
    tools: tuple[Tool, ...] = ()
    reference_calls: tuple[ToolCall, ...] | None = None  # the calls the reference answer makes

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


def _text(value: Any) -> str | None:
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        value = "".join(str(p.get("text", "")) for p in value)
    return value if isinstance(value, str) else None


def _system(data: dict[str, Any]) -> str | None:
    for key in ("system", "system_prompt"):
        text = _text(data.get(key))
        if text:
            return text
    return None


def _calls(turn: dict[str, Any], raw_role: str, i: int, key: str) -> tuple[ToolCall, ...]:
    try:
        if raw_role == "function_call":
            return parse_calls(turn.get("value", turn.get("content")), f"turn {i} of '{key}' (function_call)")
        return parse_calls(turn["tool_calls"], f"turn {i} of '{key}' 'tool_calls'") if turn.get("tool_calls") else ()
    except RecordProblem as bad:
        raise ValueError(bad.message) from None


def _tools(data: dict[str, Any]) -> tuple[Tool, ...]:
    try:
        return parse_tools(data.get("tools"))
    except RecordProblem as bad:
        raise ValueError(bad.message) from None


def _from_turns(data: dict[str, Any], key: str, where: str) -> PromptItem:
    turns = data[key]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"'{key}' must be a non-empty list of turns")
    system = _system(data)
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} of '{key}' must be an object")
        raw_role = str(turn.get("role", turn.get("from", ""))).lower()
        role = _ROLES.get(raw_role)
        calls = _calls(turn, raw_role, i, key) if role == "assistant" else ()
        content = "" if calls and raw_role == "function_call" else _text(turn.get("content", turn.get("value")))
        if content is None and calls:
            content = ""
        if role is None or content is None:
            raise ValueError(f"turn {i} of '{key}' needs a role (user/assistant/system/tool) and a text content")
        if role == "system":
            system = content or system
        elif messages and messages[-1]["role"] == role and role != "tool" and not calls and "tool_calls" not in messages[-1]:
            messages[-1]["content"] += "\n" + content  # two turns of one role in a row: joined
        else:
            messages.append({"role": role, "content": content, **({"tool_calls": list(calls)} if calls else {})})
    tools = _tools(data)
    if messages and messages[-1]["role"] == "tool":  # tool results to answer from: the prompt as it stands
        return PromptItem(messages, system, where, None, tools)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise ValueError(f"'{key}' has no user turn")
    history = messages[: last_user + 1]
    if history[0]["role"] != "user":
        history = history[1:]  # an opening assistant greeting cannot be rendered by most templates
    after = messages[last_user + 1 :]
    reference = after[0]["content"] if after else None
    reference_calls = tuple(after[0].get("tool_calls", ())) if after and tools else None
    return PromptItem(history, system, where, reference or None, tools, reference_calls)


def _from_fields(data: dict[str, Any], where: str) -> PromptItem | None:
    for key in PROMPT_KEYS:
        prompt = _text(data.get(key))
        if prompt is None or not prompt.strip():
            continue
        extra = _text(data.get("input")) if key == "instruction" else None
        if extra:
            prompt += "\n" + extra
        messages: list[dict[str, str]] = []
        for pair in data.get("history") or []:
            if isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair):
                messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
            else:
                raise ValueError("'history' must be a list of [question, answer] pairs")
        messages.append({"role": "user", "content": prompt})
        reference = next((_text(data.get(k)) for k in REFERENCE_KEYS if _text(data.get(k))), None)
        return PromptItem(messages, _system(data), where, reference, _tools(data))
    return None


def prompt_from_record(data: dict[str, Any], where: str) -> PromptItem:
    """The prompt of one record; ValueError says what is wrong with it."""
    for key in TURN_KEYS:
        if data.get(key):
            return _from_turns(data, key, where)
    item = _from_fields(data, where)
    if item is None:
        raise ValueError(f"no prompt: expected one of {', '.join(PROMPT_KEYS + TURN_KEYS)} (keys: {sorted(data)})")
    return item


def read_prompts(path: Path) -> list[PromptItem]:
    """Every prompt of `path`; all bad records are reported together as one DataError."""
    from tunestack.data.sources import RECORD_SUFFIXES, iter_records, read_text

    if not path.is_file():
        raise DataError(f"--data_file does not exist: {path}")
    if path.suffix.lower() not in RECORD_SUFFIXES:
        return [
            PromptItem([{"role": "user", "content": line.strip()}], None, f"{path}:{n}")
            for n, line in enumerate(read_text(path).splitlines(), start=1)
            if line.strip()
        ]
    items, problems = [], []
    for record in iter_records(path):
        try:
            items.append(prompt_from_record(record.data, record.where))
        except ValueError as exc:
            problems.append(f"{record.where}: {exc}")
    if problems:
        raise DataError(problems)
    if not items:
        raise DataError(f"{path}: no prompts in this file")
    return items


def generate_all(
    chat_model: ChatModel,
    items: list[PromptItem],
    options: GenerationArguments,
    batch_size: int,
    default_system: str | None,
) -> list[str]:
    """Answers to `items` in their order; prompts of similar length are batched together."""
    from tqdm import tqdm

    encoded = [
        chat_model.prompt_ids(item.messages, item.system or default_system, options.max_new_tokens, item.tools)[0]
        for item in items
    ]
    order = sorted(range(len(items)), key=lambda i: -len(encoded[i]))
    answers: list[str] = [""] * len(items)
    with tqdm(total=len(items), desc="generating", unit="prompt", file=sys.stderr) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            for i, answer in zip(batch, chat_model.generate([encoded[i] for i in batch], options), strict=True):
                answers[i] = answer
            bar.update(len(batch))
    return answers


def run_infer(selection: ModelSelection, options: GenerationArguments, args: InferArguments) -> int:
    if args.interactive:
        from tunestack.infer.chat import run_chat

        return run_chat(selection, options, ChatArguments(single_tune=args.single_tune))
    assert args.data_file is not None
    items = read_prompts(Path(args.data_file).expanduser())
    output = Path(args.output_file).expanduser()
    if output.is_dir():
        raise ConfigError(f"--output_file {output} is a folder")
    chat_model = ChatModel.load(selection)
    started = time.time()
    answers = generate_all(chat_model, items, options, args.eval_batch_size, chat_model.system_for(options))
    seconds = time.time() - started
    rows = []
    for item, text in zip(items, answers, strict=True):
        answer = read_answer(chat_model.call_format if item.tools else None, text)
        row: dict[str, Any] = {"prompt": item.prompt, "response": answer.content}
        if answer.tool_calls:
            row["tool_calls"] = [c.as_dict() for c in answer.tool_calls]
        if item.reference is not None:
            row["reference"] = item.reference
        if item.reference_calls:
            row["reference_tool_calls"] = [c.as_dict() for c in item.reference_calls]
        rows.append(row)
    write_jsonl_atomic(output, rows)
    new_tokens = sum(len(chat_model.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    print(  # noqa: T201
        f"answered {len(items)} prompts from {args.data_file} with {describe(chat_model)} in {seconds:.1f}s "
        f"(batch size {args.eval_batch_size}, about {new_tokens / max(seconds, 1e-9):.0f} new tokens/s)\n"
        f"  example: {items[0].prompt[:80]!r} -> {answers[0][:120]!r}\n"
        f"  output: {output}"
    )
    return 0


def main(argv: list[str]) -> int:
    from tunestack.config.parse import parse_into

    selection, options, args = parse_into(
        (ModelSelection, GenerationArguments, InferArguments),
        argv,
        prog="tunestack infer",
        description="Answer every prompt of a file (batched) into a jsonl file; --interactive chats instead.",
    )
    return run_infer(selection, options, args)
