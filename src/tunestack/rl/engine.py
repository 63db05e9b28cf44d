"""The PPO loop's accelerate setup: plain data parallel, or DeepSpeed ZeRO (`--deepspeed`, the same names and files
as the Trainer stages) with the "auto" values filled from the PPO settings. Its checkpoints under either are
rl/state.py's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tunestack.config.deepspeed import fill_auto


def ppo_accelerator(train: Any, settings: Any, hidden_size: int) -> Any:
    """An Accelerator for the PPO loop: DeepSpeed when --deepspeed names a config, else plain."""
    from accelerate import Accelerator

    if train.deepspeed is None:
        return Accelerator()
    from accelerate.utils import DeepSpeedPlugin

    config = train.deepspeed if isinstance(train.deepspeed, dict) else json.loads(Path(train.deepspeed).read_text())
    world = int(torch.distributed.get_world_size()) if torch.distributed.is_initialized() else 1
    filled = fill_auto(
        config,
        micro_batch=settings.mini_batch_size,
        accumulation=1,
        world_size=world,
        max_grad_norm=settings.max_grad_norm,
        bf16=bool(train.bf16),
        fp16=bool(train.fp16),
        learning_rate=settings.learning_rate,
        weight_decay=0.01,  # torch AdamW's default, which the plain loop uses
        hidden_size=hidden_size,
    )
    return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=filled))


def uses_deepspeed(accelerator: Any) -> bool:
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def zero3(accelerator: Any) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def ppo_optimizer(accelerator: Any, params: list[torch.nn.Parameter], learning_rate: float) -> Any:
    """torch AdamW (fused); a placeholder when the DeepSpeed config builds its own optimizer (ZeRO-Offload's CPU
    Adam)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and "optimizer" in plugin.deepspeed_config:
        from accelerate.utils import DummyOptim

        return DummyOptim(params, lr=learning_rate)
    # The fused kernel: one pass over all of a LoRA's small tensors instead of a loop over them (on a CPU 7 ms a
    # step against 19 ms for SmolLM2's 420 adapter tensors; PPO takes 16 such steps per batch by default).
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=learning_rate, fused=fused)
