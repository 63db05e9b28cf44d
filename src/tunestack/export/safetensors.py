"""`--format safetensors`: a standalone model folder (weights sharded by --max_shard_size with an index file,
tokenizer, chat template, generation config) that plain transformers, vLLM or llama.cpp's converter load.

A model with adapters goes through `tunestack merge` itself (its checked, atomic merge). A model without adapters
(a full fine-tune, a merged or Hugging Face folder, a GGUF, the built-in alias) is re-saved the same way: written
to a hidden staging folder, reloaded, its logits compared with the loaded model's, then renamed into place.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tunestack.config.model import ModelArguments
from tunestack.errors import ModelError
from tunestack.model import merge as merge_command
from tunestack.model.load import ModelRef, load_model, load_tokenizer


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
    """Merge the adapter(s) of the model reference into `output` with the merge command's own path."""
    args = merge_command.MergeArguments(
        lora_model=lora_model or model,
        base_model=model if lora_model else None,
        output_dir=str(output),
        max_shard_size=max_shard_size,
        overwrite_output_dir=overwrite,
        torch_dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
    )
    return merge_command.merge(args)


def resave(
    ref: ModelRef,
    output: Path,
    *,
    torch_dtype: str,
    max_shard_size: str,
    overwrite: bool,
    trust_remote_code: bool,
) -> dict[str, Any]:
    """Write the adapter-free model `ref` as a standalone sharded safetensors folder, checked by reloading it."""
    import torch
    from transformers import AutoModelForCausalLM

    started = time.time()
    merge_command.check_output_dir(output, overwrite, [ref.base_dir])
    saved_dtype = merge_command._saved_dtype(torch_dtype, ref)
    tokenizer = load_tokenizer(ref, None, trust_remote_code)
    model = load_model(
        ref, ModelArguments(torch_dtype="float32", trust_remote_code=trust_remote_code), tokenizer=tokenizer
    )
    model.eval()
    with torch.no_grad():  # round to the stored dtype first, so the reload must reproduce these logits exactly
        for param in model.parameters():
            param.copy_(param.to(saved_dtype).float())
    probes = merge_command._probe_inputs(tokenizer, model.get_input_embeddings().weight.shape[0])
    before = merge_command._logits(model, probes)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.export-{os.getpid()}-", dir=output.parent))
    try:
        model.to(saved_dtype).save_pretrained(staging, max_shard_size=max_shard_size.replace(" ", ""))
        tokenizer.save_pretrained(staging)
        merge_command._copy_support_files(ref, ref.tokenizer_dir, staging)
        parameters = sum(p.numel() for p in model.parameters())
        del model
        gc.collect()
        reloaded = AutoModelForCausalLM.from_pretrained(
            staging, dtype=torch.float32, local_files_only=True, trust_remote_code=trust_remote_code
        )
        diff = merge_command._max_diff(merge_command._logits(reloaded.eval(), probes), before)
        del reloaded
        tolerance = merge_command.REL_TOLERANCE * max(1.0, float(before.abs().max()))
        if not diff <= tolerance:
            raise ModelError(
                f"the re-saved model does not reproduce the loaded one (max |logit difference| {diff:.3g})"
            )
        shards = sorted(staging.glob("*.safetensors"))
        nbytes = sum(f.stat().st_size for f in shards)
        merge_command._commit(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "dtype": str(saved_dtype).removeprefix("torch."),
        "parameters": parameters,
        "shards": len(shards),
        "bytes": nbytes,
        "max_abs_logit_diff": diff,
        "seconds": round(time.time() - started, 1),
    }
