"""Resuming only what can be resumed: a checkpoint carries the record of the run that wrote it (what shapes the
weights and the order of the data), and a resume whose options differ from it is refused with every
difference listed, instead of a size-mismatch traceback or a run that silently trains on something else."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tunestack.checkpoints import MARKER
from tunestack.errors import ConfigError
from tunestack.rundir import read_json

logger = logging.getLogger("tunestack")

# Options that shape the trainable weights or the order in which the data is seen.
SHAPING = {
    "model": ("model_config", "config_overrides", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type"),
    "tuning": (
        "target_modules", "lora_rank", "lora_alpha", "use_dora", "use_rslora", "modules_to_save", "peft_path",
        "adalora_init_r", "adalora_target_r", "freeze_trainable_layers", "freeze_trainable_modules",
    ),
    "train": (
        "seed", "data_seed", "per_device_train_batch_size", "gradient_accumulation_steps", "max_tokens_per_batch",
        "padding_free", "train_sampling_strategy",
    ),
}  # fmt: skip


def resume_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """What of a run's manifest a checkpoint must match to be resumed by it."""
    options = manifest.get("options") or {}
    record: dict[str, Any] = {
        "stage": manifest.get("stage"),
        "base_model": manifest.get("base_model"),
        "tuning_method": manifest.get("tuning_method"),
        "data_fingerprint": manifest.get("data_fingerprint"),
    }
    for group, keys in SHAPING.items():
        values = options.get(group) or {}
        record.update({f"{group}.{key}": values.get(key) for key in keys if key in values})
    train = options.get("train") or {}
    if "fsdp" in train or "deepspeed" in train:
        # DDP, FSDP, ZeRO-1/2 and ZeRO-3 each lay out the optimizer state in their own files.
        record["train.sharding"] = _sharding(train) or "none"
    return record


def _sharding(train: dict[str, Any]) -> str | None:
    from types import SimpleNamespace

    from tunestack.train.distributed import sharding

    try:
        return sharding(SimpleNamespace(fsdp=train.get("fsdp"), deepspeed=train.get("deepspeed")))
    except ConfigError:  # the DeepSpeed file of the run that wrote the checkpoint is gone
        return "zero"


def resume_problems(now: dict[str, Any], then: dict[str, Any]) -> list[str]:
    """Each difference between this run and the run that wrote the checkpoint, as 'name: checkpoint X, now Y'."""
    out = []
    for key in now:
        if key not in then or then[key] == now[key]:
            continue
        if key == "data_fingerprint":
            out.append("the training data changed (its files, the data options or the template)")
        else:
            out.append(f"{key.split('.', 1)[-1]}: checkpoint {then[key]!r}, now {now[key]!r}")
    return out


def check_resume(checkpoint: Path, manifest: dict[str, Any]) -> None:
    """ConfigError listing every difference between this run and the one that wrote `checkpoint`."""
    then = (read_json(checkpoint / MARKER) or {}).get("run")
    if not then:
        logger.warning("%s carries no record of its run: its options cannot be compared with this run's", checkpoint)
        return
    problems = resume_problems(resume_record(manifest), then)
    if problems:
        raise ConfigError(
            f"cannot resume from {checkpoint}: it was written by a different run ({'; '.join(problems)}); "
            "resume with the same options, or pass --overwrite_output_dir to start over"
        )
