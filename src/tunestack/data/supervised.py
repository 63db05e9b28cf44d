"""Tokenize conversations for SFT: input_ids, labels (-100 outside the answers), attention_mask.

Labels come from the template's segments, never from comparing ids with the pad id, so a
tokenizer whose pad token is its EOS still trains the real EOS; tool calls are trained like answers, tool
results are not. Over-long samples lose their oldest exchanges first (the system prompt and tools stay), then
the left of the last question;
a sample whose last answer cannot fit with some of its question is dropped and counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tunestack.data.collators import IGNORE_INDEX, PadCollator
from tunestack.data.formats import Conversation, Message
from tunestack.data.templates import Segment, Template, conversation_segments, prompt_segments
from tunestack.data.tools import Tool
from tunestack.errors import DataError


@dataclass(frozen=True)
class Limits:
    """Length caps in tokens: the whole sample, the prompt before the last answer, and the last answer."""

    max_length: int
    max_source_length: int | None = None
    max_target_length: int | None = None


@dataclass
class Encoded:
    ids: list[int]
    answer: list[bool]  # True on tokens of assistant answers + stop tokens
    last_answer_start: int
    truncated: bool = False

    @property
    def last_answer_len(self) -> int:
        return sum(self.answer[self.last_answer_start :])

    def fits(self, limits: Limits) -> bool:
        if len(self.ids) > limits.max_length:
            return False
        if limits.max_source_length is not None and self.last_answer_start > limits.max_source_length:
            return False
        return True

    def to_features(self, train_on_inputs: bool) -> dict[str, list[int]]:
        if train_on_inputs:
            labels = list(self.ids)
        else:
            labels = [i if a else IGNORE_INDEX for i, a in zip(self.ids, self.answer, strict=True)]
        return {"input_ids": list(self.ids), "labels": labels, "attention_mask": [1] * len(self.ids)}


class SegmentTokenizer:
    """Tokenizes segments one by one: special tokens in template text become their single ids, and the
    tokenizer's automatic BOS is added once, only when the template text does not start with it."""

    def __init__(self, tokenizer: Any, template: Template):
        self.tokenizer = tokenizer
        self.template = template
        self.bos_id = auto_bos_id(tokenizer)

    def encode_segments(self, segments: Sequence[Segment]) -> Encoded:
        texts = [s.text for s in segments]
        pieces = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        ids: list[int] = []
        answer: list[bool] = []
        if self.bos_id is not None and not (pieces and pieces[0] and pieces[0][0] == self.bos_id):
            ids.append(self.bos_id)
            answer.append(False)
        last_start = len(ids)
        for segment, piece in zip(segments, pieces, strict=True):
            if segment.trainable:
                last_start = len(ids)
            ids.extend(piece)
            answer.extend([segment.trainable] * len(piece))
        return Encoded(ids, answer, last_start)

    def encode(self, conversation: Conversation) -> Encoded:
        return self.encode_segments(conversation_segments(self.template, self.tokenizer, conversation))

    def encode_prompt(
        self,
        conversation: Conversation | Sequence[Message] | Sequence[Mapping[str, Any]],
        system: str | None = None,
        tools: Sequence[Tool] = (),
    ) -> list[int]:
        """Prompt ids for generation, tokenized exactly as the same prompt is in training."""
        return self.encode_segments(prompt_segments(self.template, self.tokenizer, conversation, system, tools)).ids

    def fit(self, conversation: Conversation, limits: Limits) -> Encoded | None:
        """The encoded conversation within `limits`, or None when its last answer cannot fit."""
        encoded = self.encode(conversation)
        if limits.max_target_length is not None and encoded.last_answer_len > limits.max_target_length:
            return None
        if encoded.fits(limits):
            return encoded
        n_pairs = conversation.exchanges
        # Drop the oldest pairs: binary search for the fewest dropped that fits.
        lo, hi, best = 1, n_pairs - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            candidate = self.encode(conversation.drop_pairs(mid))
            if candidate.fits(limits):
                best, hi = candidate, mid - 1
            else:
                lo = mid + 1
        if best is not None:
            best.truncated = True
            return best
        return self._trim_question(conversation.drop_pairs(n_pairs - 1), limits)

    def _trim_question(self, conversation: Conversation, limits: Limits) -> Encoded | None:
        """Cut the left of the last question until the sample fits; None when nothing of it would remain."""
        last_user = next(m for m in reversed(conversation.messages) if m.role == "user")
        question = self.tokenizer(last_user.content, add_special_tokens=False)["input_ids"]
        encoded = self.encode(conversation)
        for _ in range(4):  # re-tokenizing a cut text can differ by a token or two
            over = len(encoded.ids) - limits.max_length
            if limits.max_source_length is not None:
                over = max(over, encoded.last_answer_start - limits.max_source_length)
            if over <= 0:
                encoded.truncated = True
                return encoded
            question = question[over:]
            if not question:
                return None
            text = self.tokenizer.decode(question)
            encoded = self.encode(conversation.with_last_user(text))
        return None


