"""Batch collation: dynamic padding (to the longest sample in the batch, never to max length), padding-free packed
rows, and PT blocks whose documents stay apart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass
class PadCollator:
    """Pads input_ids/labels/attention_mask to the longest sample; pad positions never carry a loss.

    Samples without `labels` are language-modelling samples: labels = input_ids. Labels are never
    derived from comparing ids with the pad id, so a real EOS that equals the pad token is kept.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        batch = len(features)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((batch, longest), dtype=torch.long)
        for i, f in enumerate(features):
            ids = torch.as_tensor(f["input_ids"], dtype=torch.long)
            n = ids.numel()
            input_ids[i, :n] = ids
            labels[i, :n] = torch.as_tensor(f["labels"], dtype=torch.long) if "labels" in f else ids
            attention[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


@dataclass
class PackedCollator:
    """Concatenate a batch into one row: input_ids / labels / position_ids of shape [1, total]."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, labels, positions = [], [], []
        for f in features:
            x = torch.as_tensor(f["input_ids"], dtype=torch.long)
            y = torch.as_tensor(f["labels"], dtype=torch.long) if "labels" in f else x.clone()
            y = y.clone()
            y[0] = IGNORE_INDEX  # never predict a sample's first token from the previous sample
            ids.append(x)
            labels.append(y)
            positions.append(torch.arange(x.numel()))
        return {
            "input_ids": torch.cat(ids).unsqueeze(0),
            "labels": torch.cat(labels).unsqueeze(0),
            "position_ids": torch.cat(positions).unsqueeze(0),
        }


def document_position_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Position ids that restart after every EOS, so packed documents do not attend to each other."""
    batch, length = input_ids.shape
    arange = torch.arange(length).expand(batch, length)
    is_end = input_ids == eos_id
    # Index where the current document starts: one past the last EOS before each position.
    start = torch.where(is_end, arange + 1, torch.zeros_like(arange))
    start = torch.cummax(torch.cat([torch.zeros(batch, 1, dtype=torch.long), start[:, :-1]], dim=1), dim=1).values
    return arange - start


@dataclass
class DocumentCollator:
    """PT blocks whose documents stay apart: positions restart after every EOS (full blocks only)."""

    pad_token_id: int
    eos_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = PadCollator(self.pad_token_id)(features)
        if bool(batch["attention_mask"].all()):
            batch["position_ids"] = document_position_ids(batch["input_ids"], self.eos_token_id)
            labels = batch["labels"]
            first = batch["position_ids"] == 0
            labels[first] = IGNORE_INDEX  # a document's first token is not predicted from the previous one
            del batch["attention_mask"]
        return batch
