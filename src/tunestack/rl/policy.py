"""The PPO policy: the causal LM and a scalar value head sharing its trunk."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunestack.model.anatomy import batch_first, takes_argument
from tunestack.train.fast.efficient import hf_model
from tunestack.train.fast.packed_logps import chunked_logprobs


class ValueHead(nn.Module):
    """A scalar value per position from the policy's last hidden state."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.summary.weight, std=1 / (hidden_size + 1) ** 0.5 * 0.1)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


def packed_logprobs(
    lm: Any,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    scored: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One packed row ([1, N] ids, positions restarting per sequence) through the decoder of `lm` (adapters
    included), and the output layer only at the `scored` positions: ([4, n] log-prob of each target, entropy, mean
    logit, top-1 hit, of logits / temperature; see packed_logps.chunked_logprobs), and the hidden states there
    ([n, hidden])."""
    base = hf_model(lm)
    hidden = base.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    hidden = hidden[0, scored]
    return chunked_logprobs(hidden, targets, base.get_output_embeddings(), temperature=temperature), hidden


class PolicyWithValue(nn.Module):
    """Policy LM and value head sharing the trunk; one forward gives log-probs (or logits) and values.

    With `scored` and `targets` the input is one packed row and the output the statistics of the targets at the
    scored positions (under logits / temperature) and the values there (`packed_logprobs`); without, padded rows
    and their full logits (not divided) and values at every position."""

    def __init__(self, policy: nn.Module, hidden_size: int):
        super().__init__()
        self.policy = policy
        self.value_head = ValueHead(hidden_size)

    @property
    def config(self) -> Any:
        """The policy's config (what train/fast reads, e.g. to switch its attention per sample)."""
        return self.policy.config

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        scored: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        with_values: bool = True,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if scored is not None:
            stats, hidden = packed_logprobs(self.policy, input_ids, position_ids, scored, targets, temperature)
            return stats, (self.value_head(hidden) if with_values else None)
        # A model's own code may number positions itself (Baichuan's takes no position_ids); generation then did too.
        positions = {"position_ids": position_ids} if takes_argument(self.policy, "position_ids") else {}
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=with_values,
            use_cache=False,
            **positions,
        )
        if not with_values:
            return out.logits, None
        return out.logits, self.value_head(batch_first(self.policy, out.hidden_states[-1]))
