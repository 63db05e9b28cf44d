"""Load a resolved model reference (model/ref.py) and its tokenizer, offline: dtype, device map, 4/8-bit
quantization, trust_remote_code only on request, or a freshly initialised model to train from scratch."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from contextlib import nullcontext
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

from safetensors import SafetensorError

from tunestack.atomic import build_once
from tunestack.errors import ModelError
from tunestack.model.adapters import stack_adapters
from tunestack.model.builtin import gguf_parsed_once, save_model_folder, strip_gguf_quantizer
from tunestack.model.compat import complete_model, fix_tokenizer_pad
from tunestack.model.ref import ModelRef
from tunestack.model.safety import announce_remote_code, needs_remote_code, refuse_pickled_weights
from tunestack.rundir import tunestack_home

logger = logging.getLogger(__name__)


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
    if source.is_dir() and gguf is None and not any(any(source.glob(pattern)) for pattern in _TOKENIZER_FILES):
        raise ModelError(
            f"{source} has no tokenizer (no tokenizer.json, tokenizer_config.json or vocabulary file): copy the "
            "model's tokenizer files there, or pass --tokenizer_name_or_path"
        )
    announce_remote_code(source, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, gguf_file=gguf, trust_remote_code=trust_remote_code, use_fast=use_fast, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        refused = None if trust_remote_code else needs_remote_code(source, exc)
        if refused is not None:
            raise refused from None
        raise ModelError(f"cannot load a tokenizer from {source}: {str(exc).splitlines()[0]}") from None
    fix_tokenizer_pad(tokenizer)
    if tokenizer.pad_token is None:
        # Padding is always masked by attention_mask/labels, so reusing EOS (or UNK) is safe.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "*.model", "vocab.*", "*.tiktoken")


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
    model_class = model_class or causal_lm_class(ref.base_dir, args.trust_remote_code)
    refuse_pickled_weights([ref.base_dir, *ref.adapters], getattr(args, "allow_pickle", False))
    announce_remote_code(ref.base_dir, args.trust_remote_code)
    quant = quantization_config(args)
    base_dir, gguf, adapters = ref.base_dir, ref.gguf_file, list(ref.adapters)
    live = adapters.pop() if keep_last_adapter and adapters else None
    if quant is not None and adapters:
        base_dir, gguf, adapters = _materialize_merged(ref, adapters, args.trust_remote_code), None, []
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
    attention = attention_implementation(args)
    if attention:
        kwargs["attn_implementation"] = attention
    try:
        with gguf_parsed_once() if gguf else nullcontext():
            model = model_class.from_pretrained(base_dir, **kwargs)
    except (OSError, ValueError, SafetensorError, UnpicklingError) as exc:
        refused = None if args.trust_remote_code else needs_remote_code(base_dir, exc)
        if refused is not None:
            raise refused from None
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot load the model from {base_dir / (gguf or '')}: {detail}") from None
    if gguf:
        strip_gguf_quantizer(model)
    model = complete_model(model)
    if tokenizer is not None:
        grow_embeddings(model, tokenizer)
    model = stack_adapters(model, [*adapters, live] if live else adapters, keep_last=live is not None)
    return model


def attention_implementation(args: Any) -> str | None:
    """--attn_implementation, else MedicalGPT's --flash_attn True: FlashAttention-2 where the flash-attn package
    and a CUDA GPU are there, SDPA (with a warning) where they are not."""
    if getattr(args, "attn_implementation", None):
        return args.attn_implementation
    if not getattr(args, "flash_attn", False):
        return None
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        return "flash_attention_2"
    logger.warning("--flash_attn True: flash-attention 2 is not available here (package or CUDA GPU); using SDPA")
    return "sdpa"


def load_config(folder: Path, trust_remote_code: bool, **kwargs: Any) -> Any:
    """The model folder's config (AutoConfig), with the one-line error when it needs --trust_remote_code."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as exc:
        refused = None if trust_remote_code else needs_remote_code(folder, exc)
        if refused is not None:
            raise refused from None
        raise


def causal_lm_class(folder: Path, trust_remote_code: bool) -> Any:
    """AutoModelForCausalLM, or AutoModel for remote code whose auto_map names its causal LM only there (ChatGLM-6B
    registers ChatGLMForConditionalGeneration as AutoModel, not AutoModelForCausalLM)."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto_map = _auto_map(folder) if trust_remote_code else {}
    if "AutoModelForCausalLM" not in auto_map and "AutoModel" in auto_map:
        return _GeneratingAutoModel(AutoModel)
    return AutoModelForCausalLM


def _auto_map(folder: Path) -> dict[str, Any]:
    import json

    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    return auto_map if isinstance(auto_map, dict) else {}


class _GeneratingAutoModel:
    """AutoModel standing in for AutoModelForCausalLM: what it loads must be able to generate."""

    def __init__(self, auto_class: Any):
        self.auto_class = auto_class

    def from_pretrained(self, path: Any, **kwargs: Any) -> Any:
        model = self.auto_class.from_pretrained(path, **kwargs)
        if not (hasattr(model, "generate") and hasattr(model, "can_generate") and model.can_generate()):
            raise ModelError(
                f"{path}: its auto_map names no causal LM (no AutoModelForCausalLM, and AutoModel is "
                f"{type(model).__name__}, which cannot generate)"
            )
        return model

    def from_config(self, config: Any, **kwargs: Any) -> Any:
        return self.auto_class.from_config(config, **kwargs)


def _materialize_merged(ref: ModelRef, adapters: list[Path], trust_remote_code: bool = False) -> Path:
    """Merge base + adapters once into a cached float folder (for quantized loads of a stack)."""
    key = hashlib.sha256()
    for adapter in adapters:
        key.update(str(adapter.resolve()).encode())
        for f in sorted(adapter.glob("adapter_model.*")):
            key.update(str(f.stat().st_mtime_ns).encode())

    def merge(staging: Path) -> None:
        kwargs: dict[str, Any] = {"dtype": "float32", "local_files_only": True, "trust_remote_code": trust_remote_code}
        if ref.gguf_file:
            kwargs["gguf_file"] = ref.gguf_file
        with gguf_parsed_once() if ref.gguf_file else nullcontext():
            model = causal_lm_class(ref.base_dir, trust_remote_code).from_pretrained(ref.base_dir, **kwargs)
        if ref.gguf_file:
            strip_gguf_quantizer(model)
        save_model_folder(stack_adapters(complete_model(model), adapters), staging)

    def complete(folder: Path) -> bool:
        return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))

    return build_once(tunestack_home() / "merged" / key.hexdigest()[:16], merge, complete)


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
    return complete_model(model)
