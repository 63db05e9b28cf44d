"""Reward functions for RL: a tunestack reward model, or Python functions given as `module:function`.

Every reward function has TRL's signature: f(prompts: list[str], completions: list[str], **kw) -> list[float].
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunestack.errors import ConfigError

RewardFn = Callable[..., list[float]]


def import_reward_function(spec: str) -> RewardFn:
    """`package.module:function` (or `path/to/file.py:function`) -> the callable."""
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ConfigError(f"--reward_funcs {spec}: expected module:function, e.g. mypkg.rewards:length_penalty")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            # A name of its own, so that a rewards file called json.py or random.py shadows no module.
            unique = f"tunestack_reward_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}_{path.stem}"
            spec_obj = importlib.util.spec_from_file_location(unique, path)
            if spec_obj is None or spec_obj.loader is None:
                raise ImportError(module_name)
            module = importlib.util.module_from_spec(spec_obj)
            sys.modules[unique] = module
            spec_obj.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, FileNotFoundError) as exc:
        raise ConfigError(f"--reward_funcs {spec}: cannot import {module_name} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"--reward_funcs {spec}: {module_name} has no function {attr}")
    return fn


class RewardModelFunction:
    """A trained tunestack reward model as a reward function over (prompt text, completion text). A
    sequence-classification model scores each batch as one padding-free packed row with per-sample attention
    (train/fast/packed_scores.py: the padded scores exactly)."""

    def __init__(self, reference: str, batch_size: int = 8, device: Any = None):
        from tunestack.model.reward import load_reward_model
        from tunestack.train.fast.packed_scores import use_packed_scores

        self.model, self.tokenizer, _ = load_reward_model(reference)
        if device is not None:
            self.model.to(device)
        self.model.eval()
        use_packed_scores(self.model)
        self.batch_size = batch_size
        self.__name__ = f"reward_model:{Path(reference).name}"

    def __call__(self, prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        from tunestack.model.reward import score_texts
        from tunestack.train.fast.varlen import varlen_attention

        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        with varlen_attention(self.model):
            return score_texts(self.model, self.tokenizer, texts, batch_size=self.batch_size)


def build_reward_functions(reward_model: str | None, reward_funcs: str | None) -> list[RewardFn]:
    functions: list[RewardFn] = []
    if reward_model:
        functions.append(RewardModelFunction(reward_model))
    for spec in (reward_funcs or "").split(","):
        if spec.strip():
            functions.append(import_reward_function(spec.strip()))
    if not functions:
        raise ConfigError("RL needs a reward: --reward_model DIR and/or --reward_funcs module:function")
    return functions


def total_reward(functions: list[RewardFn], prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    totals = [0.0] * len(prompts)
    for fn in functions:
        for i, value in enumerate(fn(prompts=prompts, completions=completions, **kwargs)):
            totals[i] += float(value)
    return totals
