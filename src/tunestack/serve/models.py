"""The models a server answers with, loaded once at start, and the reward model behind /v1/score.

Every served name is one `ChatModel` (tunestack.infer.generate), loaded exactly as `tunestack chat` loads
it: its template, the system prompt of its training and its stop ids. Several adapters
(`--lora_model name=path`) are each merged into their own copy of the base, with their own engine: continuous
batching mixes requests in one batch, and one batch cannot run two adapters, while merged copies batch freely
and answer exactly as `tunestack chat --model <adapter>` (which merges too). A copy costs the base's memory.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunestack.config.infer import GenerationArguments, ModelSelection
from tunestack.errors import ConfigError, DataError
from tunestack.infer.generate import ChatModel
from tunestack.serve.engine import Engine, Job, build_engine
from tunestack.serve.protocol import APIError, ChatMessage

logger = logging.getLogger(__name__)


def served_name(reference: str) -> str:
    path = Path(reference).expanduser()
    return path.resolve().name if path.exists() else reference


@dataclass
class ServedModel:
    name: str
    chat_model: ChatModel
    engine: Engine
    created: int

    def card(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "tunestack"}


def selections(selection: ModelSelection, adapters: list[str], name: str | None) -> list[tuple[str, ModelSelection]]:
    """(served name, selection) pairs: `--lora_model name=path` entries each on the base; otherwise one model."""
    named = [a for a in adapters if "=" in a]
    if not named:
        if len(adapters) > 1:
            raise ConfigError("several --lora_model need names: --lora_model NAME=PATH --lora_model NAME2=PATH2")
        single = dataclasses.replace(selection, lora_model=adapters[0] if adapters else None, adapter=None)
        reference = adapters[0] if adapters else selection.reference or "smollm2-135m-instruct"
        return [(name or served_name(reference), single)]
    if len(named) != len(adapters):
        raise ConfigError("give every --lora_model as NAME=PATH when several adapters are served")
    base = dataclasses.replace(selection, lora_model=None, adapter=None)
    out = [(name or served_name(selection.reference or "smollm2-135m-instruct"), base)]
    for entry in named:
        label, _, path = entry.partition("=")
        if not label or not path:
            raise ConfigError(f"--lora_model {entry}: expected NAME=PATH")
        out.append((label, dataclasses.replace(base, lora_model=path)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"served model names must differ: {', '.join(names)}")
    return out


def load_models(
    pairs: list[tuple[str, ModelSelection]], engine: str, max_concurrency: int, cache_tokens: int
) -> dict[str, ServedModel]:
    served: dict[str, ServedModel] = {}
    try:
        for name, selection in pairs:
            started = time.perf_counter()
            chat_model = ChatModel.load(selection)
            chosen = build_engine(chat_model, engine, max_concurrency, cache_tokens)
            served[name] = ServedModel(name, chat_model, chosen, int(time.time()))
            logger.info("loaded %s (%s engine) in %.1fs", name, chosen.name, time.perf_counter() - started)
    except BaseException:
        for model in served.values():
            model.engine.stop()
        raise
    return served


def prompt_for(
    chat_model: ChatModel,
    system: str | None,
    turns: list[dict[str, Any]],
    defaults: GenerationArguments,
    tools: tuple[dict[str, Any], ...] = (),
) -> list[int]:
    """Prompt ids as `tunestack chat` makes them: no system message sent means the server's --system_prompt,
    else the system prompt of training; an empty one means none. `tools` are offered as training wrote them."""
    if system is None:
        system = chat_model.system_for(defaults)
    try:
        return chat_model.encode(chat_model.render(turns, system or None, tools))
    except (ConfigError, DataError, ValueError) as exc:
        raise APIError(400, str(exc), param="messages") from None


def new_job(ids: list[int], max_new_tokens: int, sampling: Any, seed: int | None, index: int, events: Any) -> Job:
    return Job(prompt_ids=ids, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, index=index, events=events)


class RewardScorer:
    """A trained reward model (tunestack rm output); scores conversations as the reward model was trained."""

    def __init__(self, reference: str, torch_dtype: str = "auto", trust_remote_code: bool = False):
        from tunestack.model.reward import load_reward_model

        self.name = served_name(reference)
        self.model, self.tokenizer, self.template = load_reward_model(reference, torch_dtype, trust_remote_code)
        self.lock = threading.Lock()

    def score(self, conversations: list[list[ChatMessage]], max_messages: int) -> list[float]:
        from tunestack.data.formats import Message
        from tunestack.model.reward import score_responses

        prompts, answers = [], []
        for c, conversation in enumerate(conversations):
            where = f"conversations[{c}]"
            if len(conversation) > max_messages:
                raise APIError(400, f"{where}: at most {max_messages} messages", param=where)
            system = None
            turns: list[Message] = []
            for i, message in enumerate(conversation):
                text = message.text(f"{where}[{i}]")
                if message.role in ("system", "developer") and not turns:
                    system = text
                elif message.role in ("user", "assistant"):
                    expected = "user" if len(turns) % 2 == 0 else "assistant"
                    if message.role != expected:
                        raise APIError(400, f"{where}[{i}]: expected a {expected} message", param=where)
                    turns.append(Message(message.role, text))
                else:
                    raise APIError(400, f"{where}[{i}]: role '{message.role}' is not supported", param=where)
            if not turns or turns[-1].role != "assistant":
                raise APIError(400, f"{where}: must end with the assistant answer to score", param=where)
            prompts.append((system, turns[:-1]))
            answers.append(turns[-1].content)
        with self.lock:
            return score_responses(self.model, self.tokenizer, self.template, prompts, answers)
