"""Batched log-likelihoods of token sequences: next-token log-probs and log-probs of continuations.

Rows are left padded with position ids counted from each row's first real token, so a padded row gets the
logits it would get alone; only the last positions' logits are computed (`logits_to_keep`) where the model
takes it, so the full-vocabulary logits of long prompts are never held. Rows are batched longest first.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

Progress = Callable[[int], None] | None


def _accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def tail_logprobs(model: Any, rows: Sequence[Sequence[int]], keep: int, pad_id: int) -> Any:
    """log-softmax (float32) of the logits at the last `keep` positions of every row: [rows, keep, vocab]."""
    import torch

    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    if _accepts(model, "position_ids"):
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep
    with torch.inference_mode():
        logits = model(**kwargs).logits[:, -keep:]
    return logits.float().log_softmax(-1)


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def next_token_logprobs(
    model: Any,
    prompts: Sequence[Sequence[int]],
    token_ids: Sequence[int],
    batch_size: int,
    pad_id: int,
    progress: Progress = None,
) -> list[list[float]]:
    """log P(token | prompt) of each of `token_ids` after each prompt, in prompt order."""
    out: list[list[float]] = [[] for _ in prompts]
    for batch in _batches([len(p) for p in prompts], batch_size):
        logprobs = tail_logprobs(model, [prompts[i] for i in batch], 1, pad_id)[:, -1]
        picked = logprobs[:, list(token_ids)].tolist()
        for i, row in zip(batch, picked, strict=True):
            out[i] = row
        if progress is not None:
            progress(len(batch))
    return out


def continuation_logprobs(
    model: Any,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    batch_size: int,
    pad_id: int,
    progress: Progress = None,
) -> list[list[float]]:
    """Per-token log P(continuation token | context + earlier continuation tokens) for each pair, in order."""
    if any(not c for c in continuations):
        raise ValueError("every continuation needs at least one token")
    rows = [list(ctx) + list(cont) for ctx, cont in zip(contexts, continuations, strict=True)]
    out: list[list[float]] = [[] for _ in rows]
    for batch in _batches([len(r) for r in rows], batch_size):
        keep = max(len(continuations[i]) for i in batch) + 1
        logprobs = tail_logprobs(model, [rows[i] for i in batch], keep, pad_id)
        for j, i in enumerate(batch):
            cont = list(continuations[i])
            # logits at position t predict token t+1: the continuation's tokens are predicted by the positions
            # just before each of them, i.e. the last len(cont)+1 positions but the final one.
            predicting = logprobs[j, keep - len(cont) - 1 : keep - 1]
            out[i] = predicting.gather(-1, _column(cont, predicting.device)).squeeze(-1).tolist()
        if progress is not None:
            progress(len(batch))
    return out


def _column(ids: list[int], device: Any) -> Any:
    import torch

    return torch.tensor(ids, device=device).unsqueeze(-1)


def pad_id_of(tokenizer: Any, stop_ids: Sequence[int] = ()) -> int:
    """The id padded rows use (any id works under the attention mask; the pad token when there is one)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, *stop_ids):
        if candidate is not None:
            return int(candidate)
    return 0
