"""Linear layers through oneDNN's prepacked kernel on a CPU, for sampling and for the output layer of scoring passes.

Decoding multiplies a few rows by every weight matrix of the model, so each step reads all the weights and does
little with them. On a CPU, nn.Linear's matmul reaches a fraction of the memory bandwidth in that shape, while
oneDNN's linear on a weight reordered once for it (its prepacked form, the one torch.compile's CPU backend uses)
runs the same products 1.5-3.4x faster at every row count measured, 1 to 1024 (bench/README.md, the RL section).

`PackedLinears(model)()` is a `with` block in which every float32 `nn.Linear` of the model runs on a packed
copy of its weight, and every plain LoRA layer of peft's (adapters active and not merged, no DoRA or other
variant, dropout off) runs as one linear on a packed copy of its merged weight W + scale·B·A, so the adapter
costs nothing per token. The model's own weights are never written.

The products differ from the plain ones by float rounding (about 1e-6 relative): samples come from the same
distribution, and nothing that trains reads these logits (the RL stages score their samples in their own
passes). A copy is packed again when any weight it was made from changed (PyTorch's version counter), so a
policy sampled again after an optimizer step samples from its new weights. `keep=False` drops the copies after
each block (RL, where the next block re-packs them anyway); with `keep=True` they stay for the next block
(inference, whose weights do not change). Copies are made only while they fit in a quarter of the memory
available, and not at all off a CPU or without oneDNN: then the block changes nothing.

`frozen_linear` is the same kernel for one frozen weight multiplied outside a module call: the output layer of
the packed scoring passes (train/fast/packed_logps.py), whose logits and gradient products at 128-512 rows are
its slowest matmuls in nn.Linear's kernel.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# The row count the weight layout is chosen for; measured to change nothing between 1 and 512 rows.
_PACK_ROWS = 8
Key = tuple[Any, ...]  # what a packed copy was made from: each tensor's identity and version, LoRA scalings


def _kernel() -> bool:
    """Whether this torch build has oneDNN's packed linear kernel."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def available(model: nn.Module) -> bool:
    """Whether the packed kernel can serve this model: on a CPU with oneDNN."""
    if not _kernel():
        return False
    param = next(model.parameters(), None)
    return param is not None and param.device.type == "cpu"


def _plain(weight: torch.Tensor) -> bool:
    """A whole float32 weight in this process: not a ZeRO-3 placeholder, an FSDP shard or a quantized one."""
    return (
        weight.dtype == torch.float32 and weight.numel() > 0 and type(weight.data) is torch.Tensor
        and not hasattr(weight, "ds_id")
    )  # fmt: skip


def _tensor_key(*tensors: torch.Tensor) -> Key:
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors)


@dataclass
class _Target:
    """A layer that runs packed: its weight (made on demand), bias, and what the weight is made from."""

    module: nn.Module
    weight: Callable[[], torch.Tensor]
    bias: torch.Tensor | None
    key: Key
    nbytes: int


def _dropout_on(layer: nn.Module, adapter: str) -> bool:
    dropout = layer.lora_dropout[adapter] if adapter in layer.lora_dropout else None
    return layer.training and isinstance(dropout, nn.Dropout) and dropout.p > 0


def _lora_target(layer: nn.Module) -> _Target | None:
    """A plain, active, unmerged peft LoRA layer on its merged weight; None for any other layer, which then keeps
    its own forward (its base layer can still run packed)."""
    base = getattr(layer, "base_layer", None)
    adapters_a = getattr(layer, "lora_A", None)
    if type(base) is not nn.Linear or not isinstance(adapters_a, nn.ModuleDict) or not _plain(base.weight):
        return None
    if layer.disable_adapters or layer.merged or getattr(layer, "fan_in_fan_out", False):
        return None
    active = [a for a in layer.active_adapters if a in adapters_a]
    variants = getattr(layer, "lora_variant", {}) or {}
    if not active or any(a in variants or getattr(layer, "use_dora", {}).get(a) for a in active):
        return None
    if any(_dropout_on(layer, a) for a in active):
        return None
    parts = [base.weight, *(t for a in active for t in (adapters_a[a].weight, layer.lora_B[a].weight))]
    # Scaling changes without touching a tensor (set_scale), so it is part of what the copy depends on.
    key = (*_tensor_key(*parts), *(float(layer.scaling[a]) for a in active))

    def merged() -> torch.Tensor:
        weight = base.weight.detach().clone()
        for a in active:
            weight += layer.get_delta_weight(a).to(weight.dtype)
        return weight

    return _Target(layer, merged, base.bias, key, base.weight.nbytes)


