"""Reward models: build one for training, load a trained one, score texts with it.

Two heads, recorded in the rm output's run.json as ``reward_head``:

* ``sequence_classification``: transformers' ``AutoModelForSequenceClassification`` (num_labels=1) for
  architectures that have one (Llama, Qwen2, Mistral, Gemma, GLM-4 ...). It scores the rightmost
  non-pad token.
* ``value_head``: `ValueHeadModel`, a Linear(hidden, 1) on the last real token of any causal LM
  (ChatGLM-style remote code, custom models).

`load_reward_model(reference) -> (model, tokenizer, template)` loads either (adapter merged) for `tunestack
score` and the RL stage; `score_texts` / `score_ids` / `score_responses` turn sequences into scalar rewards.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tunestack.data.formats import Message
from tunestack.errors import ConfigError, ModelError
from tunestack.model.adapters import adapter_task_type, stack_adapters
from tunestack.model.load import load_model, load_tokenizer
from tunestack.model.ref import resolve_model
from tunestack.model.value_head import ValueHeadModel

logger = logging.getLogger(__name__)

SEQUENCE_CLASSIFICATION = "sequence_classification"
VALUE_HEAD = "value_head"


def has_sequence_classifier(config: Any, trust_remote_code: bool = False) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    if type(config) in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        return True
    auto_map = getattr(config, "auto_map", None) or {}
    return bool(trust_remote_code and "AutoModelForSequenceClassification" in auto_map)


def reward_head_for(config: Any, requested: str = "auto", trust_remote_code: bool = False) -> str:
    """The head to train: sequence classification when the architecture has it (or was asked), else a value head."""
    available = has_sequence_classifier(config, trust_remote_code)
    if requested == SEQUENCE_CLASSIFICATION and not available:
        raise ConfigError(
            f"--reward_head sequence_classification: {type(config).__name__} has no AutoModelForSequenceClassification "
            "class; use --reward_head value_head (or auto)"
        )
    if requested in (SEQUENCE_CLASSIFICATION, VALUE_HEAD):
        return requested
    return SEQUENCE_CLASSIFICATION if available else VALUE_HEAD


class SequenceClassifierLoader:
    """Stands in for a model class in `load_model`: AutoModelForSequenceClassification with one label and a pad id."""

    def __init__(self, pad_token_id: int | None):
        self.pad_token_id = pad_token_id

    def from_pretrained(self, path: Any, **kwargs: Any) -> Any:
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the new head is "missing from the checkpoint": expected, not news
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
        if self.pad_token_id is not None:
            model.config.pad_token_id = self.pad_token_id
        return model


def build_reward_model(ref: Any, model_args: Any, tokenizer: Any, head: str) -> Any:
    """A reward model to train on top of `ref` (every adapter of `ref` merged): a classifier or a value head."""
    if head == VALUE_HEAD:
        return ValueHeadModel(load_model(ref, model_args, tokenizer=tokenizer))
    loader = SequenceClassifierLoader(tokenizer.pad_token_id)
    return load_model(ref, model_args, model_class=loader, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------
# Loading a trained reward model


def load_reward_model(
    reference: str | Path, torch_dtype: str = "auto", trust_remote_code: bool = False, device: Any = None
) -> tuple[Any, Any, Any]:
    """(model in eval mode, tokenizer, chat template or None) of a tunestack rm output folder (LoRA or full,
    sequence classification or value head) or of any sequence-classification model folder."""
    from tunestack.config.model import ModelArguments
    from tunestack.data.templates import get_template

    ref = resolve_model(str(reference))
    run_info = ref.run_info or {}
    head = run_info.get("reward_head", SEQUENCE_CLASSIFICATION)
    if run_info.get("stage") not in (None, "rm"):
        raise ModelError(
            f"{reference}: a {run_info.get('stage')} output, not a reward model (train one with tunestack rm)"
        )
    args = ModelArguments(torch_dtype=torch_dtype, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(ref, trust_remote_code=trust_remote_code)
    own_adapter = ref.adapters[-1] if ref.adapters and adapter_task_type(ref.adapters[-1]) == "SEQ_CLS" else None
    earlier = dataclasses.replace(ref, adapters=ref.adapters[:-1] if own_adapter else ref.adapters)
    if head == VALUE_HEAD:
        model: Any = ValueHeadModel(load_model(earlier, args, tokenizer=tokenizer))
        if own_adapter is None:
            model.load_head(ref.head_dir)
    else:
        model = build_reward_model(earlier, args, tokenizer, SEQUENCE_CLASSIFICATION)
    if own_adapter is not None:
        model = stack_adapters(model, [own_adapter])
    if device is not None:
        model.to(device)
    model.eval()
    template = None
    if getattr(tokenizer, "chat_template", None):
        template = get_template(None, tokenizer)
    return model, tokenizer, template


# ---------------------------------------------------------------------------------------------
# Scoring


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_ids(model: Any, sequences: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 8) -> list[float]:
    """Scalar scores of token sequences (right padded in batches of `batch_size`)."""
    was_training = model.training
    model.eval()
    device = _device(model)
    scores: list[float] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        longest = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), longest), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), longest), dtype=torch.long)
        for i, seq in enumerate(chunk):
            ids[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[i, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        scores.extend(float(v) for v in logits[:, 0].float().cpu())
    model.train(was_training)
    return scores


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return pad


def _keep_last(ids: list[int], max_length: int | None) -> list[int]:
    return ids[-max_length:] if max_length and len(ids) > max_length else ids


def score_texts(
    model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 8, max_length: int | None = None
) -> list[float]:
    """Scores of full rendered texts (prompt in the chat template + answer + stop token).

    Special tokens in the text become their ids and the tokenizer's automatic BOS is added once, as in training.
    """
    from tunestack.data.supervised import auto_bos_id

    bos = auto_bos_id(tokenizer)
    sequences = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if bos is not None and not (ids and ids[0] == bos):
            ids = [bos, *ids]
        sequences.append(_keep_last(ids, max_length))
    return score_ids(model, sequences, _pad_id(tokenizer), batch_size)


def score_responses(
    model: Any,
    tokenizer: Any,
    template: Any,
    prompts: Sequence[tuple[Any, ...]],
    responses: Sequence[str | Message],
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[float]:
    """Scores of answers to (system, prompt turns[, tools]) prompts, tokenized exactly as the reward model was
    trained; an answer is a text or an assistant message (which may call tools)."""
    from tunestack.data.preference_encoding import PreferenceEncoder, PreferenceLimits

    limits = PreferenceLimits(max_source_length=1 << 30, max_target_length=1 << 30)
    encoder = PreferenceEncoder(tokenizer, template, limits)
    sequences = []
    for (system, prompt, *rest), response in zip(prompts, responses, strict=True):
        tools = rest[0] if rest else ()
        ids = encoder.prompt_ids(system, prompt, tools)[0] + encoder.answer_ids(system, prompt, response, tools)
        sequences.append(_keep_last(ids, max_length))
    return score_ids(model, sequences, _pad_id(tokenizer), batch_size)
