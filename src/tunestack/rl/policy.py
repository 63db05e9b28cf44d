"""The PPO policy: the causal LM and a scalar value head sharing its trunk."""

from __future__ import annotations

import torch
from torch import nn

from tunestack.model.anatomy import batch_first, takes_argument


class ValueHead(nn.Module):
    """A scalar value per position from the policy's last hidden state."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.summary.weight, std=1 / (hidden_size + 1) ** 0.5 * 0.1)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


class PolicyWithValue(nn.Module):
    """Policy LM and value head sharing the trunk; one forward gives logits and values."""

    def __init__(self, policy: nn.Module, hidden_size: int):
        super().__init__()
        self.policy = policy
        self.value_head = ValueHead(hidden_size)

    def forward(self, input_ids, attention_mask, position_ids):
        # A model's own code may number positions itself (Baichuan's takes no position_ids); generation then did too.
        positions = {"position_ids": position_ids} if takes_argument(self.policy, "position_ids") else {}
        out = self.policy(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False, **positions
        )
        return out.logits, self.value_head(batch_first(self.policy, out.hidden_states[-1]))
