"""Named chat templates (``--template_name``): fixed formats from ``templates/templates.yaml`` that render a
conversation as each model family's own code or official chat template does, and the jinja template that renders
like one (saved with the tokenizer, so every later consumer formats prompts the same way).

A conversation with tools is first lowered to plain turns in the template's tool format (tunestack.data.
tool_formats): ``default`` unless ``--tool_format`` names another.

A conversation renders as: prefix, the system slot, then per user/assistant pair
``user  assistant_header  ANSWER stop  separator``; only ``ANSWER stop`` (the `answer` slot with the content, then
the stop text) is trained. Three family quirks are fields of their own:

* `stop_in_history: false`: answers followed by more turns carry no stop text (ChatGLM2 and Baichuan2 render
  their history without an EOS; only the last answer is closed);
* a stop text that the user slot starts with opens the next turn (GLM-4 and ChatGLM3 end a reply with the next
  ``<|user|>``): after an answer it is written once, trained as the answer's stop; `final_stop` closes the last
  answer when it is another token (ChatGLM3's fine-tuning ends the conversation with its EOS);
* ``{round}`` in the user slot is the 1-based number of the exchange (ChatGLM2's ``[Round N]``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any, NamedTuple

import yaml

from tunestack.data.formats import Message, has_tool_content
from tunestack.data.tool_formats import get_tool_format, lower
from tunestack.data.tools import Tool
from tunestack.errors import ConfigError


class Segment(NamedTuple):
    text: str
    trainable: bool


@dataclass(frozen=True)
class NamedTemplate:
    """A fixed chat format; see templates/templates.yaml for the meaning of each field."""

    name: str
    user: str
    stop: str
    prefix: str = ""
    system: str = "{content}"
    assistant_header: str = ""
    answer: str = "{content}"
    separator: str = ""
    default_system: str | None = None
    system_in_user: bool = False
    stop_in_history: bool = True
    final_stop: str | None = None
    special_tokens: tuple[str, ...] = ()
    stop_words: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    tool_format: str = "auto"  # how tools are written: "auto" (the default format) or a named tool format

    def _fill(self, slot: str, tokenizer: Any, content: str = "", round_number: int = 1) -> str:
        bos = tokenizer.bos_token or ""
        eos = tokenizer.eos_token or ""
        text = slot.replace("{bos}", bos).replace("{eos}", eos).replace("{round}", str(round_number))
        return text.replace("{content}", content)

    @property
    def shares_stop(self) -> bool:
        """The stop text is the start of the next user turn (written once between an answer and the next turn)."""
        return bool(self.stop) and not self.separator and self.stop_in_history and self.user.startswith(self.stop)

    def answer_stop(self, tokenizer: Any, last: bool) -> str:
        """The stop text after an answer: the last one's, or one followed by more turns."""
        if last:
            return self._fill(self.final_stop if self.final_stop is not None else self.stop, tokenizer)
        return self._fill(self.stop, tokenizer) if self.stop_in_history else ""

    def render(
        self, tokenizer: Any, system: str | None, messages: Sequence[Message], tools: Sequence[Tool] = ()
    ) -> list[Segment]:
        """Segments of `messages` (alternating, from a user turn); a trailing user turn ends with the assistant header."""
        if has_tool_content(messages, tools):
            fmt = get_tool_format("default" if self.tool_format == "auto" else self.tool_format)
            if tools and system is None:
                system = self.default_system
            system, messages = lower(fmt, system, messages, tools)
        system = system if system is not None else self.default_system
        pending = self._fill(self.prefix, tokenizer)
        first_user_prefix = ""
        if system:
            if self.system_in_user:
                first_user_prefix = self._fill(self.system, tokenizer, system)
            else:
                pending += self._fill(self.system, tokenizer, system)
        segments: list[Segment] = []
        opened = False  # the previous answer's stop already opened this user turn
        for i, message in enumerate(messages):
            if message.role == "user":
                content = (first_user_prefix if i == 0 else "") + message.content
                user = self._fill(self.user, tokenizer, content, i // 2 + 1)
                if opened:
                    user = user[len(self._fill(self.stop, tokenizer)) :]
                pending += user + self._fill(self.assistant_header, tokenizer)
                continue
            last = i == len(messages) - 1
            if pending:
                segments.append(Segment(pending, False))
            answer = self._fill(self.answer, tokenizer, message.content)
            segments.append(Segment(answer + self.answer_stop(tokenizer, last), True))
            opened = self.shares_stop and not last
            # The separator follows every answer, except where the next turn opened already, and after the last
            # answer of a family whose training text ends at its final stop.
            closes = last and not self.stop_in_history
            pending = "" if opened or closes else self._fill(self.separator, tokenizer)
        if pending:
            segments.append(Segment(pending, False))
        return segments

    def stop_strings(self, tokenizer: Any) -> list[str]:
        stops = [self._fill(self.stop, tokenizer)]
        if self.final_stop is not None:
            stops.append(self._fill(self.final_stop, tokenizer))
        return [*dict.fromkeys([*stops, *self.stop_words])]

    def check(self, tokenizer: Any) -> None:
        """ConfigError unless every special token of the template is one token of `tokenizer`."""
        if any("{eos}" in s for s in (self.stop, self.final_stop or "")) and not tokenizer.eos_token:
            raise ConfigError(f"template '{self.name}' ends turns with the EOS token, but the tokenizer has none")
        needed = [*self.special_tokens, *self.stop_strings(tokenizer)[: 2 if self.final_stop is not None else 1]]
        missing = [t for t in dict.fromkeys(needed) if single_token_id(tokenizer, t) is None]
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


def single_token_id(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


# ---------------------------------------------------------------------------------------------
# The jinja template that renders like a named one


def named_jinja_template(t: NamedTemplate) -> str:
    """A jinja chat_template that renders exactly like `t` (to save with the tokenizer)."""
    sys_before, sys_after = _split_slot(t.system)
    user_before, user_after = _split_slot(t.user)
    answer_before, answer_after = _split_slot(t.answer)
    default = _jinja_expr(t.default_system) if t.default_system else "''"
    system_block = (
        "{%- if loop.first and system_message -%}"
        f"{{%- set content = {sys_before} + system_message + {sys_after} + content -%}}"
        "{%- endif -%}"
    )
    user_open = user_before
    if t.shares_stop:  # after an answer, the answer's stop already opened this turn
        opened = _jinja_expr(t.user.partition("{content}")[0][len(t.stop) :])
        user_open = f"({user_before} if loop.first else {opened})"
    last_stop = _jinja_expr(t.final_stop if t.final_stop is not None else t.stop)
    history_stop = _jinja_expr(t.stop) if t.stop_in_history else "''"
    separator = "''" if t.shares_stop else _jinja_expr(t.separator)
    header = _jinja_expr(t.assistant_header)
    last_separator = separator if t.stop_in_history else "''"
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
        f"{{{{- {user_open} + content + {user_after} -}}}}",
        "{%- elif message['role'] == 'assistant' -%}",
        f"{{{{- {header} + {answer_before} + message['content'] + {answer_after} -}}}}",
        f"{{%- if loop.last -%}}{{{{- {last_stop} + {last_separator} -}}}}"
        f"{{%- else -%}}{{{{- {history_stop} + {separator} -}}}}{{%- endif -%}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        f"{{%- if add_generation_prompt -%}}{{{{- {header} -}}}}{{%- endif -%}}",
    ]
    return "".join(parts)


def _split_slot(slot: str) -> tuple[str, str]:
    before, _, after = slot.partition("{content}")
    return _jinja_expr(before), _jinja_expr(after)


def _jinja_expr(text: str) -> str:
    """A jinja expression for `text`, with {bos}/{eos} as the bos_token/eos_token variables and {round} as the
    1-based number of the exchange (in the message loop)."""
    pieces: list[str] = []
    for i, part in enumerate(text.split("{round}")):
        if i:
            pieces.append("((loop.index0 // 2 + 1) | string)")
        for j, chunk in enumerate(part.split("{bos}")):
            if j:
                pieces.append("bos_token")
            for k, literal in enumerate(chunk.split("{eos}")):
                if k:
                    pieces.append("eos_token")
                if literal:
                    pieces.append(json.dumps(literal, ensure_ascii=False))
    return "(" + " + ".join(pieces) + ")" if pieces else "''"
