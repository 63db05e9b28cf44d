"""Perplexity of a model on held-out text: documents joined by EOS, cut into blocks, exp(mean token NLL)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tunestack.errors import DataError


def read_documents(paths: str, text_field: str = "text") -> tuple[list[str], list[Path]]:
    """Documents of the evaluation text (one per .txt file, or each record's `text_field`), and the files read."""
    from tunestack.data.pretrain import iter_documents
    from tunestack.data.sources import find_data_files

    files = find_data_files(paths, what="evaluation text")
    docs = [doc for path in files for doc in iter_documents(path, text_field, keep_linebreaks=True)]
    if not docs:
        raise DataError(f"{paths}: the evaluation text is empty")
    return docs, files


def token_blocks(tokenizer: Any, docs: list[str], block_size: int, max_blocks: int | None) -> list[list[int]]:
    """Token blocks of at most `block_size` (the last may be shorter), documents separated by EOS."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
    blocks = [ids[i : i + block_size] for i in range(0, len(ids), block_size)]
    blocks = [b for b in blocks if len(b) > 1]
    return blocks[:max_blocks] if max_blocks and max_blocks > 0 else blocks


def perplexity(model: Any, blocks: list[list[int]], batch_size: int = 4) -> dict[str, float]:
    """{'perplexity', 'nll', 'tokens'} over `blocks` (every next-token prediction inside a block counts once)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    by_length: dict[int, list[list[int]]] = {}
    for block in blocks:
        by_length.setdefault(len(block), []).append(block)
    with torch.inference_mode():
        for same_length in by_length.values():
            for start in range(0, len(same_length), batch_size):
                batch = torch.tensor(same_length[start : start + batch_size], device=device)
                logits = model(input_ids=batch).logits[:, :-1].float()
                labels = batch[:, 1:]
                total_nll += float(
                    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
                )
                total_tokens += labels.numel()
    if not total_tokens:
        raise DataError("the evaluation text has no token to predict")
    nll = total_nll / total_tokens
    return {"perplexity": round(math.exp(min(nll, 50.0)), 4), "nll": round(nll, 4), "tokens": total_tokens}


def conditional_perplexity(
    model: Any, contexts: list[list[int]], continuations: list[list[int]], batch_size: int, pad_id: int
) -> dict[str, float]:
    """{'perplexity', 'nll', 'tokens'} of the continuation tokens only, each given its context (e.g. answers given
    their prompts); pairs with an empty continuation are left out."""
    from tunestack.eval.scoring import continuation_logprobs

    pairs = [(c, a) for c, a in zip(contexts, continuations, strict=True) if a]
    if not pairs:
        raise DataError("no answer tokens to score")
    lls = continuation_logprobs(model, [c for c, _ in pairs], [a for _, a in pairs], batch_size, pad_id)
    tokens = sum(len(row) for row in lls)
    nll = -sum(sum(row) for row in lls) / tokens
    return {"perplexity": round(math.exp(min(nll, 50.0)), 4), "nll": round(nll, 4), "tokens": tokens}
