"""PPO against a reward: rollouts from the policy, KL-penalised rewards, GAE, clipped updates.

The loop is ours (TRL 1.x has no PPOTrainer); it runs through accelerate so `torchrun` data
parallelism works: every rank rolls out its own prompts and gradients are averaged by DDP.

A step: sample answers (rl/rollout.py), score them with the reward, score their tokens under the policy (log-probs
and values: the "old" policy of the ratio) and under the reference (the policy with its adapter switched off, or a
frozen copy), then `ppo_epochs` passes of clipped updates over minibatches. Scoring runs on packed rows with the
output layer only at response tokens (rl/scoring.py), the reference over the whole batch at once. The old policy is
the one that sampled: in float32 its log-probs, entropies and (through the value head) values come from the sampling
passes themselves (rl/rollout.py's SampledScores), equal to a scoring pass's to float rounding; otherwise a pass
scores them, and when no dropout is active the first minibatch's rows keep that pass's graph for their first
update, since before any update the policy is the old policy (the ratio is exactly 1 there, as two passes give it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunestack.rl.engine import ppo_optimizer, uses_deepspeed, zero3
from tunestack.rl.policy import PolicyWithValue
from tunestack.rl.ppo_core import KLController, gae, kl_penalized_rewards, masked_mean, masked_whiten, ppo_losses
from tunestack.rl.rollout import Roller, Rollout
from tunestack.rl.scoring import Scorer, Scores, token_chunks
from tunestack.rl.state import load_loop_state, save_loop_state
from tunestack.timing import PhaseClock
from tunestack.train.distributed import full_values
from tunestack.train.fast.efficient import supports_trained_positions

logger = logging.getLogger("tunestack")


@dataclass
class PPOSettings:
    batch_size: int = 8
    mini_batch_size: int = 2
    ppo_epochs: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    init_kl_coef: float = 0.2
    adap_kl_ctrl: bool = True
    target_kl: float = 0.1
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False
    reward_baseline: float = 0.0
    reward_clip: float | None = None
    missing_eos_penalty: float | None = 1.0
    early_stopping: bool = False
    learning_rate: float = 1.5e-5
    max_grad_norm: float = 1.0
    max_steps: int = 20
    save_steps: int = 10
    logging_steps: int = 1
    sample_every: int = 5
    seed: int = 42
    packed: bool = True  # packed rows and the output layer at response tokens only (rl/scoring.py)
    varlen_attention: bool = True  # per-sample attention on those rows
    packed_sampling: bool = True  # rollouts through oneDNN's prepacked linear layers on a CPU (model/packed_linear.py)
    sampled_old_scores: bool = True  # the old policy's scores from its sampling passes (see PPOLoop.__init__)


@dataclass
class OldScores:
    """The batch under the policy before this step's updates, and under the reference."""

    logp: torch.Tensor
    values: torch.Tensor
    ref_logp: torch.Tensor
    entropy: torch.Tensor
    first: Scores | None  # the first minibatch's pass, with its graph, when it is reused as its first update


