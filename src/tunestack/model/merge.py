"""`tunestack merge`: a base model + its adapter(s) -> one standalone, checked model folder.

The merge runs in float32 (exact) and is verified before anything appears at the output path:
the logits of the live PEFT model (base + adapter) on a few probe tokens are compared with those
of the merged model reloaded from disk; a difference above the tolerance is an error. The folder
is written as a hidden sibling and renamed into place only when complete, so a merge that dies
leaves nothing half-written behind. Tied input/output embeddings are untied first when the adapter
touches them (merging a LoRA of a tied `lm_head` into the shared matrix would change both).
Reward-model adapters (peft task_type SEQ_CLS) merge as sequence classifiers with their `score` head.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunestack.atomic import remove_stale_staging, staged_folder
from tunestack.checkpoints import verify_saved_model
from tunestack.config.merge import MergeArguments
from tunestack.config.model import ModelArguments
from tunestack.errors import ConfigError, ModelError, TunestackError
from tunestack.model.adapters import adapter_task_type, require_mergeable, stack_adapters
from tunestack.model.load import load_model, load_tokenizer, resolve_dtype
from tunestack.model.ref import ModelRef, resolve_stack, training_system_prompt
from tunestack.model.safety import refuse_pickled_weights
from tunestack.rundir import claim_output_folder, library_versions, write_run_manifest

logger = logging.getLogger(__name__)

# Relative tolerance of the merge check: max |logit difference| <= REL_TOLERANCE * max(1, max |logit|).
# float32 merges of SmolLM2-135M (all-linear LoRA) differ by about 5e-6 of the largest logit.
REL_TOLERANCE = 1e-4
# Probe text for the check: English and Chinese, so that most tokenizers give 20-40 tokens.
PROBE_TEXTS = (
    "The patient has had a fever and a dry cough for three days. What should they do?",
    "病人发烧咳嗽三天了，应该怎么办？",
)
MAX_PROBE_TOKENS = 48
STAGING_TAG = "merging"


class MergeCheckError(TunestackError):
    """The merged model does not reproduce base + adapter; nothing was written."""

    exit_code = 1


@dataclass
class MergeResult:
    output_dir: Path
    base_dir: Path
    adapters: list[Path]
    task: str
    dtype: str
    parameters: int
    shards: int
    bytes: int
    check: dict[str, Any]
    seconds: float


# ---------------------------------------------------------------------------------------------
# Merging in memory


def _probe_inputs(tokenizer: Any, vocab_size: int) -> list[Any]:
    import torch

    out = []
    for text in PROBE_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_PROBE_TOKENS]
        ids = [i for i in ids if 0 <= i < vocab_size] or list(range(min(8, vocab_size)))
        out.append(torch.tensor([ids]))
    return out


def _logits(model: Any, probes: list[Any]) -> Any:
    """Float32 CPU logits of every probe (causal LM: every position; classifier: the score), concatenated."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        parts = [model(input_ids=ids.to(device)).logits.float().cpu().reshape(-1) for ids in probes]
    return torch.cat(parts)


def _max_diff(a: Any, b: Any) -> float:
    import torch

    if a.shape != b.shape:
        return float("inf")
    d = (a - b).abs().max()
    return float(d) if torch.isfinite(d) else float("inf")


# ---------------------------------------------------------------------------------------------
# The output folder


def _copy_support_files(ref: ModelRef, tokenizer_dir: Path, staging: Path) -> None:
    """generation_config.json from the newest folder of the stack (it carries the stop tokens) and the
    base's remote-code *.py files (ChatGLM, InternLM2 ... do not load without them)."""
    for folder in [*reversed(ref.adapters), ref.base_dir]:
        if (folder / "generation_config.json").exists():
            shutil.copyfile(folder / "generation_config.json", staging / "generation_config.json")
            break
    for folder in dict.fromkeys([ref.base_dir, tokenizer_dir]):
        for source in folder.glob("*.py"):
            if not (staging / source.name).exists():
                shutil.copyfile(source, staging / source.name)


