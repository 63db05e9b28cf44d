"""`tunestack chat`: talk to a model in the terminal, multi-turn and streamed, or answer one --prompt.

    tunestack chat --model outputs-sft                       # a stage output folder (adapter stacked)
    tunestack chat --base_model base --lora_model outputs-sft # MedicalGPT style
    tunestack chat --model merged --prompt "..." --temperature 0   # one answer, for scripts

In the chat: /clear forgets the conversation, /system <text> sets the system prompt (/system alone
removes it), /exit, exit or Ctrl-D quits; Ctrl-C stops an answer that is being written.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from tunestack.config.infer import ChatArguments, GenerationArguments, ModelSelection
from tunestack.infer.generate import ChatModel, describe, lstrip_stream

COMMANDS_HELP = (
    "/clear forgets the conversation, /system <text> sets the system prompt (/system alone removes it), "
    "/exit quits (also exit, Ctrl-D); Ctrl-C stops an answer"
)
EXIT_WORDS = ("/exit", "/quit", "exit", "quit")


class ChatSession:
    """The conversation: history, system prompt, commands."""

    def __init__(self, chat_model: ChatModel, options: GenerationArguments, single_turn: bool = False):
        self.chat_model = chat_model
        self.options = options
        self.system = chat_model.system_for(options)
        self.single_turn = single_turn
        self.history: list[dict[str, str]] = []

    def command(self, line: str) -> str | None:
        """Run a /command; returns what to tell the user, or None when `line` is not a command."""
        word, _, rest = line.strip().partition(" ")
        if word == "/clear":
            self.history = []
            return "(conversation cleared)"
        if word == "/system":
            self.system = rest.strip() or None
            return f"(system prompt set: {self.system})" if self.system else "(system prompt removed)"
        if word in ("/help", "/?"):
            return COMMANDS_HELP
        if word.startswith("/") and word not in EXIT_WORDS:
            return f"unknown command {word}; {COMMANDS_HELP}"
        return None

    def messages_for(self, question: str) -> list[dict[str, str]]:
        history = [] if self.single_turn else self.history
        return [*history, {"role": "user", "content": question}]

    def prompt_ids(self, question: str) -> list[int]:
        ids, dropped = self.chat_model.prompt_ids(self.messages_for(question), self.system, self.options.max_new_tokens)
        if dropped:
            self.history = self.history[2 * dropped :]
        return ids

    def ask(
        self,
        question: str,
        on_text: Callable[[str], None] | None = None,
        show_prompt: TextIO | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> str:
        """Answer `question` in the conversation (streamed to `on_text`) and remember the turn."""
        ids = self.prompt_ids(question)
        if show_prompt is not None:
            text = self.chat_model.tokenizer.decode(ids, skip_special_tokens=False)
            show_prompt.write(f"--- prompt ({len(ids)} tokens) ---\n{text}\n--- end of prompt ---\n")
            show_prompt.flush()
        if on_start is not None:
            on_start()
        answer = self.chat_model.generate([ids], self.options, on_text)[0]
        if not self.single_turn:
            self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return answer


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
        except KeyboardInterrupt:
            out.write(" [stopped; this answer is not kept]")
        out.write("\n")
        out.flush()


def run_chat(selection: ModelSelection, options: GenerationArguments, chat: ChatArguments) -> int:
    if chat.prompt is None:
        sys.stderr.write("loading the model...\n")
    chat_model = ChatModel.load(selection)
    session = ChatSession(chat_model, options, single_turn=chat.single_tune)
    if chat.prompt is not None:
        session.ask(chat.prompt, lstrip_stream(_writer(sys.stdout)), sys.stderr if chat.show_prompt else None)
        sys.stdout.write("\n")
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
