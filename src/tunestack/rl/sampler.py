"""The rollouts' draw of each next token from the policy's whole distribution, by inverse CDF.

`generate(do_sample=True)` draws with `torch.multinomial`, which on a CPU spends an exponential random number on
every entry of the vocabulary: 7.8 ms per decoding step for 8 rows of SmolLM2's 49152, about 10% of a PPO
rollout's decoding step. One uniform number per row against the cumulative distribution is the same categorical
draw, in a fraction of that. `CategoricalDraw` is a logits processor for greedy decoding: it draws the token from
softmax(scores / temperature) and leaves it the only finite score, so the greedy pick is the draw. The cumulative
sums run in blocks of 256 entries (float32 within a block, float64 across blocks), so a token's chance is its
probability to float32 rounding of its block's mass, not of the whole vocabulary's running sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor

BLOCK = 256


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of `probs` ([rows, n], non-negative, any positive total), drawn with chance proportional to
    its entry; an entry of 0 is never drawn. Returns [rows] (long)."""
    rows, n = probs.shape
    blocks = F.pad(probs.float(), (0, (-n) % BLOCK)).view(rows, -1, BLOCK).cumsum(-1)  # within each block
    totals = blocks[..., -1].double().cumsum(-1)  # mass up to the end of each block
    u = torch.rand(rows, 1, dtype=torch.float64, device=probs.device, generator=generator) * totals[:, -1:]
    # searchsorted(right=True): the first cumulative sum above u, so an entry (or block) of 0 mass is skipped.
    block = torch.searchsorted(totals, u, right=True).clamp_(max=totals.shape[1] - 1)
    before = F.pad(totals, (1, 0)).gather(1, block)  # the mass before the block
    inner = blocks.gather(1, block[..., None].expand(-1, -1, BLOCK)).squeeze(1)  # [rows, BLOCK]
    # What is left of u inside its block, kept below the block's float32 total so rounding cannot step past it.
    rest = torch.minimum((u - before).float(), torch.nextafter(inner[:, -1:], torch.zeros_like(inner[:, -1:])))
    within = torch.searchsorted(inner, rest, right=True).clamp_(max=BLOCK - 1)
    return (block * BLOCK + within).squeeze(1)


class CategoricalDraw(LogitsProcessor):
    """A `generate` logits processor (with do_sample=False) that samples softmax(scores / temperature): the drawn
    token keeps score 0, every other one -inf. Processors before it (suppressed tokens) act on its input."""

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        token = draw(probs)
        return torch.full_like(scores, float("-inf")).scatter_(1, token[:, None], 0.0)
