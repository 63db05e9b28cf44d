"""Per-token log-probabilities of preference completions with no padding and the output layer only where scored.

TRL's DPOTrainer asks the model for per-token log-probs of a padded batch (chosen rows, then rejected
rows) through `model(..., labels=labels, fused_lm_head=True).log_probs`. On a CPU its fused head scores
every position of the padded batch, prompts and padding included. Here the same call packs the real
tokens of all rows into one row (positions restart per row, so attention stays inside each sequence),
runs the decoder once, applies the output layer in chunks (gradients taken as each chunk is computed)
only to the positions whose next token is a scored completion token, and scatters the results back
into the padded layout TRL expects. Under per-sample attention (varlen.py) rows that answer the same prompt,
a DPO pair or a GRPO group, pack that prompt once and their answers as branches of it. Same values and gradients
(tests/unit/test_packed_logps.py, test_packed_rl.py); `--padding_free false` or `--sparse_lm_head false` keep
TRL's path, `--varlen_attention false` the whole prompt in every row.

A model's own code (trust_remote_code) may return its backbone output in a layout of its own (ChatGLM's is
sequence-first), which TRL's fused head would read as batch-first: for those, `use_logits_logps` answers the
same calls from the model's own logits (its whole forward), exact at the memory of full logits.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from tunestack.model.packed_linear import frozen_linear
from tunestack.train.fast.efficient import (
    IGNORE_INDEX,
    head_chunks,
    hf_model,
    packed_positions,
    plain_linear_head,
    supports_trained_positions,
)
from tunestack.train.fast.varlen import shares_prompts

MODEL_KWARGS = {"input_ids", "attention_mask", "use_cache"}


STATS = ("log_probs", "entropy", "mean_logits", "is_top1")  # what TRL's DPOTrainer reads from the output


def _logprob_stats(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """[4, n] for STATS under logits / temperature (as TRL's fused head scales them): log-prob of each target
    (differentiable), entropy, mean logit and whether the target is the argmax (for TRL's logs); and the softmax."""
    if temperature != 1.0:
        logits = logits * (1.0 / temperature)
    log_probs = logits.log_softmax(-1)
    picked = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    with torch.no_grad():
        probs = log_probs.exp()
        entropy = -(probs * log_probs).sum(-1)
        stats = torch.stack([entropy, logits.mean(-1), (logits.argmax(-1) == targets).float()])
    return torch.cat([picked[None], stats]), probs


def _head_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, temperature: float = 1.0
) -> torch.Tensor:
    return _logprob_stats(head(hidden).float(), targets, temperature)[0]


class TargetLogProbs(torch.autograd.Function):
    """`_head_logprobs` over chunks of a frozen output layer, with the hidden states' gradient taken while each
    chunk's logits exist: d log p(t) / d logits = one-hot(t) - softmax, so forward keeps (one-hot - softmax) @ W
    per token (divided by the temperature the logits are divided by) and backward only scales it by the upstream
    gradient of that token's log-prob. Nothing is
    recomputed, unlike a checkpointed chunk. (A trained output layer would need the upstream gradient to form
    its own; that case keeps the checkpointed path.) On a CPU both products run on packed copies of the weight
    (model/packed_linear.frozen_linear)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, temperature=1.0):  # noqa: ANN001, ANN205
        need_hidden = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        parts = []
        for start in range(0, hidden.shape[0], chunk_size):
            rows, target = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            values, probs = _logprob_stats(frozen_linear(rows, weight, bias).float(), target, temperature)
            parts.append(values)
            if need_hidden:
                grad_logits = probs.neg_()  # one-hot - softmax, in place of the probabilities
                grad_logits[torch.arange(len(target), device=target.device), target] += 1.0
                if temperature != 1.0:
                    grad_logits.mul_(1.0 / temperature)
                grad_hidden[start : start + chunk_size] = frozen_linear(
                    grad_logits.to(hidden.dtype), weight, transposed=True
                )
        ctx.save_for_backward(grad_hidden)
        return torch.cat(parts, dim=1) if parts else hidden.new_zeros(len(STATS), 0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_values):  # noqa: ANN001, ANN205
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden is None:
            return None, None, None, None, None, None
        return grad_hidden * grad_values[0, :, None].to(grad_hidden.dtype), None, None, None, None, None


# A chunk's logits kept to about this many bytes. Each chunk allocates several tensors of that size; above a
# few MB glibc maps every one afresh and hands it back when freed, and on a virtual machine that returns freed
# memory to its host, touching fresh pages after a phase that freed much (a PPO rollout) cost kernel time: the
# first 512-row scoring pass after a rollout spent 1.2-1.7 s in its output layer at 1024 rows a chunk against 0.2 s
# at 32-64 (SmolLM2's 49152 entries: 6-12 MB), the same values (bench/README.md, the RL section).
CHUNK_LOGITS_BYTES = 8 << 20


def rows_per_chunk(vocab_size: int) -> int:
    """Rows of logits per chunk: CHUNK_LOGITS_BYTES of float32, at least 16."""
    return max(16, CHUNK_LOGITS_BYTES // (4 * vocab_size))


def chunked_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    chunk_size: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """[4, n]: log-probs of `targets` under logits / temperature (differentiable), entropy, mean logit, top-1
    hit; head run in chunks of `chunk_size` rows (default: `rows_per_chunk` of the head's output size)."""
    if chunk_size is None:
        weight = getattr(head, "weight", None)  # a ZeRO-3 placeholder is 1-D and empty; a custom head may have none
        whole = isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] > 0
        chunk_size = rows_per_chunk(weight.shape[0]) if whole else 1024
    frozen = not any(p.requires_grad for p in head.parameters())
    if frozen and plain_linear_head(head, hidden):
        return TargetLogProbs.apply(hidden, head.weight, head.bias, targets, chunk_size, temperature)
    fn = _head_logprobs if temperature == 1.0 else functools.partial(_head_logprobs, temperature=temperature)
    parts = head_chunks(fn, hidden, targets, head, chunk_size)
    return torch.cat(parts, dim=1) if parts else hidden.new_zeros(len(STATS), 0, dtype=torch.float32)


def _layout(
    input_ids: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor, share: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed row of a padded batch: the flat index of each packed token, its position id, and for every scored
    label the packed token whose hidden state predicts it and the label's flat index. With `share`, rows whose
    prompts (the real tokens before the first label) are the same token for token send that prompt once: the first
    such row packs whole, the others only their tokens from the first label on, as a branch whose positions
    continue the prompt's (varlen.segments), the prompt's last token predicting each branch's first label."""
    if share:
        grouped = _prompt_groups(input_ids, keep, labels)
        if any(len(rows) > 1 for rows, _ in grouped):
            return _shared_layout(keep, labels, grouped)
    flat, positions = packed_positions(keep)
    label = labels.reshape(-1)[flat]
    # Packed token k predicts the label of token k + 1, unless token k + 1 starts the next row.
    source = ((positions[1:] != 0) & (label[1:] != IGNORE_INDEX)).nonzero().squeeze(1)
    return flat, positions, source, flat[source + 1]


def _prompt_groups(input_ids: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor) -> list[tuple[list[int], int]]:
    """Rows with the same prompt, in the order of their first row, with the prompt's length in tokens."""
    groups: dict[Any, tuple[list[int], int]] = {}
    labelled = (labels != IGNORE_INDEX) & keep
    for r in range(input_ids.shape[0]):
        real = keep[r].nonzero().squeeze(1)
        first = labelled[r, real].nonzero()
        prompt = len(first) and int(first[0])
        # A row without a prompt or without labels shares nothing.
        key = tuple(input_ids[r, real[:prompt]].tolist()) if 0 < prompt < len(real) else ("row", r)
        groups.setdefault(key, ([], prompt))[0].append(r)
    return list(groups.values())


def _shared_layout(
    keep: torch.Tensor, labels: torch.Tensor, grouped: list[tuple[list[int], int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    width = keep.shape[1]
    flats, positions, sources, dests = [], [], [], []
    packed = 0
    for rows, prompt in grouped:
        trunk_last = packed + prompt - 1
        for i, r in enumerate(rows):
            cols = keep[r].nonzero().squeeze(1)
            own = cols if i == 0 else cols[prompt:]  # the first row packs its prompt, the others continue it
            start = 0 if i == 0 else prompt
            flats.append(r * width + own)
            positions.append(torch.arange(start, start + len(own), device=keep.device))
            # Each token of the row and the packed token before it in the row's own sequence.
            before = torch.arange(packed - 1, packed + len(own) - 1, device=keep.device)
            if i > 0:
                before[0] = trunk_last
            scored = labels[r, own] != IGNORE_INDEX
            if i == 0 and len(own):
                scored[0] = False  # a row's first token has no token before it
            sources.append(before[scored])
            dests.append(r * width + own[scored])
            packed += len(own)
    return torch.cat(flats), torch.cat(positions), torch.cat(sources), torch.cat(dests)


def packed_completion_logps(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """{stat: [rows, width - 1]} for STATS: entry (r, j) is about labels[r, j + 1]; 0 where that label is -100.
    The statistics are those of logits / temperature. Under per-sample attention (varlen.py) rows with the same
    prompt run it once (`_layout`)."""
    rows, width = input_ids.shape
    keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    flat, positions, source, dest = _layout(input_ids, keep, labels, shares_prompts(model))
    base = hf_model(model)
    ids = input_ids.reshape(-1)[flat]
    hidden = base.get_decoder()(input_ids=ids[None], position_ids=positions[None], use_cache=False).last_hidden_state
    targets = labels.reshape(-1)[dest]
    values = chunked_logprobs(hidden[0, source], targets, base.get_output_embeddings(), temperature=temperature)
    out = {}
    for name, value in zip(STATS, values, strict=True):
        padded = hidden.new_zeros(rows * width, dtype=torch.float32).index_put((dest,), value)
        out[name] = padded.view(rows, width)[:, 1:]
    out["is_top1"] = out["is_top1"].bool()
    return out


def use_packed_logps(model: Any, temperature: float = 1.0) -> bool:
    """Route `fused_lm_head=True` calls of `model` (after TRL patched it with this temperature) through
    `packed_completion_logps`."""
    base = hf_model(model)
    if not supports_trained_positions(base):
        return False
    from trl.trainer.utils import FusedCausalLMOutput

    fused_forward = base.forward

    @functools.wraps(fused_forward)  # keep the signature: generate and column filtering read it
    def forward(*args: Any, fused_lm_head: bool = False, labels: Any = None, **kwargs: Any) -> Any:
        given = {k: v for k, v in kwargs.items() if v is not None}  # PEFT passes its unused options as None
        if not fused_lm_head or args or labels is None or "input_ids" not in given or not set(given) <= MODEL_KWARGS:
            return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        stats = packed_completion_logps(base, given["input_ids"], given.get("attention_mask"), labels, temperature)
        mask = labels[:, 1:] != IGNORE_INDEX
        loss = -stats["log_probs"].sum() / mask.sum().clamp(min=1)
        return FusedCausalLMOutput(loss=loss, label_mask=mask, **stats)

    base.forward = forward
    return True


class PackedPreferenceMixin:
    """DPOTrainer whose policy (and reference) score completions with `packed_completion_logps`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if getattr(self, "use_weighting", False):
            return  # WPO weights need log_sum_sq_probs: TRL's own head computes them
        use_packed_logps(self.model)
        if getattr(self, "ref_model", None) is not None:
            use_packed_logps(self.ref_model)


def use_logits_logps(model: Any) -> None:
    """Answer `fused_lm_head=True` calls of `model` (after TRL patched it) from the logits of its own forward."""
    from trl.trainer.utils import FusedCausalLMOutput

    base = hf_model(model)
    fused_forward = base.forward

    @functools.wraps(fused_forward)
    def forward(*args: Any, fused_lm_head: bool = False, labels: Any = None, **kwargs: Any) -> Any:
        if not fused_lm_head:
            return fused_forward(*args, fused_lm_head=False, labels=labels, **kwargs)
        kwargs.pop("num_items_in_batch", None)
        given = {k: v for k, v in kwargs.items() if v is not None}
        logits = fused_forward(*args, fused_lm_head=False, **given).logits[:, :-1].float()
        targets = labels[:, 1:].to(logits.device)
        mask = targets != IGNORE_INDEX
        values, _ = _logprob_stats(logits[mask], targets[mask])
        stats = {
            name: logits.new_zeros(mask.shape).masked_scatter(mask, v) for name, v in zip(STATS, values, strict=True)
        }
        stats["is_top1"] = stats["is_top1"].bool()
        loss = -stats["log_probs"].sum() / mask.sum().clamp(min=1)
        return FusedCausalLMOutput(loss=loss, label_mask=mask, **stats)

    base.forward = forward


class LogitsPreferenceMixin:
    """DPO / KTO trainer whose policy (and reference) answer TRL's fused-head calls from their own logits."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        use_logits_logps(self.model)
        if getattr(self, "ref_model", None) is not None:
            use_logits_logps(self.ref_model)
