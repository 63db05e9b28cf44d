"""The decoding engines behind `tunestack serve`: transformers' continuous batching, and batched `generate`.

`ContinuousEngine` hands every request to one `ContinuousBatchingManager` (transformers'
`init_continuous_batching`, what `transformers serve --continuous-batching` uses): concurrent requests share
forward passes, join and leave the batch at any step, and each has its own temperature / top_p / top_k
(per-request logits processors). Greedy requests are top_k=1 in the same sampling batch.

`GenerateEngine` runs `model.generate` on left-padded batches of the requests waiting at that moment. It
serves what continuous batching cannot (`Engine.supports`): a repetition penalty (continuous batching drops
that processor), a seeded sampled request (one shared random stream there; here the seed is set and the
request decoded alone, so it repeats `tunestack chat --seed`), and every request of a model that continuous
batching cannot run (quantized weights, remote code, a failed start), or when `--engine generate` asks.

Both deliver tokens through a `Job`: the engine thread pushes, the event loop awaits.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from tunestack.infer.decoding import Sampling

logger = logging.getLogger(__name__)
_ids = itertools.count()


@dataclass
class Job:
    """One answer to decode. The engine calls `push` from its thread; `events` is read on the event loop."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    seed: int | None = None
    index: int = 0  # which choice of its request (n > 1); the events of all choices may share one queue
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: bool = False
    generated: int = 0
    id: str = field(default_factory=lambda: f"job-{next(_ids)}")

    def push(self, tokens: list[int], finished: bool = False, error: str | None = None) -> None:
        """New tokens of this answer (engine thread); `finished` once it ended, `error` if decoding failed."""
        if self.done:
            return
        self.generated += len(tokens)
        self.done = finished or error is not None
        item = (self.index, tokens, self.done, error)
        if self.loop is None:
            self.events.put_nowait(item)
        else:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """The interface: `submit` a job (from the event loop), `cancel` it, `stop` the engine."""

    name = "engine"

    def supports(self, job: Job) -> bool:
        return True

    def submit(self, job: Job) -> None:
        raise NotImplementedError

    def cancel(self, job: Job) -> None:
        job.cancel()

    def stop(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------


class GenerateEngine(Engine):
    """`model.generate` on batches of waiting requests (up to `max_batch_size`), on one worker thread."""

    name = "generate"

    def __init__(self, chat_model: Any, max_batch_size: int = 16):
        self.chat_model = chat_model
        self.max_batch_size = max_batch_size
        self.waiting: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="tunestack-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.waiting.put(job)

    def stop(self) -> None:
        self.waiting.put(None)
        self.thread.join(timeout=10)

    def _next_batch(self) -> list[Job] | None:
        first = self.waiting.get()
        if first is None:
            return None
        batch, later = [first], []
        # A seeded sampled job is decoded alone; others join jobs of the same sampling.
        alone = first.seed is not None and first.sampling.do_sample
        while not alone and len(batch) < self.max_batch_size:
            try:
                job = self.waiting.get_nowait()
            except queue.Empty:
                break
            if job is None:
                later.append(job)
                break
            fits = job.sampling == first.sampling and not (job.seed is not None and job.sampling.do_sample)
            (batch if fits else later).append(job)
        for job in later:
            self.waiting.put(job)
        return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            for job in batch:
                if job.cancelled.is_set():
                    job.push([], finished=True)
            batch = [job for job in batch if not job.done]
            if not batch:
                continue
            try:
                self._generate(batch)
            except Exception as exc:  # a bug or an out-of-memory: these requests fail, the server goes on
                logger.exception("generation failed")
                for job in batch:
                    job.push([], error=f"{type(exc).__name__} during generation")

    def _generate(self, batch: list[Job]) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, set_seed

        from tunestack.config.infer import GenerationArguments

        model = self.chat_model
        s = batch[0].sampling
        options = GenerationArguments(
            max_new_tokens=max(job.max_new_tokens for job in batch),
            temperature=s.temperature if s.do_sample else 0.0,
            top_p=s.top_p,
            top_k=s.top_k,
            repetition_penalty=s.repetition_penalty,
            do_sample=s.do_sample,
        )
        config = model.generation_config(options, s)
        stops = set(model.stop_ids)

        class RowStreamer:
            """Routes each step's new token of every row to its job; the first call is the prompt."""

            started = False

            def put(self, value: Any) -> None:
                if not self.started:
                    self.started = True
                    return
                for job, token in zip(batch, value.reshape(len(batch), -1)[:, -1].tolist(), strict=True):
                    if job.done:
                        continue
                    end = token in stops or job.generated + 1 >= job.max_new_tokens
                    job.push([token], finished=end)

            def end(self) -> None:
                for job in batch:
                    job.push([], finished=True)

        class RowStop(StoppingCriteria):
            """A row is done when its job ended (its own length, a stop) or was cancelled."""

            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                flags = [job.done or job.cancelled.is_set() for job in batch]
                return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

        if batch[0].seed is not None:
            set_seed(batch[0].seed)
        model.generate_ids([job.prompt_ids for job in batch], config, RowStreamer(), StoppingCriteriaList([RowStop()]))


# ---------------------------------------------------------------------------------------------


def continuous_batching_problem(chat_model: Any) -> str | None:
    """Why continuous batching cannot run this model, or None."""
    model = chat_model.model
    if not hasattr(model, "init_continuous_batching"):
        return f"{type(model).__name__} has no continuous batching"
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return "4/8-bit weights"
    if getattr(model.config, "auto_map", None):
        return "a model with its own code (trust_remote_code)"
    return None


class ContinuousEngine(Engine):
    """transformers' ContinuousBatchingManager with per-request sampling; `fallback` takes what it cannot do."""

    name = "continuous"

    def __init__(
        self,
        chat_model: Any,
        fallback: GenerateEngine,
        max_concurrency: int = 16,
        cache_tokens: int = 16384,
        max_batch_tokens: int = 512,
    ):
        import torch
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.chat_model = chat_model
        self.fallback = fallback
        self.vocab_size = int(chat_model.model.get_output_embeddings().weight.shape[0])
        # Sampling on with temperature, top_k and top_p set, so that each of their per-request processors exists;
        # every request brings its own values (greedy: top_k=1).
        config = GenerationConfig(
            do_sample=True,
            temperature=0.5,
            top_k=50,
            top_p=0.9,
            eos_token_id=list(chat_model.stop_ids),
            pad_token_id=chat_model.tokenizer.pad_token_id,
            max_new_tokens=256,
        )
        page = 64
        cb_config = ContinuousBatchingConfig(
            page_size=page,
            num_blocks=max(8, -(-cache_tokens // page)),
            max_batch_tokens=max_batch_tokens,
            max_requests_per_batch=max_concurrency,
            per_request_processors=True,
            scheduler_type="fifo",
        )
        self.manager = chat_model.model.init_continuous_batching(
            generation_config=config, continuous_batching_config=cb_config
        )
        with torch.inference_mode():  # the manager's thread takes the caller's inference mode
            self.manager.start()
        self.jobs: dict[str, Job] = {}

    def supports(self, job: Job) -> bool:
        s = job.sampling
        return s.repetition_penalty == 1.0 and not (s.do_sample and job.seed is not None)

    def submit(self, job: Job) -> None:
        """Called on the event loop (the manager delivers results there)."""
        if not self.supports(job):
            self.fallback.submit(job)
            return
        s = job.sampling
        if s.do_sample:
            kwargs = {"temperature": float(s.temperature), "top_p": float(s.top_p), "top_k": s.top_k or self.vocab_size}
        else:
            kwargs = {"temperature": 1.0, "top_p": 1.0, "top_k": 1}
        kwargs["top_k"] = int(min(kwargs["top_k"], self.vocab_size))
        seen = 0

        def on_output(output: Any) -> None:
            nonlocal seen
            tokens = list(output.generated_tokens[seen:])
            seen = len(output.generated_tokens)
            if output.error is not None:
                logger.error("continuous batching failed on %s: %s", job.id, output.error)
                job.push(tokens, error="generation failed")
            else:
                job.push(tokens, finished=output.is_finished())
            if job.done:
                self.jobs.pop(job.id, None)

        self.jobs[job.id] = job
        self.manager.register_result_handler(job.id, on_output)
        self.manager.add_request(
            list(job.prompt_ids),
            request_id=job.id,
            max_new_tokens=job.max_new_tokens,
            streaming=True,
            eos_token_id=list(self.chat_model.stop_ids),
            **kwargs,
        )

    def cancel(self, job: Job) -> None:
        job.cancel()
        if self.jobs.pop(job.id, None) is not None:
            self.manager.cancel_request(job.id)
            with self.manager.output_router._lock:  # a cancelled request gets no final output: drop its handler
                self.manager.output_router.result_handlers.pop(job.id, None)
        else:
            self.fallback.cancel(job)

    @property
    def alive(self) -> bool:
        return self.manager.is_running() and self.manager.background_thread_status.fatal_error is None

    def stop(self) -> None:
        try:
            self.manager.stop(block=True, timeout=5)
        finally:
            self.fallback.stop()


def build_engine(chat_model: Any, kind: str, max_concurrency: int, cache_tokens: int) -> Engine:
    """The engine for `--engine auto|continuous|generate`: continuous batching where it works, else `generate`."""
    from tunestack.errors import ConfigError

    fallback = GenerateEngine(chat_model, max_batch_size=max_concurrency)
    if kind == "generate":
        return fallback
    problem = continuous_batching_problem(chat_model)
    if problem is None:
        try:
            return ContinuousEngine(chat_model, fallback, max_concurrency, cache_tokens)
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if kind == "continuous":
        fallback.stop()
        raise ConfigError(f"--engine continuous: continuous batching cannot serve {chat_model.name} ({problem})")
    logger.warning("%s: batched generate instead of continuous batching (%s)", chat_model.name, problem)
    return fallback
