"""What remote code written for another transformers lacks, given once at load time, so every library that
takes the model (PEFT, the Trainer, TRL, generation) finds what it asks of any model:

* get/set_input_embeddings and get/set_output_embeddings, where the class has none (model/anatomy.py finds
  the parts): ChatGLM's classes raise `get_input_embeddings not auto-handled` without them;
* whether its hidden states are sequence-first (ChatGLM's are [seq, batch, hidden]), for value heads;
* generation without transformers' KV cache when the forward predates it (`past_key_values` tuples):
  `generate` would hand it a `cache` argument it does not take;
* a tokenizer `_pad` without the `padding_side` argument (transformers before 4.45), which transformers now
  passes on every encode (ChatGLM's `_pad() got an unexpected keyword argument 'padding_side'`): the
  tokenizer's own `_pad` still runs (with its own extra inputs, such as ChatGLM's position ids), and a side
  it does not pad on is padded here.
"""

from __future__ import annotations

import inspect
import logging
import types
from typing import Any

from torch import nn

from tunestack.model.anatomy import (
    SEQUENCE_FIRST,
    find_input_embeddings,
    find_output_layer,
    is_native,
    library_accessor,
    takes_cache,
)

logger = logging.getLogger(__name__)

_INPUT_PATH = "_tunestack_input_embeddings"
_OUTPUT_PATH = "_tunestack_output_embeddings"


def _get_input(self: nn.Module) -> nn.Module:
    return self.get_submodule(getattr(self, _INPUT_PATH))


def _set_input(self: nn.Module, value: nn.Module) -> None:
    _replace(self, getattr(self, _INPUT_PATH), value)


def _get_output(self: nn.Module) -> nn.Module:
    return self.get_submodule(getattr(self, _OUTPUT_PATH))


def _set_output(self: nn.Module, value: nn.Module) -> None:
    _replace(self, getattr(self, _OUTPUT_PATH), value)


def _replace(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, value)


def complete_model(model: Any) -> Any:
    """`model` (as loaded) with the embedding accessors and generation settings it lacks; native models unchanged."""
    if is_native(model) or not isinstance(model, nn.Module):
        return model
    added = _add_embedding_accessors(model)
    if added:
        logger.info("%s: found %s (the class does not say where they are)", type(model).__name__, ", ".join(added))
    if _runs_sequence_first(model):
        logger.info("%s: its hidden states are sequence-first", type(model).__name__)
        setattr(model, SEQUENCE_FIRST, True)
    generation = getattr(model, "generation_config", None)
    if generation is not None and not takes_cache(model) and generation.use_cache is not False:
        logger.info("%s: its code predates transformers' cache; generating without one", type(model).__name__)
        generation.use_cache = False
    return model


def _runs_sequence_first(model: nn.Module) -> bool:
    """Whether the model's hidden states come [seq, batch, hidden] (ChatGLM): told apart on a 1 x 2 probe."""
    import torch

    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            out = model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device), output_hidden_states=True,
                        use_cache=False)  # fmt: skip
    except Exception:  # noqa: BLE001 - the probe is optional; a model it cannot run is left as it is
        return False
    hidden = getattr(out, "hidden_states", None)
    return bool(hidden) and tuple(hidden[-1].shape[:2]) == (2, 1)


def _add_embedding_accessors(model: nn.Module) -> list[str]:
    added = []
    embedding = library_accessor(model, "get_input_embeddings")
    if embedding is None:
        located = find_input_embeddings(model)
        if located is None:
            return added
        embedding = located[1]
        for owner, prefix in _owners(model, located[0]):
            setattr(owner, _INPUT_PATH, located[0][len(prefix) :])
            owner.get_input_embeddings = types.MethodType(_get_input, owner)
            owner.set_input_embeddings = types.MethodType(_set_input, owner)
        added.append(f"the input embeddings at {located[0]}")
    if library_accessor(model, "get_output_embeddings") is None:
        located = find_output_layer(model, embedding)
        if located is not None:
            setattr(model, _OUTPUT_PATH, located[0])
            model.get_output_embeddings = types.MethodType(_get_output, model)
            model.set_output_embeddings = types.MethodType(_set_output, model)
            added.append(f"the output layer at {located[0]}")
    return added


def _owners(model: nn.Module, path: str) -> list[tuple[nn.Module, str]]:
    """The model and its base model (when the path runs through it), each with the path prefix to strip."""
    owners = [(model, "")]
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if (
        isinstance(base, nn.Module)
        and path.startswith(prefix + ".")
        and library_accessor(base, "get_input_embeddings") is None
    ):
        owners.append((base, prefix + "."))
    return owners


# ---------------------------------------------------------------------------------------------
# Tokenizers


def fix_tokenizer_pad(tokenizer: Any) -> Any:
    """Give a tokenizer whose `_pad` predates `padding_side` one that takes it (see the module docstring)."""
    pad = getattr(type(tokenizer), "_pad", None)
    if pad is None or getattr(getattr(tokenizer, "_pad", None), "__func__", None) is _pad_with_side:
        return tokenizer
    try:
        params = inspect.signature(pad).parameters
    except (TypeError, ValueError):
        return tokenizer
    if "padding_side" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return tokenizer
    logger.info("%s: its _pad predates padding_side; tunestack pads for it", type(tokenizer).__name__)
    tokenizer._pad = types.MethodType(_pad_with_side, tokenizer)  # a method: copies of the tokenizer keep it
    return tokenizer


def _pad_with_side(
    self: Any,
    encoded_inputs: Any,
    max_length: int | None = None,
    padding_strategy: Any = None,
    pad_to_multiple_of: int | None = None,
    padding_side: str | None = None,
    return_attention_mask: bool | None = None,
) -> Any:
    from transformers.utils import PaddingStrategy

    own = type(self)._pad
    strategy = padding_strategy if padding_strategy is not None else PaddingStrategy.DO_NOT_PAD
    side = padding_side or self.padding_side
    if side == self.padding_side:
        return own(self, encoded_inputs, max_length, strategy, pad_to_multiple_of, return_attention_mask)
    # Its own _pad adds its extra inputs (unpadded); the other side is padded here.
    encoded = own(self, encoded_inputs, None, PaddingStrategy.DO_NOT_PAD, None, return_attention_mask)
    return _pad_side(self, encoded, max_length, strategy, pad_to_multiple_of, side)


_PAD_VALUES = {"attention_mask": 0, "special_tokens_mask": 1, "position_ids": 0}


def _pad_side(tokenizer: Any, encoded: Any, max_length: int | None, strategy: Any, multiple: int | None, side: str):
    from transformers.utils import PaddingStrategy

    main = tokenizer.model_input_names[0]
    length = len(encoded[main])
    if strategy == PaddingStrategy.LONGEST or max_length is None:
        max_length = length
    if multiple and max_length % multiple:
        max_length = (max_length // multiple + 1) * multiple
    missing = max_length - length
    if strategy == PaddingStrategy.DO_NOT_PAD or missing <= 0:
        return encoded
    values = {main: tokenizer.pad_token_id, "token_type_ids": tokenizer.pad_token_type_id, **_PAD_VALUES}
    for key, value in list(encoded.items()):
        if isinstance(value, list) and len(value) == length and key in values:
            fill = [values[key]] * missing
            encoded[key] = value + fill if side == "right" else fill + value
    return encoded
