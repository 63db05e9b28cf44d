"""Reward-model scores without padding: the pairs of a batch run as one packed row, the head on last tokens only.

TRL's RewardTrainer calls the sequence-classification model on a padded batch (chosen rows, then
rejected rows); transformers runs the decoder over every padded position and the score head over
all of them, then keeps the rightmost non-pad token of each row. Here the same call packs the real
tokens into one row (positions restart per sequence, so attention stays inside each), runs the
decoder once and the head only on the token transformers would pool. Under per-sample attention (varlen.py)
each rejected row runs only from where it leaves its chosen row (row k + rows/2 against row k, TRL's order), as a
branch of it: a pair's prompt, and any answer tokens they share, run once. Same scores and gradients
(tests/unit/test_packed_scores.py); `--padding_free false` keeps the padded path. Value-head reward
models (models without a sequence-classification class) keep theirs.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from tunestack.model.anatomy import is_native
from tunestack.train.fast.efficient import hf_model, packed_positions
from tunestack.train.fast.varlen import shares_prompts

MODEL_KWARGS = {"input_ids", "attention_mask", "use_cache", "return_dict"}


def packed_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """[rows, num_labels] scores, or None when the batch is not right-padded (the caller falls back)."""
    rows, width = input_ids.shape
    keep = attention_mask.bool()
    lengths = keep.sum(1)
    if not bool((keep == (torch.arange(width, device=keep.device) < lengths[:, None])).all()):
        return None  # not right padding
    pad_id = model.config.get_text_config().pad_token_id
    # The token transformers pools: the rightmost one that is not the pad id (pad may equal EOS).
    non_pad = (input_ids != pad_id).int() if pad_id is not None else keep.int()
    pooled = (torch.arange(width, device=input_ids.device) * non_pad).argmax(-1)
    if bool((pooled >= lengths).any()):
        return None
    if shares_prompts(model) and rows > 1:
        flat, positions, picked = _paired_layout(input_ids, lengths, pooled)
    else:
        flat, positions = packed_positions(keep)
        picked = lengths.cumsum(0) - lengths + pooled
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids.reshape(-1)[flat][None], position_ids=positions[None], use_cache=False
    ).last_hidden_state[0]
    return model.score(hidden[picked])


def _paired_layout(
    input_ids: torch.Tensor, lengths: torch.Tensor, pooled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed row with row k + rows/2 a branch of row k from their first differing token (never past its
    pooled token, which stays its own), each branch right after its row: the flat index and position of every packed
    token, and the packed index of every row's pooled token."""
    rows, width = input_ids.shape
    half = rows // 2
    shared = [0] * rows
    for r in range(half, 2 * half):
        k = r - half
        m = min(int(lengths[k]), int(pooled[r]))
        differ = (input_ids[r, :m] != input_ids[k, :m]).nonzero()
        shared[r] = int(differ[0]) if len(differ) else m
    order = [r for k in range(half) for r in (k, k + half)] + list(range(2 * half, rows))
    flats, positions, picked, packed = [], [], [0] * rows, 0
    for r in order:
        cols = torch.arange(shared[r], int(lengths[r]), device=input_ids.device)
        flats.append(r * width + cols)
        positions.append(cols)
        picked[r] = packed + int(pooled[r]) - shared[r]
        packed += len(cols)
    return torch.cat(flats), torch.cat(positions), torch.tensor(picked, device=input_ids.device)


def use_packed_scores(model: Any) -> bool:
    """Route plain padded calls of a sequence-classification reward model through `packed_scores`."""
    base = hf_model(model)
    if (
        not is_native(base)
        or not hasattr(base, "score")
        or not hasattr(base, getattr(base, "base_model_prefix", "") or "-")
    ):
        return False
    from transformers.modeling_outputs import SequenceClassifierOutputWithPast

    forward_padded = base.forward

    @functools.wraps(forward_padded)
    def forward(*args: Any, **kwargs: Any) -> Any:
        given = {k: v for k, v in kwargs.items() if v is not None}  # PEFT passes its unused options as None
        if args or "input_ids" not in given or "attention_mask" not in given or not set(given) <= MODEL_KWARGS:
            return forward_padded(*args, **kwargs)
        logits = packed_scores(base, given["input_ids"], given["attention_mask"])
        if logits is None:
            return forward_padded(*args, **kwargs)
        return SequenceClassifierOutputWithPast(logits=logits)

    base.forward = forward
    return True


class PackedRewardMixin:
    """RewardTrainer whose model scores padding-free packed rows."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        use_packed_scores(self.model)
