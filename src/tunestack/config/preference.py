"""Options of the preference stages (rm, dpo, kto) and of `tunestack score` (MedicalGPT reward_modeling.py /
dpo_training.py / orpo_training.py names)."""

from __future__ import annotations

from dataclasses import dataclass, field

PREFERENCE_FORMATS = ("medicalgpt", "chosen_rejected", "messages", "kto")
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
KTO_LOSSES = ("kto", "apo_zero_unpaired")
REWARD_HEADS = ("auto", "sequence_classification", "value_head")


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
            "help": "auto (detected per file); medicalgpt {system,history,question,response_chosen,response_rejected}; "
            "chosen_rejected {prompt,chosen,rejected} strings; messages (chosen/rejected conversations); "
            "kto {prompt,completion,label}.",
            "choices": ("auto",) + PREFERENCE_FORMATS,
        },
    )
    template_name: str | None = field(
        default=None,
        metadata={"help": "Chat template: the tokenizer's own by default, or a named one (chatml, qwen, llama3 ...)."},
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
    # Losses.
    beta: float | None = field(
        default=None,
        metadata={"help": "DPO/KTO beta, deviation from the reference (default 0.1; SimPO's default is 2.0)."},
    )
    loss_type: str | None = field(
        default=None,
        metadata={
            "help": "dpo: sigmoid (default), ipo, hinge, robust ..., a weighted comma list such as sigmoid,sft "
            "(DPO + NLL on the chosen answers, see --loss_weights), or the reference-free orpo and simpo; "
            "kto: kto (default) or apo_zero_unpaired."
        },
    )
    loss_weights: str | None = field(
        default=None, metadata={"help": "Comma list of weights for a comma list of DPO losses (default: all 1)."}
    )
    label_smoothing: float = field(default=0.0, metadata={"help": "Robust DPO / conservative DPO label smoothing."})
    orpo_beta: float = field(default=0.1, metadata={"help": "ORPO: weight of the odds-ratio term (lambda)."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO: target reward margin gamma."})
    ref_model: str | None = field(
        default=None,
        metadata={"help": "Reference model for full-parameter DPO/KTO (default: a frozen copy of the start model)."},
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "DPO/KTO: compute reference log-probs once up front, so no reference stays in memory."},
    )
    desirable_weight: float = field(default=1.0, metadata={"help": "KTO: weight of desirable examples."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "KTO: weight of undesirable examples."})
    reward_head: str = field(
        default="auto",
        metadata={
            "help": "rm: sequence_classification (transformers' *ForSequenceClassification), value_head (a linear "
            "head on any causal LM, e.g. ChatGLM) or auto (sequence classification when the architecture has it).",
            "choices": REWARD_HEADS,
        },
    )
    # Accepted for compatibility with the MedicalGPT scripts.
    dataset_name: str | None = field(default=None, metadata={"help": "Hub datasets are not fetched; use local files."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Accepted for compatibility."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Accepted for compatibility."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Accepted for compatibility."})

    def problems(self) -> list[str]:
        out = []
        if self.dataset_name:
            out.append(
                f"--dataset_name {self.dataset_name}: tunestack runs offline; pass local files with --train_file_dir"
            )
        if not self.train_file_dir:
            out.append("--train_file_dir is required")
        if self.max_source_length < 1 or self.max_target_length < 1:
            out.append("--max_source_length and --max_target_length must be positive")
        if self.min_target_length > self.max_target_length:
            out.append("--min_target_length must not exceed --max_target_length")
        if not 0 <= self.validation_split_percentage < 100:
            out.append("--validation_split_percentage must be in [0, 100)")
        if not 0 <= self.label_smoothing < 0.5:
            out.append(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.beta is not None and self.beta <= 0:
            out.append(f"--beta must be positive, got {self.beta}")
        return out


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
