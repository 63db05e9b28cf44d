"""Data options of the continued-pretraining stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunestack.config.parse import hub_dataset_problem


@dataclass
class PretrainDataArguments:
    train_file_dir: str | None = field(
        default=None,
        metadata={"help": "Folder(s) or file(s) of .txt/.json/.jsonl/.csv/.parquet text, comma separated."},
    )
    validation_file_dir: str | None = field(default=None, metadata={"help": "Held-out text for evaluation."})
    validation_split_percentage: float = field(
        default=1, metadata={"help": "Percent of training blocks held out when no validation files are given."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "Hub datasets are not fetched; use local files."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Accepted for compatibility."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most N training blocks (-1: all)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most N evaluation blocks (-1: all)."})
    block_size: int | None = field(
        default=None, metadata={"help": "Tokens per training block (default: min(1024, the model's context))."}
    )
    keep_linebreaks: bool = field(
        default=True,
        metadata={"help": ".txt files: keep line breaks, whole file = one document, instead of one per line."},
    )
    keep_remainder: bool = field(
        default=False,
        metadata={"help": "Keep the last partial block (padded, padding not trained) instead of dropping it."},
    )
    text_field: str = field(
        default="text", metadata={"help": "Field holding the text in json/jsonl/csv/parquet files."}
    )
    packing: bool = field(
        default=True,
        metadata={
            "help": "Documents are joined with EOS and cut into --block_size blocks (always). False also keeps "
            "packed documents apart, as --document_attention true: each attends only to itself."
        },
    )
    streaming: bool = field(
        default=False, metadata={"help": "Tokenize on the fly for corpora bigger than memory (needs --max_steps)."}
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={
            "help": "Accepted for compatibility: the fast tokenizer already encodes each batch of documents on "
            "all cores (RAYON_NUM_THREADS limits it)."
        },
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Tokenize again even when a cached copy exists."})

    def problems(self) -> list[str]:
        out = []
        out += hub_dataset_problem(self.dataset_name)
        if not self.train_file_dir:
            out.append("--train_file_dir is required")
        if self.block_size is not None and self.block_size < 2:
            out.append(f"--block_size must be at least 2, got {self.block_size}")
        if not 0 <= self.validation_split_percentage < 100:
            out.append("--validation_split_percentage must be in [0, 100)")
        return out
