"""Options of `tunestack rm` (the reward head) and of `tunestack score`."""

from __future__ import annotations

from dataclasses import dataclass, field

REWARD_HEADS = ("auto", "sequence_classification", "value_head")


@dataclass
class RewardModelArguments:
    reward_head: str = field(
        default="auto",
        metadata={
            "help": "sequence_classification (transformers' *ForSequenceClassification), value_head (a linear "
            "head on any causal LM, e.g. ChatGLM) or auto (sequence classification when the architecture has it).",
            "choices": REWARD_HEADS,
        },
    )
    loss_type: str | None = field(
        default=None, metadata={"help": "Accepted for compatibility: the reward model trains with the pairwise loss."}
    )

    def problems(self) -> list[str]:
        if self.loss_type not in (None, "pairwise", "sigmoid"):
            return [f"--loss_type {self.loss_type}: the reward model trains with the pairwise loss"]
        return []


@dataclass
class ScoreArguments:
    reward_model: str | None = field(
        default=None, metadata={"help": "A tunestack rm output folder (or any sequence-classification model folder)."}
    )
    data_file: str | None = field(
        default=None,
        metadata={
            "help": "Records to score (file(s) or folder(s)): preference pairs (score_chosen / score_rejected) "
            "or prompt/response, chat and kto records (score)."
        },
    )
    output_file: str | None = field(default=None, metadata={"help": "Where the scores go (jsonl; default: stdout)."})
    batch_size: int = field(default=8, metadata={"help": "Sequences scored together."})
    data_format: str = field(default="auto", metadata={"help": "auto, or a preference format (see tunestack rm)."})
    template_name: str | None = field(
        default=None, metadata={"help": "Chat template (default: the one saved with the reward model)."}
    )
    system_prompt: str | None = field(default=None, metadata={"help": "System prompt for records that have none."})
    max_length: int | None = field(default=None, metadata={"help": "Keep the last N tokens of each sequence."})
    skip_bad_records: bool = field(default=False, metadata={"help": "Score the good records, list the bad ones."})
    torch_dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model folder's own code."})

    def problems(self) -> list[str]:
        out = []
        if not self.reward_model:
            out.append("--reward_model is required")
        if not self.data_file:
            out.append("--data_file is required")
        if self.batch_size < 1:
            out.append("--batch_size must be at least 1")
        return out
