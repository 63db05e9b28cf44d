"""Log-probabilities, values and entropies of a rollout's response tokens, two ways with the same results:

* packed (the default): the real tokens of the rows as one padding-free row (positions restart per sequence, so
  attention stays inside each; per-sample attention with --varlen_attention), the output layer only at the
  positions whose next token is a response token, in chunks, the hidden states' gradient taken while each chunk's
  logits exist (train/fast/packed_logps.py); the value head on the same positions;
* padded (--padding_free false or --sparse_lm_head false, and models whose logits are not a plain head): the
  left-padded prompt + response rows and the full-vocabulary logits at every position, as the loop was first
  written. tests/unit/test_ppo_fast.py holds the packed way to its values and gradients.

Either way a value at a position outside the response mask is 0 (packed) or whatever the padded rows give: every
use of them is masked.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from tunestack.model.anatomy import takes_argument
from tunestack.rl.policy import packed_logprobs
from tunestack.rl.ppo_core import entropy_from_logits, token_logprobs
from tunestack.rl.rollout import Rollout
from tunestack.train.fast.efficient import packed_positions
from tunestack.train.fast.varlen import varlen_attention

TOKENS_PER_PASS = 8192  # the most tokens a no-gradient pass packs into one row


@dataclass
class Scores:
    logp: torch.Tensor  # [rows, response length]
    values: torch.Tensor | None
    entropy: torch.Tensor | None  # no gradient; None when the padded way was not asked for it


@dataclass
class PackedRows:
    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N]
    scored: torch.Tensor  # [n]: packed index of the token before each scored response token
    targets: torch.Tensor  # [n]: that response token
    where: tuple[torch.Tensor, torch.Tensor]  # (row, response column) of each
    shape: tuple[int, int]

    def spread(self, values: torch.Tensor) -> torch.Tensor:
        """[n] values -> [rows, response length], 0 elsewhere (differentiable)."""
        zeros = torch.zeros(self.shape, dtype=values.dtype, device=values.device)
        return zeros.index_put(self.where, values)


def pack_rows(r: Rollout, idx: torch.Tensor) -> PackedRows | None:
    """The rows `idx` of a rollout as one packed row; None if a scored token follows a masked one (a pad id
    sampled inside an answer), which only the padded way handles."""
    ids, keep = r.input_ids[idx], r.attention_mask[idx].bool()
    width, start = ids.shape[1], r.prompt_len
    flat, positions = packed_positions(keep)
    rows, cols = r.mask[idx].bool().nonzero(as_tuple=True)
    before = rows * width + start + cols - 1  # flat position of the token that predicts each response token
    kept = keep.reshape(-1)
    if not bool(kept[before].all()):
        return None
    packed_index = kept.long().cumsum(0) - 1
    return PackedRows(
        ids.reshape(-1)[flat][None],
        positions[None],
        packed_index[before],
        ids[rows, start + cols],
        (rows, cols),
        (len(idx), width - start),
    )


def token_chunks(r: Rollout, idx: torch.Tensor, budget: int = TOKENS_PER_PASS) -> list[torch.Tensor]:
    """`idx` split in order into runs of rows of at most `budget` real tokens (at least one row each)."""
    lengths = r.attention_mask[idx].sum(1).tolist()
    chunks, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and total + n > budget:
            chunks.append(idx[start:i])
            start, total = i, 0
        total += n
    chunks.append(idx[start:])
    return chunks


class Scorer:
    """Scores of response tokens under the policy (with values) or any causal LM (log-probs), of the distribution
    the rollouts sample: the logits divided by the sampling temperature (as TRL's trainers score them)."""

    def __init__(self, packed: bool, varlen: bool, temperature: float = 1.0):
        self.packed = packed
        self.varlen = varlen
        self.temperature = temperature

    def _attention(self, model: Any) -> Any:
        return varlen_attention(model) if self.varlen else contextlib.nullcontext()

    def policy(
        self, model: Any, r: Rollout, idx: torch.Tensor, with_values: bool = True, entropy: bool = False
    ) -> Scores:
        """`model` is the PolicyWithValue (through its DDP wrapper when there is one). The packed way always
        gives the entropy; the padded way when asked (it costs a pass over the full logits)."""
        rows = pack_rows(r, idx) if self.packed else None
        if rows is None:
            ids, att, pos = r.input_ids[idx], r.attention_mask[idx], r.position_ids[idx]
            logits, values = model(ids, pos, attention_mask=att, with_values=with_values)
            return _padded_scores(r, ids, logits / self.temperature, values, entropy)
        with self._attention(model):
            stats, values = model(
                rows.input_ids,
                rows.position_ids,
                scored=rows.scored,
                targets=rows.targets,
                with_values=with_values,
                temperature=self.temperature,
            )
        values = rows.spread(values) if values is not None else None
        return Scores(rows.spread(stats[0]), values, rows.spread(stats[1].detach()))

    def logprobs(self, lm: Any, r: Rollout, idx: torch.Tensor) -> torch.Tensor:
        """Log-probs of the response tokens under a causal LM (the reference, or the policy alone)."""
        rows = pack_rows(r, idx) if self.packed else None
        if rows is None:
            ids, att, pos = r.input_ids[idx], r.attention_mask[idx], r.position_ids[idx]
            # A model's own code may number positions itself (Baichuan's takes no position_ids).
            positions = {"position_ids": pos} if takes_argument(lm, "position_ids") else {}
            logits = lm(input_ids=ids, attention_mask=att, use_cache=False, **positions).logits
            return _padded_scores(r, ids, logits / self.temperature, None, False).logp
        with self._attention(lm):
            stats, _ = packed_logprobs(
                lm, rows.input_ids, rows.position_ids, rows.scored, rows.targets, self.temperature
            )
        return rows.spread(stats[0])


def _padded_scores(
    r: Rollout, ids: torch.Tensor, logits: torch.Tensor, values: torch.Tensor | None, entropy: bool
) -> Scores:
    start = r.prompt_len - 1
    logits = logits[:, start:-1]
    logp = token_logprobs(logits, ids[:, r.prompt_len :])
    with torch.no_grad():
        ent = entropy_from_logits(logits) if entropy else None
    return Scores(logp, values[:, start:-1] if values is not None else None, ent)
