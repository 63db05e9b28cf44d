"""PPO rollouts: prompts encoded with the training template, answers sampled from the policy's whole distribution,
rewards scored; on request also the sampling passes' own scores of the answer tokens (SampledScores)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList

from tunestack.model.anatomy import batch_first, untokenizable_ids
from tunestack.model.packed_linear import packed_linears
from tunestack.rl.ppo_core import entropy_from_logprobs, response_mask
from tunestack.rl.sampler import CategoricalDraw
from tunestack.timing import PhaseClock
from tunestack.train.fast.efficient import hf_model


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
    sampled: SampledScores | None = None  # the sampling policy's scores of its tokens, when asked for


@dataclass
class SampledScores:
    """What the sampling passes computed of each response token, before any update: the policy's log-prob of it and
    the entropy of its distribution (of the logits divided by the sampling temperature, before any other
    processing), and the last hidden state that predicted it (for a value head)."""

    logp: torch.Tensor  # [rows, response length], 0 after a row's stop token
    entropy: torch.Tensor  # [rows, response length], 0 after a row's stop token
    hidden: torch.Tensor  # [rows, response length, hidden size]


class _ScoreRecorder:
    """Forward hooks on a policy being sampled. Each decoding step's input is the token the step before sampled: it
    is scored from that step's log-softmax, the only one kept, and `scores` scores the last token from the last.
    A step whose input is not one sampled token (a prompt fed as embeddings, an extra pass) spoils the record:
    `scores` is then None."""

    def __init__(self, policy: Any, temperature: float):
        model = hf_model(policy)
        self.model = model
        self.temperature = temperature
        self.logp: list[torch.Tensor] = []
        self.entropy: list[torch.Tensor] = []
        self.hidden: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []
        self.previous: torch.Tensor | None = None
        self.spoiled = False
        self.hooks = [
            model.register_forward_hook(self._on_logits, with_kwargs=True),
            model.get_decoder().register_forward_hook(self._on_hidden),
        ]

    def _on_hidden(self, module: Any, args: Any, output: Any) -> None:
        self.hidden.append(batch_first(self.model, output[0])[:, -1].float())

    def _on_logits(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        if self.spoiled:
            return
        if self.previous is not None:
            ids = kwargs.get("input_ids")
            if ids is None or ids.dim() != 2 or ids.shape[1] != 1:
                self.spoiled = True
                return
            self.inputs.append(ids[:, 0])
            self.logp.append(self.previous.gather(1, ids).squeeze(1))
        log_probs = (output.logits[:, -1].float() / self.temperature).log_softmax(-1)
        self.entropy.append(entropy_from_logprobs(log_probs))
        self.previous = log_probs

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def scores(self, responses: torch.Tensor, mask: torch.Tensor) -> SampledScores | None:
        steps = responses.shape[1]
        if self.spoiled or self.previous is None or len(self.entropy) != steps or len(self.hidden) != steps:
            return None
        if self.inputs and not torch.equal(torch.stack(self.inputs, 1), responses[:, :-1]):
            return None
        self.logp.append(self.previous.gather(1, responses[:, -1:]).squeeze(1))
        return SampledScores(
            torch.stack(self.logp, 1) * mask,
            torch.stack(self.entropy, 1) * mask,
            torch.stack(self.hidden, 1),
        )


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


@contextlib.contextmanager
def _without_model_defaults(policy: Any) -> Iterator[None]:
    """`generate` without the model's own generation defaults. transformers takes every field a config leaves unset
    from the model's generation_config (SmolLM2's sets top_p 0.9); a rollout must sample the policy's whole
    distribution at the run's temperature, which the PPO ratio and its KL estimate assume, not a truncation of it."""
    model = hf_model(policy)
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


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

    def _generation_config(self, policy: Any) -> Any:
        # Sampling is greedy decoding over CategoricalDraw's one finite score (rl/sampler.py), so none of
        # transformers' sampling warpers (top_k 50 by default) applies; the model's own generation defaults are kept
        # out by `_without_model_defaults`.
        return GenerationConfig(
            max_new_tokens=self.s.max_new_tokens,
            do_sample=False,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=policy.generation_config.use_cache is not False,  # False for code predating the cache
            suppress_tokens=untokenizable_ids(policy, self.tokenizer) or None,
        )

    @torch.no_grad()
    def __call__(
        self, policy: Any, prompts: list[Any], device: Any, greedy: bool = False, score: bool = False
    ) -> Rollout:
        """Sample answers to `prompts` and score them; with `score`, also keep the sampling passes' scores of the
        answer tokens (Rollout.sampled; None where they could not be read)."""
        encoded = [self.encode_prompt(p) for p in prompts]
        width = max(len(e) for e in encoded)
        prompt_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        prompt_mask = torch.zeros_like(prompt_ids)
        for i, ids in enumerate(encoded):
            prompt_ids[i, width - len(ids) :] = torch.tensor(ids)
            prompt_mask[i, width - len(ids) :] = 1
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        policy.eval()
        config = self._generation_config(policy)
        with self.clock("generation"), packed_linears(policy, self.s.packed_sampling), _without_model_defaults(policy):
            recorder = (
                _ScoreRecorder(policy, self.s.temperature) if score and not greedy and not self.synced_gpus else None
            )
            try:
                generated = policy.generate(
                    input_ids=prompt_ids,
                    attention_mask=prompt_mask,
                    generation_config=config,
                    logits_processor=LogitsProcessorList([] if greedy else [CategoricalDraw(self.s.temperature)]),
                    synced_gpus=self.synced_gpus,
                )
            finally:
                if recorder is not None:
                    recorder.remove()
        responses = generated[:, width:]
        if responses.shape[1] == 0:
            responses = torch.full((len(prompts), 1), self.stop_ids[0], device=device)
        mask, stopped = response_mask(responses, self.stop_ids, self.pad_id)
        sampled = recorder.scores(responses, mask) if recorder is not None else None
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
            input_ids,
            attention,
            positions(attention),
            width,
            mask,
            stopped,
            scores,
            raw,
            prompt_texts,
            completions,
            sampled,
        )
