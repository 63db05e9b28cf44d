"""The fast paths, each exact (its equivalence test named in docs/ARCHITECTURE.md), and which apply to a run:

* efficient.py: the output layer and loss on trained positions only, gradients taken chunk by chunk;
* varlen.py: attention per sample on packed rows (instead of a block-diagonal mask);
* packed_logps.py / packed_scores.py: DPO completion log-probs and RM scores on padding-free packed rows;
* batching.py: token-budget batches.
"""

from __future__ import annotations

from typing import Any


def lm_trainer_mixins(train_args: Any, model: Any, packed: bool) -> tuple[type, ...]:
    """Trainer behaviour of language-modelling stages: the trained-positions loss where the model allows it,
    and per-sample attention when batches are packed rows."""
    from tunestack.train.fast.efficient import TrainedPositionsLossMixin, supports_trained_positions

    mixins: tuple[type, ...] = ()
    if train_args.sparse_lm_head and supports_trained_positions(model):
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
