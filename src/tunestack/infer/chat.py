"""`tunestack chat`: talk to a model in the terminal, multi-turn and streamed, or answer one --prompt.

    tunestack chat --model outputs-sft                       # a stage output folder (adapter stacked)
    tunestack chat --base_model base --lora_model outputs-sft # MedicalGPT style
    tunestack chat --model merged --prompt "..." --temperature 0   # one answer, for scripts
    tunestack chat --model outputs-sft --tools tools.json         # the model may call these tools

In the chat: /clear forgets the conversation, /system <text> sets the system prompt (/system alone
removes it), /exit, exit or Ctrl-D quits; Ctrl-C stops an answer that is being written. With --tools, a call
the model makes is shown and its result asked for; the model then answers from it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from tunestack.config.infer import ChatArguments, GenerationArguments, ModelSelection
from tunestack.data.tools import Tool, ToolCall, load_tools_file
from tunestack.infer.generate import ChatModel, describe, lstrip_stream
from tunestack.infer.tool_calls import CallStream, read_answer

COMMANDS_HELP = (
    "/clear forgets the conversation, /system <text> sets the system prompt (/system alone removes it), "
    "/exit quits (also exit, Ctrl-D); Ctrl-C stops an answer"
)
EXIT_WORDS = ("/exit", "/quit", "exit", "quit")


class ChatSession:
    """The conversation: history, system prompt, commands."""

    def __init__(
        self,
        chat_model: ChatModel,
        options: GenerationArguments,
        single_turn: bool = False,
        tools: tuple[Tool, ...] = (),
    ):
        self.chat_model = chat_model
        self.options = options
        self.system = chat_model.system_for(options)
        self.single_turn = single_turn
        self.tools = tools
        self.history: list[dict[str, Any]] = []
        self.pending_calls: tuple[ToolCall, ...] = ()  # calls of the last answer, waiting for their results

    def command(self, line: str) -> str | None:
        """Run a /command; returns what to tell the user, or None when `line` is not a command."""
        word, _, rest = line.strip().partition(" ")
        if word == "/clear":
            self.history = []
            self.pending_calls = ()
            return "(conversation cleared)"
        if word == "/system":
            self.system = rest.strip() or None
            return f"(system prompt set: {self.system})" if self.system else "(system prompt removed)"
        if word in ("/help", "/?"):
            return COMMANDS_HELP
        if word.startswith("/") and word not in EXIT_WORDS:
            return f"unknown command {word}; {COMMANDS_HELP}"
        return None

    def messages_for(self, question: str) -> list[dict[str, Any]]:
        return self._messages([{"role": "user", "content": question}])

    def _messages(self, turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
        history = [] if self.single_turn and turns[0]["role"] == "user" else self.history
        return [*history, *turns]

    def prompt_ids(self, question: str) -> list[int]:
        return self._prompt_ids(self.messages_for(question))[0]

    def _prompt_ids(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[dict[str, Any]]]:
        """The prompt ids, and the messages they hold (the oldest go when the context is full)."""
        ids, dropped = self.chat_model.prompt_ids(messages, self.system, self.options.max_new_tokens, self.tools)
        return ids, messages[dropped:]

    def ask(
        self,
        question: str,
        on_text: Callable[[str], None] | None = None,
        show_prompt: TextIO | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> str:
        """Answer `question` in the conversation (streamed to `on_text`) and remember the turn. The answer's text
        is returned; the tool calls it makes wait in `pending_calls`."""
        return self._respond([{"role": "user", "content": question}], on_text, show_prompt, on_start)

    def give_results(
        self, results: list[str], on_text: Callable[[str], None] | None = None, show_prompt: TextIO | None = None
    ) -> str:
        """The results of `pending_calls`, in order: the model answers from them."""
        return self._respond([{"role": "tool", "content": r} for r in results], on_text, show_prompt)

    def _respond(
        self,
        turns: list[dict[str, Any]],
        on_text: Callable[[str], None] | None,
        show_prompt: TextIO | None,
        on_start: Callable[[], None] | None = None,
    ) -> str:
        ids, messages = self._prompt_ids(self._messages(turns))
        if show_prompt is not None:
            text = self.chat_model.tokenizer.decode(ids, skip_special_tokens=False)
            show_prompt.write(f"--- prompt ({len(ids)} tokens) ---\n{text}\n--- end of prompt ---\n")
            show_prompt.flush()
        if on_start is not None:
            on_start()
        stream = CallStream(self.chat_model.call_format) if self.tools else None
        write = on_text
        if stream is not None and on_text is not None:
            write = _through(stream, on_text)
        text = self.chat_model.generate([ids], self.options, write)[0]
        if stream is not None:
            rest, answer = stream.finish(text)
            if rest and on_text is not None:
                on_text(rest)
        else:
            answer = read_answer(None, text)
        self.pending_calls = answer.tool_calls
        reply: dict[str, Any] = {"role": "assistant", "content": answer.content}
        if answer.tool_calls:
            reply["tool_calls"] = list(answer.tool_calls)
        # single-turn mode keeps a conversation only while its tool calls wait for results
        keep = not self.single_turn or bool(answer.tool_calls)
        self.history = [*messages, reply] if keep else []
        return answer.content


def _through(stream: CallStream, write: Callable[[str], None]) -> Callable[[str], None]:
    """A streaming callback that shows only what `stream` lets through (not the calls being written)."""

    def callback(piece: str) -> None:
        shown = stream.feed(piece)
        if shown:
            write(shown)

    return callback


def call_line(call: ToolCall) -> str:
    """A call as one JSON line: {"name", "arguments"}."""
    return json.dumps(call.as_dict(), ensure_ascii=False)


def _writer(stream: TextIO) -> Callable[[str], None]:
    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    return write


def repl(session: ChatSession, show_prompt: bool = False, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    write = _writer(out)
    write(f"tunestack chat with {describe(session.chat_model)}\n{COMMANDS_HELP}\n")
    while True:
        try:
            line = input("User: ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in EXIT_WORDS:
            return 0
        reply = session.command(text)
        if reply is not None:
            out.write(reply + "\n")
            continue
        try:
            session.ask(text, lstrip_stream(write), err if show_prompt else None, lambda: write("Assistant: "))
            while session.pending_calls:  # the model called tools: ask for their results, then let it go on
                results = []
                for call in session.pending_calls:
                    out.write(f"\n[tool call] {call_line(call)}\n")
                    results.append(input(f"Tool result ({call.name}): "))
                write("Assistant: ")
                session.give_results(results, lstrip_stream(write), err if show_prompt else None)
        except KeyboardInterrupt:
            out.write(" [stopped; this answer is not kept]")
        except EOFError:
            out.write("\n")
            return 0
        out.write("\n")
        out.flush()


def run_chat(selection: ModelSelection, options: GenerationArguments, chat: ChatArguments) -> int:
    if chat.prompt is None:
        sys.stderr.write("loading the model...\n")
    tools = load_tools_file(chat.tools) if chat.tools else ()
    chat_model = ChatModel.load(selection)
    session = ChatSession(chat_model, options, single_turn=chat.single_tune, tools=tools)
    if chat.prompt is not None:
        text = session.ask(chat.prompt, lstrip_stream(_writer(sys.stdout)), sys.stderr if chat.show_prompt else None)
        if text or not session.pending_calls:
            sys.stdout.write("\n")
        for call in session.pending_calls:  # for scripts: one JSON line per call
            sys.stdout.write(call_line(call) + "\n")
        sys.stdout.flush()
        return 0
    return repl(session, chat.show_prompt)


def main(argv: list[str]) -> int:
    from tunestack.config.parse import parse_into

    selection, options, chat = parse_into(
        (ModelSelection, GenerationArguments, ChatArguments),
        argv,
        prog="tunestack chat",
        description="Chat with a model (multi-turn, streamed), or answer one --prompt.",
    )
    return run_chat(selection, options, chat)
