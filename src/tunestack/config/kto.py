"""Options of `tunestack kto`."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunestack.config.dpo import DPO_DEFAULT_BETA, ReferenceArguments

KTO_LOSSES = ("kto", "apo_zero_unpaired")


@dataclass
class KTOArguments(ReferenceArguments):
    loss_type: str | None = field(default=None, metadata={"help": "kto (default) or apo_zero_unpaired."})
    desirable_weight: float = field(default=1.0, metadata={"help": "Weight of desirable examples."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "Weight of undesirable examples."})

    @property
    def loss(self) -> str:
        return self.loss_type or "kto"

    @property
    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else DPO_DEFAULT_BETA

    def problems(self) -> list[str]:
        out = super().problems()
        if self.loss not in KTO_LOSSES:
            out.append(f"--loss_type {self.loss}: expected one of {', '.join(KTO_LOSSES)}")
        return out
