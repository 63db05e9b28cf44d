"""Adapters on a base model: attach one live, merge one, stack several — the one place this is done.

Tied input/output embeddings are untied first when an adapter touches either of them (merging a LoRA of a
tied `lm_head` into the shared matrix would change both), and an earlier stage's causal-LM adapter attaches
to a reward model's classifier as a plain PEFT model.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

from tunestack.errors import ModelError

logger = logging.getLogger(__name__)


def adapter_task_type(adapter_dir: Path) -> str | None:
    """The PEFT task type of an adapter folder (CAUSAL_LM, SEQ_CLS ...); None when it holds no adapter."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("task_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read ({exc})") from None


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
    peft_model = attach_adapter(model, adapter_dir)
    require_mergeable(peft_model, adapter_dir)
    return peft_model.merge_and_unload()


def stack_adapters(model: Any, adapters: Sequence[Path], keep_last: bool = False) -> Any:
    """`model` with `adapters` merged in order; with `keep_last` the newest stays a live PEFT adapter."""
    adapters = list(adapters)
    live = adapters.pop() if keep_last and adapters else None
    for adapter in adapters:
        model = merge_adapter(model, adapter)
    return attach_adapter(model, live) if live is not None else model


@contextlib.contextmanager
def merged_lora_weights(model: Any) -> Iterator[int]:
    """For the block, every plain LoRA layer of `model` (no variant such as DoRA, not merged, its adapters on, no
    dropout at work) computes linear(x, W + B·A·scale): one product instead of PEFT's five operations per layer,
    which is what decoding one token at a time on a CPU waits on. W is not touched (the merged weights are new
    tensors, dropped when the block ends), so nothing drifts from step to step. Yields how many layers it merged."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    patched = []
    with torch.no_grad():
        for module in model.modules():
            if type(module) is not LoraLinear or module.merged or module.disable_adapters or module.lora_variant:
                continue
            names = [a for a in module.active_adapters if a in module.lora_A]
            dropping = module.training and any(getattr(module.lora_dropout[a], "p", 0) > 0 for a in names)
            if not names or dropping:
                continue
            base = module.get_base_layer()
            weight = base.weight + sum(module.get_delta_weight(a).to(base.weight.dtype) for a in names)
            module.forward = functools.partial(_merged_forward, module, base, weight)
            patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward


def _merged_forward(layer: Any, base: Any, weight: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    if layer.disable_adapters:  # the adapter switched off inside the block: the base layer alone
        return base(x, *args, **kwargs)
    import torch.nn.functional as F

    return F.linear(x, weight, base.bias)

