"""Generation shared by `tunestack chat`, `tunestack infer` and `tunestack serve`.

`ChatModel.load` turns the model flags (a stage output folder, a merged folder, a base model or alias, or
MedicalGPT's --base_model + --lora_model) into a model with its adapters merged in memory, its tokenizer,
its stop ids and sampling defaults (tunestack.infer.decoding). Prompts are rendered with the tokenizer's
chat template (or --template_name), tokenized the way training tokenizes them, and generated in
left-padded batches, optionally streamed token by token. On a CPU the linear layers decode on oneDNN-prepacked
copies of their weights, made at the first answer and kept (tunestack.model.packed_linear).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tunestack.config.infer import GenerationArguments, ModelSelection
from tunestack.config.model import ModelArguments
from tunestack.data.supervised import auto_bos_id
from tunestack.errors import ConfigError
from tunestack.infer.decoding import Sampling, resolve_sampling, sampling_defaults, stop_token_ids
from tunestack.model.anatomy import untokenizable_ids
from tunestack.model.load import load_model, load_tokenizer
from tunestack.model.packed_linear import PackedLinears
from tunestack.model.ref import resolve_stack, training_system_prompt

logger = logging.getLogger(__name__)

Messages = Sequence[Mapping[str, Any]]


def _named_template(name: str | None, tokenizer: Any, tool_format: str = "auto") -> Any:
    """The template object of tunestack.data.templates for a named template, or None for the tokenizer's own."""
    try:
        from tunestack.data import templates
    except ImportError:  # named templates not available in this build: the tokenizer's template is used
        if name:
            logger.warning("named templates are not available; using the tokenizer's chat template")
        return None
    if name in templates.TOKENIZER_TEMPLATE_NAMES:
        return None
    return templates.get_template(name, tokenizer, tool_format)


def _has_tool_turns(messages: Messages) -> bool:
    return any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


