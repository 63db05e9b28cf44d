"""PPO rollouts' categorical draw (rl/sampler.py): the frequencies of its draws are the probabilities."""

from __future__ import annotations

import pytest
import torch

from tunestack.rl.sampler import BLOCK, CategoricalDraw, draw


def _frequencies(probs: torch.Tensor, draws: int, rows: int = 512) -> torch.Tensor:
    batch = probs[None].expand(rows, -1).contiguous()
    tokens = torch.cat([draw(batch) for _ in range(draws // rows)])
    return torch.bincount(tokens, minlength=probs.shape[0]).double() / len(tokens)


def _assert_matches(freq: torch.Tensor, p: torch.Tensor, draws: int) -> None:
    sigma = (p * (1 - p) / draws).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (freq - p).abs().max()


@pytest.mark.parametrize("n", [7, BLOCK, 3 * BLOCK + 5])
def test_draws_follow_the_distribution_and_never_take_a_zero(n):
    torch.manual_seed(0)
    weights = torch.rand(n) ** 3
    weights[::3] = 0  # zeros scattered, and (for the long rows) a whole block of them
    if n > 2 * BLOCK:
        weights[BLOCK : 2 * BLOCK] = 0
    weights *= 7.5  # any positive total
    draws = 200_192
    freq = _frequencies(weights, draws)
    assert (freq[weights == 0] == 0).all()
    _assert_matches(freq, (weights / weights.sum()).double(), draws)


def test_tokens_at_the_far_end_of_a_large_vocabulary_keep_their_chance():
    """SmolLM2's 49152 entries, 1% of the mass on each of the last two (the last block's last entries), the rest
    spread thinly."""
    torch.manual_seed(1)
    p = torch.full((49152,), 0.98 / 49150)
    p[-2:] = 0.01
    draws = 20_480
    freq = _frequencies(p, draws)
    _assert_matches(freq[-2:], p[-2:].double(), draws)


def test_rows_draw_independently_and_the_generator_makes_them_reproducible():
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.0, 0.0, 3.0]])
    first = draw(probs, torch.Generator().manual_seed(3))
    assert first[0] == 1 and first[1] in (0, 2) and first[2] == 2
    many = torch.stack([draw(probs, torch.Generator().manual_seed(s)) for s in range(64)])
    assert set(many[:, 1].tolist()) == {0, 2}
    assert torch.equal(draw(probs, torch.Generator().manual_seed(3)), first)


def test_the_processor_samples_the_tempered_softmax_and_leaves_one_finite_score():
    torch.manual_seed(2)
    scores = torch.tensor([2.0, 1.0, 0.0, float("-inf"), -1.0])  # -inf: a token suppressed before it
    rows, temperature = 100_000, 0.7
    out = CategoricalDraw(temperature)(torch.zeros(rows, 1, dtype=torch.long), scores[None].expand(rows, -1).clone())
    assert (torch.isfinite(out).sum(1) == 1).all() and (out.amax(1) == 0).all()
    tokens = out.argmax(1)  # what greedy decoding then picks
    freq = torch.bincount(tokens, minlength=5).double() / rows
    assert freq[3] == 0
    _assert_matches(freq, torch.softmax(scores.double() / temperature, 0), rows)
