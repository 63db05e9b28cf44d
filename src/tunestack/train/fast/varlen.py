"""Attention for packed rows, one sample at a time.

A padding-free batch is one row of concatenated samples whose position ids restart at 0 for every
sample. Through SDPA, transformers gives such a row a dense (sum of lengths)² block-diagonal mask,
and SDPA computes every masked-out score anyway: a row of four 512-token samples costs as much
attention as one 2048-token sample. Here each sample's slice of the row runs through SDPA with
`is_causal=True` instead, so the work is the sum of the squares of the lengths and the fast causal
kernels apply (flash-attention-style on CPU too). Exact: the same scores and softmax per sample.

Shared prompts: within a sample, a position id that drops back to q > 0 starts a branch that continues the
sample's first q tokens, as if the tokens between were not there: it attends to those q tokens and causally to
itself (`segments`). Completions of one prompt (GRPO's group, DPO's and the RM's chosen and rejected) then run
the prompt once (packed_logps.py, packed_scores.py). Only this implementation reads position ids that way: `shares_prompts` says when a model
runs it on every layer.

It is installed as an attention implementation (`tunestack_varlen`) only around the training and
evaluation steps of packed batches (`VarlenAttentionMixin`); the masks are SDPA's, and any call that
is not a packed row (generation with a cache, padded batches, sliding-window layers) goes to SDPA
unchanged. On GPU with flash-attention 2 chosen, transformers' own varlen path is kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN = "tunestack_varlen"


def segments(position_ids: torch.Tensor) -> list[tuple[int, int, int, int]] | None:
    """The runs of consecutive position ids of a packed row, as (start, end, prefix start, prefix length): a run
    starting at position 0 begins a sample (no prefix); one starting at q > 0 is a branch continuing the first q
    tokens of its sample. None if the row does not start at 0 or a branch continues more tokens than its sample's
    first run has."""
    p = position_ids.reshape(-1)
    if p.numel() == 0 or int(p[0]) != 0:
        return None
    starts = [0, *((p[1:] != p[:-1] + 1).nonzero().flatten() + 1).tolist()]
    bounds = [*starts, p.numel()]
    heads = p[starts].tolist()
    out, sample, first_run = [], 0, 0
    for s, e, q in zip(bounds[:-1], bounds[1:], heads, strict=True):
        if q == 0:
            sample, first_run = s, e - s
            out.append((s, e, s, 0))
        elif q <= first_run and s != sample:
            out.append((s, e, sample, q))
        else:
            return None
    return out


def _branch_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix: int, dropout: float, scaling: float | None
) -> torch.Tensor:
    """SDPA of a branch's queries over its prefix's keys (all visible) and its own (causal)."""
    length = query.shape[2]
    visible = torch.ones(length, prefix + length, dtype=torch.bool, device=query.device)
    visible[:, prefix:] = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    return F.scaled_dot_product_attention(query, key, value, attn_mask=visible, dropout_p=dropout, scale=scaling)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: per-sample causal SDPA on packed rows, plain SDPA otherwise."""
    position_ids = kwargs.get("position_ids")
    batch, _, length, _ = query.shape
    rows = None
    if (
        position_ids is not None
        and position_ids.shape[-1] == length == key.shape[2]  # no KV cache in play
        and length > 1
        and is_causal is not False
        and getattr(module, "is_causal", True)
        and getattr(module, "sliding_window", None) is None
        and kwargs.get("position_bias") is None
    ):
        rows = [segments(p) for p in position_ids.expand(batch, -1)]
        if any(r is None for r in rows) or all(len(r) == 1 for r in rows):
            rows = None  # not packed: one sample per row (padding, if any, is in the mask)
    if rows is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = []
    for b, runs in enumerate(rows):
        q, k, v = query[b : b + 1], key[b : b + 1], value[b : b + 1]
        parts = []
        for s, e, ps, prefix in runs:
            if prefix == 0:
                parts.append(
                    F.scaled_dot_product_attention(
                        q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], dropout_p=dropout, scale=scaling, is_causal=True
                    )
                )
                continue
            keys = torch.cat([k[:, :, ps : ps + prefix], k[:, :, s:e]], dim=2)
            values = torch.cat([v[:, :, ps : ps + prefix], v[:, :, s:e]], dim=2)
            parts.append(_branch_attention(q[:, :, s:e], keys, values, prefix, dropout, scaling))
        out.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    attn = torch.cat(out, dim=0) if batch > 1 else out[0]
    return attn.transpose(1, 2).contiguous(), None


AttentionInterface.register(VARLEN, varlen_attention_forward)
AttentionMaskInterface.register(VARLEN, sdpa_mask)


def _config(model: Any) -> Any:
    from tunestack.train.fast.efficient import hf_model

    return getattr(hf_model(model), "config", None)


def shares_prompts(model: Any) -> bool:
    """Whether `model` runs this implementation on every layer now (inside `varlen_attention`, no sliding-window
    layer, which goes to SDPA), so that branches of a packed row may share their prompt."""
    config = _config(model)
    if getattr(config, "_attn_implementation", None) != VARLEN:
        return False
    from tunestack.train.fast.efficient import hf_model

    return not any(getattr(m, "sliding_window", None) is not None for m in hf_model(model).modules())


@contextlib.contextmanager
def varlen_attention(model: Any) -> Iterator[None]:
    """Per-sample attention for the duration of the block, where the model runs SDPA."""
    config = _config(model)
    previous = getattr(config, "_attn_implementation", None)
    if previous != "sdpa":
        yield
        return
    config._attn_implementation = VARLEN
    try:
        yield
    finally:
        config._attn_implementation = previous


class VarlenAttentionMixin:
    """Trainer steps (forward, backward with any recomputation, evaluation) with per-sample attention."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        with varlen_attention(model):
            return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with varlen_attention(model):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
