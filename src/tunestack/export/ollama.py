"""The Ollama Modelfile beside an exported .gguf: FROM, TEMPLATE, SYSTEM and one PARAMETER stop per stop string.

The TEMPLATE is Go text/template in Ollama's form: `.System` (the system prompt: the request's, else the
Modelfile's SYSTEM) and `.Messages` (the conversation, in which Ollama also keeps the system message, skipped here).
It is generated from the structured fields of a named chat template (prefix, system, user, assistant header, answer,
stop, separator, round numbers), so it renders a conversation to the same text as tunestack's template: the history with each answer
closed by its stop text, then the assistant header. A tokenizer's jinja chat template is first matched to the
named template that renders probe conversations identically (finding a built-in default system prompt, as
SmolLM2's, on the way); a jinja template that matches none cannot be translated and is an error.

SYSTEM is the system prompt the model was trained with, else the template's default one. A leading BOS token in
the template text is left out when the tokenizer adds BOS itself (llama.cpp and Ollama then add it, once).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from tunestack.data.formats import Message
from tunestack.data.templates import NamedTemplate, Template, TokenizerTemplate, named_templates
from tunestack.errors import ConfigError

_SENTINEL = "\u2063SYSTEM\u2063"
_PROBE_SYSTEM = "You are a careful medical assistant."
_PROBES: tuple[tuple[str | None, tuple[Message, ...]], ...] = tuple(
    (system, messages)
    for system in (None, _PROBE_SYSTEM)
    for messages in (
        (Message("user", "Hi"),),
        (Message("user", "Hi"), Message("assistant", "Hello! How can I help?"), Message("user", "病人发烧了怎么办？")),
        (Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "Bye"), Message("assistant", "Bye.")),
    )
)


def _jinja_text(template: TokenizerTemplate, tokenizer: Any, system: str | None, messages: tuple[Message, ...]) -> str:
    dicts = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": m.role, "content": m.content} for m in messages
    ]
    return tokenizer.apply_chat_template(
        dicts, chat_template=template.source, add_generation_prompt=messages[-1].role == "user", tokenize=False
    )


def _named_text(template: NamedTemplate, tokenizer: Any, system: str | None, messages: tuple[Message, ...]) -> str:
    return "".join(s.text for s in template.render(tokenizer, system, messages))


def _default_system(candidate: NamedTemplate, jinja: TokenizerTemplate, tokenizer: Any) -> str | None:
    """The system prompt the jinja template inserts when none is given, if it renders like `candidate` otherwise."""
    messages = _PROBES[0][1]
    with_sentinel = _named_text(dataclasses.replace(candidate, default_system=None), tokenizer, _SENTINEL, messages)
    before, _, after = with_sentinel.partition(_SENTINEL)
    text = _jinja_text(jinja, tokenizer, None, messages)
    if text.startswith(before) and text.endswith(after) and len(text) > len(before) + len(after):
        return text[len(before) : len(text) - len(after)]
    return None


def fit_named_template(template: Template, tokenizer: Any) -> NamedTemplate:
    """A named template that renders exactly like `template` (itself when it is one), on every probe conversation
    the jinja template accepts (some refuse system prompts). A conversation that ends with an answer may lack the
    answer's stop in the jinja text: training closes it with that stop all the same (GLM-4, ChatGLM3)."""
    if isinstance(template, NamedTemplate):
        return template
    candidates = {t.name: t for t in named_templates().values()}.values()
    rendered = [(s, m, text) for s, m in _PROBES if (text := _accepted(template, tokenizer, s, m)) is not None]
    if any(system is None for system, _, _ in rendered):
        for candidate in candidates:
            for default in dict.fromkeys(
                (candidate.default_system, None, _default_system(candidate, template, tokenizer))
            ):
                fitted = dataclasses.replace(candidate, default_system=default)
                if all(_renders_like(fitted, tokenizer, *probe) for probe in rendered):
                    return fitted
    raise ConfigError(
        "the tokenizer's chat template renders conversations unlike every named template, so the Modelfile cannot "
        f"reproduce it; pass --template_name (one of {', '.join(sorted({t.name for t in candidates}))}) or "
        "--modelfile false"
    )


def _accepted(template: TokenizerTemplate, tokenizer: Any, system: str | None, messages: Any) -> str | None:
    """The jinja template's text of a probe conversation, or None when the template refuses it."""
    try:
        return _jinja_text(template, tokenizer, system, messages)
    except Exception:  # jinja TemplateError (e.g. "System role not supported") or a template-specific raise
        return None


def _renders_like(template: NamedTemplate, tokenizer: Any, system: str | None, messages: Any, jinja: str) -> bool:
    try:
        named = _named_text(template, tokenizer, system, messages)
    except Exception:  # a named template that cannot render this conversation does not fit
        return False
    if named == jinja:
        return True
    closing = template.answer_stop(tokenizer, last=True)
    return (
        messages[-1].role == "assistant"
        and bool(closing)
        and named.removesuffix(template._fill(template.separator, tokenizer) if template.stop_in_history else "")
        == jinja + closing
    )


