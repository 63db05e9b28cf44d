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
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunestack.config.model import DTYPES, ModelArguments
from tunestack.errors import ConfigError, ModelError, TunestackError
from tunestack.model.load import (
    RUN_MANIFEST,
    ModelRef,
    load_model,
    load_tokenizer,
    read_run_manifest,
    resolve_model,
)

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
_STAGING = re.compile(r"^\.(?P<name>.+)\.merging-(?P<pid>\d+)-")


class MergeCheckError(TunestackError):
    """The merged model does not reproduce base + adapter; nothing was written."""

    exit_code = 1


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
# Resolving base + adapter (shared with chat and infer)


def resolve_stack(reference: str | None = None, adapter: str | None = None) -> ModelRef:
    """The model to load from MedicalGPT-style flags.

    `reference` alone is any model reference (see `resolve_model`). With `adapter`, the adapter is
    stacked on `reference` when given (MedicalGPT's --base_model + --lora_model), else on the base
    recorded in the adapter's run.json / adapter_config.json.
    """
    if not adapter:
        return resolve_model(reference)
    adapter_dir = Path(adapter).expanduser()
    if not adapter_dir.is_dir():
        raise ModelError(f"adapter folder does not exist: {adapter}")
    is_adapter = (adapter_dir / "adapter_config.json").exists()
    if reference is None:
        try:
            return resolve_model(adapter)
        except ModelError as exc:
            if is_adapter:
                raise ModelError(f"{exc}; or pass the base model with --base_model") from None
            raise
    if not is_adapter:
        raise ModelError(f"{adapter_dir}: no adapter_config.json, so it is not an adapter to put on {reference}")
    base = resolve_model(reference)
    return ModelRef(
        adapter, base.base_dir, base.gguf_file, [*base.adapters, adapter_dir], read_run_manifest(adapter_dir)
    )


def training_system_prompt(ref: ModelRef) -> str | None:
    """The system prompt the newest stage of the stack trained with (run.json), so chat and merge keep it."""
    for folder in [*reversed(ref.adapters), ref.base_dir]:
        manifest = read_run_manifest(folder) or {}
        data_options = (manifest.get("options") or {}).get("data") or {}
        found = data_options.get("system_prompt") or manifest.get("system_prompt")
        if found:
            return str(found)
    return None


def adapter_task_type(adapter_dir: Path) -> str | None:
    try:
        return json.loads((adapter_dir / "adapter_config.json").read_text()).get("task_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{adapter_dir / 'adapter_config.json'}: cannot read ({exc})") from None


# ---------------------------------------------------------------------------------------------
# Merging in memory


def _base_layer(module: Any) -> Any:
    return getattr(module, "base_layer", module)


def untie_adapted_embeddings(model: Any) -> bool:
    """Give the output embedding its own copy of the weight when it is tied to the input embedding
    and an adapter touches either of them. Returns True when it untied.

    A live adapter on a tied `lm_head` (or `embed_tokens`) changes only its own side; merging it into
    the shared matrix would change both. With separate weights the merge reproduces the live model.
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inp, out = base.get_input_embeddings(), base.get_output_embeddings()
    if inp is None or out is None:
        return False
    w_in, w_out = getattr(_base_layer(inp), "weight", None), getattr(_base_layer(out), "weight", None)
    if w_in is None or w_out is None or w_in.data_ptr() != w_out.data_ptr():
        return False
    if not any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in (inp, out)):
        return False
    _base_layer(out).weight = torch.nn.Parameter(w_out.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (base.config, base.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True


def attach_adapter(model: Any, adapter_dir: Path) -> Any:
    """`model` with the adapter in `adapter_dir` live (a PeftModel), tied embeddings made safe to merge."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
        if "size mismatch" in str(exc) or "Error(s) in loading state_dict" in str(exc):
            raise ModelError(
                f"{adapter_dir}: the adapter does not fit this base model ({detail}); pass the base it was trained on"
            ) from None
        raise
    if untie_adapted_embeddings(model):
        logger.info("%s: untied the input/output embeddings (the adapter changes one of them)", adapter_dir)
    model.eval()
    return model


def _require_mergeable(peft_model: Any, adapter_dir: Path) -> None:
    if not hasattr(peft_model, "merge_and_unload"):  # prompt/prefix tuning add no weights to merge into
        kind = peft_model.peft_config["default"].peft_type
        raise ModelError(f"{adapter_dir}: {kind} adapters cannot be merged into the weights; chat with the adapter")


