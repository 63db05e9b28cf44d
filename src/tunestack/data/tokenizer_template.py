"""The tokenizer's own jinja chat template, rendered with ``tokenizer.apply_chat_template``.

Trainable spans are found by rendering prefixes: the text between "everything before the answer + generation
prompt" and "everything up to the answer" is the assistant part; its stop token is the first special token
after the content. Tools: a template that renders them itself (Qwen2.5/3, Llama 3.1+, GLM-4 style; found by
rendering a probe) gets ``tools=`` and the assistant's ``tool_calls``, and a call turn is trained from the end of
the generation prompt to the first special token after the call; any other template (or ``--tool_format NAME``)
sees the conversation lowered to plain turns in a named tool format first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunestack.data.formats import Message, has_tool_content
from tunestack.data.named_templates import Segment, template_names
from tunestack.data.tool_formats import get_tool_format, lower
from tunestack.data.tools import Tool, ToolCall, template_tools
from tunestack.errors import ConfigError

PROBE_TOOL = {
    "name": "tunestack_probe_fn",
    "description": "probe",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
PROBE_CALL = ToolCall.of("tunestack_probe_fn", {"city": "tunestack_probe_value"})
_native_cache: dict[tuple[str, str | None, str | None], bool] = {}


@dataclass(frozen=True)
class TokenizerTemplate:
    """The tokenizer's jinja chat_template; trainable spans are derived by rendering prefixes."""

    source: str
    name: str = "tokenizer"
    tool_format: str = "auto"  # "auto": the template's own tool support, else the default format; or a name

    def _render(
        self, tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool, tools: Sequence[Tool] = ()
    ) -> str:
        if not messages:
            return ""
        return tokenizer.apply_chat_template(
            messages,
            tools=template_tools(tools) or None,
            chat_template=self.source,
            add_generation_prompt=generation_prompt,
            tokenize=False,
        )

    def renders_tools(self, tokenizer: Any) -> bool:
        """Whether the jinja source writes tools, calls and results itself (cached per source)."""
        key = (self.source, tokenizer.bos_token, tokenizer.eos_token)
        if key not in _native_cache:
            probe = [Message("user", "Hi"), Message("assistant", "", (PROBE_CALL,)), Message("tool", "probe_result_7")]
            try:
                text = self._render(tokenizer, _as_dicts(None, probe), True, (PROBE_TOOL,))
            except Exception:  # noqa: BLE001  (a template that refuses the tool role or the tools variable)
                text = ""
            _native_cache[key] = (
                text.count("tunestack_probe_fn") >= 2 and "tunestack_probe_value" in text and "probe_result_7" in text
            )
        return _native_cache[key]

    def native_tools(self, tokenizer: Any) -> bool:
        """Whether tool conversations are rendered by the template itself (rather than a named tool format)."""
        return self.tool_format == "auto" and self.renders_tools(tokenizer)

    def render(
        self, tokenizer: Any, system: str | None, messages: Sequence[Message], tools: Sequence[Tool] = ()
    ) -> list[Segment]:
        if has_tool_content(messages, tools) and not self.native_tools(tokenizer):
            fmt = get_tool_format("default" if self.tool_format == "auto" else self.tool_format)
            system, messages = lower(fmt, system, messages, tools)
            tools = ()
        dicts = _as_dicts(system, messages)
        if messages and messages[-1].role != "assistant":
            return [Segment(self._render(tokenizer, dicts, True, tools), False)]
        full = self._render(tokenizer, dicts, False, tools)
        offset = len(dicts) - len(messages)
        turns = [i for i, m in enumerate(dicts) if m["role"] == "assistant"]
        # The prompt of answer k (rendered with the generation prompt) must be a prefix of the whole
        # rendering; answer k lies between the end of its prompt and the end of the next one.
        prompts = [self._render(tokenizer, dicts[:i], True, tools) for i in turns]
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
            message = messages[i - offset]
            if message.tool_calls:
                start, end, extra = _call_span(full[:bound], len(prompt), message, specials)
            else:
                start, end, extra = _answer_span(tokenizer, full[:bound], len(prompt), message.content, specials)
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


def _call_span(text: str, prompt_end: int, message: Message, specials: list[str]) -> tuple[int, int, str]:
    """The trainable span of an assistant turn with tool calls, as the template writes it: everything the model
    writes after the generation prompt, up to and including the first special token after the last call."""
    name = message.tool_calls[-1].name
    k = text.find(name, prompt_end)
    if k < 0:
        raise ConfigError(
            "the tokenizer's chat template does not write the assistant's tool calls; pass --tool_format default "
            "(or qwen, glm4, llama3) to write them as text"
        )
    found = [(j, s) for s in specials if (j := text.find(s, k + len(name))) >= 0]
    if not found:
        raise ConfigError("the chat template ends a tool-call turn with no special token; pass --tool_format default")
    j, stop = min(found, key=lambda f: (f[0], -len(f[1])))
    return prompt_end, j + len(stop), ""


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


def _as_dicts(system: str | None, messages: Sequence[Message]) -> list[dict[str, Any]]:
    head: list[dict[str, Any]] = [{"role": "system", "content": system}] if system is not None else []
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [c.as_template_call() for c in m.tool_calls]
        out.append(d)
    return head + out
