"""LoRA dropout fused into the adapter's first matmul: the same computation with a fraction of the memory.

PEFT computes `lora_B(lora_A(dropout(x)))`. On a CPU, dropout keeps its mask as a float tensor and
`lora_A` keeps the dropped-out copy of `x` for its weight gradient: two float copies of every adapted
layer's input, for each of q, k, v, o, gate, up and down. That is about half of all the activations a
LoRA step keeps (1.2 of 2.5 MB per token for SmolLM2), and writing them costs time as well.

`DropoutLinear` computes `linear(x * mask / (1 - p), A)` in one autograd function that keeps `x`
itself (the very tensor q, k and v share, so it is kept once) and a one-byte mask, and recomputes the
dropped-out input in backward. Same masks distribution, same values, same gradients as PEFT's path
(tests/unit/test_lora_dropout.py); off with `--fused_lora_dropout false`. Under autocast, without
gradients, in eval mode or with p = 0 it is the plain computation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _DropoutLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight, keep)
        ctx.scale = scale
        return F.linear(x * keep * scale, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, weight, keep = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight) * keep * ctx.scale
        if ctx.needs_input_grad[1]:
            dropped = (x * keep * ctx.scale).reshape(-1, x.shape[-1])
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ dropped
        return grad_x, grad_w, None, None


def dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """linear(dropout(x, p), weight) keeping x and a bool mask for backward; `keep` fixes the mask (tests)."""
    if keep is None:
        keep = torch.rand_like(x) >= p
    return _DropoutLinearFunction.apply(x, weight, keep, 1.0 / (1.0 - p))


class DeferredDropout(nn.Dropout):
    """Stands in for the layer's `lora_dropout`: passes x through; `lora_A` applies its `p`. Still an nn.Dropout,
    so whatever switches dropout off model-wide (TRL's disable_dropout sets p = 0) reaches the fused path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class DropoutLinear(nn.Linear):
    """A LoRA `lora_A` that applies its layer's dropout itself."""

    deferred: DeferredDropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.deferred.p
        plain = (
            not self.training
            or p == 0
            or self.bias is not None
            or torch.is_autocast_enabled(x.device.type)
            or not torch.is_grad_enabled()
        )
        if plain:
            return F.linear(F.dropout(x, p, self.training), self.weight, self.bias)
        return dropout_linear(x, self.weight, p)


def fuse_lora_dropout(model: nn.Module) -> int:
    """Fuse dropout into lora_A of every plain LoRA layer (not DoRA or other variants); returns how many."""
    fused = 0
    for module in model.modules():
        lora_a, dropouts = getattr(module, "lora_A", None), getattr(module, "lora_dropout", None)
        if not isinstance(lora_a, nn.ModuleDict) or not isinstance(dropouts, nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {}) or {}
        for name, linear in lora_a.items():
            dropout = dropouts[name] if name in dropouts else None
            if name in variants or type(linear) is not nn.Linear or type(dropout) is not nn.Dropout or dropout.p == 0:
                continue
            deferred = DeferredDropout(dropout.p)
            deferred.train(dropout.training)
            dropouts[name] = deferred
            linear.__class__ = DropoutLinear  # same parameters and state-dict keys; only forward changes
            object.__setattr__(linear, "deferred", deferred)  # a reference, not a second child module
            fused += 1
    return fused
