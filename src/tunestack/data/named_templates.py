"""Named chat templates (``--template_name``): fixed formats from ``templates/templates.yaml`` (vicuna, alpaca,
chatml, qwen, llama3, glm4, chatglm3, internlm2, mistral, baichuan2, gemma), rendered into `Segment`s.

A conversation with tools is first lowered to plain turns in the template's tool format (tunestack.data.
tool_formats): ``default`` unless ``--tool_format`` names another.
"""

from __future__ import annotations

import functools
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
    separator: str = ""
    default_system: str | None = None
    system_in_user: bool = False
    special_tokens: tuple[str, ...] = ()
    stop_words: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    tool_format: str = "auto"  # how tools are written: "auto" (the default format) or a named tool format

    def _fill(self, slot: str, tokenizer: Any, content: str = "") -> str:
        bos = tokenizer.bos_token or ""
        eos = tokenizer.eos_token or ""
        return slot.replace("{bos}", bos).replace("{eos}", eos).replace("{content}", content)

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
