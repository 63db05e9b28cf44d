"""What decodes an answer of a model folder: the sampling its author set and the tokens that end an answer.

Sampling comes from the options given (flags, a request), then from the newest generation_config.json of the
stack (do_sample, temperature, top_p, top_k, repetition_penalty), then conservative greedy decoding. The stop
ids are the newest generation_config.json's eos_token_id(s), the tokenizer's EOS and a named template's stops.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tunestack.errors import ModelError
from tunestack.model.ref import ModelRef

SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


@dataclass(frozen=True)
class Sampling:
    """The decoding of one answer, every value resolved: greedy when `do_sample` is false."""

    do_sample: bool
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0


def resolve_sampling(
    defaults: Mapping[str, Any],
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    do_sample: bool | None = None,
) -> Sampling:
    """Given options first, then the model's generation_config.json (`defaults`), then conservative decoding.

    A temperature given without do_sample decides it (0: greedy, > 0: sampling); with neither given the model
    folder decides, and a folder that says nothing means greedy decoding. Unset values of a sampling model take
    transformers' defaults (temperature 1, top_p 1, top_k 50), as `generate` would.
    """
    if do_sample is None:
        do_sample = temperature > 0 if temperature is not None else bool(defaults.get("do_sample") or False)
    penalty = repetition_penalty if repetition_penalty is not None else defaults.get("repetition_penalty")
    penalty = float(penalty) if penalty is not None else 1.0
    if not do_sample or temperature == 0:
        return Sampling(False, repetition_penalty=penalty)

    def pick(given: Any, key: str, fallback: Any) -> Any:
        value = given if given is not None else defaults.get(key)
        return fallback if value is None else value

    return Sampling(
        True,
        temperature=float(pick(temperature, "temperature", 1.0)) or 1.0,
        top_p=float(pick(top_p, "top_p", 1.0)),
        top_k=int(pick(top_k, "top_k", 50)),
        repetition_penalty=penalty,
    )


def _newest_generation_config(ref: ModelRef) -> tuple[dict[str, Any] | None, Any]:
    """(contents, path) of the newest generation_config.json in the stack, adapters first; (None, None) if none."""
    for folder in [*reversed(ref.adapters), ref.base_dir]:
        path = folder / "generation_config.json"
        if path.exists():
            try:
                return json.loads(path.read_text()), path
            except json.JSONDecodeError as exc:
                raise ModelError(f"{path}: corrupt ({exc.msg})") from None
    return None, None


def sampling_defaults(ref: ModelRef, model: Any) -> dict[str, Any]:
    """The sampling the model's author set: do_sample, temperature, top_p, top_k, repetition_penalty when present."""
    config, _ = _newest_generation_config(ref)
    if config is None:
        loaded = getattr(model, "generation_config", None)
        config = {k: getattr(loaded, k, None) for k in SAMPLING_KEYS} if loaded is not None else {}
    return {k: config[k] for k in SAMPLING_KEYS if config.get(k) is not None}


def stop_token_ids(ref: ModelRef, model: Any, tokenizer: Any, extra: Sequence[int] = ()) -> list[int]:
    """Ids that end an answer: the newest generation_config.json's eos_token_id(s), the tokenizer's EOS, `extra`."""
    config, _ = _newest_generation_config(ref)
    if config is not None:
        eos = config.get("eos_token_id")
    else:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    ids += [tokenizer.eos_token_id, *extra]
    return [int(i) for i in dict.fromkeys(ids) if i is not None]
