"""Options of `tunestack merge` (MedicalGPT merge_peft_adapter.py names)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tunestack.config.model import DTYPES


@dataclass
class MergeArguments:
    lora_model: str | None = field(
        default=None,
        metadata={"help": "The adapter to merge: a PEFT adapter folder or a tunestack stage output folder."},
    )
    model: str | None = field(default=None, metadata={"help": "Same as --lora_model."})
    base_model: str | None = field(
        default=None,
        metadata={"help": "Base model; if omitted, the base named in the adapter's run.json or adapter_config.json."},
    )
    tokenizer_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to save with the model; if omitted, the adapter's, else the base's."}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Where the merged model goes; if omitted, <adapter folder>-merged beside it."}
    )
    max_shard_size: str = field(default="2GB", metadata={"help": "Largest safetensors shard, e.g. 2GB, 500MB."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir."})
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the saved model: auto (the base checkpoint's), float32, bfloat16, float16. "
            "The merge itself and its check always run in float32.",
            "choices": DTYPES,
        },
    )
    device_map: str | None = field(
        default=None, metadata={"help": "Merge on a GPU (e.g. auto or cuda:0); if omitted, on the CPU."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the base folder's own Python code."})
    allow_pickle: bool = field(
        default=False, metadata={"help": "Load pickled weights (*.bin) with torch's weights_only loader."}
    )
    resize_emb: bool = field(
        default=False,
        metadata={"help": "Accepted for compatibility: embeddings grow to the tokenizer's size automatically."},
    )
    model_type: str | None = field(default=None, metadata={"help": "Accepted for compatibility; ignored."})
    hf_hub_model_id: str | None = field(
        default=None, metadata={"help": "Accepted for compatibility; tunestack never uploads (offline)."}
    )
    hf_hub_token: str | None = field(default=None, metadata={"help": "Accepted for compatibility; never used."})

    @property
    def adapter(self) -> str | None:
        return self.lora_model or self.model

    def problems(self) -> list[str]:
        out = []
        if not self.adapter:
            out.append("--lora_model is required (an adapter folder or a tunestack stage output folder)")
        if self.lora_model and self.model and self.lora_model != self.model:
            out.append("--model is a synonym of --lora_model; give only one of them")
        if not re.fullmatch(r"\s*\d+(\.\d+)?\s*([KMG]i?B|B)?\s*", self.max_shard_size, re.IGNORECASE):
            out.append(f"--max_shard_size {self.max_shard_size!r}: expected a size such as 2GB or 500MB")
        return out


def option_classes() -> tuple[type, ...]:
    return (MergeArguments,)
