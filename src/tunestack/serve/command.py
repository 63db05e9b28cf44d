"""`tunestack serve`: an OpenAI-compatible API and a web chat page for any model tunestack can load.

    tunestack serve --model out/sft                                  # http://127.0.0.1:8000 (page and API)
    tunestack serve --model out/sft --host 0.0.0.0 --api_key "$KEY"  # another host needs a key
    tunestack serve --model smollm2-135m-instruct --lora_model med=out/sft --lora_model dpo=out/dpo
    tunestack serve --model out/sft --reward_model out/rm            # adds POST /v1/score

MedicalGPT's openai_api.py / gradio_demo.py flags work too: --base_model --lora_model --server_name
--server_port --port --api_auth --cpu_only --context_len --share (refused: nothing leaves this machine).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import os
from dataclasses import dataclass, field

from tunestack.config.infer import GenerationArguments, ModelSelection
from tunestack.errors import ConfigError

logger = logging.getLogger("tunestack.serve")
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
ENGINES = ("auto", "continuous", "generate")


@dataclass
class ServeArguments:
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind; any but loopback needs --api_key."})
    server_name: str | None = field(default=None, metadata={"help": "Same as --host (MedicalGPT)."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    server_port: int | None = field(default=None, metadata={"help": "Same as --port (MedicalGPT)."})
    api_key: str | None = field(
        default=None, metadata={"help": "Key clients send as 'Authorization: Bearer KEY' (env TUNESTACK_API_KEY)."}
    )
    api_auth: str | None = field(default=None, metadata={"help": "user:pass for Basic auth (MedicalGPT); a key too."})
    served_model_name: str | None = field(default=None, metadata={"help": "Name of the model in the API."})
    reward_model: str | None = field(default=None, metadata={"help": "A tunestack rm output: adds /v1/score."})
    engine: str = field(
        default="auto",
        metadata={
            "help": "auto (continuous batching where it works, else batched generate), continuous, generate.",
            "choices": ENGINES,
        },
    )
    backend: str = field(
        default="transformers",
        metadata={"help": "transformers or vllm (needs vLLM and a CUDA GPU).", "choices": ("transformers", "vllm")},
    )
    max_concurrency: int = field(default=16, metadata={"help": "Requests decoded together (one batch)."})
    max_queue: int = field(default=64, metadata={"help": "Requests waiting beyond those; one more gets a 429."})
    max_new_tokens_limit: int = field(default=2048, metadata={"help": "Largest max_tokens a request may ask (400)."})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "Largest request body (413)."})
    max_messages: int = field(default=256, metadata={"help": "Most messages in one request (400)."})
    max_n: int = field(default=8, metadata={"help": "Largest n, answers per request (400)."})
    request_timeout: float = field(default=600.0, metadata={"help": "Seconds a request may take (then 504)."})
    context_len: int | None = field(default=None, metadata={"help": "Cap on prompt + answer tokens (MedicalGPT)."})
    kv_cache_tokens: int = field(default=32768, metadata={"help": "Tokens the continuous batching cache holds."})
    cors_origin: str | None = field(
        default=None, metadata={"help": "Comma-separated origins allowed by CORS (default: none, same origin only)."}
    )
    log_interval: float = field(default=60.0, metadata={"help": "Seconds between throughput lines (0: none)."})
    share: bool = field(default=False, metadata={"help": "Refused: tunestack never opens a public tunnel."})
    disable_gc: bool = field(default=False, metadata={"help": "Accepted for compatibility; ignored."})

    @property
    def bind_host(self) -> str:
        return self.server_name or self.host

    @property
    def bind_port(self) -> int:
        return self.server_port if self.server_port is not None else self.port

    @property
    def keys(self) -> list[str]:
        return [k for k in (self.api_key or os.environ.get("TUNESTACK_API_KEY"), self.api_auth) if k]

    def problems(self) -> list[str]:
        out = []
        if self.share:
            out.append("--share: tunestack never opens a public tunnel; serve with --host and --api_key instead")
        if not 0 <= self.bind_port <= 65535:
            out.append("--port must be in 0..65535")
        for name in ("max_concurrency", "max_new_tokens_limit", "max_body_bytes", "max_messages", "max_n"):
            if getattr(self, name) < 1:
                out.append(f"--{name} must be at least 1")
        if self.max_queue < 0:
            out.append("--max_queue must be >= 0")
        if self.request_timeout <= 0:
            out.append("--request_timeout must be > 0")
        if self.api_auth is not None and ":" not in self.api_auth:
            out.append("--api_auth must be user:password")
        if not is_loopback(self.bind_host) and not self.keys:
            out.append(
                f"--host {self.bind_host} is reachable from other machines: give --api_key "
                "(or TUNESTACK_API_KEY), or bind 127.0.0.1"
            )
        return out


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_adapters(argv: list[str]) -> tuple[list[str], list[str]]:
    """Take every --lora_model / --adapter value out of argv (the flag may repeat, NAME=PATH)."""
    rest, adapters, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, value = arg.partition("=")
        if flag in ("--lora_model", "--adapter"):
            if eq:
                adapters.append(value)
            elif i + 1 < len(argv):
                adapters.append(argv[i + 1])
                i += 1
            else:
                raise ConfigError(f"{flag} needs a value")
        else:
            rest.append(arg)
        i += 1
    return rest, adapters


def check_backend(backend: str) -> None:
    if backend != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "--backend vllm: vLLM is not installed (pip install vllm, on a machine with a CUDA GPU); "
            "--backend transformers serves with continuous batching without it"
        )
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("--backend vllm needs a CUDA GPU and none is visible; use --backend transformers")
    raise ConfigError(
        "--backend vllm: this tunestack version does not drive vLLM yet; serve the merged model folder "
        "with `vllm serve DIR` (tunestack merge writes one), or use --backend transformers"
    )


def run(serve: ServeArguments, selection: ModelSelection, options: GenerationArguments, adapters: list[str]) -> int:
    import torch
    import uvicorn

    from tunestack.serve.app import create_app
    from tunestack.serve.generation import Limits
    from tunestack.serve.models import RewardScorer, load_models, selections

    check_backend(serve.backend)
    # transformers' continuous batching logs its cache sizing and choices at INFO; the server's own lines say enough.
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
    pairs = selections(selection, adapters, serve.served_model_name)
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        # One core stays free for the HTTP side: with every core in torch's pool, the event loop's work stalls
        # the pool's barriers (measured on 2 cores: 16 streams 2.25x slower, bench/README.md).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    models = load_models(pairs, serve.engine, serve.max_concurrency, serve.kv_cache_tokens)
    try:
        reward = (
            RewardScorer(serve.reward_model, selection.torch_dtype, selection.trust_remote_code)
            if serve.reward_model
            else None
        )
        limits = Limits(
            serve.max_new_tokens_limit, serve.max_messages, serve.max_n, serve.request_timeout, serve.context_len
        )
        origins = [o.strip() for o in (serve.cors_origin or "").split(",") if o.strip()]
        app = create_app(
            models,
            options,
            limits,
            capacity=serve.max_concurrency + serve.max_queue,
            api_keys=serve.keys,
            max_body_bytes=serve.max_body_bytes,
            cors_origins=origins,
            reward=reward,
            log_interval=serve.log_interval,
        )
        host = f"[{serve.bind_host}]" if ":" in serve.bind_host else serve.bind_host
        names = ", ".join(f"{name} ({m.engine.name})" for name, m in models.items())
        logger.info(
            "serving %s at http://%s:%d/ (API: /v1, key %s)",
            names,
            host,
            serve.bind_port,
            "required" if serve.keys else "not required",
        )
        config = uvicorn.Config(
            app,
            host=serve.bind_host,
            port=serve.bind_port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        uvicorn.Server(config).run()
    finally:
        for model in models.values():
            model.engine.stop()
    logger.info("server stopped")
    return 0


def main(argv: list[str]) -> int:
    from tunestack.config.parse import parse_into

    rest, adapters = split_adapters(list(argv))
    serve, selection, options = parse_into(
        (ServeArguments, ModelSelection, GenerationArguments),
        rest,
        prog="tunestack serve",
        description="Serve a model: an OpenAI-compatible API (/v1) and a web chat page (/).",
    )
    selection.cpu_only = selection.cpu_only or selection.only_cpu
    return run(serve, selection, options, adapters)
