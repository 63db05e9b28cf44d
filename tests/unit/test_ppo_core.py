"""PPO arithmetic against hand-computed values."""

from __future__ import annotations

import torch

from tunestack.rl.ppo_core import KLController, gae, kl_penalized_rewards, ppo_losses, response_mask


def test_response_mask_stops_at_the_first_stop_token():
    responses = torch.tensor([[5, 6, 2, 2, 2], [5, 6, 7, 8, 9]])
    mask, stopped = response_mask(responses, stop_ids=[2], pad_id=2)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert stopped.tolist() == [True, False]


def test_kl_penalty_and_score_on_the_last_token():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    logp = torch.tensor([[-1.0, -2.0, -1.0, -5.0]])
    ref = torch.tensor([[-1.5, -2.0, -0.5, -1.0]])
    rewards, kl = kl_penalized_rewards(torch.tensor([3.0]), logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -0.5, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 0.05 + 3.0, 0.0]]))


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4]])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    d2 = 1.0 - 0.4
    d1 = 0.0 + 0.4 - 0.2
    d0 = 0.0 + 0.2 - 0.5
    a2, a1 = d2, d1 + 0.5 * d2
    a0 = d0 + 0.5 * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2]]))
    assert torch.allclose(ret, adv + values)


def test_policy_loss_is_clipped():
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[2.0, 0.5]]))  # ratios 2 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    values = torch.zeros(1, 2)
    pg, vf, stats = ppo_losses(new, old, adv, values, values, values, mask, clip_range=0.2)
    # Positive advantage: min gain at ratio 1.2; negative advantage: ratio clipped at 0.8.
    assert torch.isclose(pg, torch.tensor((-1.2 + 0.8) / 2))
    assert stats.clip_fraction == 1.0 and vf.item() == 0.0


def test_adaptive_kl_moves_toward_target():
    ctl = KLController(0.2, target=0.1, horizon=100)
    ctl.update(current_kl=1.0, n_samples=10)
    assert ctl.value > 0.2
    fixed = KLController(0.2, target=None)
    fixed.update(5.0, 10)
    assert fixed.value == 0.2