def _targets(model: nn.Module) -> Iterator[_Target]:
    """Every layer of the model that runs packed."""
    covered: set[int] = set()
    for module in model.modules():
        for holder in ("lora_A", "lora_B"):  # an adapter's own factors run inside their layer, or not at all
            if isinstance(getattr(module, holder, None), nn.ModuleDict):
                covered.update(id(m) for m in getattr(module, holder).modules())
        target = _lora_target(module)
        if target is not None:
            covered.add(id(module.base_layer))
            yield target
    for module in model.modules():
        if type(module) is nn.Linear and id(module) not in covered and _plain(module.weight):
            if not hasattr(module, "_hf_hook"):  # accelerate's hooks wrap forward themselves
                weight = module.weight
                yield _Target(module, weight.detach, module.bias, _tensor_key(weight), weight.nbytes)


class _PackedForward:
    """A module's forward on a packed weight; the module's own forward where the packed kernel does not apply:
    while gradients are recorded (a merged layer has no backward), on an input that is not float32, or under
    autocast."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None, own: Callable[..., torch.Tensor]):
        self.packed, self.own = packed, own
        self.bias = None if bias is None else bias.detach()

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or torch.is_grad_enabled() or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            return self.own(x, *args, **kwargs)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class PackedLinears:
    """Packed copies of a model's linear weights, swapped in for the duration of a `with` block (see the module
    docstring). `keep` holds the copies between blocks."""

    def __init__(self, model: nn.Module, keep: bool = True):
        self.model = model
        self.keep = keep
        self._copies: dict[int, tuple[Key, torch.Tensor]] = {}
        self._warned = False

    def _fits(self, targets: list[_Target]) -> bool:
        needed = sum(t.nbytes for t in targets if id(t.module) not in self._copies)
        if needed <= _available_bytes() // 4:
            return True
        if not self._warned:
            logger.info("sampling without packed weights: %.0f MB of copies would not fit", needed / 2**20)
            self._warned = True
        return False

    def _packed(self, target: _Target) -> torch.Tensor:
        held = self._copies.get(id(target.module))
        if held is not None and held[0] == target.key:
            return held[1]
        packed = torch.ops.mkldnn._reorder_linear_weight(target.weight().contiguous(), _PACK_ROWS)
        self._copies[id(target.module)] = (target.key, packed)
        return packed

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        # Checked at each block: a model built on a CPU may have moved to a GPU since.
        targets = list(_targets(self.model)) if available(self.model) else []
        if not targets or not self._fits(targets):
            yield
            return
        swapped: list[nn.Module] = []
        try:
            with torch.no_grad():
                for target in targets:
                    module = target.module
                    module.forward = _PackedForward(
                        self._packed(target), target.bias, type(module).forward.__get__(module)
                    )
                    swapped.append(module)
            yield
        finally:
            for module in swapped:
                module.__dict__.pop("forward", None)
            if not self.keep:
                self._copies.clear()


# Packed copies of frozen weights multiplied outside any module call (frozen_linear), the latest few kept.
_FROZEN: dict[tuple[int, bool], tuple[Key, torch.Tensor]] = {}
_FROZEN_KEPT = 4  # an output layer and its transpose, for the policy and a separate reference


def frozen_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, transposed: bool = False
) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, or `x @ weight` with `transposed`, for a weight that does not train, run where
    no gradient is recorded (an autograd Function's forward, a no-grad pass): on a CPU with oneDNN through a packed
    copy of the weight, kept between calls and made again when the weight changed. The output layer's matmuls in
    the scoring passes: 1.3-2.3x nn.Linear's at 128-512 rows (bench/README.md). Plain elsewhere."""
    if not _frozen_packable(x, weight):
        return x @ weight if transposed else F.linear(x, weight, bias)
    slot, key = (id(weight), transposed), _tensor_key(weight)
    held = _FROZEN.pop(slot, None)  # popped and put back: the dict's order is the order of use
    if held is None or held[0] != key:
        if weight.nbytes > _available_bytes() // 4:  # no room for a copy
            return x @ weight if transposed else F.linear(x, weight, bias)
        if held is None:
            weakref.finalize(weight, _FROZEN.pop, slot, None)  # the copy goes with its weight's model
        source = weight.detach().t() if transposed else weight.detach()
        held = (key, torch.ops.mkldnn._reorder_linear_weight(source.contiguous(), _PACK_ROWS))
    _FROZEN[slot] = held
    while len(_FROZEN) > _FROZEN_KEPT:
        del _FROZEN[next(iter(_FROZEN))]
    return torch.ops.mkldnn._linear_pointwise(x, held[1], None if bias is None else bias.detach(), "none", [], "")


def _frozen_packable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
        and _plain(weight) and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and _kernel()
    )  # fmt: skip


def packed_linears(model: nn.Module, enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """One block on copies packed for it and dropped after it (a policy that trains between blocks)."""
    return PackedLinears(model, keep=False)() if enabled else contextlib.nullcontext()
