"""GRPO / RLOO log-probs on padding-free packed rows with the output layer on completion tokens only, and RLOO's
training step without a second forward of the policy.

TRL's GRPOTrainer and RLOOTrainer get per-token log-probs of the policy, of the reference (the policy with its
adapter switched off) and, in RLOO, of the old policy through `model(..., labels=labels, fused_lm_head=True)` on a
batch whose prompts are left-padded and completions right-padded. On a CPU TRL's fused head scores every position
of that batch, prompt and padding included, and its backward computes the head a second time. `PackedRLMixin`
routes those calls through `packed_logps.packed_completion_logps` at the trainer's sampling temperature: the real
tokens of all rows as one packed row, each group's prompt once with its completions as branches of it (under
per-sample attention), the head only where a completion token is scored, the hidden states' gradient taken while
each chunk's logits exist (tests/unit/test_packed_rl.py: TRL's values and gradients).

`OnePolicyPassMixin` (RLOO): right after generation RLOO runs the policy without gradients for the old log-probs
(the KL penalty of the reward and the ratio's denominator), and the training step runs the same policy on the same
tokens again, with gradients. When one optimizer step follows each generation (TRL's defaults: num_iterations 1,
steps_per_generation = gradient_accumulation_steps = 1), no dropout is active and one process trains, both passes
see the same weights, so the first runs with gradients and the training step reuses it, its rows matched after
TRL's shuffle; the ratio is then exactly 1 at the first and only update, as the two passes give it on a CPU.

`PackedSamplingMixin`: on a CPU, TRL's `generate` call samples on oneDNN-prepacked linear layers with the adapter
merged into them (tunestack.model.packed_linear): the same completions, about 1.8x as fast.
"""

from __future__ import annotations

from typing import Any

import torch

from tunestack.model.packed_linear import packed_linears
from tunestack.train.fast.packed_logps import use_packed_logps
from tunestack.train.fast.varlen import varlen_attention

ROWS_KEY = "tunestack_rows"  # which generated row each training row is, through TRL's shuffle and split


class PackedRLMixin:
    """GRPOTrainer / RLOOTrainer whose policy and reference score completions on packed rows."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if getattr(self, "_entropy_bonus_enabled", False) or getattr(self, "use_vllm", False):
            return  # an entropy bonus needs the entropy's gradient, vLLM its own logprob path: TRL's head
        use_packed_logps(self.model, temperature=self.temperature)
        if getattr(self, "ref_model", None) is not None:
            use_packed_logps(self.ref_model, temperature=self.temperature)


class VarlenScoringMixin:
    """Per-sample attention (varlen.py) on the packed rows of the scoring passes only: generation, which runs in
    the same training step, keeps the model's own attention."""

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        with varlen_attention(model):
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)


class PackedSamplingMixin:
    """Generation through oneDNN's prepacked linear layers on a CPU, the adapter merged into them
    (tunestack.model.packed_linear)."""

    def _generate_single_turn(self, *args: Any, **kwargs: Any):
        with packed_linears(self.accelerator.unwrap_model(self.model)):
            return super()._generate_single_turn(*args, **kwargs)


def packed_rl_mixins(train_args: Any, algo: str, head_outside: bool = True) -> tuple[type, ...]:
    """The fast paths of a GRPO / RLOO run: RLOO's single policy pass, sampling on packed linear layers unless
    --packed_sampling false, packed scoring unless --padding_free false or --sparse_lm_head false (or the output
    layer may not run outside the forward: `head_outside`, see train.fast.head_outside_forward), and per-sample
    attention on those rows unless --varlen_attention false."""
    mixins: tuple[type, ...] = (OnePolicyPassMixin,) if algo == "rloo" else ()
    if train_args.packed_sampling:
        mixins += (PackedSamplingMixin,)
    if train_args.padding_free and train_args.sparse_lm_head and head_outside:
        mixins += (PackedRLMixin,)
        if train_args.varlen_attention:
            mixins += (VarlenScoringMixin,)
    return mixins


def _dropout_active(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


class OnePolicyPassMixin:
    """RLOOTrainer whose old-policy pass keeps its graph for the training step (see the module docstring)."""

    _kept: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
    _expect_old_pass = False
    _rows: torch.Tensor | None = None

    def _reuses_policy_pass(self) -> bool:
        args = self.args
        return (
            self.model.training
            and self.num_iterations == 1
            and args.steps_per_generation == 1
            and args.gradient_accumulation_steps == 1
            and not args.gradient_checkpointing
            and self.accelerator.num_processes == 1
            and not getattr(self, "use_vllm", False)
            and not getattr(self, "aux_loss_enabled", False)
            and not _dropout_active(self.model)
        )

    def _generate_and_score_completions(self, inputs):
        self._kept, self._expect_old_pass = None, self._reuses_policy_pass()
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            self._expect_old_pass = False
        if self._kept is not None:
            out[ROWS_KEY] = torch.arange(self._kept[0].shape[0], device=self._kept[0].device)
        return out

    def _compute_loss(self, model, inputs):
        self._rows = inputs.get(ROWS_KEY)
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._kept, self._rows = None, None

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **extra,
    ):
        plain = not compute_aux_loss and all(v is None for v in extra.values())
        if self._expect_old_pass and plain and model is self.model and not torch.is_grad_enabled():
            self._expect_old_pass = False  # the first call after generation: the old policy
            with torch.enable_grad():
                logps, entropies, _ = super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy=True
                )
            self._kept = (input_ids, logps, entropies)
            return logps.detach(), (entropies.detach() if compute_entropy else None), None
        kept, rows = self._kept, self._rows
        if kept is not None and rows is not None and plain and torch.is_grad_enabled():
            ids, logps, entropies = kept
            if ids.shape == input_ids.shape and torch.equal(ids[rows], input_ids):
                self._kept = None  # used once: the training step's backward frees its graph
                return logps[rows], (entropies[rows] if compute_entropy else None), None
        return super()._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            batch_size,
            compute_entropy=compute_entropy,
            compute_aux_loss=compute_aux_loss,
            **extra,
        )
