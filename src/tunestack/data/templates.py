"""Chat templates: how a `Conversation` becomes text, and which parts of it are trained.

Two kinds of template:

* `TokenizerTemplate` (the default, tunestack.data.tokenizer_template): the tokenizer's own jinja
  ``chat_template``, rendered with ``tokenizer.apply_chat_template``; trainable spans are found by rendering
  prefixes.
* `NamedTemplate` (``--template_name``, tunestack.data.named_templates): a fixed format from
  ``templates/templates.yaml`` (vicuna, alpaca, chatml, qwen, llama3, glm4, chatglm3, internlm2, mistral,
  baichuan2, gemma).

Either turns a conversation into `Segment`s ``(text, trainable)``: exactly the assistant content of
every assistant turn (a tool call included) plus that turn's stop token is trainable; system, user, tool results,
role headers and separators are not. Tools are written by the template itself when it can (``--tool_format
auto``), else in a named tool format (tunestack.data.tool_formats), which is then saved in front of the chat
template so that chat, serve and any other reader render tools the way training did.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from tunestack.data.formats import Conversation, Message, as_message, turn_order_problem
from tunestack.data.named_templates import (
    NamedTemplate,
    Segment,
    named_jinja_template,
    named_templates,
    single_token_id,
    template_names,
)
from tunestack.data.tokenizer_template import PROBE_CALL, PROBE_TOOL, TokenizerTemplate
from tunestack.data.tool_formats import TOOL_FORMATS, ToolFormat, get_tool_format
from tunestack.data.tool_jinja import jinja_preamble, preamble_format
from tunestack.data.tools import Tool
from tunestack.errors import ConfigError

TOKENIZER_TEMPLATE_NAMES = (None, "", "auto", "default", "tokenizer")
__all__ = ["NamedTemplate", "Segment", "TokenizerTemplate", "named_templates", "template_names"]

Template = NamedTemplate | TokenizerTemplate


def get_template(name: str | None, tokenizer: Any, tool_format: str | None = "auto") -> Template:
    """The named template, or (no name, "auto", "default", "tokenizer") the tokenizer's own chat_template; with
    `tool_format` (auto: the template's own tool support, else the default format; or a named tool format)."""
    tool_format = "auto" if tool_format in (None, "", "auto") else get_tool_format(tool_format).name
    if name in TOKENIZER_TEMPLATE_NAMES:
        source = getattr(tokenizer, "chat_template", None)
        if not isinstance(source, str) or not source:
            raise ConfigError(
                "the tokenizer has no chat_template; pass template_name (one of " + ", ".join(template_names()) + ")"
            )
        return TokenizerTemplate(source, tool_format=tool_format)
    table = named_templates()
    template = table.get(str(name).lower())
    if template is None:
        close = difflib.get_close_matches(str(name).lower(), list(table), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown template_name '{name}'{hint}; known: {', '.join(template_names())}")
    template.check(tokenizer)
    return dataclasses.replace(template, tool_format=tool_format)


def conversation_segments(template: Template, tokenizer: Any, conversation: Conversation) -> list[Segment]:
    """The conversation as (text, trainable) segments; their texts concatenated are what the model sees."""
    return template.render(tokenizer, conversation.system, conversation.messages, conversation.tools)


def call_format(template: Template, tokenizer: Any) -> ToolFormat:
    """The tool format a model answers in under `template`: the named format in use, or, for a template that
    writes tools itself, the named format that reads back the call it writes (default when none does)."""
    if isinstance(template, NamedTemplate) or not template.native_tools(tokenizer):
        return get_tool_format("default" if template.tool_format == "auto" else template.tool_format)
    marked = preamble_format(template.source)
    if marked in TOOL_FORMATS:
        return TOOL_FORMATS[marked]
    probe = (Message("user", "Hi"), Message("assistant", "", (PROBE_CALL,)))
    trained = [s.text for s in template.render(tokenizer, None, probe, (PROBE_TOOL,)) if s.trainable][-1]
    for stop in template.stop_strings(tokenizer):
        trained = trained.replace(stop, "")
    for fmt in TOOL_FORMATS.values():
        parsed = fmt.parse(trained.strip())
        if parsed is not None and parsed[1] == (PROBE_CALL,):
            return fmt
    return TOOL_FORMATS["default"]


def stop_token_ids(template: Template, tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn (for generation_config.json `eos_token_id`), the tokenizer's EOS last."""
    ids = [single_token_id(tokenizer, s) for s in template.stop_strings(tokenizer)]
    ids.append(tokenizer.eos_token_id)
    return [i for i in dict.fromkeys(ids) if i is not None]


Prompt = Conversation | Sequence[Message] | Sequence[Mapping[str, Any]]


def render_prompt(
    template: Template, tokenizer: Any, conversation: Prompt, system: str | None = None, tools: Sequence[Tool] = ()
) -> str:
    """The generation prompt, ending with the assistant header.

    A `Conversation` gives the prompt for its last answer (the answer itself left out, its tools offered); a
    message list must end with a user turn or a tool result. A leading system message (dict) is the system prompt.
    """
    return "".join(s.text for s in prompt_segments(template, tokenizer, conversation, system, tools))


def prompt_segments(
    template: Template, tokenizer: Any, conversation: Prompt, system: str | None = None, tools: Sequence[Tool] = ()
) -> list[Segment]:
    """Like `render_prompt`, as segments (so that prompts tokenize exactly as in training)."""
    if isinstance(conversation, Conversation):
        tools = tools or conversation.tools
    system, messages = _prompt_messages(conversation, system)
    return template.render(tokenizer, system, messages, tools)


def _prompt_messages(conversation: Prompt, system: str | None) -> tuple[str | None, tuple[Message, ...]]:
    if isinstance(conversation, Conversation):
        return (system if system is not None else conversation.system), conversation.messages[:-1]
    messages: list[Message] = []
    for m in conversation:
        message = as_message(m)
        if message.role == "system" and not messages:  # type: ignore[comparison-overlap]
            system = message.content if system is None else system
            continue
        messages.append(message)
    if turn_order_problem(messages, prompt=True):
        raise ValueError(
            "prompt messages must alternate user/assistant, starting with a user turn and ending with a user turn "
            "or a tool result"
        )
    return system, tuple(messages)


def jinja_chat_template(template: Template) -> str:
    """A jinja chat_template that renders exactly like `template` (to save with the tokenizer); a named tool
    format in use is written in front of it as a preamble that lowers tool conversations the same way."""
    if isinstance(template, TokenizerTemplate):
        if template.tool_format == "auto":
            return template.source
        fmt = get_tool_format(template.tool_format)
        source = template.source
        for old in TOOL_FORMATS.values():  # a folder trained with a tool format before: replace its preamble
            if source.startswith(jinja_preamble(old)):
                source = source[len(jinja_preamble(old)) :]
        return jinja_preamble(fmt) + source
    base = named_jinja_template(template)
    if template.tool_format == "auto":
        return base
    return jinja_preamble(get_tool_format(template.tool_format), template.default_system) + base
