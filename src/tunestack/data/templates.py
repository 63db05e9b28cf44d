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
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any, NamedTuple

import yaml

from tunestack.data.formats import Conversation, Message
from tunestack.errors import ConfigError

TOKENIZER_TEMPLATE_NAMES = (None, "", "auto", "default", "tokenizer")


class Segment(NamedTuple):
    text: str
    trainable: bool


# ---------------------------------------------------------------------------------------------
# Named templates


@dataclass(frozen=True)
class NamedTemplate:
    """A fixed chat format; see templates/templates.yaml for the meaning of each field."""

    name: str
    user: str
    stop: str
    prefix: str = ""
    system: str = "{content}"
    assistant_header: str = ""
    separator: str = ""
    default_system: str | None = None
    system_in_user: bool = False
    special_tokens: tuple[str, ...] = ()
    stop_words: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()

    def _fill(self, slot: str, tokenizer: Any, content: str = "") -> str:
        bos = tokenizer.bos_token or ""
        eos = tokenizer.eos_token or ""
        return slot.replace("{bos}", bos).replace("{eos}", eos).replace("{content}", content)

    def render(self, tokenizer: Any, system: str | None, messages: Sequence[Message]) -> list[Segment]:
        """Segments of `messages` (alternating, from a user turn); a trailing user turn ends with the assistant header."""
        system = system if system is not None else self.default_system
        pending = self._fill(self.prefix, tokenizer)
        first_user_prefix = ""
        if system:
            if self.system_in_user:
                first_user_prefix = self._fill(self.system, tokenizer, system)
            else:
                pending += self._fill(self.system, tokenizer, system)
        segments: list[Segment] = []
        for i, message in enumerate(messages):
            if message.role == "user":
                content = (first_user_prefix if i == 0 else "") + message.content
                pending += self._fill(self.user, tokenizer, content) + self._fill(self.assistant_header, tokenizer)
                continue
            if pending:
                segments.append(Segment(pending, False))
            segments.append(Segment(message.content + self._fill(self.stop, tokenizer), True))
            pending = self._fill(self.separator, tokenizer)
        if pending:
            segments.append(Segment(pending, False))
        return segments

    def stop_strings(self, tokenizer: Any) -> list[str]:
        return [self._fill(self.stop, tokenizer), *self.stop_words]

    def check(self, tokenizer: Any) -> None:
        """ConfigError unless every special token of the template is one token of `tokenizer`."""
        if "{eos}" in self.stop and not tokenizer.eos_token:
            raise ConfigError(f"template '{self.name}' ends turns with the EOS token, but the tokenizer has none")
        needed = [*self.special_tokens, self._fill(self.stop, tokenizer)]
        missing = [t for t in dict.fromkeys(needed) if _single_token_id(tokenizer, t) is None]
        if missing:
            raise ConfigError(
                f"template '{self.name}' needs {', '.join(missing)} as single tokens, but this tokenizer does not "
                f"have them: the template does not match the model; omit template_name to use the tokenizer's "
                f"own chat template, or pick the model's template"
            )


_FIELD_NAMES = {f.name for f in fields(NamedTemplate)}


@functools.cache
def named_templates() -> dict[str, NamedTemplate]:
    """All named templates by name and alias, from templates/templates.yaml."""
    path = resources.files("tunestack.data").joinpath("templates", "templates.yaml")
    table = yaml.safe_load(path.read_text(encoding="utf-8"))
    out: dict[str, NamedTemplate] = {}
    for name, spec in table.items():
        unknown = set(spec) - _FIELD_NAMES
        if unknown:
            raise ValueError(f"templates.yaml: template '{name}' has unknown keys {sorted(unknown)}")
        spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
        template = NamedTemplate(name=name, **spec)
        for key in (name, *template.aliases):
            out[key] = template
    return out


def template_names() -> list[str]:
    return sorted({t.name for t in named_templates().values()})


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
    t = template
    sys_before, sys_after = _split_slot(t.system)
    user_before, user_after = _split_slot(t.user)
    default = _jinja_expr(t.default_system) if t.default_system else "''"
    system_block = (
        "{%- if loop.first and system_message -%}"
        f"{{%- set content = {sys_before} + system_message + {sys_after} + content -%}}"
        "{%- endif -%}"
    )
    parts = [
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}",
        f"{{%- else -%}}{{%- set system_message = {default} -%}}{{%- set loop_messages = messages -%}}",
        "{%- endif -%}",
        f"{{{{- {_jinja_expr(t.prefix)} -}}}}",
        ""
        if t.system_in_user
        else f"{{%- if system_message -%}}{{{{- {sys_before} + system_message + {sys_after} -}}}}{{%- endif -%}}",
        "{%- for message in loop_messages -%}",
        "{%- if message['role'] == 'user' -%}",
        "{%- set content = message['content'] -%}",
        system_block if t.system_in_user else "",
        f"{{{{- {user_before} + content + {user_after} -}}}}",
        "{%- elif message['role'] == 'assistant' -%}",
        f"{{{{- {_jinja_expr(t.assistant_header)} + message['content'] + {_jinja_expr(t.stop)} + {_jinja_expr(t.separator)} -}}}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        f"{{%- if add_generation_prompt -%}}{{{{- {_jinja_expr(t.assistant_header)} -}}}}{{%- endif -%}}",
    ]
    return "".join(parts)


def _split_slot(slot: str) -> tuple[str, str]:
    before, _, after = slot.partition("{content}")
    return _jinja_expr(before), _jinja_expr(after)


def _jinja_expr(text: str) -> str:
    """A jinja expression for `text`, with {bos}/{eos} as the bos_token/eos_token variables."""
    pieces: list[str] = []
    for i, chunk in enumerate(text.split("{bos}")):
        if i:
            pieces.append("bos_token")
        for j, literal in enumerate(chunk.split("{eos}")):
            if j:
                pieces.append("eos_token")
            if literal:
                pieces.append(json.dumps(literal, ensure_ascii=False))
    return "(" + " + ".join(pieces) + ")" if pieces else "''"


def _single_token_id(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None