def merge_adapter(model: Any, adapter_dir: Path) -> Any:
    """Load the adapter onto `model` and merge it into the weights."""
    peft_model = attach_adapter(model, adapter_dir)
    _require_mergeable(peft_model, adapter_dir)
    return peft_model.merge_and_unload()


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(output: Path) -> None:
    """Hidden staging folders of this output left by a merge that was killed."""
    if not output.parent.is_dir():
        return
    for child in output.parent.iterdir():
        m = _STAGING.match(child.name)
        if m and m["name"] == output.name and child.is_dir() and not _pid_alive(int(m["pid"])):
            shutil.rmtree(child, ignore_errors=True)


def check_output_dir(output: Path, overwrite: bool, inputs: list[Path]) -> None:
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output_dir {output} is a file")
    resolved = output.resolve()
    for folder in inputs:
        folder = folder.resolve()
        if resolved == folder or folder.is_relative_to(resolved):
            raise ConfigError(f"--output_dir {output} would replace the input {folder}; choose another folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"--output_dir {output} is not empty; pass --overwrite_output_dir to replace it")


def _commit(staging: Path, output: Path) -> None:
    """Move the finished staging folder to `output`, replacing what is there."""
    if output.exists():
        trash = output.with_name(f".{output.name}.replaced-{os.getpid()}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(output, trash)
        os.replace(staging, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, output)


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

    from tunestack.model.load import resolve_dtype

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


def merge(args: MergeArguments) -> MergeResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    started = time.time()
    ref = resolve_stack(args.base_model, args.adapter)
    if not ref.adapters:
        raise ConfigError(f"{args.adapter} holds a full model, not an adapter: there is nothing to merge")
    adapter_dir = ref.adapters[-1]
    output = (
        Path(args.output_dir).expanduser() if args.output_dir else adapter_dir.with_name(adapter_dir.name + "-merged")
    )
    check_output_dir(output, args.overwrite_output_dir, [ref.base_dir, *ref.adapters])
    _remove_stale_staging(output)
    saved_dtype = _saved_dtype(args.torch_dtype, ref)

    tokenizer = load_tokenizer(ref, args.tokenizer_path, args.trust_remote_code)
    tokenizer_dir = Path(args.tokenizer_path).expanduser() if args.tokenizer_path else ref.tokenizer_dir
    seq_cls = adapter_task_type(adapter_dir) == "SEQ_CLS"
    model_class = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    extra = {"num_labels": 1} if seq_cls else None
    load_args = ModelArguments(
        torch_dtype="float32", trust_remote_code=args.trust_remote_code, device_map=args.device_map
    )
    bare = ModelRef(ref.reference, ref.base_dir, ref.gguf_file)
    model = load_model(bare, load_args, model_class=model_class, tokenizer=tokenizer, extra_kwargs=extra)
    model = _dequantize_if_needed(model)
    if seq_cls and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # batched scoring finds the last token with it
    for earlier in ref.adapters[:-1]:
        model = merge_adapter(model, earlier)
    model = attach_adapter(model, adapter_dir)
    _require_mergeable(model, adapter_dir)

    probes = _probe_inputs(tokenizer, model.get_base_model().get_input_embeddings().weight.shape[0])
    live = _logits(model, probes)
    tolerance = REL_TOLERANCE * max(1.0, float(live.abs().max()))
    merged = model.merge_and_unload()
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

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.merging-{os.getpid()}-", dir=output.parent))
    try:
        merged.to(saved_dtype).save_pretrained(staging, max_shard_size=args.max_shard_size.replace(" ", ""))
        tokenizer.save_pretrained(staging)
        _copy_support_files(ref, tokenizer_dir, staging)
        del merged
        gc.collect()
        from tunestack.train.checkpoint import verify_saved_model

        verify_saved_model(staging, None, trained=False)
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
        _commit(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _write_manifest(folder: Path, result: MergeResult, ref: ModelRef, model_name: str) -> None:
    from tunestack.train.output import library_versions, write_json_atomic

    source = ref.run_info or {}
    write_json_atomic(
        folder / RUN_MANIFEST,
        {
            "stage": "merge",
            "status": "complete",
            "base_model": str(ref.base_dir.resolve()),
            "adapter": str(result.adapters[-1].resolve()),
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
    lines = [
        f"merged {n} adapter{'s' if n > 1 else ''} ({result.adapters[-1]}) into {result.base_dir} "
        f"in {result.seconds:.0f}s",
        f"  model: {result.task}, {result.parameters / 1e6:.1f}M parameters, {result.dtype}, "
        f"{result.shards} safetensors shard{'s' if result.shards > 1 else ''} ({result.bytes / 1e6:.1f} MB)",
        f"  check: max |logit difference| vs base + adapter = {check['max_abs_logit_diff']:.2g} on "
        f"{check['tokens']} tokens (tolerance {check['tolerance']:.2g}): ok",
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
