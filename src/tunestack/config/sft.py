"""Data options of the supervised fine-tuning stage (MedicalGPT supervised_finetuning.py names)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunestack.config.parse import hub_dataset_problem

DEFAULT_MAX_LENGTH = 512


@dataclass
class SupervisedDataArguments:
    train_file_dir: str | None = field(
        default=None,
        metadata={"help": "Folder(s) or file(s) of chat data (.json/.jsonl/.csv/.parquet), comma separated."},
    )
    validation_file_dir: str | None = field(default=None, metadata={"help": "Held-out chat data for evaluation."})
    validation_split_percentage: float = field(
        default=1, metadata={"help": "Percent of conversations held out when no validation files are given."}
    )
    data_format: str = field(
        default="auto",
        metadata={"help": "auto (detected per file), sharegpt, messages, alpaca or prompt_response."},
    )
    template_name: str | None = field(
        default=None,
        metadata={
            "help": "Chat template: the tokenizer's own by default, or a named one (chatml, qwen, llama3, glm4, vicuna ...)."
        },
    )
    tool_format: str = field(
        default="auto",
        metadata={
            "help": "How tools, calls and results are written: auto (the chat template's own tool support, else "
            "default), default (Action: / Action Input: lines, as MedicalGPT), qwen, glm4 or llama3; saved with "
            "the model's chat template."
        },
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System prompt for conversations that have none."}
    )
    model_max_length: int | None = field(
        default=None,
        metadata={"help": "Tokens per sample (default 512, or the model's context when shorter); older turns are cut first."},
    )
    max_source_length: int | None = field(default=None, metadata={"help": "Cap on the prompt tokens of a sample."})
    max_target_length: int | None = field(
        default=None, metadata={"help": "Drop samples whose answer is longer than this (never cut an answer)."}
    )
    train_on_inputs: bool = field(default=False, metadata={"help": "Also train on system and user tokens."})
    skip_bad_records: bool = field(
        default=False, metadata={"help": "Skip malformed records (counted, written to OUTPUT_DIR/rejects.jsonl)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most N training conversations."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most N evaluation conversations."})
    predict_with_generate: bool = field(
        default=False,
        metadata={
            "help": "After training, answer the held-out conversations (greedy) into OUTPUT_DIR/predictions.jsonl "
            "with BLEU-4, ROUGE-L and exact match against their answers."
        },
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Longest generated answer of --predict_with_generate."})
    replay_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Forgetting guard: mix in R x (training conversations) of the starting model's own greedy answers "
            "to general prompts (e.g. 0.3); 0 turns it off."
        },
    )
    replay_prompts: str | None = field(
        default=None,
        metadata={
            "help": "Prompts for --replay_ratio (.txt lines or jsonl; every sixth is kept out for eval's drift probe); "
            "default: 240 built-in English and Chinese general questions."
        },
    )
    replay_max_new_tokens: int = field(
        default=256, metadata={"help": "Longest replay answer; answers cut at this length are not used."}
    )
    replay_batch_size: int = field(default=8, metadata={"help": "Replay prompts generated together."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Accepted for compatibility."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Accepted for compatibility."})
    ignore_pad_token_for_loss: bool = field(default=True, metadata={"help": "Accepted; padding never carries a loss."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub datasets are not fetched; use local files."})

    def max_length(self, context: int | None) -> int:
        """The tokens per sample for a model of `context` positions; ConfigError when more was asked."""
        from tunestack.errors import ConfigError

        if self.model_max_length is None:
            return min(DEFAULT_MAX_LENGTH, context or DEFAULT_MAX_LENGTH)
        if context and self.model_max_length > context:
            raise ConfigError(
                f"--model_max_length {self.model_max_length} is larger than the model's context of {context} "
                "positions (max_position_embeddings); use at most that"
            )
        return self.model_max_length

    def problems(self) -> list[str]:
        from tunestack.data.tool_formats import tool_format_problems

        out = tool_format_problems(self.tool_format)
        out += hub_dataset_problem(self.dataset_name)
        if not self.train_file_dir:
            out.append("--train_file_dir is required")
        if self.model_max_length is not None and self.model_max_length < 8:
            out.append(f"--model_max_length must be at least 8, got {self.model_max_length}")
        if self.max_new_tokens < 1:
            out.append(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.replay_ratio <= 10:
            out.append(f"--replay_ratio must be between 0 and 10, got {self.replay_ratio}")
        if self.replay_max_new_tokens < 8:
            out.append(f"--replay_max_new_tokens must be at least 8, got {self.replay_max_new_tokens}")
        if self.replay_prompts and not self.replay_ratio:
            out.append("--replay_prompts is used only with --replay_ratio > 0")
        return out
