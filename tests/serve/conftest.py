"""Fixtures of the server tests: a live server on the tiny glm4 model (tests/fixtures/live_server.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from live_server import LiveServer, selection, start_server  # noqa: E402


@pytest.fixture(scope="module")
def glm4_server(tiny_models: dict[str, Path]) -> Iterator[LiveServer]:
    """The tiny glm4 model (its answers differ per prompt) served under the name 'tiny'."""
    live = start_server([("tiny", selection(tiny_models["glm4"]))])
    yield live
    live.stop()
