"""PPO against a reward: rollouts from the policy, KL-penalised rewards, GAE, clipped updates.

The loop is ours (TRL 1.x has no PPOTrainer); it runs through accelerate so `torchrun` data
parallelism works: every rank rolls out its own prompts and gradients are averaged by DDP.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunestack.rl.policy import PolicyWithValue
from tunestack.rl.ppo_core import (
    KLController,
    entropy_from_logits,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    ppo_losses,
    response_mask,
    token_logprobs,
)
from tunestack.timing import PhaseClock

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


@dataclass
class Rollout:
    input_ids: torch.Tensor  # prompt (left-padded) + response
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_len: int
    mask: torch.Tensor  # response tokens that count
    stopped: torch.Tensor
    scores: torch.Tensor
    raw_scores: torch.Tensor
    prompts: list[str]
    completions: list[str]


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


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
    ):
        from accelerate import Accelerator

        self.accelerator = Accelerator()
        self.s = settings
        self.tokenizer = tokenizer
        self.encode_prompt = encode_prompt
        self.reward_fn = reward_fn
        self.stop_ids = stop_ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        self.output_dir = output_dir
        self.ref_model = ref_model
        hidden = model.config.hidden_size
        wrapped = PolicyWithValue(model, hidden)
        params = [p for p in wrapped.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)
        self.model, self.optimizer = self.accelerator.prepare(wrapped, optimizer)
        if self.ref_model is not None:
            self.ref_model.to(self.accelerator.device).eval()
        self.kl = KLController(
            settings.init_kl_coef, settings.target_kl if settings.adap_kl_ctrl else None, settings.kl_horizon
        )
        self.step = 0
        self.last_rollout: Rollout | None = None
        self.clock = PhaseClock(torch.cuda.synchronize if torch.cuda.is_available() else None)

    @property
    def unwrapped(self) -> PolicyWithValue:
        return self.accelerator.unwrap_model(self.model)

    # ---------------------------------------------------------------------------------- rollout

    @torch.no_grad()
    def rollout(self, prompts: list[Any], greedy: bool = False) -> Rollout:
        device = self.accelerator.device
        encoded = [self.encode_prompt(p) for p in prompts]
        width = max(len(e) for e in encoded)
        prompt_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        prompt_mask = torch.zeros_like(prompt_ids)
        for i, ids in enumerate(encoded):
            prompt_ids[i, width - len(ids) :] = torch.tensor(ids)
            prompt_mask[i, width - len(ids) :] = 1
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        policy = self.unwrapped.policy
        policy.eval()
        from transformers import GenerationConfig

        # A complete config, so no top-k/top-p from the model's defaults biases the samples (and the KL).
        config = GenerationConfig(
            max_new_tokens=self.s.max_new_tokens,
            do_sample=not greedy,
            temperature=self.s.temperature if not greedy else None,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
        )
        with self.clock("generation"):
            generated = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
        responses = generated[:, width:]
        if responses.shape[1] == 0:
            responses = torch.full((len(prompts), 1), self.stop_ids[0], device=device)
        mask, stopped = response_mask(responses, self.stop_ids, self.pad_id)
        attention = torch.cat([prompt_mask, mask.long()], dim=1)
        input_ids = torch.cat([prompt_ids, responses], dim=1)
        prompt_texts = [self.tokenizer.decode(ids, skip_special_tokens=False) for ids in encoded]
        completions, with_stop = [], []
        for row, m in zip(responses, mask, strict=True):
            kept = row[m.bool()]
            completions.append(self.tokenizer.decode(kept, skip_special_tokens=True))
            with_stop.append(self.tokenizer.decode(kept, skip_special_tokens=False))
        with self.clock("reward"):
            raw = torch.tensor(
                self.reward_fn(prompts=prompt_texts, completions=completions, completions_with_stop=with_stop),
                dtype=torch.float32,
                device=device,
            )
        scores = raw - self.s.reward_baseline
        if self.s.missing_eos_penalty is not None:
            scores = scores - self.s.missing_eos_penalty * (~stopped).float()
        if self.s.reward_clip:
            scores = scores.clamp(-self.s.reward_clip, self.s.reward_clip)
        return Rollout(
            input_ids, attention, _positions(attention), width, mask, stopped, scores, raw, prompt_texts, completions
        )

    def _forward(self, model: Any, r: Rollout, idx: torch.Tensor, with_values: bool):
        ids, att, pos = r.input_ids[idx], r.attention_mask[idx], r.position_ids[idx]
        if with_values:
            logits, values = model(ids, att, pos)
        else:
            logits = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False).logits
            values = None
        start = r.prompt_len - 1
        logits = logits[:, start:-1]
        targets = ids[:, r.prompt_len :]
        logp = token_logprobs(logits, targets)
        if values is not None:
            values = values[:, start:-1]
        return logp, values, logits

    @torch.no_grad()
    def _score_old(self, r: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        self.model.eval()
        logps, values, refs, ents = [], [], [], []
        for chunk in torch.arange(r.input_ids.shape[0], device=r.input_ids.device).split(self.s.mini_batch_size):
            with self.clock("old_logprobs_values"):
                logp, value, logits = self._forward(self.model, r, chunk, with_values=True)
                logps.append(logp)
                values.append(value)
                ents.append(entropy_from_logits(logits))
            with self.clock("ref_logprobs"):
                refs.append(self._ref_logprobs(r, chunk))
        return torch.cat(logps), torch.cat(values), torch.cat(refs), torch.cat(ents)

    def _ref_logprobs(self, r: Rollout, idx: torch.Tensor) -> torch.Tensor:
        if self.ref_model is not None:
            return self._forward(self.ref_model, r, idx, with_values=False)[0]
        policy = self.unwrapped.policy
        with policy.disable_adapter():  # LoRA: the reference is the base without the adapter
            return self._forward(policy, r, idx, with_values=False)[0]

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
        r = self.rollout(prompts)
        self._finite("reward", r.scores)
        old_logp, old_values, ref_logp, entropy = self._score_old(r)
        mask = r.mask
        rewards, kl = kl_penalized_rewards(r.scores, old_logp, ref_logp, mask, self.kl.value)
        if self.s.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, old_values, mask, self.s.gamma, self.s.lam)
        advantages = masked_whiten(advantages, mask)
        self._finite("advantage", advantages)
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clip_fraction", "approx_kl")}
        n = r.input_ids.shape[0]
        self.model.train()
        stop_early = False
        with self.clock("update"):
            for _ in range(self.s.ppo_epochs):
                for idx in torch.randperm(n, device=mask.device).split(self.s.mini_batch_size):
                    logp, values, _ = self._forward(self.model, r, idx, with_values=True)
                    pg, vf, ls = ppo_losses(
                        logp,
                        old_logp[idx],
                        advantages[idx],
                        values,
                        old_values[idx],
                        returns[idx],
                        mask[idx],
                        self.s.clip_range,
                        self.s.clip_range_value,
                    )
                    loss = pg + self.s.vf_coef * vf
                    self._finite("loss", loss.detach())
                    self.accelerator.backward(loss)
                    if self.s.max_grad_norm:
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
                        stop_early = True
                        break
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
            "entropy": masked_mean(entropy, mask).item(),
            "response_length": gathered[:, 1].mean().item(),
            "stopped_fraction": gathered[:, 2].mean().item(),
            "ppo_early_stopped": float(stop_early),
        }
        out.update({k: sum(v) / max(len(v), 1) for k, v in stats.items()})
        self.last_rollout = r
        return out

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
            logp = self._forward(self.unwrapped.policy, r, idx, with_values=False)[0]
            ref = self._ref_logprobs(r, idx)
            kls.append(((logp - ref) * r.mask).sum(1))
            rewards.append(r.raw_scores)
            lengths.append(r.mask.sum(1))
        reward = self.accelerator.gather_for_metrics(torch.cat(rewards)).mean().item()
        kl = self.accelerator.gather_for_metrics(torch.cat(kls)).mean().item()
        length = self.accelerator.gather_for_metrics(torch.cat(lengths)).mean().item()
        return {"reward": reward, "kl": kl, "response_length": length}

    # ---------------------------------------------------------------------------------- state

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.unwrapped.named_parameters() if p.requires_grad}

    def save_state(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file(self.trainable_state(), str(folder / "trainable.safetensors"))
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
        if torch.cuda.is_available():  # sampling on a GPU draws from its generator
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, folder / "rng_state.pt")
        (folder / "rl_state.json").write_text(
            json.dumps(
                {
                    "step": self.step,
                    "kl_coef": self.kl.value,
                    "python_rng_version": random.getstate()[0],
                    "python_rng_gauss": random.getstate()[2],
                }
            )
        )

    def load_state(self, folder: Path) -> None:
        from safetensors.torch import load_file

        from tunestack.errors import ConfigError

        state = load_file(str(folder / "trainable.safetensors"))
        params = dict(self.unwrapped.named_parameters())
        unexpected = [k for k in state if k not in params]
        absent = [k for k, p in params.items() if p.requires_grad and k not in state]
        if unexpected or absent:
            detail = f"e.g. {unexpected[0]} is not in this model" if unexpected else f"it has no {absent[0]}"
            raise ConfigError(f"{folder}: the checkpoint does not fit this model/adapter ({detail})")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        rng = torch.load(folder / "rng_state.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        meta = json.loads((folder / "rl_state.json").read_text())
        random.setstate((meta["python_rng_version"], tuple(rng["python"]), meta["python_rng_gauss"]))
        self.step = meta["step"]
        self.kl.value = meta["kl_coef"]
