"""A PPO run's state in a checkpoint: trainable weights (safetensors), optimizer, random generators, step and KL
coefficient; under DeepSpeed the engine's own checkpoint instead of the first two. `load_loop_state` refuses a
checkpoint that does not fit the model or was written under another engine.

Under ZeRO-3 the weights are partitioned across processes: every save gathers them first (on every process, the
main one writes), so a saved adapter is the trained one, never an empty placeholder.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from tunestack.rl.engine import uses_deepspeed

DEEPSPEED_TAG = "zero"  # the engine checkpoint's folder inside a PPO checkpoint


def save_loop_state(loop: Any, folder: Path) -> None:
    """What a resume needs besides the saved policy; every process calls it (the main one writes the shared
    files). Under DeepSpeed the engine writes its own checkpoint (each process its optimizer partition)."""
    from safetensors.torch import save_file

    acc = loop.accelerator
    if uses_deepspeed(acc):
        loop.model.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
        state = None
    else:
        state = loop.trainable_state()
    if not acc.is_main_process:
        return
    if state is not None:
        save_file(state, str(folder / "trainable.safetensors"))
        torch.save(loop.optimizer.state_dict(), folder / "optimizer.pt")
    rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():  # sampling on a GPU draws from its generator
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, folder / "rng_state.pt")
    meta = {
        "step": loop.step,
        "kl_coef": loop.kl.value,
        "python_rng_version": random.getstate()[0],
        "python_rng_gauss": random.getstate()[2],
    }
    (folder / "rl_state.json").write_text(json.dumps(meta))


def load_loop_state(loop: Any, folder: Path) -> None:
    from safetensors.torch import load_file

    from tunestack.errors import ConfigError

    if uses_deepspeed(loop.accelerator):
        if not (folder / DEEPSPEED_TAG).is_dir():
            raise ConfigError(
                f"{folder}: not a checkpoint of a DeepSpeed run (no {DEEPSPEED_TAG}/); resume without "
                "--deepspeed, or start over"
            )
        from tunestack.train.distributed import allow_deepspeed_checkpoints

        allow_deepspeed_checkpoints()
        loop.model.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_module_strict=False)
    else:
        if not (folder / "trainable.safetensors").is_file():
            raise ConfigError(f"{folder}: a checkpoint of a DeepSpeed run; resume with the same --deepspeed")
        state = load_file(str(folder / "trainable.safetensors"))
        params = dict(loop.unwrapped.named_parameters())
        unexpected = [k for k in state if k not in params]
        absent = [k for k, p in params.items() if p.requires_grad and k not in state]
        if unexpected or absent:
            detail = f"e.g. {unexpected[0]} is not in this model" if unexpected else f"it has no {absent[0]}"
            raise ConfigError(f"{folder}: the checkpoint does not fit this model/adapter ({detail})")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)
        loop.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    rng = torch.load(folder / "rng_state.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    meta = json.loads((folder / "rl_state.json").read_text())
    random.setstate((meta["python_rng_version"], tuple(rng["python"]), meta["python_rng_gauss"]))
    loop.step = meta["step"]
    loop.kl.value = meta["kl_coef"]
