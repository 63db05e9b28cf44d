"""Capacity (429), a client that goes away (its slot is free at once), the request timeout, keys, the bind rule."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from live_server import selection, start_server

from tunestack.serve.generation import Limits

try:
    import httpx2 as httpx
except ImportError:
    import httpx

SRC = str(Path(__file__).resolve().parents[2] / "src")
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 8, "stream": True}


@pytest.fixture(scope="module")
def one_slot(tiny_models):
    """Room for one request in flight, a 3 s request timeout."""
    live = start_server(
        [("tiny", selection(tiny_models["glm4"]))], max_concurrency=1, max_queue=0, limits=Limits(request_timeout=3)
    )
    yield live
    live.stop()


def in_flight(live) -> int:
    return httpx.get(f"{live.url}/health").json()["in_flight"]


def wait_for(condition, timeout: float = 5.0) -> float:
    started = time.perf_counter()
    while not condition():
        assert time.perf_counter() - started < timeout, "condition not reached in time"
        time.sleep(0.02)
    return time.perf_counter() - started


def test_over_capacity_is_429_and_a_disconnect_frees_the_slot(one_slot) -> None:
    engine = one_slot.models["tiny"].engine
    client = one_slot.client()
    with engine.manager.pause():  # the decoding loop holds still: the first request keeps its slot
        with httpx.stream("POST", f"{one_slot.url}/v1/chat/completions", json=BODY, timeout=30) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk; no token yet
            assert in_flight(one_slot) == 1 and len(engine.jobs) == 1
            with pytest.raises(openai.RateLimitError) as err:
                client.chat.completions.create(model="tiny", messages=BODY["messages"], max_tokens=4)
            assert err.value.status_code == 429 and err.value.code == "rate_limit_exceeded"
            assert err.value.body["message"] == "the server is at capacity (1 requests in flight); retry shortly"
        # The client went away mid-stream: its slot and its decoding job are given back within a poll.
        assert wait_for(lambda: in_flight(one_slot) == 0) < 1.0
        assert engine.jobs == {}
        with httpx.stream("POST", f"{one_slot.url}/v1/chat/completions", json=BODY, timeout=30) as second:
            assert second.status_code == 200
    wait_for(lambda: in_flight(one_slot) == 0)
    reply = client.chat.completions.create(model="tiny", messages=BODY["messages"], max_tokens=4, temperature=0)
    assert reply.choices[0].message.content is not None


def test_a_request_past_its_timeout_is_504_and_frees_its_slot(one_slot) -> None:
    engine = one_slot.models["tiny"].engine
    with engine.manager.pause():
        started = time.perf_counter()
        response = httpx.post(f"{one_slot.url}/v1/chat/completions", json={**BODY, "stream": False}, timeout=30)
        assert 3 <= time.perf_counter() - started < 6
    assert response.status_code == 504
    assert response.json()["error"] == {
        "message": "no answer within 3s (--request_timeout)",
        "type": "timeout_error",
        "param": None,
        "code": "timeout",
    }
    assert in_flight(one_slot) == 0 and engine.jobs == {}


def test_keys_are_required_when_set(tiny_models) -> None:
    live = start_server([("tiny", selection(tiny_models["glm4"]))], api_keys=["s3cret"], engine="generate")
    try:
        with pytest.raises(openai.AuthenticationError) as err:
            live.client(key="wrong").models.list()
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
        response = httpx.get(f"{live.url}/v1/models")
        assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"
        assert [m.id for m in live.client(key="s3cret").models.list()] == ["tiny"]
        assert httpx.get(f"{live.url}/health").status_code == 200  # the page and health need no key
        assert "tunestack" in httpx.get(f"{live.url}/").text
    finally:
        live.stop()


def serve_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    env.pop("TUNESTACK_API_KEY", None) if "TUNESTACK_API_KEY" not in (env or {}) else None
    return subprocess.run(
        [sys.executable, "-m", "tunestack", "serve", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_another_host_without_a_key_refuses_to_start() -> None:
    proc = serve_cli("--host", "0.0.0.0", "--model", "/no/such/model")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "tunestack serve: error: --host 0.0.0.0 is reachable from other machines: give --api_key "
        "(or TUNESTACK_API_KEY), or bind 127.0.0.1"
    ]
    proc = serve_cli("--server_name", "0.0.0.0", "--share", "--backend", "vllm")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--share: tunestack never opens a public tunnel" in proc.stderr


def test_backend_vllm_is_guarded() -> None:
    proc = serve_cli("--backend", "vllm", "--model", "/no/such/model")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        assert "--backend vllm: vLLM is not installed" in proc.stderr
    else:
        assert "--backend vllm" in proc.stderr
