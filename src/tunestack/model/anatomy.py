"""Where the parts of a causal LM are, for transformers' own architectures and for remote code alike.

Remote-code models (ChatGLM, InternLM2, Baichuan ...) keep their vocabulary projection at paths of their own
(`transformer.output_layer`, `output`, a NormHead `lm_head`) and often define none of get/set_input_embeddings
or get_output_embeddings, so the library defaults find nothing. Here the input embedding is the model's
largest vocabulary-sized `nn.Embedding` and the output layer the module whose 2-D weight is vocabulary x hidden
(an nn.Linear or not), preferring the usual head names.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

# Leaf names of output heads across families (the vocabulary projection, or a scalar scorer).
OUTPUT_HEAD_NAMES = ("lm_head", "output_layer", "output", "embed_out")


def is_native(model_or_config: Any) -> bool:
    """Whether the class comes with transformers itself (not remote code, not a custom class)."""
    return type(model_or_config).__module__.startswith("transformers.models.")


def is_remote_code(model_or_config: Any) -> bool:
    """Whether the class was loaded from a model folder's own Python files (trust_remote_code)."""
    return type(model_or_config).__module__.startswith("transformers_modules.")


def library_accessor(model: nn.Module, name: str) -> Any:
    """model.<name>() when the class (or the library's default) answers; None when it cannot."""
    method = getattr(model, name, None)
    if method is None:
        return None
    try:
        return method()
    except (NotImplementedError, AttributeError):
        return None


def find_input_embeddings(model: nn.Module) -> tuple[str, nn.Embedding] | None:
    """(path, module) of the token embedding: the largest nn.Embedding (position tables are smaller)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    if not found:
        return None
    return max(found, key=lambda item: item[1].num_embeddings)


def find_output_layer(model: nn.Module, embedding: nn.Module | None = None) -> tuple[str, nn.Module] | None:
    """(path, module) of the vocabulary projection: a module with a [vocabulary, hidden] weight that is not the input
    embedding, under a usual head name if there is one."""
    embedding = embedding if embedding is not None else (find_input_embeddings(model) or (None, None))[1]
    if embedding is None:
        return None
    shape = tuple(embedding.weight.shape)
    candidates = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if module is embedding or isinstance(module, nn.Embedding) or not isinstance(weight, nn.Parameter):
            continue
        if weight.dim() == 2 and weight.shape[1] == shape[1] and weight.shape[0] >= shape[0] - 64:
            candidates.append((name.rsplit(".", 1)[-1] not in OUTPUT_HEAD_NAMES, -weight.shape[0], name, module))
    if not candidates:
        return None
    _, _, name, module = min(candidates, key=lambda c: c[:3])
    return name, module


def input_embeddings(model: nn.Module) -> nn.Module | None:
    found = library_accessor(model, "get_input_embeddings")
    if found is not None:
        return found
    located = find_input_embeddings(model)
    return located[1] if located else None


def output_layer(model: nn.Module) -> nn.Module | None:
    found = library_accessor(model, "get_output_embeddings")
    if found is not None:
        return found
    located = find_output_layer(model, input_embeddings(model))
    return located[1] if located else None


def forward_parameters(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def takes_argument(model: nn.Module, name: str) -> bool:
    """Whether the forward of `model` (under a PEFT wrapper: of its base model) takes `name`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def takes_cache(model: nn.Module) -> bool:
    """Whether the forward takes transformers' `cache` (generation with a KV cache works through `generate`); code
    written for older transformers takes `past_key_values` tuples instead."""
    params = forward_parameters(model)
    return "cache" in params or "past_key_values" not in params


def untokenizable_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Output rows past the tokenizer's last token (ChatGLM pads its vocabulary beyond its tokenizer's; embeddings
    grown to a multiple of 8 do too): ids no text decodes to, which generation must not pick."""
    layer = output_layer(model)
    weight = getattr(layer, "weight", None)
    rows = int(weight.shape[0]) if weight is not None and weight.dim() == 2 else 0
    return list(range(len(tokenizer), rows))


SEQUENCE_FIRST = "_tunestack_sequence_first"  # set on a loaded model whose hidden states are [seq, batch, hidden]


def batch_first(model: nn.Module, hidden: Any) -> Any:
    """`hidden` ([batch, seq, hidden] or, for a sequence-first model such as ChatGLM, [seq, batch, hidden]) as
    [batch, seq, hidden]."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hidden.transpose(0, 1) if getattr(base, SEQUENCE_FIRST, False) else hidden
