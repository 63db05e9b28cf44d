"""Sampling defaults: given options, then the model folder's generation_config.json, then greedy decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunestack.config.infer import sampling_problems
from tunestack.infer.decoding import Sampling, resolve_sampling, sampling_defaults
from tunestack.model.builtin import BUILTIN_MODELS, write_card_sampling
from tunestack.model.ref import ModelRef

CARD = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}


def test_nothing_set_anywhere_is_greedy() -> None:
    assert resolve_sampling({}) == Sampling(False)
    assert resolve_sampling({"temperature": 0.6}) == Sampling(False)  # without do_sample, as generate() reads it


def test_the_model_folder_decides_when_no_option_is_given() -> None:
    assert resolve_sampling(CARD) == Sampling(True, temperature=0.2, top_p=0.9, top_k=50)
    assert resolve_sampling({**CARD, "top_k": 20, "repetition_penalty": 1.1}) == Sampling(
        True, temperature=0.2, top_p=0.9, top_k=20, repetition_penalty=1.1
    )


def test_options_win_over_the_model_folder() -> None:
    assert resolve_sampling(CARD, temperature=0) == Sampling(False)
    assert resolve_sampling(CARD, do_sample=False) == Sampling(False)
    assert resolve_sampling(CARD, temperature=0.7, top_k=0) == Sampling(True, temperature=0.7, top_p=0.9, top_k=0)
    # A temperature alone turns sampling on for a greedy folder; the folder's other values still apply.
    assert resolve_sampling({"top_p": 0.5}, temperature=1.2) == Sampling(True, temperature=1.2, top_p=0.5, top_k=50)
    assert resolve_sampling({}, repetition_penalty=1.3) == Sampling(False, repetition_penalty=1.3)


def test_sampling_problems_name_the_option() -> None:
    assert sampling_problems(-1, 2, -3, 0, None) == [
        "--temperature must be >= 0 (0 means greedy)",
        "--top_p must be in (0, 1]",
        "--top_k must be >= 0",
        "--repetition_penalty must be > 0",
    ]
    assert sampling_problems(0, None, None, None, True, prefix="") == ["do_sample true needs temperature > 0"]
    assert sampling_problems(None, None, None, None) == []


def test_defaults_come_from_the_newest_generation_config_of_the_stack(tmp_path: Path) -> None:
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    (base / "generation_config.json").write_text(json.dumps({**CARD, "eos_token_id": 2, "top_k": None}))
    assert sampling_defaults(ModelRef("base", base), None) == CARD
    (adapter / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "temperature": 0.8}))
    assert sampling_defaults(ModelRef("x", base, adapters=[adapter]), None) == {"temperature": 0.8}


def test_the_builtin_folder_gets_the_model_card_sampling_once(tmp_path: Path) -> None:
    spec = BUILTIN_MODELS["smollm2-135m-instruct"]
    assert spec.sampling == CARD
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"_from_model_config": True, "eos_token_id": 2}))
    write_card_sampling(tmp_path, spec)
    assert json.loads(path.read_text()) == {"eos_token_id": 2, **CARD}
    path.write_text(json.dumps({"eos_token_id": 2, "temperature": 0.5}))  # the user's own setting stays
    write_card_sampling(tmp_path, spec)
    assert json.loads(path.read_text()) == {"eos_token_id": 2, "temperature": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["generation_config.json"]


@pytest.mark.parametrize("flag", ["--temperature", "--top_p"])
def test_chat_flags_default_to_the_model(flag: str) -> None:
    from tunestack.config.infer import GenerationArguments

    options = GenerationArguments()
    assert options.temperature is None and options.top_p is None and options.top_k is None
    assert options.problems() == []
    bad = GenerationArguments(**{flag.lstrip("-"): -1.0})
    assert any(p.startswith(flag) for p in bad.problems())
