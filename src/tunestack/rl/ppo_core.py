"""The arithmetic of PPO for language models, as small pure functions.

Shapes: [batch, response_len]; `mask` is 1 on response tokens up to and including the stop token.
Follows Ziegler et al. (2019) / Stiennon et al. (2020): a per-token KL penalty against the reference
policy, the reward-model score added on the last token, GAE, clipped policy and value losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1).clamp(min=1)  # unbiased


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under `logits` ([B, T, V] -> [B, T]), computed in float32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    return entropy_from_logprobs(torch.log_softmax(logits.float(), dim=-1))


def entropy_from_logprobs(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def response_mask(
    responses: torch.Tensor, stop_ids: list[int], pad_id: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real response tokens (through the first stop token) and whether each response stopped."""
    is_stop = torch.zeros_like(responses, dtype=torch.bool)
    for sid in stop_ids:
        is_stop |= responses == sid
    # Positions after the first stop token are padding from generate().
    after_stop = (is_stop.cumsum(1) - is_stop.long()) > 0
    mask = ~after_stop
    stopped = is_stop.any(1)
    if pad_id is not None and pad_id not in stop_ids:
        mask &= responses != pad_id
    return mask.float(), stopped


def kl_penalized_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * (log pi - log ref) everywhere, plus the score on the last real token.

    Returns (rewards, per-token KL estimate).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & (mask > 0)
    rewards = rewards + last.float() * scores.unsqueeze(1)
    return rewards * mask, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens. Returns (advantages, returns)."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device, dtype=rewards.dtype)
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


@dataclass
class LossStats:
    policy_loss: float
    value_loss: float
    clip_fraction: float
    approx_kl: float
    value_clip_fraction: float


def ppo_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    clip_range_value: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, LossStats]:
    """Clipped surrogate policy loss and clipped value loss, masked to the response tokens."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    policy_loss = masked_mean(torch.max(unclipped, clipped), mask)
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    value_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (values_clipped - returns) ** 2), mask)
    with torch.no_grad():
        stats = LossStats(
            policy_loss=policy_loss.item(),
            value_loss=value_loss.item(),
            clip_fraction=masked_mean((clipped > unclipped).float(), mask).item(),
            approx_kl=masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask).item(),
            value_clip_fraction=masked_mean(
                ((values - returns) ** 2 < (values_clipped - returns) ** 2).float(), mask
            ).item(),
        )
    return policy_loss, value_loss, stats


class KLController:
    """Fixed, or adaptive toward `target` (Ziegler et al. 2019): coef *= 1 + clip(kl/target - 1, ±0.2) * n/horizon."""

    def __init__(self, init_coef: float, target: float | None = None, horizon: int = 10000):
        self.value = init_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        if self.target is None or self.target <= 0:
            return
        error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + error * n_samples / self.horizon
