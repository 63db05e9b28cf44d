"""The fast paths, each exact (its equivalence test named in docs/ARCHITECTURE.md), and which apply to a run:

* efficient.py: the output layer and loss on trained positions only, gradients taken chunk by chunk;
* varlen.py: attention per sample on packed rows (instead of a block-diagonal mask);
* packed_logps.py / packed_scores.py: DPO completion log-probs and RM scores on padding-free packed rows;
* batching.py: token-budget batches.
"""

from __future__ import annotations

import logging
from typing import Any

from tunestack.errors import ConfigError
from tunestack.model.anatomy import is_native

logger = logging.getLogger("tunestack")


def packing_problem(config: Any) -> str | None:
    """Why packed rows (samples back to back, position ids restarting, no mask) would let samples attend to each
    other with this model, or None. transformers' own architectures turn restarting positions into per-sample
    attention; a model's own code (trust_remote_code) is not known to."""
    if config is None or is_native(config):
        return None
    return f"{type(config).__name__} is the model's own code, which is not known to keep packed samples apart"


def fit_fast_paths(train_args: Any, config: Any) -> None:
    """Switch off the fast paths this model cannot take (before anything is planned or recorded)."""
    problem = packing_problem(config)
    if problem is None:
        return
    if train_args.document_attention:
        raise ConfigError(f"--document_attention packs documents into one row: {problem}")
    if train_args.padding_free:
        logger.info("padding-free batches off: %s; batches are padded", problem)
        train_args.padding_free = False


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
