"""Running on the engines practitioners already use: DeepSpeed ZeRO, FSDP, torchrun across nodes.

* DeepSpeed's communication starts before the model loads (ZeRO-3 partitions the weights while they load),
  on the process group torchrun / accelerate made, or on a one-process group when no launcher started this
  process; its checkpoints are read back with `torch.load(weights_only=True)` like every other tunestack file.
* FSDP on a CPU-only machine: accelerate silently turns `--fsdp` into plain DDP there; tunestack shards for real
  (gloo), so what runs on a GPU cluster is what the CPU tests exercise.
* Data is prepared with waits that no process-group timeout cuts short (see `data_first_on_main`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

logger = logging.getLogger("tunestack")

# How long the other processes wait for the data (rank 0 tokenizing, or a slower node): the training
# collectives keep --ddp_timeout, this wait does not count against it.
DATA_WAIT = timedelta(hours=24)


def launched() -> bool:
    """Started by torchrun / accelerate launch / the deepspeed launcher (the process group is described)."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_deepspeed(train: Any) -> None:
    """DeepSpeed's communication, before the model loads. Without a launcher: a one-process group on 127.0.0.1
    (what the `deepspeed` launcher would set up), instead of DeepSpeed's MPI discovery and its traceback."""
    if train.deepspeed is None:
        return
    if not launched():
        one = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1"}
        for key, value in {**one, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
            os.environ.setdefault(key, value)
    import deepspeed

    allow_deepspeed_checkpoints()
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(
            dist_backend="gloo" if train.use_cpu else None,
            auto_mpi_discovery=False,
            verbose=False,
            timeout=timedelta(seconds=train.ddp_timeout),
        )


# DeepSpeed's own classes a ZeRO checkpoint holds besides tensors and plain containers.
_DEEPSPEED_CHECKPOINT_CLASSES = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def _deepspeed_checkpoint_classes() -> list[type]:
    import importlib

    found = []
    for module, name in _DEEPSPEED_CHECKPOINT_CLASSES:
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), name))
    return found


def load_deepspeed_file(path: str, map_location: Any = None) -> Any:
    """A file of a ZeRO checkpoint, read without running pickled code (DeepSpeed itself uses weights_only=False)."""
    import torch

    with torch.serialization.safe_globals(_deepspeed_checkpoint_classes()):
        return torch.load(path, map_location=map_location, weights_only=True)


def allow_deepspeed_checkpoints() -> None:
    """Make DeepSpeed's checkpoint engine read with `load_deepspeed_file`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if getattr(TorchCheckpointEngine.load, "tunestack", False):
        return

    def load(self: Any, path: str, map_location: Any = None) -> Any:
        return load_deepspeed_file(path, map_location)

    load.tunestack = True  # type: ignore[attr-defined]
    TorchCheckpointEngine.load = load  # type: ignore[method-assign]


def enable_fsdp_on_cpu(trainer: Any) -> None:
    """After the Trainer made its Accelerator: on a CPU-only multi-process run accelerate has left FSDP out
    (it shards on accelerators only) and would train plain DDP; put FSDP back, over gloo."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if not trainer.args.fsdp_plugin_args or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP  # AcceleratorState copies it from PartialState: set both
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True


@contextlib.contextmanager
def gathered(params: list[Any]) -> Iterator[None]:
    """The full values of ZeRO-3-partitioned parameters for the block (every process must enter it)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def full_values(named: list[tuple[str, Any]]) -> dict[str, Any]:
    """{name: a CPU copy of the whole tensor} of parameters sharded by ZeRO-3 or FSDP2 (a collective: every
    process calls it) or not sharded at all."""
    out = {}
    with gathered([p for _, p in named]):
        for name, p in named:
            value = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 keeps DTensor shards
            out[name] = value.detach().cpu().contiguous().clone()
    return out


def sharding(train: Any) -> str | None:
    """'fsdp', 'zero3' (the weights are sharded outside the forward pass), 'zero' (ZeRO 0-2) or None."""
    if getattr(train, "fsdp", None):
        return "fsdp"
    if getattr(train, "deepspeed", None) is None:
        return None
    from tunestack.config.deepspeed import zero_stage

    return "zero3" if zero_stage(train.deepspeed) == 3 else "zero"


@contextlib.contextmanager
def data_first_on_main(state: Any) -> Iterator[None]:
    """Rank 0 prepares the data first (tokenizes, fills the shared cache); the others then read it. Unlike
    accelerate's main_process_first, the waits run on a gloo group of their own with a 24-hour timeout, so a
    long tokenization on one node never runs into the process-group timeout (--ddp_timeout) on another; and
    every process waits until all have their data, so a node that had to tokenize for itself (a cache folder
    that is not shared) does not leave the others waiting in the first training collective."""
    if state.num_processes == 1:
        yield
        return
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=DATA_WAIT)
    try:
        if not state.is_main_process:
            logger.info("waiting for rank 0 to prepare the data (it tokenizes once; this process then reads it)")
            dist.barrier(group=group)
        yield
        if state.is_main_process:
            dist.barrier(group=group)
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group(group)


def _parent_command() -> list[str]:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as fh:
            return [part.decode(errors="replace") for part in fh.read().split(b"\0") if part]
    except OSError:
        return []


def check_launch() -> None:
    """Refuse the silent single process of `accelerate launch --num_processes N --cpu` (N > 1): without GPUs
    accelerate starts several processes only through mpirun, and would otherwise train one process alone."""
    if "WORLD_SIZE" in os.environ or os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1"):
        return
    parent = _parent_command()
    head = " ".join(parent[:3])  # `accelerate launch ...` or `python -m accelerate.commands.launch ...`
    if "accelerate" not in head or not ("launch" in parent or "accelerate.commands.launch" in head):
        return
    wanted = 1
    for i, part in enumerate(parent):
        if part.startswith("--num_processes") or part.startswith("--num-processes"):
            value = part.split("=", 1)[1] if "=" in part else (parent[i + 1] if i + 1 < len(parent) else "1")
            wanted = int(value) if value.isdigit() else 1
    if wanted > 1 and "--mpirun_hostfile" not in parent:
        from tunestack.errors import ConfigError

        raise ConfigError(
            f"accelerate launch --num_processes {wanted} --cpu started a single process (on CPUs accelerate starts "
            f"several only through mpirun): use `accelerate launch --multi_gpu --num_processes {wanted} ...` (it "
            f"runs over gloo here) or `torchrun --nproc_per_node {wanted} -m tunestack ...`"
        )
