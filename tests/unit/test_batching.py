"""Token-budget batches: within the budget, every sample once per epoch, reshuffled, split evenly across ranks."""

from __future__ import annotations

import random

import pytest

from tunestack.train.fast.batching import TokenBudgetBatchSampler

LENGTHS = [random.Random(0).randint(5, 120) for _ in range(200)]


@pytest.mark.parametrize("packed", [True, False])
def test_batches_stay_within_the_budget_and_cover_every_sample_once(packed):
    sampler = TokenBudgetBatchSampler(LENGTHS, 256, packed=packed, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
    for b in batches:
        size = sum(LENGTHS[i] for i in b) if packed else len(b) * max(LENGTHS[i] for i in b)
        assert size <= 256
    # Greedy filling leaves little unused: fewer than 1.3x the batches a perfect split would need.
    total = sum(LENGTHS) if packed else None
    if packed:
        assert len(batches) < 1.3 * total / 256


def test_padded_batches_group_similar_lengths():
    batches = list(TokenBudgetBatchSampler(LENGTHS, 256, packed=False, seed=1))
    fed = sum(len(b) * max(LENGTHS[i] for i in b) for b in batches)
    assert fed < 1.25 * sum(LENGTHS), "length grouping should keep padding small"


def test_each_epoch_reshuffles_and_repeats_for_the_same_seed():
    sampler = TokenBudgetBatchSampler(LENGTHS, 256, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first != second
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(TokenBudgetBatchSampler(LENGTHS, 256, seed=3)) == first


def test_ranks_take_disjoint_equal_shares():
    shares = [list(TokenBudgetBatchSampler(LENGTHS, 256, seed=2, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == len(TokenBudgetBatchSampler(LENGTHS, 256, seed=2, num_replicas=2))
    seen = [{i for b in s for i in b} for s in shares]
    assert not seen[0] & seen[1]


def test_a_sample_longer_than_the_budget_is_an_error():
    with pytest.raises(ValueError, match="longer than --max_tokens_per_batch 100"):
        TokenBudgetBatchSampler([50, 150], 100)
