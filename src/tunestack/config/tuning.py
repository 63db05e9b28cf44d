"""How the model is tuned: full, freeze, LoRA, QLoRA, AdaLoRA, DoRA."""

from __future__ import annotations

from dataclasses import dataclass, field

METHODS = ("full", "freeze", "lora", "qlora", "adalora", "dora")


@dataclass
class TuningArguments:
    tuning_method: str | None = field(
        default=None,
        metadata={
            "help": "full, freeze, lora, qlora, adalora or dora. Default: lora when --use_peft (the default), "
            "qlora when --qlora or a 4/8-bit load is asked, full when --use_peft False.",
            "choices": METHODS,
        },
    )
    use_peft: bool = field(default=True, metadata={"help": "Train an adapter (LoRA family) instead of all weights."})
    qlora: bool = field(default=False, metadata={"help": "QLoRA: LoRA over a 4-bit base (implies --load_in_4bit)."})
    target_modules: str = field(
        default="all",
        metadata={"help": "Layers that get adapters: 'all' (every linear layer but the output head) or a comma list."},
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    fused_lora_dropout: bool = field(
        default=True,
        metadata={
            "help": "Apply LoRA dropout inside the adapter's first matmul, keeping a 1-byte mask instead of two "
            "float copies of each adapted input (same computation, less memory)."
        },
    )
    modules_to_save: str | None = field(
        default=None,
        metadata={"help": "Comma list of modules trained in full beside the adapter, e.g. embed_tokens,lm_head."},
    )
    peft_path: str | None = field(default=None, metadata={"help": "Continue training an existing adapter folder."})
    use_dora: bool = field(
        default=False, metadata={"help": "DoRA (weight-decomposed LoRA); same as --tuning_method dora."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA scaling (alpha / sqrt(r))."})
    adalora_init_r: int = field(default=12, metadata={"help": "AdaLoRA: initial rank of every layer."})
    adalora_target_r: int = field(default=8, metadata={"help": "AdaLoRA: average rank after pruning."})
    adalora_tinit: float = field(default=0.1, metadata={"help": "AdaLoRA: fraction of steps before pruning starts."})
    adalora_tfinal: float = field(
        default=0.2, metadata={"help": "AdaLoRA: fraction of final steps with a fixed budget."}
    )
    adalora_delta_t: int = field(default=1, metadata={"help": "AdaLoRA: steps between two budget allocations."})
    freeze_trainable_layers: int = field(
        default=2, metadata={"help": "freeze: train the last N transformer layers (negative: the first N)."}
    )
    freeze_trainable_modules: str | None = field(
        default=None,
        metadata={"help": "freeze: comma list of name fragments to train instead of whole layers (e.g. mlp,lm_head)."},
    )

    def resolved_method(self, load_in_4bit: bool = False, load_in_8bit: bool = False) -> str:
        if self.tuning_method:
            return self.tuning_method
        if not self.use_peft:
            return "full"
        if self.qlora or load_in_4bit or load_in_8bit:
            return "qlora"
        return "dora" if self.use_dora else "lora"

    def problems(self, load_in_4bit: bool = False, load_in_8bit: bool = False) -> list[str]:
        out = []
        method = self.resolved_method(load_in_4bit, load_in_8bit)
        if self.lora_rank <= 0:
            out.append(f"--lora_rank must be positive, got {self.lora_rank}")
        if not 0 <= self.lora_dropout < 1:
            out.append(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if method in ("full", "freeze") and (load_in_4bit or load_in_8bit):
            out.append(f"--tuning_method {method} cannot train a 4/8-bit base; use qlora")
        if method in ("full", "freeze") and self.peft_path:
            out.append(f"--peft_path needs an adapter method, not {method}")
        if method == "adalora" and self.adalora_target_r > self.adalora_init_r:
            out.append("--adalora_target_r must not exceed --adalora_init_r")
        return out

    @property
    def target_list(self) -> list[str]:
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]

    @property
    def modules_to_save_list(self) -> list[str] | None:
        if not self.modules_to_save:
            return None
        return [t.strip() for t in self.modules_to_save.split(",") if t.strip()]
