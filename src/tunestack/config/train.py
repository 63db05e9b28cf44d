"""transformers.TrainingArguments with tunestack defaults and the legacy flags tutorials still pass."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

from transformers import TrainingArguments

from tunestack.config.deepspeed import HELP as DEEPSPEED_HELP


@dataclass
class TrainArguments(TrainingArguments):
    # Defaults that differ from transformers: TensorBoard on, frequent logging, keep our columns.
    report_to: None | str | list[str] = field(
        default="tensorboard", metadata={"help": "Integrations to report to (tensorboard by default; 'none' for none)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Drop dataset columns the model does not take (tunestack prepares its own)."}
    )
    include_num_input_tokens_seen: str = field(
        default="non_padding", metadata={"help": "Count trained tokens: all, non_padding or no."}
    )
    # Flags removed from transformers 5 that tutorial scripts still pass.
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over in an output folder that already holds a run."}
    )
    evaluation_strategy: str | None = field(default=None, metadata={"help": "Old name of --eval_strategy."})
    warmup_ratio: float | None = field(default=None, metadata={"help": "Warmup as a fraction of all steps."})
    group_by_length: bool = field(default=False, metadata={"help": "Batch samples of similar length together."})
    logging_dir: str | None = field(default=None, metadata={"help": "TensorBoard folder (default: OUTPUT_DIR/runs)."})
    save_safetensors: bool = field(default=True, metadata={"help": "Accepted; weights are always safetensors."})
    no_cuda: bool = field(default=False, metadata={"help": "Old name of --use_cpu."})
    deepspeed: dict | str | None = field(default=None, metadata={"help": DEEPSPEED_HELP})
    # tunestack additions.
    padding_free: bool = field(
        default=True,
        metadata={
            "help": "SFT, RM and DPO: concatenate each batch into one row (no padding; attention stays per sample)."
        },
    )
    sparse_lm_head: bool = field(
        default=True,
        metadata={"help": "Run the output layer only where it counts (answers, DPO completions), in chunks."},
    )
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={
            "help": "SFT: fill each batch with samples up to this many tokens (packed; padded tokens without "
            "--padding_free) instead of --per_device_train_batch_size samples."
        },
    )
    varlen_attention: bool = field(
        default=True,
        metadata={
            "help": "Packed rows (--padding_free, --document_attention): attention runs per sample (causal SDPA on "
            "each) instead of through a block-diagonal mask over the whole row."
        },
    )
    packed_sampling: bool = field(
        default=True,
        metadata={
            "help": "RL on a CPU: sample rollouts through oneDNN's prepacked linear layers, each LoRA adapter merged "
            "into the packed copy of its weight (about 1.8x faster generation; samples differ only by rounding)."
        },
    )
    document_attention: bool = field(
        default=False,
        metadata={"help": "PT: restart positions at every document so packed documents do not attend to each other."},
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after N evaluations without improvement of the eval loss."}
    )

    def __post_init__(self) -> None:
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.warmup_ratio is not None and not self.warmup_steps:
            self.warmup_steps = self.warmup_ratio
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        if self.no_cuda:
            self.use_cpu = True
        import torch

        from tunestack.config.deepspeed import check_deepspeed
        from tunestack.config.fsdp import fsdp_settings

        self.fsdp, self.fsdp_config = fsdp_settings(self.fsdp, self.fsdp_config)
        self.deepspeed = check_deepspeed(self.deepspeed, self.fsdp)
        if self.deepspeed is not None and not torch.cuda.is_available():
            self.use_cpu = True  # DeepSpeed's CPU accelerator, over gloo

        # transformers 5 renamed gradient_checkpointing* to activation_checkpointing*; the tutorial names stay
        # first-class here (no deprecation warning), and the newer names work too.
        gc, gc_kwargs = "gradient_checkpointing", "gradient_checkpointing_kwargs"
        if hasattr(self, "activation_checkpointing"):
            for old, new in ((gc, "activation_checkpointing"), (gc_kwargs, "activation_checkpointing_kwargs")):
                if getattr(self, new) is None and getattr(self, old) is not None:
                    setattr(self, new, getattr(self, old))
                    setattr(self, old, None)
            gc, gc_kwargs = "activation_checkpointing", "activation_checkpointing_kwargs"
        if getattr(self, gc):
            given = getattr(self, gc_kwargs) or {}
            if isinstance(given, str):
                import json

                given = json.loads(given)
            # Non-reentrant checkpointing works with frozen embeddings (LoRA) without input hooks. Other keys
            # pass through, e.g. {"every_n_layers": 2} to recompute only every other layer.
            setattr(self, gc_kwargs, {"use_reentrant": False, **given})
        if (self.bf16 or self.fp16) and not self.use_cpu:
            if not torch.cuda.is_available():
                # Mixed precision on a CPU-only machine: let torch autocast run on the CPU.
                self.use_cpu = True
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # torchrun on a CPU-only machine: without this accelerate sets up a single process per rank.
                self.use_cpu = True
                _cpu_process_group(self.ddp_timeout)
        if self.early_stopping_patience and self.eval_strategy in ("no", None):
            self.eval_strategy = "steps"
        if self.early_stopping_patience:
            self.load_best_model_at_end = True
            self.metric_for_best_model = self.metric_for_best_model or "eval_loss"
        super().__post_init__()


def _cpu_process_group(timeout_s: int) -> None:
    """The gloo process group of a CPU run, with --ddp_timeout (accelerate's CPU path would use torch's default)."""
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized() and "MASTER_ADDR" in os.environ:
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
