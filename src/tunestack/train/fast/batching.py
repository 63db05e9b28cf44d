"""Batches cut to a token budget (`--max_tokens_per_batch`) instead of a fixed number of samples.

With packed rows a batch costs about its token count, so a fixed sample count makes steps of very
different cost and memory: four long chats can hold ten times the tokens of four short ones. A token
budget keeps every step near the same size (and the peak memory bounded by the budget), with as many
samples as fit. Without packing the budget counts padded tokens (samples × the longest), and samples
of similar length are batched together so that little of it is padding.

Every rank builds the same batches from the same seed and takes its share, so data parallelism needs
no communication; each epoch reshuffles.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import Sampler

SORT_WINDOW = 64  # padded mode: samples sorted by length within windows of this many batches' worth


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Lists of dataset indices whose (packed or padded) size stays within `max_tokens`."""

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        *,
        packed: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
        if too_long:
            raise ValueError(
                f"{len(too_long)} samples are longer than --max_tokens_per_batch {max_tokens} "
                f"(the longest has {max(lengths)} tokens): raise it to at least --model_max_length"
            )
        self.lengths = list(lengths)
        self.max_tokens = max_tokens
        self.packed = packed
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _cost(self, count: int, longest: int, total: int) -> int:
        return total if self.packed else count * longest

    def batches(self) -> list[list[int]]:
        """All batches of this epoch, for every rank, in training order."""
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if not self.packed:
            mean = max(1, sum(self.lengths) // max(len(self.lengths), 1))
            window = max(1, SORT_WINDOW * self.max_tokens // mean)
            order = [
                i
                for start in range(0, len(order), window)
                for i in sorted(order[start : start + window], key=lambda i: -self.lengths[i])
            ]
        out: list[list[int]] = []
        batch: list[int] = []
        longest = total = 0
        for i in order:
            n = self.lengths[i]
            if batch and self._cost(len(batch) + 1, max(longest, n), total + n) > self.max_tokens:
                out.append(batch)
                batch, longest, total = [], 0, 0
            batch.append(i)
            longest, total = max(longest, n), total + n
        if batch:
            out.append(batch)
        if not self.packed:
            rng.shuffle(out)  # sorted windows made batches of similar length; do not train in length order
        return out

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches()
        per_rank = len(batches) // self.num_replicas if self.num_replicas > 1 else len(batches)
        # Every rank takes the same number of batches (the last few of an epoch may be left out under DDP).
        yield from batches[self.rank :: self.num_replicas][:per_rank]

    def __len__(self) -> int:
        n = len(self.batches())
        return n // self.num_replicas if self.num_replicas > 1 else n


def sample_lengths(dataset: Any) -> list[int]:
    return [len(ids) for ids in dataset["input_ids"]]


class TokenBudgetMixin:
    """Trainer whose training batches follow `args.max_tokens_per_batch` (SFT), not the per-device batch size."""

    def get_train_dataloader(self):
        budget = getattr(self.args, "max_tokens_per_batch", None)
        if not budget:
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        from tunestack.data.collators import PackedCollator

        dataset = self.train_dataset
        sampler = TokenBudgetBatchSampler(
            sample_lengths(dataset),
            budget,
            packed=isinstance(self.data_collator, PackedCollator),
            seed=self.args.seed,
            num_replicas=self.args.world_size,
            rank=self.args.process_index,
        )
        columns = [c for c in dataset.column_names if c not in ("input_ids", "labels", "attention_mask")]
        loader = DataLoader(
            dataset.remove_columns(columns) if columns else dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        prepared = self.accelerator.prepare(loader)
        # The sampler is rank-aware already: make accelerate's sharding wrapper a passthrough.
        wrapper = getattr(prepared, "batch_sampler", None)
        if wrapper is not None and getattr(wrapper, "batch_sampler", None) is sampler:
            wrapper.num_processes = 1
            wrapper.process_index = 0
        return prepared
