"""Tuning methods: full, freeze, LoRA, QLoRA, AdaLoRA, DoRA, applied to any causal LM."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunestack.errors import ConfigError
from tunestack.model.anatomy import output_layer

logger = logging.getLogger(__name__)

# Output heads never get adapters: they are the vocabulary projection or a scalar scorer.
HEAD_NAMES = ("lm_head", "output_layer", "score", "v_head", "classifier", "embed_out")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def find_linear_names(model: nn.Module) -> list[str]:
    """Leaf names of every linear layer except the output head (the `all` target), for any architecture."""
    output = output_layer(model)  # found by shape where the class does not say (remote code)
    names = set()
    for full_name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is output:
            continue
        leaf = full_name.rsplit(".", 1)[-1]
        if leaf in HEAD_NAMES:
            continue
        names.add(leaf)
    return sorted(names)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 leaves an empty placeholder, ds_numel is its size
        # 4-bit weights pack two values per byte.
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def _freeze(model: nn.Module, layers: int, fragments: list[str] | None) -> None:
    names = [n for n, _ in model.named_parameters()]
    indices = sorted({int(m.group(1)) for n in names if (m := _LAYER_INDEX.search(n))})
    if fragments:
        chosen = {n for n in names if any(f in n for f in fragments)}
    else:
        if not indices:
            raise ConfigError(
                "freeze: found no numbered transformer layers; name modules with --freeze_trainable_modules"
            )
        keep = set(indices[-layers:] if layers > 0 else indices[:-layers])
        chosen = {n for n in names if (m := _LAYER_INDEX.search(n)) and int(m.group(1)) in keep}
    if not chosen:
        raise ConfigError(f"freeze: no parameter matches {fragments}")
    for name, param in model.named_parameters():
        param.requires_grad = name in chosen


def _lora_targets(model: nn.Module, tuning: Any) -> list[str]:
    targets = tuning.target_list
    if not targets or targets == ["all"]:
        return find_linear_names(model)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present and not any(t in n for n, _ in model.named_modules())]
    if missing:
        raise ConfigError(
            f"--target_modules {','.join(missing)} not found in the model; its linear layers are: "
            f"{','.join(find_linear_names(model))} (or use 'all')"
        )
    return targets


def apply_tuning(
    model: nn.Module,
    tuning: Any,
    method: str,
    total_steps: int,
    gradient_checkpointing: bool = False,
    task_type: str = "CAUSAL_LM",
) -> nn.Module:
    """Return the model prepared for `method` with exactly the intended parameters trainable."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad = True
        return model
    if method == "freeze":
        _freeze(model, tuning.freeze_trainable_layers, _split(tuning.freeze_trainable_modules))
        return model

    from peft import AdaLoraConfig, LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if tuning.peft_path:
        path = Path(tuning.peft_path)
        if not (path / "adapter_config.json").exists():
            raise ConfigError(f"--peft_path {path}: no adapter_config.json there")
        from tunestack.model.adapters import attach_adapter

        return _fused(attach_adapter(model, path, trainable=True), tuning)
    targets = _lora_targets(model, tuning)
    common = dict(
        target_modules=targets,
        lora_alpha=tuning.lora_alpha,
        lora_dropout=tuning.lora_dropout,
        modules_to_save=tuning.modules_to_save_list,
        task_type=task_type,
    )
    if method == "adalora":
        config = AdaLoraConfig(
            init_r=tuning.adalora_init_r,
            target_r=tuning.adalora_target_r,
            tinit=max(1, int(total_steps * tuning.adalora_tinit)),
            tfinal=max(1, int(total_steps * tuning.adalora_tfinal)),
            deltaT=tuning.adalora_delta_t,
            total_step=max(total_steps, 3),
            **common,
        )
    else:
        config = LoraConfig(
            r=tuning.lora_rank, use_dora=method == "dora" or tuning.use_dora, use_rslora=tuning.use_rslora, **common
        )
    return _fused(get_peft_model(model, config), tuning)


def _fused(model: nn.Module, tuning: Any) -> nn.Module:
    if getattr(tuning, "fused_lora_dropout", False):
        from tunestack.model.lora_dropout import fuse_lora_dropout

        fuse_lora_dropout(model)
    return model


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def describe_trainable(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"


def is_adalora(model: nn.Module) -> bool:
    config = getattr(model, "peft_config", {}).get("default") if hasattr(model, "peft_config") else None
    return config is not None and config.peft_type.value == "ADALORA"


ADALORA_STATE = "adalora_state.safetensors"


def save_adalora_state(model: nn.Module, folder: Path) -> None:
    """Save what an AdaLoRA resume needs and PEFT's pruned adapter file drops.

    PEFT saves AdaLoRA adapters cut down to their current rank pattern, but training continues
    on the full-rank matrices and the rank allocator's sensitivity statistics; without these a
    resume fails with size mismatches (or silently restarts the rank schedule).
    """
    import json

    from safetensors.torch import save_file

    tensors = {f"param::{n}": p.detach().contiguous() for n, p in model.named_parameters() if "lora_" in n}
    allocator = model.base_model.rankallocator
    for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        for n, t in getattr(allocator, kind).items():
            tensors[f"{kind}::{n}"] = t.detach().contiguous()
    rank_pattern = model.peft_config[model.active_adapter].rank_pattern
    save_file(tensors, str(folder / ADALORA_STATE), metadata={"rank_pattern": json.dumps(rank_pattern)})


def load_adalora_state(model: nn.Module, folder: Path) -> bool:
    """Restore full-rank AdaLoRA matrices, allocator statistics and rank pattern; False if none saved."""
    import json

    from safetensors import safe_open

    path = Path(folder) / ADALORA_STATE
    if not path.exists():
        return False
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    allocator = model.base_model.rankallocator  # its keys are relative to the wrapped model
    with safe_open(str(path), framework="pt") as fh:
        for key in fh.keys():
            kind, name = key.split("::", 1)
            tensor = fh.get_tensor(key)
            if kind == "param":
                with torch.no_grad():
                    params[name].copy_(tensor)
            else:
                getattr(allocator, kind)[name] = tensor.to(device)
        rank_pattern = json.loads(fh.metadata()["rank_pattern"])
    model.peft_config[model.active_adapter].rank_pattern = rank_pattern
    return True
