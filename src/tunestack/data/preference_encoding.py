"""Preference samples -> token ids, exactly as SFT tokenizes the same conversation: the prompt as the model sees
it at inference (ending with the assistant header), each answer as the span SFT trains (answer + stop token)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunestack.data.formats import Conversation, Message
from tunestack.data.preference import Item, KTOSample, PreferencePair
from tunestack.data.supervised import SegmentTokenizer
from tunestack.data.templates import Template, conversation_segments
from tunestack.data.tools import Tool
from tunestack.errors import DataError


@dataclass(frozen=True)
class PreferenceLimits:
    max_source_length: int = 2048
    max_target_length: int = 512
    min_target_length: int = 0


class PreferenceEncoder:
    """Token ids of prompts and answers, exactly as SFT tokenizes them (same template, same segment tokenization)."""

    def __init__(self, tokenizer: Any, template: Template, limits: PreferenceLimits | None = None):
        self.tokenizer = tokenizer
        self.template = template
        self.segments = SegmentTokenizer(tokenizer, template)
        self.limits = limits or PreferenceLimits()

    def prompt_ids(
        self, system: str | None, prompt: Sequence[Message], tools: Sequence[Tool] = ()
    ) -> tuple[list[int], bool]:
        """The generation prompt (ending with the assistant header); the end is kept when it is too long.
        Returns (ids, truncated)."""
        ids = self.segments.encode_prompt(list(prompt), system, tools)
        limit = self.limits.max_source_length
        if len(ids) <= limit:
            return ids, False
        bos = self.segments.bos_id
        if bos is not None and ids and ids[0] == bos and limit > 1:
            return [bos] + ids[len(ids) - limit + 1 :], True
        return ids[len(ids) - limit :], True

    def answer_ids(
        self, system: str | None, prompt: Sequence[Message], answer: str | Message, tools: Sequence[Tool] = ()
    ) -> list[int]:
        """The answer (text, or an assistant message that may call tools) and its stop token: the span SFT trains."""
        message = answer if isinstance(answer, Message) else Message("assistant", answer)
        conversation = Conversation(system, tuple(prompt) + (message,), tools=tuple(tools))
        segments = conversation_segments(self.template, self.tokenizer, conversation)
        last = [s for s in segments if s.trainable][-1]
        return self.tokenizer(last.text, add_special_tokens=False)["input_ids"]

    def _length_problem(self, *answers: list[int]) -> str | None:
        if any(len(a) > self.limits.max_target_length for a in answers):
            return "dropped_too_long"
        if any(len(a) < self.limits.min_target_length for a in answers):
            return "dropped_too_short"
        return None

    def encode_pair(self, pair: PreferencePair) -> tuple[dict[str, list[int]] | None, str | None, bool]:
        """({prompt_ids, chosen_ids, rejected_ids} or None when dropped, drop reason, prompt truncated)."""
        chosen = self.answer_ids(pair.system, pair.prompt_messages, pair.chosen_message, pair.tools)
        rejected = self.answer_ids(pair.system, pair.prompt_messages, pair.rejected_message, pair.tools)
        problem = self._length_problem(chosen, rejected)
        if problem:
            return None, problem, False
        prompt, truncated = self.prompt_ids(pair.system, pair.prompt_messages, pair.tools)
        return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}, None, truncated

    def encode_unpaired(self, sample: KTOSample) -> tuple[dict[str, Any] | None, str | None, bool]:
        completion = self.answer_ids(sample.system, sample.prompt_messages, sample.completion_message, sample.tools)
        problem = self._length_problem(completion)
        if problem:
            return None, problem, False
        prompt, truncated = self.prompt_ids(sample.system, sample.prompt_messages, sample.tools)
        return {"prompt_ids": prompt, "completion_ids": completion, "label": sample.desirable}, None, truncated


def build_preference_dataset(items: Sequence[Item], encoder: PreferenceEncoder) -> tuple[Any, dict[str, int]]:
    """A `datasets.Dataset` of encoded pairs (prompt_ids, chosen_ids, rejected_ids) or, for KTO samples,
    (prompt_ids, completion_ids, label); and stats."""
    import datasets
    from tqdm.auto import tqdm

    rows: list[dict[str, Any]] = []
    stats = {"samples": 0, "truncated_prompts": 0, "dropped_too_long": 0, "dropped_too_short": 0}
    stats |= {"prompt_tokens": 0, "answer_tokens": 0}
    for item in tqdm(items, desc="tokenizing", unit="sample", disable=None):
        if isinstance(item, PreferencePair):
            row, problem, truncated = encoder.encode_pair(item)
        else:
            row, problem, truncated = encoder.encode_unpaired(item)
        if row is None:
            stats[problem or "dropped_too_long"] += 1
            continue
        rows.append(row)
        stats["samples"] += 1
        stats["truncated_prompts"] += int(truncated)
        stats["prompt_tokens"] += len(row["prompt_ids"])
        stats["answer_tokens"] += sum(len(v) for k, v in row.items() if k.endswith("_ids") and k != "prompt_ids")
    if not rows:
        raise DataError(
            f"no preference sample fits: {stats['dropped_too_long']} have an answer longer than max_target_length="
            f"{encoder.limits.max_target_length} tokens, {stats['dropped_too_short']} one shorter than "
            f"min_target_length={encoder.limits.min_target_length}"
        )
    return datasets.Dataset.from_list(rows), stats
