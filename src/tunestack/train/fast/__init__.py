"""The fast paths, each exact (its equivalence test named in docs/ARCHITECTURE.md), and which apply to a run:

* efficient.py: the output layer and loss on trained positions only, gradients taken chunk by chunk;
* varlen.py: attention per sample on packed rows (instead of a block-diagonal mask);
* packed_logps.py / packed_scores.py: DPO completion log-probs and RM scores on padding-free packed rows;
* batching.py: token-budget batches.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("tunestack")


def head_outside_forward(train_args: Any, what: str) -> bool:
    """Whether a fast path that runs the output (or score) layer after the model's forward pass may run: not
    where that layer's weight is sharded outside the forward (ZeRO-3, FSDP1; FSDP2 keeps the root module's
    weights, the output layer among them, gathered until backward). Says so when it is switched off."""
    from tunestack.train.distributed import sharding

    kind = sharding(train_args)
    version = int((getattr(train_args, "fsdp_config", None) or {}).get("version", 2))
    why = {"zero3": "ZeRO-3", "fsdp": "FSDP1" if version == 1 else None}.get(kind or "")
    if why is None:
        return True
    logger.info(
        "%s is switched off under %s: it partitions the output layer's weight outside the model's forward "
        "pass; the model's own output layer runs instead (same loss)",
        what,
        why,
    )
    return False


def lm_trainer_mixins(train_args: Any, model: Any, packed: bool) -> tuple[type, ...]:
    """Trainer behaviour of language-modelling stages: the trained-positions loss where the model allows it,
    and per-sample attention when batches are packed rows."""
    from tunestack.train.fast.efficient import TrainedPositionsLossMixin, supports_trained_positions

    mixins: tuple[type, ...] = ()
    if (
        train_args.sparse_lm_head
        and supports_trained_positions(model)
        and head_outside_forward(train_args, "--sparse_lm_head (the trained-positions output layer)")
    ):
        mixins += (TrainedPositionsLossMixin,)
    if packed:
        mixins += packed_row_mixins(train_args)
    return mixins


def packed_row_mixins(train_args: Any) -> tuple[type, ...]:
    """Per-sample attention for a trainer that feeds packed rows, unless --varlen_attention false."""
    if not train_args.varlen_attention:
        return ()
    from tunestack.train.fast.varlen import VarlenAttentionMixin

    return (VarlenAttentionMixin,)
