"""Training without waste: an output layer computed only where a loss is.

Padding-free batches (data/collators.py PackedCollator) are one row of concatenated samples whose position
ids restart at every sample; transformers turns restarting position ids (with no attention mask) into a
block-diagonal causal mask for SDPA/eager and into varlen kernels for flash-attention, and varlen.py runs
attention per sample, so no token attends across samples.

Trained positions only: the LM head (49k-wide for SmolLM2) and the cross-entropy run on the
positions whose next-token label is trained, in chunks whose gradients are taken as they are
computed, so the full-vocabulary logits are never held for the whole batch. Both are exact: losses
and gradients equal the padded, full computation within float tolerance (tests/unit/test_efficient.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunestack.data.collators import IGNORE_INDEX
from tunestack.model.anatomy import is_native


def packed_positions(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a padded batch's mask of real tokens: their flat indices, row after row, and their position ids
    (restarting at 0 in every row), so the real tokens can run as one packed row and be scattered back."""
    flat = keep.reshape(-1).nonzero().squeeze(1)
    positions = (keep.long().cumsum(1) - 1).reshape(-1)[flat]
    return flat, positions


def _head_loss(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T (+ bias)`, chunk by chunk, with the gradients taken while
    each chunk's logits exist: softmax - one-hot is the loss's gradient for the logits, so backward only
    scales what forward kept (the hidden states' gradient, and the weight's when it trains). No chunk is
    computed twice, unlike a checkpointed chunk, and at most one chunk of float32 logits is alive."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):  # noqa: ANN001, ANN205 (autograd signature)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            rows, target = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            logits = F.linear(rows, weight, bias).float()
            log_norm = torch.logsumexp(logits, dim=-1)
            total += (log_norm - logits.gather(1, target[:, None]).squeeze(1)).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            grad_logits = logits.sub_(log_norm[:, None]).exp_()  # softmax, in place of the logits
            grad_logits[torch.arange(len(target), device=target.device), target] -= 1.0
            if need_bias:
                grad_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(hidden.dtype)
            if need_hidden:
                grad_hidden[start : start + chunk_size] = grad_logits @ weight
            if need_weight:
                grad_weight += (grad_logits.t() @ rows).float()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: ANN001, ANN205
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (
            grad_hidden * grad_total.to(grad_hidden.dtype) if grad_hidden is not None else None,
            (grad_weight * grad_total).to(weight_dtype) if grad_weight is not None else None,
            (grad_bias * grad_total).to(bias_dtype) if grad_bias is not None else None,
            None,
            None,
        )


def plain_linear_head(head: torch.nn.Module, hidden: torch.Tensor) -> bool:
    """A head whose full weight is at hand: an nn.Linear, not wrapped by an adapter, not sharded (ZeRO-3 leaves
    an empty placeholder, FSDP2 a DTensor) and not quantized."""
    if type(head) is not torch.nn.Linear:
        return False
    weight = head.weight
    return (
        type(weight) in (torch.nn.Parameter, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[1] == hidden.shape[-1]
        and weight.is_floating_point()
    )


def trained_positions_loss(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over trained positions, and their count."""
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    rows = hidden[:, :-1][selected]
    targets = targets[selected]
    if plain_linear_head(head, rows):
        return LinearCrossEntropy.apply(rows, head.weight, head.bias, targets, chunk_size), selected.sum()
    # Any other head (an adapter on the output layer, a sharded or quantized weight) runs as a module.
    total = sum(head_chunks(_head_loss, rows, targets, head, chunk_size), rows.new_zeros((), dtype=torch.float32))
    return total, selected.sum()


def head_chunks(
    fn: Callable[..., torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, chunk_size: int
) -> list[torch.Tensor]:
    """fn(hidden chunk, target chunk, head) for each chunk, checkpointed when gradients are on: the same result
    as one call, with at most one chunk's logits alive, each chunk's head computed again in backward."""
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        parts.append(checkpoint(fn, h, t, head, use_reentrant=False) if torch.is_grad_enabled() else fn(h, t, head))
    return parts


def supports_trained_positions(model: Any) -> bool:
    """transformers' own models whose logits are a plain head over the decoder output (no soft-capping or
    scaling); a model's own code is not known to return its decoder's output as this assumes."""
    base = hf_model(model)
    if not is_native(base):
        return False
    config = getattr(base, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    if not hasattr(base, "get_decoder") or base.get_output_embeddings() is None:
        return False
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def hf_model(model: Any) -> Any:
    """The transformers model under DDP / PEFT wrappers."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


class TrainedPositionsLossMixin:
    """compute_loss that runs the LM head only on trained positions (training steps; eval is unchanged)."""

    lm_head_chunk_size = 1024
    loss_is_scaled_for_ga = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        base = hf_model(model)
        captured: dict[str, torch.Tensor] = {}

        def keep_hidden(module, args, output):
            captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

        handle = base.get_decoder().register_forward_hook(keep_hidden)
        try:
            # Through the (DDP/PEFT) wrapper so gradient sync and adapters apply; the head runs on 1 position.
            model(**inputs, logits_to_keep=1, use_cache=False)
        finally:
            handle.remove()
        loss_sum, count = trained_positions_loss(
            captured["hidden"],
            labels.to(captured["hidden"].device),
            base.get_output_embeddings(),
            self.lm_head_chunk_size,
        )
        denominator = num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1)
        loss = loss_sum / denominator
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return loss
