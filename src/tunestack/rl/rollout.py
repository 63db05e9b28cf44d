"""PPO rollouts: prompts encoded with the training template, answers sampled from the policy, rewards scored."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tunestack.model.anatomy import untokenizable_ids
from tunestack.model.packed_linear import packed_linears
from tunestack.rl.ppo_core import response_mask
from tunestack.timing import PhaseClock


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


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


class Roller:
    """Samples answers to prompts from a policy and scores them:
    `reward_fn(prompts, completions, completions_with_stop=...) -> list[float]`. `settings` is the run's
    PPOSettings (max_new_tokens, temperature, reward_baseline, reward_clip, missing_eos_penalty, packed_sampling)."""

    def __init__(
        self,
        tokenizer: Any,
        encode_prompt: Callable[[Any], list[int]],
        reward_fn: Callable[..., list[float]],
        stop_ids: list[int],
        settings: Any,
        clock: PhaseClock,
        synced_gpus: bool = False,
    ):
        self.tokenizer = tokenizer
        self.encode_prompt = encode_prompt
        self.reward_fn = reward_fn
        self.stop_ids = stop_ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        self.s = settings
        self.clock = clock
        self.synced_gpus = synced_gpus  # ZeRO-3 on several processes: every one runs as many forward passes

    def _generation_config(self, policy: Any, greedy: bool) -> Any:
        from transformers import GenerationConfig

        # A complete config, so no top-k/top-p from the model's defaults biases the samples (and the KL).
        return GenerationConfig(
            max_new_tokens=self.s.max_new_tokens,
            do_sample=not greedy,
            temperature=self.s.temperature if not greedy else None,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=policy.generation_config.use_cache is not False,  # False for code predating the cache
            suppress_tokens=untokenizable_ids(policy, self.tokenizer) or None,
        )

    @torch.no_grad()
    def __call__(self, policy: Any, prompts: list[Any], device: Any, greedy: bool = False) -> Rollout:
        encoded = [self.encode_prompt(p) for p in prompts]
        width = max(len(e) for e in encoded)
        prompt_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        prompt_mask = torch.zeros_like(prompt_ids)
        for i, ids in enumerate(encoded):
            prompt_ids[i, width - len(ids) :] = torch.tensor(ids)
            prompt_mask[i, width - len(ids) :] = 1
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        policy.eval()
        with self.clock("generation"), packed_linears(policy, self.s.packed_sampling):
            generated = policy.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                generation_config=self._generation_config(policy, greedy),
                synced_gpus=self.synced_gpus,
            )
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
                self.reward_fn(
                    prompts=prompt_texts,
                    completions=completions,
                    completions_with_stop=with_stop,
                    answer=[getattr(p, "answer", None) for p in prompts],
                ),
                dtype=torch.float32,
                device=device,
            )
        scores = raw - self.s.reward_baseline
        if self.s.missing_eos_penalty is not None:
            scores = scores - self.s.missing_eos_penalty * (~stopped).float()
        if self.s.reward_clip:
            scores = scores.clamp(-self.s.reward_clip, self.s.reward_clip)
        return Rollout(
            input_ids, attention, positions(attention), width, mask, stopped, scores, raw, prompt_texts, completions
        )
