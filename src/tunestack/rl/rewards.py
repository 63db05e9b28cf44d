"""Reward functions for RL: a tunestack reward model, Python functions given as `module:function`, or the built-in
accuracy reward against each prompt's reference answer (the default for question/answer data).

Every reward function has TRL's signature: f(prompts: list[str], completions: list[str], **kw) -> list[float];
`answer` (a list, one reference answer or None per prompt) comes as a keyword.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
import unicodedata
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

    def __init__(self, reference: str, batch_size: int = 8, device: Any = None, trust_remote_code: bool = False):
        from tunestack.model.reward import load_reward_model
        from tunestack.train.fast.packed_scores import use_packed_scores

        self.model, self.tokenizer, _ = load_reward_model(reference, trust_remote_code=trust_remote_code)
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


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_TRAILING = " \t\n.。!！?？,，;；:：'\"“”‘’"


def extract_answer(text: str) -> str:
    """The answer part of a completion: inside the last <answer>...</answer>, else after the last '####',
    else the whole text."""
    tagged = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if tagged:
        return tagged[-1].strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    return text.strip()


def _number(text: str) -> float | None:
    cleaned = text.strip().replace("$", "").replace("%", "").replace(",", "")
    try:
        return float(cleaned)
    except ValueError:
        return None


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return re.sub(r"\s+", " ", text).strip(_TRAILING)


def answer_matches(completion: str, reference: str) -> bool:
    """Whether `completion` answers `reference` (see accuracy_reward)."""
    gold = extract_answer(reference)
    pred = extract_answer(completion)
    gold_number = _number(gold)
    if gold_number is not None:
        found = _NUMBER.findall(pred)
        value = _number(found[-1]) if found else None
        return value is not None and abs(value - gold_number) <= 1e-6 * max(1.0, abs(gold_number))
    return _normalise(pred) == _normalise(gold)


def accuracy_reward(prompts: list[str], completions: list[Any], answer: list[Any] | None = None, **_: Any) -> list[float]:
    """1.0 when a completion answers its prompt's reference `answer`, else 0.0 (also for prompts without one).

    The answer part of a completion is what is inside <answer>...</answer>, else what follows '####', else the
    whole completion (the same for the reference). A numeric reference is compared with the last number of the
    completion's answer; text is compared without case, repeated spaces and final punctuation.
    """
    references = list(answer) if answer is not None else [None] * len(completions)
    out = []
    for completion, reference in zip(completions, references, strict=True):
        if isinstance(completion, list):  # TRL's conversational completions
            completion = "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
        ok = reference is not None and str(reference).strip() and answer_matches(str(completion), str(reference))
        out.append(1.0 if ok else 0.0)
    return out


BUILTIN_REWARDS: dict[str, RewardFn] = {"accuracy": accuracy_reward}


def build_reward_functions(
    reward_model: str | None, reward_funcs: str | None, trust_remote_code: bool = False
) -> list[RewardFn]:
    functions: list[RewardFn] = []
    if reward_model:
        functions.append(RewardModelFunction(reward_model, trust_remote_code=trust_remote_code))
    for spec in (reward_funcs or "").split(","):
        if spec.strip() in BUILTIN_REWARDS:
            functions.append(BUILTIN_REWARDS[spec.strip()])
        elif spec.strip():
            functions.append(import_reward_function(spec.strip()))
    if not functions:
        raise ConfigError(NO_REWARD)
    return functions


NO_REWARD = (
    "RL needs a reward: --reward_model DIR and/or --reward_funcs module:function (question/answer records get the "
    "accuracy reward by default)"
)


def default_reward_funcs(reward_model: str | None, reward_funcs: str | None, answers: list[str | None]) -> str | None:
    """--reward_funcs, or 'accuracy' when no reward is given and every prompt has a reference answer."""
    if reward_model or reward_funcs:
        return reward_funcs
    missing = sum(a is None for a in answers)
    if answers and not missing:
        return "accuracy"
    detail = f"; {missing} of {len(answers)} prompts have no answer" if answers else ""
    raise ConfigError(NO_REWARD + detail)


def total_reward(functions: list[RewardFn], prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    totals = [0.0] * len(prompts)
    for fn in functions:
        for i, value in enumerate(fn(prompts=prompts, completions=completions, **kwargs)):
            totals[i] += float(value)
    return totals
