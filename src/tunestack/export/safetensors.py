"""`--format safetensors`: a standalone model folder (weights sharded by --max_shard_size with an index file,
tokenizer, chat template, generation config) that plain transformers, vLLM or llama.cpp's converter load.

It is `tunestack merge`'s own checked, atomic path: adapters are merged, and a model without adapters (a full
fine-tune, a merged or Hugging Face folder, a GGUF, the built-in alias) is re-saved the same way, written to a
hidden staging folder, reloaded, its logits compared with the loaded model's, then renamed into place.
"""

from __future__ import annotations

from pathlib import Path

from tunestack.config.merge import MergeArguments
from tunestack.model import merge as merge_command


def merge_into(
    output: Path,
    model: str | None,
    lora_model: str | None,
    *,
    torch_dtype: str,
    max_shard_size: str,
    overwrite: bool,
    trust_remote_code: bool,
) -> merge_command.MergeResult:
    """The model reference (and its adapters, merged) as one checked folder at `output`."""
    args = MergeArguments(
        lora_model=lora_model or model,
        base_model=model if lora_model else None,
        output_dir=str(output),
        max_shard_size=max_shard_size,
        overwrite_output_dir=overwrite,
        torch_dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
    )
    return merge_command.merge(args, allow_full=True)
