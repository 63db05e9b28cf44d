"""Data options of the preference stages (rm, dpo, kto): MedicalGPT reward_modeling.py / dpo_training.py /
orpo_training.py names. Each stage's own options (losses, reference, reward head) are in dpo.py, kto.py, rm.py."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunestack.config.parse import hub_dataset_problem

PREFERENCE_FORMATS = ("sharegpt", "medicalgpt", "chosen_rejected", "messages", "kto")


@dataclass
class PreferenceDataArguments:
    train_file_dir: str | None = field(
        default=None,
        metadata={"help": "Folder(s) or file(s) of preference data (.json/.jsonl/.csv/.parquet), comma separated."},
    )
    validation_file_dir: str | None = field(default=None, metadata={"help": "Held-out preference data."})
    validation_split_percentage: float = field(
        default=1, metadata={"help": "Percent of pairs held out when no validation files are given (with --do_eval)."}
    )
    data_format: str = field(
        default="auto",
        metadata={
            "help": "auto (detected per file); sharegpt {conversations,chosen,rejected,tools} (MedicalGPT 2026); "
            "medicalgpt {system,history,question,response_chosen,response_rejected}; "
            "chosen_rejected {prompt,chosen,rejected} strings; messages (chosen/rejected conversations); "
            "kto {prompt,completion,label}.",
            "choices": ("auto",) + PREFERENCE_FORMATS,
        },
    )
    template_name: str | None = field(
        default=None,
        metadata={"help": "Chat template: the tokenizer's own by default, or a named one (chatml, qwen, llama3 ...)."},
    )
    tool_format: str = field(
        default="auto",
        metadata={
            "help": "How tools, calls and results are written: auto (the chat template's own tool support, else "
            "default), default (Action: / Action Input: lines), qwen, glm4 or llama3.",
        },
    )
    system_prompt: str | None = field(default=None, metadata={"help": "System prompt for records that have none."})
    max_source_length: int = field(
        default=2048, metadata={"help": "Prompt tokens kept per pair (the end of a longer prompt is kept)."}
    )
    max_target_length: int = field(
        default=512, metadata={"help": "Drop pairs whose chosen or rejected answer is longer (answers are never cut)."}
    )
    min_target_length: int = field(
        default=0, metadata={"help": "Drop pairs whose chosen or rejected answer has fewer tokens than this."}
    )
    skip_bad_records: bool = field(
        default=False, metadata={"help": "Skip malformed records (counted, written to OUTPUT_DIR/rejects.jsonl)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most N training pairs (-1: all)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most N evaluation pairs (-1: all)."})
    # Accepted for compatibility with the MedicalGPT scripts.
    dataset_name: str | None = field(default=None, metadata={"help": "Hub datasets are not fetched; use local files."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Accepted for compatibility."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Accepted for compatibility."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Accepted for compatibility."})

    def problems(self) -> list[str]:
        from tunestack.data.tool_formats import tool_format_problems

        out = tool_format_problems(self.tool_format)
        out += hub_dataset_problem(self.dataset_name)
        if not self.train_file_dir:
            out.append("--train_file_dir is required")
        if self.max_source_length < 1 or self.max_target_length < 1:
            out.append("--max_source_length and --max_target_length must be positive")
        if self.min_target_length > self.max_target_length:
            out.append("--min_target_length must not exceed --max_target_length")
        if not 0 <= self.validation_split_percentage < 100:
            out.append("--validation_split_percentage must be in [0, 100)")
        return out