def _saved_dtype(name: str, ref: ModelRef) -> Any:
    """The dtype to store: the requested one, or (auto) the base checkpoint's."""
    import torch

    if name != "auto":
        return resolve_dtype(name, for_cuda=False)
    if ref.gguf_file:
        return torch.float32  # a GGUF base is dequantized to float32
    try:
        config = json.loads((ref.base_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return torch.float32
    text_config = config.get("text_config") or {}
    declared = (
        config.get("dtype") or config.get("torch_dtype") or text_config.get("dtype") or text_config.get("torch_dtype")
    )
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(declared), torch.float32)


def _dequantize_if_needed(model: Any) -> Any:
    """A base checkpoint saved quantized (bitsandbytes) is dequantized so the adapter can be merged."""
    if getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False):
        return model
    logger.info("the base checkpoint is quantized; dequantizing it for the merge")
    try:
        model = model.dequantize()
    except Exception as exc:  # each quantization backend raises its own types
        raise ModelError(f"cannot dequantize the quantized base for the merge: {exc}") from None
    return model.float()


# ---------------------------------------------------------------------------------------------
# The command


def merge(args: MergeArguments, allow_full: bool = False) -> MergeResult:
    """Merge the reference's adapters into one checked, standalone folder. With `allow_full` a model without
    adapters is re-saved the same way (sharded, checked by reloading it): what `tunestack export` does."""
    started = time.time()
    ref = resolve_stack(args.base_model, args.adapter)
    if not ref.adapters and not allow_full:
        raise ConfigError(f"{args.adapter} holds a full model, not an adapter: there is nothing to merge")
    if (ref.run_info or {}).get("reward_head") == "value_head":
        raise ConfigError(
            f"{args.adapter} is a value-head reward model (its family has no sequence-classification class): "
            "score, rl and serve --reward_model use the folder as it is; there is no merged form to write"
        )
    if not args.output_dir and not ref.adapters:
        raise ConfigError("--output_dir is required")
    output = (
        Path(args.output_dir).expanduser()
        if args.output_dir
        else ref.adapters[-1].with_name(ref.adapters[-1].name + "-merged")
    )
    lock = claim_output_folder(output, args.overwrite_output_dir, [ref.base_dir, *ref.adapters])
    try:
        return _merge(args, ref, output, started)
    finally:
        lock.release()


def _merge(args: MergeArguments, ref: ModelRef, output: Path, started: float) -> MergeResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    adapter_dir = ref.adapters[-1] if ref.adapters else None
    remove_stale_staging(output, STAGING_TAG)
    saved_dtype = _saved_dtype(args.torch_dtype, ref)

    tokenizer = load_tokenizer(ref, args.tokenizer_path, args.trust_remote_code)
    tokenizer_dir = Path(args.tokenizer_path).expanduser() if args.tokenizer_path else ref.tokenizer_dir
    seq_cls = adapter_dir is not None and adapter_task_type(adapter_dir) == "SEQ_CLS"
    model_class = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    extra = {"num_labels": 1} if seq_cls else None
    load_args = ModelArguments(
        torch_dtype="float32",
        trust_remote_code=args.trust_remote_code,
        device_map=args.device_map,
        allow_pickle=args.allow_pickle,
    )
    refuse_pickled_weights(ref.adapters, args.allow_pickle)
    bare = ModelRef(ref.reference, ref.base_dir, ref.gguf_file)
    model = load_model(bare, load_args, model_class=model_class, tokenizer=tokenizer, extra_kwargs=extra)
    model = _dequantize_if_needed(model)
    if seq_cls and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # batched scoring finds the last token with it
    model = stack_adapters(model, ref.adapters, keep_last=True)
    if adapter_dir is not None:
        require_mergeable(model, adapter_dir)

    probes = _probe_inputs(tokenizer, model.get_input_embeddings().weight.shape[0])
    live = _logits(model, probes)
    tolerance = REL_TOLERANCE * max(1.0, float(live.abs().max()))
    merged = model.merge_and_unload() if adapter_dir is not None else model
    del model
    check: dict[str, Any] = {"tokens": int(sum(p.shape[1] for p in probes)), "tolerance": tolerance}
    stored = live
    if saved_dtype != torch.float32:
        # Check the merge itself in float32, then round the weights to the stored dtype (keeping float32
        # tensors) so that the reload below, also in float32, must reproduce `stored` exactly.
        check["merge_diff_float32"] = _max_diff(_logits(merged, probes), live)
        with torch.no_grad():
            for param in merged.parameters():
                param.copy_(param.to(saved_dtype).float())
        stored = _logits(merged, probes)
    parameters = sum(p.numel() for p in merged.parameters())
    model_name = type(merged).__name__

    with staged_folder(output, STAGING_TAG) as staging:
        merged.to(saved_dtype).save_pretrained(staging, max_shard_size=args.max_shard_size.replace(" ", ""))
        tokenizer.save_pretrained(staging)
        _copy_support_files(ref, tokenizer_dir, staging)
        del merged
        gc.collect()
        verify_saved_model(staging, trained=False)
        reloaded = model_class.from_pretrained(
            staging,
            dtype=torch.float32,
            local_files_only=True,
            trust_remote_code=args.trust_remote_code,
            **({"device_map": args.device_map} if args.device_map and torch.cuda.is_available() else {}),
        )
        after = _logits(reloaded, probes)
        del reloaded
        gc.collect()
        if saved_dtype == torch.float32:
            check["max_abs_logit_diff"] = _max_diff(after, live)
        else:
            check["save_reload_diff"] = _max_diff(after, stored)
            check["max_abs_logit_diff"] = max(check["merge_diff_float32"], check["save_reload_diff"])
            check["storage_rounding_diff"] = _max_diff(after, live)
        if not check["max_abs_logit_diff"] <= tolerance:
            raise MergeCheckError(
                f"the merged model does not reproduce base + adapter: max |logit difference| "
                f"{check['max_abs_logit_diff']:.3g} > tolerance {tolerance:.3g} on {check['tokens']} probe tokens; "
                f"nothing was written to {output}"
            )
        shards = sorted(staging.glob("*.safetensors"))
        result = MergeResult(
            output_dir=output,
            base_dir=ref.base_dir,
            adapters=list(ref.adapters),
            task="sequence_classification" if seq_cls else "causal_lm",
            dtype=str(saved_dtype).removeprefix("torch."),
            parameters=parameters,
            shards=len(shards),
            bytes=sum(f.stat().st_size for f in shards),
            check=check,
            seconds=round(time.time() - started, 1),
        )
        _write_manifest(staging, result, ref, model_name)
    return result


