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


def head_outside_forward(train_args: Any, what: str, head_trains: bool) -> bool:
    """Whether a fast path that runs the output (or score) layer after the model's forward pass may run: not where
    that layer's weight is sharded outside the forward (ZeRO-3, FSDP1), nor under FSDP2 when the layer itself
    trains (FSDP2 keeps the root module's weights gathered until backward, but its gradient must come from within
    FSDP's own backward). Says so when it is switched off."""
    from tunestack.train.distributed import sharding

    kind = sharding(train_args)
    version = int((getattr(train_args, "fsdp_config", None) or {}).get("version", 2))
    reason = None
    if kind == "zero3":
        reason = "ZeRO-3: it partitions the output layer's weight outside the model's forward pass"
    elif kind == "fsdp" and version == 1:
        reason = "FSDP1: it reshards the output layer's weight outside the model's forward pass"
    elif kind == "fsdp" and head_trains:
        reason = "FSDP when the output layer trains: its gradient must come from FSDP's own backward"
    if reason is None:
        return True
    logger.info("%s is switched off under %s; the model's own output layer runs instead (same loss)", what, reason)
    return False


def output_layer_trains(model: Any) -> bool:
    from tunestack.train.fast.efficient import hf_model

    head = hf_model(model).get_output_embeddings()
    return head is not None and any(p.requires_grad for p in head.parameters())


def lm_trainer_mixins(train_args: Any, model: Any, packed: bool) -> tuple[type, ...]:
    """Trainer behaviour of language-modelling stages: the trained-positions loss where the model allows it,
    and per-sample attention when batches are packed rows."""
    from tunestack.train.fast.efficient import TrainedPositionsLossMixin, supports_trained_positions

    mixins: tuple[type, ...] = ()
    if (
        train_args.sparse_lm_head
        and supports_trained_positions(model)
        and head_outside_forward(
            train_args, "--sparse_lm_head (the trained-positions output layer)", output_layer_trains(model)
        )
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