def _dropout_active(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


class PPOLoop:
    """One PPO run. `reward_fn(prompts, completions, completions_with_stop=...) -> list[float]`."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        encode_prompt: Callable[[Any], list[int]],
        reward_fn: Callable[..., list[float]],
        stop_ids: list[int],
        settings: PPOSettings,
        output_dir: Path,
        ref_model: nn.Module | None = None,
        accelerator: Any = None,
    ):
        from accelerate import Accelerator

        self.accelerator = accelerator if accelerator is not None else Accelerator()
        self.s = settings
        self.tokenizer = tokenizer
        self.output_dir = output_dir
        self.ref_model = ref_model
        wrapped = PolicyWithValue(model, model.config.hidden_size)
        params = [p for p in wrapped.parameters() if p.requires_grad]
        optimizer = ppo_optimizer(self.accelerator, params, settings.learning_rate)
        self.model, self.optimizer = self.accelerator.prepare(wrapped, optimizer)
        self.deepspeed, self.zero3 = uses_deepspeed(self.accelerator), zero3(self.accelerator)
        if self.ref_model is not None:
            self.ref_model.to(self.accelerator.device).eval()
        self.kl = KLController(
            settings.init_kl_coef, settings.target_kl if settings.adap_kl_ctrl else None, settings.kl_horizon
        )
        self.step = 0
        self.last_rollout: Rollout | None = None
        self.clock = PhaseClock(torch.cuda.synchronize if torch.cuda.is_available() else None)
        # ZeRO-3 gathers each layer's weights from every process: all must run as many forward passes.
        synced = self.zero3 and self.accelerator.num_processes > 1
        self.roller = Roller(tokenizer, encode_prompt, reward_fn, stop_ids, settings, self.clock, synced)
        # ZeRO-3 partitions the output layer's weight outside the model's forward: packed scoring runs it there.
        packed = settings.packed and supports_trained_positions(model) and not self.zero3
        self.scorer = Scorer(packed, settings.varlen_attention, settings.temperature)
        # The policy that sampled a batch is its old policy: the log-probs, entropies and last hidden states its
        # sampling passes computed are the old scores, without a pass of their own, where they are the numbers
        # such a pass gives to float rounding: float32 weights without mixed precision, on the models packed
        # scoring serves, each process sampling on its own (ZeRO-3 keeps them stepping in lockstep).
        self.sampled_old = (
            settings.sampled_old_scores and packed and not synced and self.accelerator.mixed_precision == "no"
            and all(p.dtype == torch.float32 for p in model.parameters())
        )  # fmt: skip

    @property
    def unwrapped(self) -> PolicyWithValue:
        return self.accelerator.unwrap_model(self.model)

    def rollout(self, prompts: list[Any], greedy: bool = False, score: bool = False) -> Rollout:
        return self.roller(self.unwrapped.policy, prompts, self.accelerator.device, greedy, score)

    # ---------------------------------------------------------------------------------- scoring

    def _reference(self, r: Rollout, idx: torch.Tensor) -> torch.Tensor:
        if self.ref_model is not None:
            return self.scorer.logprobs(self.ref_model, r, idx)
        policy = self.unwrapped.policy
        with policy.disable_adapter():  # LoRA: the reference is the base without the adapter
            return self.scorer.logprobs(policy, r, idx)

    def _score_old(self, r: Rollout, first: torch.Tensor | None) -> OldScores:
        """The old policy's log-probs, values and entropies, and the reference's log-probs, of every row. From
        the sampling passes when the rollout kept them (only the value head and the reference run). Packed: the
        rows of `first` (if given) with gradients, kept for their update, the others and the reference in passes
        of up to TOKENS_PER_PASS tokens. Padded: minibatch by minibatch, as the loop was first written."""
        n, device = r.input_ids.shape[0], r.input_ids.device
        if r.sampled is not None:
            self.model.eval()
            with torch.no_grad():
                with self.clock("old_logprobs_values"):
                    values = self.unwrapped.value_head(r.sampled.hidden) * r.mask
                with self.clock("ref_logprobs"):
                    ref = self._reference_batch(r)
            return OldScores(r.sampled.logp, values, ref, r.sampled.entropy, None)
        if not self.scorer.packed:
            self.model.eval()
            parts, refs = [], []
            for chunk in torch.arange(n, device=device).split(self.s.mini_batch_size):
                with torch.no_grad(), self.clock("old_logprobs_values"):
                    parts.append((chunk, self.scorer.policy(self.model, r, chunk, entropy=True)))
                with torch.no_grad(), self.clock("ref_logprobs"):
                    refs.append(self._reference(r, chunk))
            return _gathered(parts, torch.cat(refs), None)
        kept = None
        rest = torch.arange(n, device=device)
        if first is not None:
            self.model.train()  # no dropout is active: the same network as the updates
            with self.clock("old_logprobs_values"):
                kept = self.scorer.policy(self.model, r, first)
            rest = rest[~torch.isin(rest, first)]
        else:
            self.model.eval()
        parts = [(first, kept)] if kept is not None else []
        with torch.no_grad():
            with self.clock("old_logprobs_values"):
                parts += [(chunk, self.scorer.policy(self.model, r, chunk)) for chunk in token_chunks(r, rest)]
            with self.clock("ref_logprobs"):
                ref = self._reference_batch(r)
        return _gathered(parts, ref, kept)

    def _reference_batch(self, r: Rollout) -> torch.Tensor:
        """The reference's log-probs of every row, in packed passes of up to TOKENS_PER_PASS tokens."""
        everything = torch.arange(r.input_ids.shape[0], device=r.input_ids.device)
        return torch.cat([self._reference(r, chunk) for chunk in token_chunks(r, everything)])

    # ---------------------------------------------------------------------------------- update

    def _finite(self, what: str, value: torch.Tensor) -> None:
        """Stop before any weight changes when a quantity of the step is NaN or infinite (on any rank)."""
        bad = torch.tensor([0.0 if bool(torch.isfinite(value).all()) else 1.0], device=value.device)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, "max")
        if bad.item():
            from tunestack.errors import TrainingDiverged

            raise TrainingDiverged(
                f"the PPO {what} became non-finite at step {self.step + 1}; training stopped before the optimizer "
                "step, so no weights changed. Check the reward function, or lower --learning_rate / --init_kl_coef"
            )

    def train_step(self, prompts: list[Any]) -> dict[str, float]:
        self.clock.take()
        with self.clock("step"):
            out = self._train_step(prompts)
        out.update({f"time/{k}": v for k, v in self.clock.take().items()})
        return out

    def _train_step(self, prompts: list[Any]) -> dict[str, float]:
        r = self.rollout(prompts, score=self.sampled_old)
        self._finite("reward", r.scores)
        n, mask = r.input_ids.shape[0], r.mask
        order = torch.randperm(n, device=mask.device).split(self.s.mini_batch_size)  # the first epoch's minibatches
        reuse = self.scorer.packed and not _dropout_active(self.model) and r.sampled is None
        old = self._score_old(r, order[0] if reuse else None)
        rewards, kl = kl_penalized_rewards(r.scores, old.logp, old.ref_logp, mask, self.kl.value)
        if self.s.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, old.values, mask, self.s.gamma, self.s.lam)
        advantages = masked_whiten(advantages, mask)
        self._finite("advantage", advantages)
        with self.clock("update"):
            stats, stop_early = self._update(r, old, advantages, returns, order)
        seq_kl = (kl.sum(1)).mean()
        seq_kl = self.accelerator.reduce(seq_kl, "mean").item()
        self.kl.update(seq_kl, n * self.accelerator.num_processes)
        self.step += 1
        gathered = self.accelerator.gather_for_metrics(
            torch.stack([r.raw_scores, mask.sum(1), r.stopped.float()], dim=1)
        )
        out = {
            "reward_mean": gathered[:, 0].mean().item(),
            "reward_std": gathered[:, 0].std().item() if gathered.shape[0] > 1 else 0.0,
            "kl": seq_kl,
            "kl_coef": self.kl.value,
            "entropy": masked_mean(old.entropy, mask).item(),
            "response_length": gathered[:, 1].mean().item(),
            "stopped_fraction": gathered[:, 2].mean().item(),
            "ppo_early_stopped": float(stop_early),
        }
        out.update({k: sum(v) / max(len(v), 1) for k, v in stats.items()})
        self.last_rollout = r
        return out

    def _update(
        self,
        r: Rollout,
        old: OldScores,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        order: tuple[torch.Tensor, ...],
    ) -> tuple[dict[str, list[float]], bool]:
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clip_fraction", "approx_kl")}
        mask, n = r.mask, r.input_ids.shape[0]
        self.model.train()
        for epoch in range(self.s.ppo_epochs):
            if epoch > 0:
                order = torch.randperm(n, device=mask.device).split(self.s.mini_batch_size)
            for k, idx in enumerate(order):
                reused = epoch == 0 and k == 0 and old.first is not None
                scores = old.first if reused else self.scorer.policy(self.model, r, idx)
                pg, vf, ls = ppo_losses(
                    scores.logp,
                    old.logp[idx],
                    advantages[idx],
                    scores.values,
                    old.values[idx],
                    returns[idx],
                    mask[idx],
                    self.s.clip_range,
                    self.s.clip_range_value,
                )
                loss = pg + self.s.vf_coef * vf
                self._finite("loss", loss.detach())
                self.accelerator.backward(loss)
                if self.s.max_grad_norm and not self.deepspeed:  # DeepSpeed clips inside its step (gradient_clipping)
                    norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.s.max_grad_norm)
                    self._finite("gradient norm", torch.as_tensor(norm))
                self.optimizer.step()
                self.optimizer.zero_grad()
                for key in stats:
                    stats[key].append(getattr(ls, key))
            if self.s.early_stopping:
                # Every rank must take the same number of steps: decide on the mean over ranks.
                approx = self.accelerator.reduce(torch.tensor(stats["approx_kl"][-1], device=mask.device), "mean")
                if approx.item() > 1.5 * self.s.target_kl:
                    return stats, True
        return stats, False

    # ---------------------------------------------------------------------------------- eval

    @torch.no_grad()
    def evaluate(self, prompts: list[Any]) -> dict[str, float]:
        """Mean reward and KL to the reference of sampled answers to held-out prompts.

        Sampled (not greedy) so the KL estimate is unbiased; a fixed seed on a forked RNG keeps it
        comparable before and after training without disturbing the training RNG stream.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.s.seed)
            return self._evaluate(prompts)

    def _evaluate(self, prompts: list[Any]) -> dict[str, float]:
        rewards, kls, lengths = [], [], []
        for i in range(0, len(prompts), self.s.batch_size):
            r = self.rollout(prompts[i : i + self.s.batch_size])
            idx = torch.arange(r.input_ids.shape[0], device=r.input_ids.device)
            logp = self.scorer.logprobs(self.unwrapped.policy, r, idx)
            ref = self._reference(r, idx)
            kls.append(((logp - ref) * r.mask).sum(1))
            rewards.append(r.raw_scores)
            lengths.append(r.mask.sum(1))
        reward = self.accelerator.gather_for_metrics(torch.cat(rewards)).mean().item()
        kl = self.accelerator.gather_for_metrics(torch.cat(kls)).mean().item()
        length = self.accelerator.gather_for_metrics(torch.cat(lengths)).mean().item()
        return {"reward": reward, "kl": kl, "response_length": length}

    # ---------------------------------------------------------------------------------- state

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained parameters (gathered under ZeRO-3: every process must call it)."""
        return full_values([(n, p) for n, p in self.unwrapped.named_parameters() if p.requires_grad])

    def save_state(self, folder: Path) -> None:
        save_loop_state(self, folder)  # every process calls it

    def load_state(self, folder: Path) -> None:
        load_loop_state(self, folder)


def _gathered(parts: list[tuple[torch.Tensor, Scores]], ref: torch.Tensor, first: Scores | None) -> OldScores:
    """Row-chunk scores put back in row order, without gradients."""
    rows = torch.cat([idx for idx, _ in parts])
    where = torch.empty_like(rows)
    where[rows] = torch.arange(len(rows), device=rows.device)
    logp = torch.cat([s.logp.detach() for _, s in parts])[where]
    values = torch.cat([s.values.detach() for _, s in parts])[where]
    entropy = torch.cat([s.entropy for _, s in parts])[where]
    return OldScores(logp, values, ref, entropy, first)