# ---------------------------------------------------------------------------------------------
# Go template


def _literal(text: str) -> str:
    """`text` as Go template output: raw when it cannot be taken for template syntax, else a Go string action."""
    if not text:
        return ""
    if "{{" in text or "}}" in text or '"""' in text or text.endswith("{") or text.startswith("}"):
        return "{{ " + json.dumps(text) + " }}"
    return text


def go_template(template: NamedTemplate, tokenizer: Any, runtime_adds_bos: bool) -> str:
    """Ollama's TEMPLATE for `template` (see the module docstring). No trim markers (`{{-`) are used: the
    literal text around the actions is output exactly. A round number counts the user turns in a string
    (`len` of one mark per turn: Go templates have no arithmetic)."""
    t = template

    def fill(slot: str) -> str:
        """The slot as Go template text: literals, with {round} as the count of user turns so far."""
        parts = t._fill(slot.replace("{round}", _ROUND), tokenizer).split(_ROUND)
        return "{{ len $rounds }}".join(_literal(p) for p in parts)

    prefix = t._fill(t.prefix, tokenizer)
    bos = tokenizer.bos_token or ""
    if runtime_adds_bos and bos and prefix.startswith(bos):
        prefix = prefix[len(bos) :]
    sys_before, sys_after = (fill(part) for part in t.system.partition("{content}")[::2])
    user_before, user_after = (fill(part) for part in t.user.partition("{content}")[::2])
    answer_before, answer_after = (fill(part) for part in t.answer.partition("{content}")[::2])
    if t.shares_stop:  # after an answer, its stop already opened the turn
        opened = fill(t.user.partition("{content}")[0][len(t.stop) :])
        user_before = f'{{{{ if eq $prev "assistant" }}}}{opened}{{{{ else }}}}{user_before}{{{{ end }}}}'
    history_stop = fill(t.stop) if t.stop_in_history else ""
    header, separator = fill(t.assistant_header), "" if t.shares_stop else fill(t.separator)
    system_block = f"{sys_before}{{{{ $.System }}}}{sys_after}"
    parts = [_literal(prefix), '{{ $rounds := "" }}{{ $prev := "" }}']
    if t.system_in_user:
        parts.append("{{ $first := true }}")
    else:
        parts.append(f"{{{{ if .System }}}}{system_block}{{{{ end }}}}")
    parts.append(
        '{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}{{ if eq .Role "user" }}'
        '{{ $rounds = printf "%sI" $rounds }}'
    )
    parts.append(user_before)
    if t.system_in_user:
        parts.append(f"{{{{ if and $first $.System }}}}{system_block}{{{{ end }}}}{{{{ $first = false }}}}")
    parts.append(f"{{{{ .Content }}}}{user_after}{header}")
    parts.append(f'{{{{ else if eq .Role "assistant" }}}}{answer_before}{{{{ .Content }}}}{answer_after}')
    parts.append(f"{{{{ if not $last }}}}{history_stop}{separator}{{{{ end }}}}")
    parts.append("{{ end }}{{ $prev = .Role }}{{ end }}")
    return "".join(parts)


_ROUND = "\u2063ROUND\u2063"


# ---------------------------------------------------------------------------------------------
# The Modelfile


def _printable(value: str, what: str) -> None:
    """Ollama's Modelfile parser drops unprintable characters other than newlines and tabs."""
    bad = sorted({c for c in value if not (c.isprintable() or c in "\n\r\t")})
    if bad:
        raise ConfigError(f"the {what} holds characters a Modelfile cannot carry: {', '.join(map(repr, bad))}")


def quote(value: str, what: str, multiline: bool = False) -> str:
    """A Modelfile value whose text the parser keeps exactly: in quotes, triple quotes when it spans lines or holds
    a quote (the parser ends a value at a newline outside quotes and trims the spaces around it)."""
    _printable(value, what)
    if '"""' in value:
        raise ConfigError(f'the {what} contains """, which a Modelfile value cannot hold')
    if multiline or "\n" in value or "\r" in value or '"' in value:
        return f'"""{value}"""'
    return f'"{value}"'


def stop_strings(tokenizer: Any, stop_ids: list[int], template: NamedTemplate) -> list[str]:
    """The text of every stop token of training, then the template's stop texts."""
    texts = [tokenizer.decode([i]) for i in stop_ids]
    texts += [s for s in template.stop_strings(tokenizer) if s]
    return [s for s in dict.fromkeys(texts) if s.strip()]


def modelfile_text(gguf_name: str, template_text: str | None, system: str | None, stops: list[str]) -> str:
    lines = [
        "# Ollama Modelfile written by tunestack export. Create the model with:",
        "#   ollama create NAME -f Modelfile",
        f"FROM ./{gguf_name}",
    ]
    if template_text is not None:
        lines.append(f"TEMPLATE {quote(template_text, 'chat template', multiline=True)}")
    if system:
        lines.append(f"SYSTEM {quote(system, 'system prompt', multiline=True)}")
    lines += [f"PARAMETER stop {quote(s, 'stop string')}" for s in stops]
    return "\n".join(lines) + "\n"
