"""Batched log-likelihoods of token sequences: next-token log-probs and log-probs of continuations.

Rows are right padded and run without an attention mask: in a causal model a real token attends only to the
tokens before it, which are all real, so every row gets exactly the logits it would get alone (and attention
takes the fused causal path). Only the positions asked for go through the output layer (`logits_to_keep` with
those positions) where the model takes it, so the full-vocabulary logits of long prompts are never held.
Rows are batched longest first.
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


def positions_logprobs(
    model: Any, rows: Sequence[Sequence[int]], positions: Sequence[Sequence[int]], pad_id: int
) -> list:
    """For each row, the log-softmax (float32) of the logits at its `positions`: a [len(positions), vocab] tensor."""
    import torch

    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], device=device)
    needed = sorted({p for ps in positions for p in ps})
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = torch.tensor(needed, device=device)
        column = {p: j for j, p in enumerate(needed)}
    else:
        column = {p: p for p in needed}
    with torch.inference_mode():
        logits = model(**kwargs).logits
    return [logits[i, [column[p] for p in ps]].float().log_softmax(-1) for i, ps in enumerate(positions)]


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
        rows = [prompts[i] for i in batch]
        logprobs = positions_logprobs(model, rows, [[len(r) - 1] for r in rows], pad_id)
        for i, lp in zip(batch, logprobs, strict=True):
            out[i] = lp[0, list(token_ids)].tolist()
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
    import torch

    if any(not c for c in continuations):
        raise ValueError("every continuation needs at least one token")
    rows = [list(ctx) + list(cont) for ctx, cont in zip(contexts, continuations, strict=True)]
    out: list[list[float]] = [[] for _ in rows]
    for batch in _batches([len(r) for r in rows], batch_size):
        # The logits at position t predict token t + 1: a continuation of n tokens ending a row of length L is
        # predicted by the positions L-n-1 .. L-2.
        wanted = [list(range(len(rows[i]) - len(continuations[i]) - 1, len(rows[i]) - 1)) for i in batch]
        logprobs = positions_logprobs(model, [rows[i] for i in batch], wanted, pad_id)
        for i, lp in zip(batch, logprobs, strict=True):
            targets = torch.tensor(list(continuations[i]), device=lp.device).unsqueeze(-1)
            out[i] = lp.gather(-1, targets).squeeze(-1).tolist()
        if progress is not None:
            progress(len(batch))
    return out


def pad_id_of(tokenizer: Any, stop_ids: Sequence[int] = ()) -> int:
    """The id padded rows use (any id works: padding comes after every real token; the pad token when there is
    one)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, *stop_ids):
        if candidate is not None:
            return int(candidate)
    return 0
