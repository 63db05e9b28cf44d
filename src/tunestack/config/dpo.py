"""Options of `tunestack dpo` (DPO and its relatives) and what it shares with `tunestack kto`: beta and the
reference model."""

from __future__ import annotations

from dataclasses import dataclass, field

DPO_LOSSES = (
    "sigmoid",
    "ipo",
    "hinge",
    "robust",
    "bco_pair",
    "sppo_hard",
    "nca_pair",
    "exo_pair",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "sft",
)
REFERENCE_FREE_LOSSES = ("orpo", "simpo")
SIMPO_DEFAULT_BETA = 2.0
DPO_DEFAULT_BETA = 0.1


@dataclass
class ReferenceArguments:
    """beta and the reference model: what DPO and KTO share."""

    beta: float | None = field(
        default=None,
        metadata={"help": "Deviation from the reference (default 0.1; SimPO's default is 2.0)."},
    )
    ref_model: str | None = field(
        default=None,
        metadata={"help": "Reference model for full-parameter training (default: a frozen copy of the start model)."},
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Compute reference log-probs once up front, so no reference stays in memory."},
    )

    def problems(self) -> list[str]:
        if self.beta is not None and self.beta <= 0:
            return [f"--beta must be positive, got {self.beta}"]
        return []


@dataclass
class DPOArguments(ReferenceArguments):
    loss_type: str | None = field(
        default=None,
        metadata={
            "help": "sigmoid (DPO, default), ipo, hinge, robust ..., a weighted comma list such as sigmoid,sft "
            "(DPO + NLL on the chosen answers, see --loss_weights), or the reference-free orpo and simpo."
        },
    )
    loss_weights: str | None = field(
        default=None, metadata={"help": "Comma list of weights for a comma list of DPO losses (default: all 1)."}
    )
    label_smoothing: float = field(default=0.0, metadata={"help": "Robust DPO / conservative DPO label smoothing."})
    orpo_beta: float = field(default=0.1, metadata={"help": "ORPO: weight of the odds-ratio term (lambda)."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO: target reward margin gamma."})

    @property
    def loss(self) -> str:
        return self.loss_type or "sigmoid"

    @property
    def losses(self) -> list[str]:
        return [x.strip() for x in self.loss.split(",") if x.strip()]

    @property
    def weights(self) -> list[float] | None:
        """--loss_weights as numbers; None when not given or not numbers (problems() reports the latter)."""
        if not self.loss_weights:
            return None
        try:
            return [float(x) for x in self.loss_weights.split(",")]
        except ValueError:
            return None

    @property
    def reference_free(self) -> bool:
        return self.loss in REFERENCE_FREE_LOSSES

    @property
    def resolved_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        return SIMPO_DEFAULT_BETA if self.loss == "simpo" else DPO_DEFAULT_BETA

    def problems(self) -> list[str]:
        out = super().problems()
        if not self.reference_free and any(x not in DPO_LOSSES for x in self.losses):
            known = ", ".join(DPO_LOSSES + REFERENCE_FREE_LOSSES)
            out.append(f"--loss_type {self.loss}: expected one of {known}, or a comma list of DPO losses")
        if self.loss_weights and (self.weights is None or len(self.weights) != len(self.losses)):
            out.append(f"--loss_weights {self.loss_weights}: give one number per --loss_type entry")
        if self.ref_model and self.reference_free:
            out.append(f"--loss_type {self.loss} uses no reference model; drop --ref_model")
        if not 0 <= self.label_smoothing < 0.5:
            out.append(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        return out
