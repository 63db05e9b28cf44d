"""Adapters on a base model: attach one live, merge one, stack several — the one place this is done.

Tied input/output embeddings are untied first when an adapter touches either of them (merging a LoRA of a
tied `lm_head` into the shared matrix would change both), and an earlier stage's causal-LM adapter attaches
to a reward model's classifier as a plain PEFT model.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

from tunestack.errors import ModelError

logger = logging.getLogger(__name__)


def adapter_config(adapter_dir: Path) -> dict[str, Any] | None:
    """The adapter_config.json of an adapter folder; None when it holds no adapter, ModelError when unreadable."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read ({exc})") from None


def adapter_task_type(adapter_dir: Path) -> str | None:
    """The PEFT task type of an adapter folder (CAUSAL_LM, SEQ_CLS ...); None when it holds no adapter."""
    config = adapter_config(adapter_dir)
    return None if config is None else config.get("task_type")


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


def attach_adapter(model: Any, adapter_dir: Path, trainable: bool = False) -> Any:
    """`model` with the adapter in `adapter_dir` live (a PeftModel), tied embeddings made safe to merge; in eval
    mode unless it is to be trained further."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(str(adapter_dir))
    if config.task_type == "CAUSAL_LM" and model.get_output_embeddings() is None:
        # An earlier stage's adapter under a reward model (a classifier, or the LM inside a value head):
        # the same layer names, without the LM head.
        config.task_type = None
        config.modules_to_save = [m for m in (config.modules_to_save or []) if m not in ("lm_head", "embed_out")]
    try:
        model = PeftModel.from_pretrained(model, adapter_dir, config=config, is_trainable=trainable)
    except UnpicklingError as exc:  # --allow_pickle: weights_only refused what is not a tensor
        raise ModelError(f"{adapter_dir}: its pickled weights hold more than tensors ({exc}); not loaded") from None
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
    if not trainable:
        model.eval()
    return model


def require_mergeable(peft_model: Any, adapter_dir: Path) -> None:
    if not hasattr(peft_model, "merge_and_unload"):  # prompt/prefix tuning add no weights to merge into
        kind = peft_model.peft_config["default"].peft_type
        raise ModelError(f"{adapter_dir}: {kind} adapters cannot be merged into the weights; chat with the adapter")


def merge_adapter(model: Any, adapter_dir: Path) -> Any:
    """Load the adapter onto `model` and merge it into the weights."""
    plain = _plain_lora_layers(model, Path(adapter_dir))
    if plain is not None:
        return _merge_plain_lora(model, *plain)
    peft_model = attach_adapter(model, adapter_dir)
    require_mergeable(peft_model, adapter_dir)
    return peft_model.merge_and_unload()


# The adapter_config.json keys that may hold a value without making a LoRA other than W += (B @ A) * scale; any
# other key with a value (DoRA, patterns, biases, saved modules, newer variants) leaves the merge to PEFT.
_PLAIN_LORA_KEYS = {
    "peft_type", "task_type", "r", "lora_alpha", "use_rslora", "lora_dropout", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "init_lora_weights", "base_model_name_or_path", "revision",
    "inference_mode", "peft_version", "auto_mapping", "bias", "megatron_core", "qalora_group_size",
    "ensure_weight_tying",
}  # fmt: skip


def _plain_lora_layers(model: Any, adapter_dir: Path) -> tuple[list[tuple[Any, Any, Any]], float] | None:
    """([(linear layer, A, B)], scale) when `adapter_dir` holds a plain LoRA whose every pair of weights fits a
    float32 nn.Linear of `model` that is not its output embedding; else None.

    PEFT merges such an adapter as W += (B @ A) * scale per layer, after wrapping every target layer and loading
    the adapter into the wrappers: a second per adapter for a 135M model, paid again by every stage and eval model
    that starts from a stack. Merged here directly, with the same operations, the weights are the same bits."""
    import torch

    weights_path = adapter_dir / "adapter_model.safetensors"
    if hasattr(model, "peft_config") or not weights_path.exists():
        return None
    config = adapter_config(adapter_dir)
    if config is None or config.get("peft_type") != "LORA" or config.get("bias", "none") != "none":
        return None
    if any(value for key, value in config.items() if key not in _PLAIN_LORA_KEYS):
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(weights_path)
    except (OSError, SafetensorError):
        return None  # PEFT's loader says what is wrong with the file
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if not key.startswith("base_model.model.") or part not in ("A.weight", "B.weight"):
            return None
        pairs.setdefault(name, {})[part[0]] = tensor
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = []
    for name, ab in pairs.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            return None
        a, b = ab.get("A"), ab.get("B")
        if type(layer) is not torch.nn.Linear or layer is output_embeddings or a is None or b is None:
            return None
        if {layer.weight.dtype, a.dtype, b.dtype} != {torch.float32}:
            return None
        rows, cols = layer.weight.shape
        if a.dim() != 2 or tuple(b.shape) != (rows, a.shape[0]) or a.shape[1] != cols:
            return None
        layers.append((layer, a, b))
    if not layers:
        return None
    r, alpha = config["r"], config["lora_alpha"]
    return layers, (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


def _merge_plain_lora(model: Any, layers: list[tuple[Any, Any, Any]], scale: float) -> Any:
    import torch

    with torch.no_grad():
        for layer, a, b in layers:
            device = layer.weight.device
            layer.weight.data += (b.to(device) @ a.to(device)) * scale
    return model.eval()


def stack_adapters(model: Any, adapters: Sequence[Path], keep_last: bool = False) -> Any:
    """`model` with `adapters` merged in order; with `keep_last` the newest stays a live PEFT adapter."""
    adapters = list(adapters)
    live = adapters.pop() if keep_last and adapters else None
    for adapter in adapters:
        model = merge_adapter(model, adapter)
    return attach_adapter(model, live) if live is not None else model