class _CallbackStreamer:
    """A transformers streamer that hands each finished piece of text to a callback."""

    def __init__(self, tokenizer: Any, callback: Callable[[str], None]):
        from transformers import TextStreamer

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    callback(text)

        self.streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class ChatModel:
    """A loaded model ready to answer: tokenizer, stop ids, prompt rendering, (streamed) generation."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        stop_ids: list[int],
        template: Any = None,
        name: str = "",
        default_system: str | None = None,
        defaults: Mapping[str, Any] | None = None,
        tool_format: str = "auto",
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.template = template
        self.name = name
        self.default_system = default_system  # the system prompt the model was trained with, if any
        self.bos_id = auto_bos_id(tokenizer)
        self.defaults = dict(defaults or {})  # the sampling of the model folder's generation_config.json
        self.tool_format = tool_format
        self._tools_template: Any = None
        self._call_format: Any = None
        self.unused_ids = untokenizable_ids(model, tokenizer)  # output rows no token decodes to
        self.packed = PackedLinears(model)  # on a CPU: decoding on prepacked weights, packed at the first answer

    @classmethod
    def load(cls, selection: ModelSelection) -> ChatModel:
        import torch

        ref = resolve_stack(selection.reference, selection.adapter_path)
        tokenizer = load_tokenizer(ref, selection.tokenizer_path, selection.trust_remote_code)
        template = _named_template(selection.template_name, tokenizer, selection.tool_format)
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"the tokenizer of {ref.reference} has no chat template (a base model?): pass --template_name, "
                "or chat with an instruction-tuned model or a stage output folder"
            )
        on_gpu = torch.cuda.is_available() and not (selection.only_cpu or selection.cpu_only)
        args = ModelArguments(
            torch_dtype=selection.torch_dtype,
            device_map=(selection.device_map or "auto") if on_gpu else None,
            load_in_8bit=selection.load_in_8bit,
            load_in_4bit=selection.load_in_4bit,
            trust_remote_code=selection.trust_remote_code,
            allow_pickle=selection.allow_pickle,
        )
        if not on_gpu and args.torch_dtype == "auto":
            args.torch_dtype = "float32"
        # Every adapter is merged in (exact, and faster to generate with); under a 4/8-bit load the newest
        # stays live, since an adapter cannot be merged into quantized weights.
        model = load_model(ref, args, tokenizer=tokenizer, keep_last_adapter=args.load_in_4bit or args.load_in_8bit)
        model.eval()
        extra: list[int] = []
        if template is not None:
            from tunestack.data.templates import stop_token_ids as template_stop_ids

            extra = template_stop_ids(template, tokenizer)
        stops = stop_token_ids(ref, model, tokenizer, extra)
        defaults = sampling_defaults(ref, model)
        system = training_system_prompt(ref)
        return cls(model, tokenizer, stops, template, ref.reference, system, defaults, selection.tool_format)

    def system_for(self, options: GenerationArguments) -> str | None:
        """--system_prompt when given ('' for none), else the system prompt of training."""
        return options.system_prompt if options.system_prompt is not None else self.default_system

    # -- prompts -----------------------------------------------------------------------------

    @property
    def tools_template(self) -> Any:
        """The template of conversations with tools: the named one, else the tokenizer's own (which writes tools
        itself, or in the named tool format saved in front of it, else in the default format)."""
        if self._tools_template is None:
            from tunestack.data.templates import get_template

            self._tools_template = self.template or get_template(None, self.tokenizer, self.tool_format)
        return self._tools_template

    @property
    def call_format(self) -> Any:
        """The tool format the model answers in (tunestack.data.tool_formats.ToolFormat)."""
        if self._call_format is None:
            from tunestack.data.templates import call_format

            self._call_format = call_format(self.tools_template, self.tokenizer)
        return self._call_format

    def render(self, messages: Messages, system: str | None = None, tools: Sequence[Mapping[str, Any]] = ()) -> str:
        """The prompt text for the next answer: `messages` alternate user/assistant and end with a user turn (or
        tool results after the assistant's calls); `tools` are the function schemas the model may call."""
        if self.template is not None or tools or _has_tool_turns(messages):
            from tunestack.data.templates import render_prompt

            return render_prompt(self.tools_template, self.tokenizer, messages, system, tuple(tools))
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        with_system = ([{"role": "system", "content": system}] if system else []) + turns
        try:
            return self.tokenizer.apply_chat_template(with_system, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja TemplateError: e.g. "System role not supported"
            if not system:
                raise ConfigError(f"the chat template of {self.name} fails: {exc}") from None
            # Templates without a system role (Gemma, Mistral): the system text opens the first user turn.
            turns[0] = {"role": "user", "content": f"{system}\n\n{turns[0]['content']}"}
            return self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)

    def encode(self, text: str) -> list[int]:
        """Prompt ids exactly as training tokenizes them: specials in the text map to their ids, and the
        tokenizer's automatic BOS is added once, only when the text does not start with it."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    @property
    def context_length(self) -> int | None:
        config = (
            self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        )
        return getattr(config, "max_position_embeddings", None)

    def prompt_ids(
        self, messages: Messages, system: str | None, max_new_tokens: int, tools: Sequence[Mapping[str, Any]] = ()
    ) -> tuple[list[int], int]:
        """Ids of the prompt for `messages` within the context window, and how many old messages were dropped.

        The oldest exchanges (a question with its answers, calls and results) go first; a single question that is
        still too long keeps its end.
        """
        messages = list(messages)
        limit = (self.context_length or 0) - max_new_tokens
        dropped = 0
        while True:
            ids = self.encode(self.render(messages, system, tools))
            if limit <= 0 or len(ids) <= limit:
                return ids, dropped
            later = [i for i, m in enumerate(messages) if m.get("role") == "user" and i > 0]
            if later:
                dropped += later[0]
                messages = messages[later[0] :]
                continue
            logger.warning("the prompt has %d tokens, more than the %d that fit; keeping its end", len(ids), limit)
            return ids[-limit:], dropped

    # -- generation ----------------------------------------------------------------------------

    def sampling(self, options: GenerationArguments) -> Sampling:
        """The decoding of `options`: what they set, else what the model folder sets, else greedy."""
        keys = ("temperature", "top_p", "top_k", "repetition_penalty", "do_sample")
        return resolve_sampling(self.defaults, **{k: getattr(options, k) for k in keys})

    def generation_config(self, options: GenerationArguments, sampling: Sampling | None = None) -> Any:
        config = copy.deepcopy(self.model.generation_config)
        sampling = sampling or self.sampling(options)
        config.update(
            max_new_tokens=options.max_new_tokens,
            max_length=None,
            min_new_tokens=None,
            do_sample=sampling.do_sample,
            num_beams=1,
            repetition_penalty=sampling.repetition_penalty,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0],
            temperature=sampling.temperature if sampling.do_sample else None,
            top_p=sampling.top_p if sampling.do_sample else None,
            top_k=sampling.top_k if sampling.do_sample else None,
            stop_strings=options.stop_strings or None,
            suppress_tokens=self.unused_ids or None,
        )
        return config

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        options: GenerationArguments,
        on_text: Callable[[str], None] | None = None,
    ) -> list[str]:
        """Answers to a batch of prompt ids (left padded). `on_text` streams the answer of a single prompt."""
        if options.seed is not None:
            from transformers import set_seed

            set_seed(options.seed)
        streamer = None
        if on_text is not None:
            if len(prompts) != 1:
                raise ValueError("streaming needs a single prompt")
            streamer = _CallbackStreamer(self.tokenizer, on_text).streamer
        out = self.generate_ids(prompts, self.generation_config(options), streamer)
        return [self.decode(ids, options.stop_strings) for ids in out]

    def generate_ids(
        self, prompts: Sequence[Sequence[int]], config: Any, streamer: Any = None, stopping_criteria: Any = None
    ) -> list[list[int]]:
        """The new token ids of each prompt (left padded into one batch) under the GenerationConfig `config`."""
        import torch

        width = max(len(p) for p in prompts)
        pad = config.pad_token_id
        if config.stop_strings:
            # As a criterion of ours rather than through generate(tokenizer=...): generate hands its extra
            # arguments on to the model's forward, which a model's own code may not accept.
            from transformers import StoppingCriteriaList, StopStringCriteria

            criteria = StopStringCriteria(tokenizer=self.tokenizer, stop_strings=config.stop_strings)
            stopping_criteria = StoppingCriteriaList([*(stopping_criteria or []), criteria])
            config = copy.copy(config)
            config.stop_strings = None
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        device = next(self.model.parameters()).device
        with torch.inference_mode(), self.packed():
            out = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                streamer=streamer,
                stopping_criteria=stopping_criteria,
            )
        return [seq[width:].tolist() for seq in out]

    def decode(self, new_ids: list[int], stop_strings: Sequence[str] = ()) -> str:
        """The answer text: the new tokens up to the first stop token (or stop string), without special tokens."""
        stops = set(self.stop_ids)
        end = next((i for i, t in enumerate(new_ids) if t in stops), len(new_ids))
        text = self.tokenizer.decode(new_ids[:end], skip_special_tokens=True)
        for stop in stop_strings:
            text = text.split(stop, 1)[0]
        return text.strip()

    def answer(
        self,
        messages: Messages,
        options: GenerationArguments,
        on_text: Callable[[str], None] | None = None,
        tools: Sequence[Mapping[str, Any]] = (),
    ) -> str:
        """One answer to the conversation `messages` (ending with a user turn)."""
        ids, _ = self.prompt_ids(messages, self.system_for(options), options.max_new_tokens, tools)
        return self.generate([ids], options, on_text)[0]


def lstrip_stream(write: Callable[[str], None]) -> Callable[[str], None]:
    """A streaming callback that drops the whitespace an answer starts with (the final answer is stripped too)."""
    started = False

    def callback(text: str) -> None:
        nonlocal started
        if not started:
            text = text.lstrip()
            started = bool(text)
        if text:
            write(text)

    return callback


def describe(chat_model: ChatModel) -> str:
    """One line about the loaded model, for the chat banner and the infer summary."""
    model = chat_model.model
    device = next(model.parameters()).device
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    template = getattr(chat_model.template, "name", None) or "the tokenizer's chat template"
    stops = ", ".join(f"{i} {chat_model.tokenizer.convert_ids_to_tokens(i)!r}" for i in chat_model.stop_ids)
    line = f"{chat_model.name} ({type(model).__name__}, {dtype} on {device}; {template}; stops at {stops})"
    if chat_model.defaults:
        shown = ", ".join(f"{k}={v}" for k, v in chat_model.defaults.items())
        line += f"\nsampling of its generation_config.json: {shown} (flags replace it)"
    if chat_model.default_system:
        line += f"\nsystem prompt of its training: {chat_model.default_system!r} (--system_prompt replaces it)"
    return line
