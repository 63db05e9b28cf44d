"""Serving throughput: N concurrent clients asking for 64-token answers from the real SmolLM2-135M-Instruct.

Servers, each a subprocess on a free port of 127.0.0.1, measured in the same run:

  (a) `tunestack serve` (continuous batching: transformers' ContinuousBatchingManager)
  (b) one request at a time through `model.generate`, as MedicalGPT's openai_api.py serves
      (`tunestack serve --engine generate --max_concurrency 1`: the same HTTP layer, the decoding serialized)
  (c) `tunestack serve --engine generate` (the batched-generate engine, batches of up to 16)
  (d) `transformers serve --continuous-batching` on the same local folder (offline), when it runs

Every client streams one chat completion (temperature 0, max_tokens 64, a different question each) and all
start together. Reported per server: total output tokens/s (all clients' completion tokens over the wall
time from the first request sent to the last answer done), and p50 / p95 time to first token. Tokens are
counted by the server's `usage` where it sends one, else by the model's tokenizer on the streamed text.

    flock /tmp/tunestack-heavy.lock python bench/serve_throughput.py [--clients 16] [--max_tokens 64] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_line, machine_line  # noqa: E402

import tunestack.cli  # noqa: E402,F401  (the CLI's environment settings first, as the other benches do)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
TOPICS = [
    "the sea",
    "a lighthouse",
    "the heart",
    "a city at night",
    "an old doctor",
    "a mountain village",
    "the first snow",
    "a train journey",
    "a small robot",
    "the desert",
    "a library",
    "spring rain",
    "a lost cat",
    "the moon",
    "a market",
    "a river",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def servers(folder: Path, port: int, clients: int) -> dict[str, list[str]]:
    ts = [sys.executable, "-m", "tunestack", "serve", "--model", MODEL, "--port", str(port), "--log_interval", "0"]
    return {
        "tunestack serve (continuous batching)": [*ts, "--max_concurrency", str(clients)],
        "one request at a time (generate)": [*ts, "--engine", "generate", "--max_concurrency", "1"],
        "tunestack serve --engine generate": [*ts, "--engine", "generate", "--max_concurrency", str(clients)],
        "transformers serve --continuous-batching": [
            sys.executable,
            "-m",
            "transformers.cli.transformers",
            "serve",
            str(folder),
            "--continuous-batching",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
    }


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx2 as httpx  # the client library the installed openai package uses

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not answer in time")


def one_request(url: str, model: str, question: str, max_tokens: int, tokenizer: Any) -> dict[str, Any]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    sent = time.perf_counter()
    first, text, usage = None, "", None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                text += choice.delta.content
    done = time.perf_counter()
    tokens = usage if usage is not None else len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return {"sent": sent, "ttft": (first or done) - sent, "done": done, "tokens": tokens}


def load(url: str, model: str, clients: int, max_tokens: int, tokenizer: Any) -> dict[str, Any]:
    questions = [f"Write a long story about {TOPICS[i % len(TOPICS)]}." for i in range(clients)]
    results: list[dict[str, Any] | BaseException] = [None] * clients  # type: ignore[list-item]
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        barrier.wait()
        try:
            results[i] = one_request(url, model, questions[i], max_tokens, tokenizer)
        except BaseException as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {clients} requests failed: {failed[0]!r}")
    start = min(r["sent"] for r in results)
    wall = max(r["done"] for r in results) - start
    tokens = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": p95,
    }


def measure(name: str, argv: list[str], url: str, model: str, args: argparse.Namespace, tokenizer: Any) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    log = open(args.work / f"{abs(hash(name))}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(url, proc)
        one_request(url, model, "Say hello.", 8, tokenizer)  # warm-up
        rounds = [load(url, model, args.clients, args.max_tokens, tokenizer) for _ in range(args.rounds)]
        best = max(rounds, key=lambda r: r["tokens_per_s"])
        return {"server": name, **best, "rounds": rounds}
    except Exception as exc:
        return {"server": name, "error": f"{type(exc).__name__}: {exc}", "log": log.name}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="load rounds per server; the best is reported")
    parser.add_argument("--only", default=None, help="comma-separated prefixes of the server names to run")
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 1) - 1),
        help="torch threads of each server (default: the cores less one, tunestack serve's own default)",
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tunestack-bench-serve")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    from tunestack.model.builtin import builtin_model_dir

    folder = builtin_model_dir(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    print(f"machine: {machine_line()}; servers use {args.threads} torch threads; {load_line()}")  # noqa: T201
    rows = []
    port = free_port()
    for name, argv in servers(folder, port, args.clients).items():
        if args.only and not any(name.startswith(p) for p in args.only.split(",")):
            continue
        model = str(folder) if name.startswith("transformers") else MODEL
        row = measure(name, argv, f"http://127.0.0.1:{port}", model, args, tokenizer)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "rounds"}))  # noqa: T201
    base = next((r for r in rows if r["server"].startswith("one request") and "error" not in r), None)
    print(f"\n{args.clients} clients x {args.max_tokens}-token answers, SmolLM2-135M-Instruct, float32; {load_line()}")  # noqa: T201
    print("| server | output tokens/s | x one-at-a-time | TTFT p50 | TTFT p95 | tokens | wall |")  # noqa: T201
    print("|---|---|---|---|---|---|---|")  # noqa: T201
    for r in rows:
        if "error" in r:
            print(f"| {r['server']} | did not run: {r['error']} | | | | | |")  # noqa: T201
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        print(
            f"| {r['server']} | {r['tokens_per_s']:.1f} | {ratio} | {r['ttft_p50']:.2f} s | {r['ttft_p95']:.2f} s "  # noqa: T201
            f"| {r['tokens']} | {r['wall_s']:.1f} s |"
        )


if __name__ == "__main__":
    main()
