"""Batched log-likelihoods of token sequences: next-token log-probs and log-probs of continuations.

Rows are right padded and run without an attention mask: in a causal model a real token attends only to the
tokens before it, which are all real, so every row gets exactly the logits it would get alone (and attention
takes the fused causal path). Only the positions asked for go through the output layer (`logits_to_keep` with
those positions) where the model takes it, so the full-vocabulary logits of long prompts are never held.

Rows that begin alike (the k-shot prompts of one subject, the choices of one question) are batched together, and
the beginning a batch shares is run once: its KV cache is repeated over the batch and only the rows' own tails are
run on it. The log-probs are those of the whole rows (the attention over the cache is the same sum, up to float
rounding); a model without transformers' `cache` argument runs the whole rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tunestack.model.anatomy import forward_parameters

Progress = Callable[[int], None] | None


# A shared beginning shorter than this is not worth a pass of its own.
MIN_SHARED_PREFIX = 32
# Rows are sorted by this many leading tokens (which puts rows that begin alike next to each other), then longest
# first.
SORT_PREFIX = 256


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all `rows` have in common, leaving each row at least its last token."""
    first, limit = rows[0], min(len(r) for r in rows) - 1
    length = 0
    while length < limit and all(r[length] == first[length] for r in rows):
        length += 1
    return length


def positions_logprobs(
    model: Any, rows: Sequence[Sequence[int]], positions: Sequence[Sequence[int]], pad_id: int
) -> list:
    """For each row, the log-softmax (float32) of the logits at its `positions`: a [len(positions), vocab] tensor."""
    import torch

    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], device=device)
    takes = forward_parameters(model)
    kwargs: dict[str, Any] = {"use_cache": False}
    with torch.inference_mode():
        shared = _shared_cache(model, takes, ids, rows, positions)
        if shared is not None:
            start, kwargs["cache"] = shared
            kwargs["use_cache"] = True
            ids = ids[:, start:]
            positions = [[p - start for p in ps] for ps in positions]
        kwargs["input_ids"] = ids
        needed = sorted({p for ps in positions for p in ps})
        if "logits_to_keep" in takes:
            kwargs["logits_to_keep"] = torch.tensor(needed, device=device)
            column = {p: j for j, p in enumerate(needed)}
        else:
            column = {p: p for p in needed}
        logits = model(**kwargs).logits
    return [logits[i, [column[p] for p in ps]].float().log_softmax(-1) for i, ps in enumerate(positions)]


def _shared_cache(
    model: Any, takes: set[str], ids: Any, rows: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]
) -> Any:
    """(length, KV cache of the rows' shared beginning repeated over the batch), or None where sharing does not
    pay or the model keeps no transformers Cache (remote code written for `past_key_values` tuples). Positions
    inside the beginning keep it in the full pass."""
    if len(rows) < 2 or "cache" not in takes:
        return None
    length = min(shared_prefix_length(rows), min(min(ps) for ps in positions))
    if length < MIN_SHARED_PREFIX:
        return None
    from transformers import Cache

    kwargs: dict[str, Any] = {"input_ids": ids[:1, :length], "use_cache": True}
    if "logits_to_keep" in takes:
        kwargs["logits_to_keep"] = 1
    cache = model(**kwargs).cache
    if not isinstance(cache, Cache):
        return None
    cache.batch_repeat_interleave(len(rows))
    return length, cache


def _batches(rows: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Row indices in batches. Rows that share a beginning worth running once (the k-shot prompts of one subject)
    are batched among themselves; the others together, longest first."""
    order = sorted(range(len(rows)), key=lambda i: (list(rows[i][:SORT_PREFIX]), -len(rows[i])))
    runs: list[list[int]] = []
    for i in order:
        if runs and shared_prefix_length([rows[runs[-1][0]], rows[i]]) >= MIN_SHARED_PREFIX:
            runs[-1].append(i)
        else:
            runs.append([i])
    alone = sorted((run[0] for run in runs if len(run) == 1), key=lambda i: -len(rows[i]))
    groups = [run for run in runs if len(run) > 1] + [alone]
    return [group[k : k + batch_size] for group in groups for k in range(0, len(group), batch_size)]


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
    for batch in _batches(prompts, batch_size):
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
    for batch in _batches(rows, batch_size):
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