def auto_bos_id(tokenizer: Any) -> int | None:
    """The BOS id the tokenizer adds by itself (None when it adds none)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    if with_special and with_special[0] == bos and (not without or without[0] != bos):
        return bos
    return None


def encode_conversation(
    conv: Conversation,
    tokenizer: Any,
    template: Template,
    max_length: int,
    train_on_inputs: bool = False,
    max_source_length: int | None = None,
    max_target_length: int | None = None,
) -> dict[str, list[int]] | None:
    """input_ids / labels / attention_mask of one conversation, or None when its last answer cannot fit."""
    encoded = SegmentTokenizer(tokenizer, template).fit(conv, Limits(max_length, max_source_length, max_target_length))
    return None if encoded is None else encoded.to_features(train_on_inputs)


def build_sft_dataset(
    conversations: Iterable[Conversation],
    tokenizer: Any,
    template: Template,
    max_length: int,
    train_on_inputs: bool = False,
    max_source_length: int | None = None,
    max_target_length: int | None = None,
) -> tuple[Any, dict[str, int]]:
    """A `datasets.Dataset` of encoded conversations, and stats: samples, dropped_too_long, truncated,
    trainable_tokens, total_tokens."""
    import datasets
    from tqdm.auto import tqdm

    encoder = SegmentTokenizer(tokenizer, template)
    limits = Limits(max_length, max_source_length, max_target_length)
    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
    stats = {"samples": 0, "dropped_too_long": 0, "truncated": 0, "trainable_tokens": 0, "total_tokens": 0}
    for conv in tqdm(conversations, desc="tokenizing", unit="sample", disable=None):
        encoded = encoder.fit(conv, limits)
        if encoded is None:
            stats["dropped_too_long"] += 1
            continue
        features = encoded.to_features(train_on_inputs)
        for key, column in columns.items():
            column.append(features[key])
        stats["samples"] += 1
        stats["truncated"] += int(encoded.truncated)
        stats["total_tokens"] += len(encoded.ids)
        stats["trainable_tokens"] += sum(1 for label in features["labels"] if label != IGNORE_INDEX)
    if not stats["samples"]:
        raise DataError(
            f"all {stats['dropped_too_long']} conversations are too long: no last answer fits in "
            f"max_length={max_length} tokens with its question; raise model_max_length"
        )
    return datasets.Dataset.from_dict(columns), stats


# SFT batches pad like any other: labels with -100, so a pad id equal to the EOS never hides the real EOS.
SupervisedCollator = PadCollator


def collator_for(tokenizer: Any, pad_to_multiple_of: int | None = None) -> PadCollator:
    """Dynamic-padding collator; pads with the pad token, or the EOS when the tokenizer has no pad token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
    return PadCollator(pad, pad_to_multiple_of)
