"""Hugging Face causal LMs as GGUF: hyperparameter metadata and tensors laid out as llama.cpp's converter lays them.

The gguf package maps tensor names; the rest is the writer's job (llama.cpp keeps it in its conversion script):
- the `llama` architecture wants the rows of Q and K permuted: HF rotates the two halves of each head, llama.cpp
  rotates interleaved pairs (Qwen2 / Qwen3 use the HF layout as is);
- Llama-3-style RoPE is a `rope_freqs` tensor of per-dimension divisors of the base frequencies; linear and YaRN
  scaling are metadata keys; other RoPE variants have no GGUF form here and are refused;
- the model's hyperparameters become `<arch>.*` keys (`rope.dimension_count` included).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tunestack.errors import ModelError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face `model_type` is written as GGUF."""

    gguf_arch: str  # a gguf.MODEL_ARCH member name
    permute_qk: bool  # llama.cpp's `llama` graph expects the interleaved RoPE row order
    key_length: bool = False  # write attention.key_length / value_length even when head_dim = hidden / heads


# Mistral is written as `llama`, as llama.cpp's converter does (same graph; Q/K permuted).
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("LLAMA", permute_qk=True),
    "mistral": Architecture("LLAMA", permute_qk=True),
    "qwen2": Architecture("QWEN2", permute_qk=False),
    "qwen3": Architecture("QWEN3", permute_qk=False, key_length=True),
}


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def architecture_of(config: Any) -> Architecture:
    """The GGUF layout of `config`'s model type; ModelError (exit 2) naming the supported ones otherwise."""
    model_type = getattr(text_config(config), "model_type", None)
    if any(name.endswith("ForSequenceClassification") for name in getattr(config, "architectures", None) or []):
        raise ModelError("a reward model (a sequence classifier) has no GGUF form; use --format safetensors")
    if model_type not in ARCHITECTURES:
        names = ", ".join(getattr(config, "architectures", None) or [str(model_type)])
        raise ModelError(
            f"GGUF export does not support the architecture '{model_type}' ({names}); "
            f"supported: {', '.join(ARCHITECTURES)}. `--format safetensors` exports any model"
        )
    return ARCHITECTURES[model_type]


def gguf_arch_name(arch: Architecture) -> str:
    import gguf

    return gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_arch]]


# ---------------------------------------------------------------------------------------------
# RoPE


@dataclass(frozen=True)
class Rope:
    theta: float
    kind: str  # default | linear | llama3 | yarn
    params: dict[str, Any]


_ROPE_KINDS = ("default", "linear", "llama3", "yarn")


def rope_of(config: Any) -> Rope:
    cfg = text_config(config)
    params = {**(getattr(cfg, "rope_scaling", None) or {}), **(getattr(cfg, "rope_parameters", None) or {})}
    kind = str(params.get("rope_type") or params.get("type") or "default").lower()
    theta = float(params.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0)
    if kind not in _ROPE_KINDS:
        raise ModelError(
            f"RoPE type '{kind}' has no GGUF form that tunestack writes (supported: {', '.join(_ROPE_KINDS)})"
        )
    return Rope(theta, kind, params)


def head_dim_of(config: Any) -> int:
    cfg = text_config(config)
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def llama3_rope_factors(config: Any) -> np.ndarray:
    """llama.cpp's `rope_freqs`: per rotary pair, the divisor of its base frequency under Llama-3 scaling
    (1 for short wavelengths, `factor` for long ones, a smooth blend between)."""
    rope = rope_of(config)
    p = rope.params
    dim = head_dim_of(config)
    factor = float(p.get("factor", 8.0))
    low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old_context = float(p.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    freqs = 1.0 / (rope.theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Metadata


def write_hyperparameters(writer: Any, config: Any, arch: Architecture) -> None:
    """The `<arch>.*` keys llama.cpp reads for these architectures."""
    import gguf

    cfg = text_config(config)
    heads = int(cfg.num_attention_heads)
    head_dim = head_dim_of(config)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or heads))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(int(cfg.vocab_size))
    writer.add_rope_dimension_count(head_dim)
    if arch.key_length or head_dim * heads != cfg.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = rope_of(config)
    writer.add_rope_freq_base(rope.theta)
    if rope.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope.params["factor"]))
    elif rope.kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope.params["factor"]))
        original = rope.params.get("original_max_position_embeddings")
        if original:
            writer.add_rope_scaling_orig_ctx_len(int(original))
        for key, add in (
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
            ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
        ):
            if rope.params.get(key) is not None:
                add(float(rope.params[key]))
    # llama3: no keys; the factors travel as the rope_freqs tensor (see model_tensors).
    if arch.gguf_arch == "QWEN2" and getattr(cfg, "use_sliding_window", False):
        logger.warning("this Qwen2 model uses sliding-window attention, which llama.cpp's qwen2 graph ignores")
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "model_type", "") == "mistral" else None
    if window and window < cfg.max_position_embeddings:
        logger.warning(
            "this Mistral model has a sliding window of %s tokens; llama.cpp attends to the whole context",
            cfg.sliding_window,
        )


# ---------------------------------------------------------------------------------------------
# Tensors


@dataclass
class SourceTensor:
    """One tensor to write: its GGUF name, numpy shape, and how to get its float32 values."""

    name: str
    shape: tuple[int, ...]
    values: Callable[[], np.ndarray]


def _permute_rows(weight: Any, n_head: int) -> Any:
    """HF's half-split RoPE row order -> llama.cpp's interleaved order, per head (weights and biases)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _float32(tensor: Any) -> np.ndarray:
    return tensor.detach().to("cpu").float().contiguous().numpy()


def model_tensors(model: Any, arch: Architecture) -> list[SourceTensor]:
    """Every tensor of the GGUF file for `model`, in llama.cpp's names, with values produced on demand."""
    import gguf

    cfg = text_config(model.config)
    n_blocks = int(cfg.num_hidden_layers)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch], n_blocks)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    state = model.state_dict()
    embed = model.get_input_embeddings().weight
    out_layer = model.get_output_embeddings()
    tied = out_layer is not None and out_layer.weight.data_ptr() == embed.data_ptr()
    out: list[SourceTensor] = []
    if rope_of(model.config).kind == "llama3":
        factors = llama3_rope_factors(model.config)
        out.append(
            SourceTensor(
                gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.shape, lambda f=factors: f
            )
        )
    unmapped = []
    for key, tensor in state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reuses token_embd as the output layer when there is no output.weight
        name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            unmapped.append(key)
            continue
        permute = 0
        if arch.permute_qk and ".attn_q." in name:
            permute = heads
        elif arch.permute_qk and ".attn_k." in name:
            permute = kv_heads
        out.append(SourceTensor(name, tuple(tensor.shape), _producer(tensor, permute)))
    if unmapped:
        shown = ", ".join(unmapped[:5]) + (f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else "")
        raise ModelError(f"GGUF export: no GGUF name for the tensors {shown} of this {cfg.model_type} model")
    return out


def _producer(tensor: Any, permute_heads: int) -> Callable[[], np.ndarray]:
    def values() -> np.ndarray:
        data = tensor.detach()
        if permute_heads:
            data = _permute_rows(data, permute_heads)
        return _float32(data)

    return values
