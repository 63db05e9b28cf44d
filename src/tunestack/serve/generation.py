"""One request's answers: its jobs on the engine, their text, its limits, its log line.

`plan` turns a request's options into decoding settings (the request first, then the server's flags, then
the model folder's generation_config.json, then greedy decoding) and checks the token limits; `Generation`
runs the n jobs and yields text pieces as they come, and cancels whatever is left when the client is gone,
the time is up, or the request ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tunestack.config.infer import GenerationArguments
from tunestack.data.tools import ToolCall
from tunestack.infer.decoding import Sampling, resolve_sampling
from tunestack.infer.tool_calls import CallStream
from tunestack.serve.engine import Job
from tunestack.serve.models import ServedModel, new_job
from tunestack.serve.protocol import APIError, Sampled
from tunestack.serve.text import TextAssembler

logger = logging.getLogger("tunestack.serve")


@dataclass
class Limits:
    max_new_tokens_limit: int = 2048
    max_messages: int = 256
    max_n: int = 8
    request_timeout: float = 600.0
    context_len: int | None = None


@dataclass
class Plan:
    max_new_tokens: int
    sampling: Sampling
    seed: int | None
    stop_strings: list[str]


def plan(body: Sampled, served: ServedModel, defaults: GenerationArguments, limits: Limits, prompt_len: int) -> Plan:
    chat_model = served.chat_model
    requested, name = body.requested_tokens
    if requested is not None and requested > limits.max_new_tokens_limit:
        raise APIError(
            400,
            f"{name} is {requested}, above this server's limit of {limits.max_new_tokens_limit} "
            "(--max_new_tokens_limit)",
            param=name,
        )
    contexts = [c for c in (chat_model.context_length, limits.context_len) if c]
    context = min(contexts) if contexts else None
    max_new = requested if requested is not None else min(defaults.max_new_tokens, limits.max_new_tokens_limit)
    if context is not None and prompt_len + max_new > context:
        if requested is not None or prompt_len >= context:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens; the messages have "
                f"{prompt_len} tokens and {max_new} more were asked for",
                param="messages",
                code="context_length_exceeded",
            )
        max_new = context - prompt_len
    given = {
        "temperature": body.temperature if body.temperature is not None else defaults.temperature,
        "top_p": body.top_p if body.top_p is not None else defaults.top_p,
        "top_k": body.top_k if body.top_k is not None else defaults.top_k,
        "repetition_penalty": body.repetition_penalty
        if body.repetition_penalty is not None
        else defaults.repetition_penalty,
        "do_sample": None if body.temperature is not None else defaults.do_sample,
    }
    sampling = resolve_sampling(chat_model.defaults, **given)
    return Plan(max_new, sampling, body.seed, [*body.stop_strings, *defaults.stop_strings])


@dataclass
class Choice:
    text: TextAssembler
    job: Job
    reason: str | None = None
    calls: CallStream | None = None  # when tools are offered: holds back call text, reads the calls at the end
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass
class Generation:
    """The n answers of one request on `served`'s engine."""

    served: ServedModel
    prompt_ids: list[int]
    plan: Plan
    n: int
    timeout: float
    rid: str
    stats: Any = None
    read_calls: bool = False  # tools offered (tool_choice not none): answers are read for tool calls
    choices: list[Choice] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    closed: bool = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        chat_model = self.served.chat_model
        for i in range(self.n):
            seed = None if self.plan.seed is None else self.plan.seed + i
            job = new_job(self.prompt_ids, self.plan.max_new_tokens, self.plan.sampling, seed, i, events)
            job.loop = loop
            assembler = TextAssembler(chat_model.tokenizer, chat_model.stop_ids, self.plan.stop_strings)
            calls = CallStream(chat_model.call_format) if self.read_calls else None
            self.choices.append(Choice(assembler, job, calls=calls))
            self.served.engine.submit(job)
        self.events = events

    async def pieces(self, request: Any) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice index, new text, finish_reason when that choice ended) until every choice has ended. With
        tools, the text of calls is held back: a choice that calls tools ends with "tool_calls" (its calls in
        `tool_calls`); a malformed call is text."""
        deadline = self.started + self.timeout
        open_choices = self.n
        while open_choices:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError
            try:
                index, tokens, done, error = await asyncio.wait_for(self.events.get(), timeout=min(0.25, remaining))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ConnectionAbortedError from None
                continue
            if error is not None:
                raise RuntimeError(f"{self.served.name}: {error}")
            choice = self.choices[index]
            if choice.reason is not None:
                continue
            if tokens and self.first_token is None:
                self.first_token = time.perf_counter()
            piece = choice.text.feed(tokens)
            ended = bool(choice.text.stopped or done)
            if ended:
                piece += choice.text.finish()
            if choice.calls is not None:
                piece = choice.calls.feed(piece)
                if ended:
                    rest, answer = choice.calls.finish(choice.text.text)
                    piece += rest
                    choice.tool_calls = answer.tool_calls
            if ended:
                choice.reason = "stop" if choice.text.stopped else "length"
                if choice.tool_calls:
                    choice.reason = "tool_calls"
                if not choice.job.done:  # a stop string: the engine need not go on
                    self.served.engine.cancel(choice.job)
                open_choices -= 1
            if piece or choice.reason:
                yield index, piece, choice.reason

    @property
    def completion_tokens(self) -> int:
        return sum(min(c.job.generated, len(c.text.ids)) for c in self.choices)

    def close(self, outcome: str = "ok") -> None:
        """Cancel what still runs and log the request's line (once)."""
        if self.closed:
            return
        self.closed = True
        for choice in self.choices:
            if not choice.job.done:
                self.served.engine.cancel(choice.job)
        elapsed = time.perf_counter() - self.started
        tokens = self.completion_tokens
        ttft = f"{self.first_token - self.started:.3f}s" if self.first_token else "-"
        decode = elapsed - (self.first_token - self.started) if self.first_token else 0.0
        rate = f"{(tokens - self.n) / decode:.1f}" if decode > 0 and tokens > self.n else "-"
        reasons = ",".join(c.reason or "-" for c in self.choices)
        logger.info(
            "%s model=%s prompt=%d completion=%d ttft=%s tok/s=%s time=%.2fs finish=%s %s",
            self.rid,
            self.served.name,
            len(self.prompt_ids),
            tokens,
            ttft,
            rate,
            elapsed,
            reasons,
            outcome,
        )
        if self.stats is not None:
            self.stats.record(tokens)
