"""Batch collation with dynamic padding (to the longest sample in the batch, never to max length)."""

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
