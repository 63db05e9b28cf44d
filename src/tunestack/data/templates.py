"""Chat templates: how a `Conversation` becomes text, and which parts of it are trained.

Two kinds of template:

* `TokenizerTemplate` (the default): the tokenizer's own jinja ``chat_template``, rendered with
  ``tokenizer.apply_chat_template``. Trainable spans are found by rendering prefixes: the text
  between "everything before the answer + generation prompt" and "everything up to the answer"
  is the assistant part; its stop token is the first special token after the content.
* `NamedTemplate` (``--template_name``): a fixed format from ``templates/templates.yaml``
  (vicuna, alpaca, chatml, qwen, llama3, glm4, chatglm3, internlm2, mistral, baichuan2, gemma).

Either turns a conversation into `Segment`s ``(text, trainable)``: exactly the assistant content of
every assistant turn plus that turn's stop token is trainable; system, user, role headers and
separators are not.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tunestack.data.formats import Conversation, Message
from tunestack.data.named_templates import (
    NamedTemplate,
    Segment,
    named_jinja_template,
    named_templates,
    template_names,
)
from tunestack.data.named_templates import single_token_id as _single_token_id
from tunestack.errors import ConfigError

__all__ = [
    "NamedTemplate",
    "Segment",
    "Template",
    "TokenizerTemplate",
    "conversation_segments",
    "get_template",
    "jinja_chat_template",
    "named_templates",
    "prompt_segments",
    "render_prompt",
    "stop_token_ids",
    "template_names",
]

TOKENIZER_TEMPLATE_NAMES = (None, "", "auto", "default", "tokenizer")


# ---------------------------------------------------------------------------------------------
# The tokenizer's own jinja template


@dataclass(frozen=True)
class TokenizerTemplate:
    """The tokenizer's jinja chat_template; trainable spans are derived by rendering prefixes."""

    source: str
    name: str = "tokenizer"

    def _render(self, tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        if not messages:
            return ""
        return tokenizer.apply_chat_template(
            messages, chat_template=self.source, add_generation_prompt=generation_prompt, tokenize=False
        )

    def render(self, tokenizer: Any, system: str | None, messages: Sequence[Message]) -> list[Segment]:
        dicts = _as_dicts(system, messages)
        if messages and messages[-1].role == "user":
            return [Segment(self._render(tokenizer, dicts, True), False)]
        full = self._render(tokenizer, dicts, False)
        turns = [i for i, m in enumerate(dicts) if m["role"] == "assistant"]
        # The prompt of answer k (rendered with the generation prompt) must be a prefix of the whole
        # rendering; answer k lies between the end of its prompt and the end of the next one.
        prompts = [self._render(tokenizer, dicts[:i], True) for i in turns]
        bounds = [len(p) for p in prompts[1:]] + [len(full)]
        specials = _special_strings(tokenizer)
        segments: list[Segment] = []
        pos = 0
        for i, prompt, bound in zip(turns, prompts, bounds, strict=True):
            if not full.startswith(prompt) or len(prompt) < pos:
                raise ConfigError(
                    "the tokenizer's chat template renders earlier turns differently once later turns follow, "
                    "so the answer spans cannot be found; pass template_name (one of "
                    f"{', '.join(template_names())})"
                )
            start, end, extra = _answer_span(tokenizer, full[:bound], len(prompt), dicts[i]["content"], specials)
            if start > pos:
                segments.append(Segment(full[pos:start], False))
            segments.append(Segment(full[start:end] + extra, True))
            pos = end
        if pos < len(full):
            segments.append(Segment(full[pos:], False))
        return segments

    def stop_strings(self, tokenizer: Any) -> list[str]:
        """The stop tokens found after the answers of a two-turn probe conversation."""
        answers = ("Hello", "Bye")
        probe = tuple(m for a in answers for m in (Message("user", "Hi"), Message("assistant", a)))
        trained = [s.text for s in self.render(tokenizer, None, probe) if s.trainable]
        stops = [text.split(answer, 1)[-1].strip() for text, answer in zip(trained, answers, strict=True)]
        return [s for s in dict.fromkeys(stops) if s]

    def check(self, tokenizer: Any) -> None:
        pass


def _answer_span(tokenizer: Any, text: str, prompt_end: int, content: str, specials: list[str]) -> tuple[int, int, str]:
    """(start, end, extra): text[start:end] is the trainable answer + stop token; `extra` is an EOS to append
    when no special token follows the answer. Whitespace between the prompt and the answer is trained (the
    model writes it); other text there (e.g. a header the generation prompt lacks) is not."""
    part = text[prompt_end:]
    k, found = _find_content(part, content)
    if k < 0:
        raise ConfigError(
            "the tokenizer's chat template changes the assistant text, so the answer span cannot be found; "
            f"pass template_name (one of {', '.join(template_names())})"
        )
    start = prompt_end + (k if part[:k].strip() else 0)
    after = prompt_end + k + len(found)
    stop = _leading_stop(text[after:], specials)
    if stop:
        return start, after + len(stop), ""
    if not tokenizer.eos_token:
        raise ConfigError("the chat template ends assistant turns with no special token and the tokenizer has no EOS")
    return start, after, tokenizer.eos_token


def _find_content(part: str, content: str) -> tuple[int, str]:
    """Where the answer starts in the rendered assistant part, and the text found (content or content.strip())."""
    for text in dict.fromkeys((content, content.strip())):
        if part.startswith(text):
            return 0, text
        stripped = part.lstrip()
        if stripped.startswith(text):
            return len(part) - len(stripped), text
    for text in dict.fromkeys((content, content.strip())):
        k = part.find(text)
        if k >= 0:
            return k, text
    return -1, content


def _leading_stop(post: str, specials: list[str]) -> str:
    """Whitespace + the special token that `post` starts with, or '' when it starts with none."""
    ws = len(post) - len(post.lstrip())
    for token in specials:
        if post.startswith(token, ws):
            return post[: ws + len(token)]
    return ""


def _special_strings(tokenizer: Any) -> list[str]:
    """Special token strings of `tokenizer`, longest first."""
    tokens = set(tokenizer.all_special_tokens)
    tokens.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((t for t in tokens if t), key=len, reverse=True)


def _as_dicts(system: str | None, messages: Sequence[Message]) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": m.role, "content": m.content} for m in messages]


# ---------------------------------------------------------------------------------------------
# Public helpers

Template = NamedTemplate | TokenizerTemplate


def get_template(name: str | None, tokenizer: Any) -> Template:
    """The named template, or (no name, "auto", "default", "tokenizer") the tokenizer's own chat_template."""
    if name in TOKENIZER_TEMPLATE_NAMES:
        source = getattr(tokenizer, "chat_template", None)
        if not isinstance(source, str) or not source:
            raise ConfigError(
                "the tokenizer has no chat_template; pass template_name (one of " + ", ".join(template_names()) + ")"
            )
        return TokenizerTemplate(source)
    table = named_templates()
    template = table.get(str(name).lower())
    if template is None:
        close = difflib.get_close_matches(str(name).lower(), list(table), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown template_name '{name}'{hint}; known: {', '.join(template_names())}")
    template.check(tokenizer)
    return template


def conversation_segments(template: Template, tokenizer: Any, conversation: Conversation) -> list[Segment]:
    """The conversation as (text, trainable) segments; their texts concatenated are what the model sees."""
    return template.render(tokenizer, conversation.system, conversation.messages)


def stop_token_ids(template: Template, tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn (for generation_config.json `eos_token_id`), the tokenizer's EOS last."""
    ids = [_single_token_id(tokenizer, s) for s in template.stop_strings(tokenizer)]
    ids.append(tokenizer.eos_token_id)
    return [i for i in dict.fromkeys(ids) if i is not None]


def render_prompt(
    template: Template,
    tokenizer: Any,
    conversation: Conversation | Sequence[Message] | Sequence[Mapping[str, str]],
    system: str | None = None,
) -> str:
    """The generation prompt, ending with the assistant header.

    A `Conversation` gives the prompt for its last answer (the answer itself left out); a message
    list must end with a user turn. A leading system message (dict) is used as the system prompt.
    """
    system, messages = _prompt_messages(conversation, system)
    return "".join(s.text for s in template.render(tokenizer, system, messages))


def prompt_segments(
    template: Template,
    tokenizer: Any,
    conversation: Conversation | Sequence[Message] | Sequence[Mapping[str, str]],
    system: str | None = None,
) -> list[Segment]:
    """Like `render_prompt`, as segments (so that prompts tokenize exactly as in training)."""
    system, messages = _prompt_messages(conversation, system)
    return template.render(tokenizer, system, messages)


def _prompt_messages(
    conversation: Conversation | Sequence[Message] | Sequence[Mapping[str, str]], system: str | None
) -> tuple[str | None, tuple[Message, ...]]:
    if isinstance(conversation, Conversation):
        return (system if system is not None else conversation.system), conversation.messages[:-1]
    messages: list[Message] = []
    for m in conversation:
        role, content = (m.role, m.content) if isinstance(m, Message) else (m["role"], m["content"])
        if role == "system" and not messages:
            system = content if system is None else system
            continue
        messages.append(Message(role, content))  # type: ignore[arg-type]
    roles = [m.role for m in messages]
    if (
        not roles
        or roles[-1] != "user"
        or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles))
    ):
        raise ValueError("prompt messages must alternate user/assistant, starting and ending with a user turn")
    return system, tuple(messages)


def jinja_chat_template(template: Template) -> str:
    """A jinja chat_template that renders exactly like `template` (to save with the tokenizer)."""
    if isinstance(template, TokenizerTemplate):
        return template.source
    return named_jinja_template(template)
