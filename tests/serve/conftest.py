"""A live `tunestack serve` app on a free port of 127.0.0.1, in a thread of the test process (uvicorn)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")


@dataclass
class LiveServer:
    url: str
    models: dict[str, Any]
    server: Any
    thread: threading.Thread
    app: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def client(self, key: str = "unused", **kwargs: Any) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        for model in self.models.values():
            model.engine.stop()


def start_server(
    pairs: list[tuple[str, Any]],
    *,
    engine: str = "auto",
    max_concurrency: int = 4,
    max_queue: int = 4,
    options: Any = None,
    limits: Any = None,
    reward: Any = None,
    **app_kwargs: Any,
) -> LiveServer:
    import uvicorn

    from tunestack.infer.generate import GenerationArguments
    from tunestack.serve.app import create_app
    from tunestack.serve.generation import Limits
    from tunestack.serve.models import load_models

    models = load_models(pairs, engine, max_concurrency, cache_tokens=4096)
    app = create_app(models, options or GenerationArguments(), limits or Limits(), capacity=max_concurrency + max_queue,
                     reward=reward, log_interval=0, **app_kwargs)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return LiveServer(f"http://127.0.0.1:{port}", models, server, thread, app)


def selection(model: Path | str, **kwargs: Any) -> Any:
    from tunestack.infer.generate import ModelSelection

    return ModelSelection(model=str(model), **kwargs)


@pytest.fixture(scope="module")
def glm4_server(tiny_models: dict[str, Path]) -> Iterator[LiveServer]:
    """The tiny glm4 model (its answers differ per prompt) served under the name 'tiny'."""
    live = start_server([("tiny", selection(tiny_models["glm4"]))])
    yield live
    live.stop()