def _write_manifest(folder: Path, result: MergeResult, ref: ModelRef, model_name: str) -> None:
    source = ref.run_info or {}
    write_run_manifest(
        folder,
        {
            "stage": "merge",
            "status": "complete",
            "base_model": str(ref.base_dir.resolve()),
            "adapter": str(result.adapters[-1].resolve()) if result.adapters else None,
            "adapters": [str(a.resolve()) for a in result.adapters],
            "source_stage": source.get("stage"),
            "tuning_method": source.get("tuning_method"),
            "system_prompt": training_system_prompt(ref),
            "task": result.task,
            "architecture": model_name,
            "dtype": result.dtype,
            "parameters": result.parameters,
            "check": result.check,
            "seconds": result.seconds,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "versions": library_versions(),
        },
    )


def summary(result: MergeResult) -> str:
    n = len(result.adapters)
    check = result.check
    what = (
        f"merged {n} adapter{'s' if n > 1 else ''} ({result.adapters[-1]}) into {result.base_dir}"
        if n
        else f"re-saved {result.base_dir}"
    )
    shards = f"{result.shards} safetensors shards + model.safetensors.index.json" if result.shards > 1 else "1 shard"
    lines = [
        f"{what} in {result.seconds:.0f}s",
        f"  model: {result.task}, {result.parameters / 1e6:.1f}M parameters, {result.dtype}, {shards} "
        f"({result.bytes / 1e6:.1f} MB)",
        f"  check: max |logit difference| vs {'base + adapter' if n else 'the loaded model'} = "
        f"{check['max_abs_logit_diff']:.2g} on {check['tokens']} tokens (tolerance {check['tolerance']:.2g}): ok",
    ]
    if "storage_rounding_diff" in check:
        lines.append(
            f"  (merged and checked in float32; storing {result.dtype} rounds the logits by up to "
            f"{check['storage_rounding_diff']:.2g})"
        )
    lines.append(f"  output: {result.output_dir}")
    if result.task == "causal_lm":
        lines.append(f"  chat with it: tunestack chat --model {result.output_dir}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from tunestack.config.parse import parse_into

    (args,) = parse_into(
        (MergeArguments,),
        argv,
        prog="tunestack merge",
        description="Merge a LoRA/DoRA/AdaLoRA adapter (or a tunestack stage output) into its base model.",
    )
    print(summary(merge(args)))  # noqa: T201
    return 0
