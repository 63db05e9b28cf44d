"""A PPO run's state in a checkpoint: trainable weights (safetensors), optimizer, random generators, step and KL
coefficient; `load_loop_state` refuses a checkpoint that does not fit the model."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch


def save_loop_state(loop: Any, folder: Path) -> None:
    from safetensors.torch import save_file

    save_file(loop.trainable_state(), str(folder / "trainable.safetensors"))
    torch.save(loop.optimizer.state_dict(), folder / "optimizer.pt")
    rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():  # sampling on a GPU draws from its generator
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, folder / "rng_state.pt")
    (folder / "rl_state.json").write_text(
        json.dumps(
            {
                "step": loop.step,
                "kl_coef": loop.kl.value,
                "python_rng_version": random.getstate()[0],
                "python_rng_gauss": random.getstate()[2],
            }
        )
    )


def load_loop_state(loop: Any, folder: Path) -> None:
    from safetensors.torch import load_file

    from tunestack.errors import ConfigError

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
