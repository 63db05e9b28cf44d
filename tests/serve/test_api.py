"""The OpenAI API of `tunestack serve` driven by the official openai client, on a tiny model."""

from __future__ import annotations

import openai
import pytest
import torch

try:  # the HTTP client the installed openai package uses
    import httpx2 as httpx
except ImportError:
    import httpx

from tunestack.config.infer import GenerationArguments

QUESTION = "What is the capital of France?"


def ask(question: str = QUESTION) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def greedy_reference(chat_model, question: str, max_new_tokens: int) -> tuple[str, list[int], list[int]]:
    """(answer, prompt ids, new ids up to and with the stop token) as `tunestack chat --temperature 0` makes them."""
    options = GenerationArguments(temperature=0, max_new_tokens=max_new_tokens)
    ids, _ = chat_model.prompt_ids(ask(question), chat_model.system_for(options), max_new_tokens)
    raw = chat_model.generate_ids([ids], chat_model.generation_config(options))[0]
    end = next((i + 1 for i, t in enumerate(raw) if t in chat_model.stop_ids), len(raw))
    return chat_model.answer(ask(question), options), ids, raw[:end]


def test_models_and_health(glm4_server) -> None:
    client = glm4_server.client()
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "tunestack"
    health = httpx.get(f"{glm4_server.url}/health").json()
    assert health == {"status": "ok", "models": ["tiny"], "engines": {"tiny": "continuous"}, "in_flight": 0,
                      "capacity": 8, "score": False}  # fmt: skip


@pytest.mark.parametrize("question", [QUESTION, "Who are you?", "心脏有什么作用？"])
def test_answers_equal_chat_and_the_stream_equals_the_answer(glm4_server, question: str) -> None:
    chat_model = glm4_server.models["tiny"].chat_model
    expected, prompt, new = greedy_reference(chat_model, question, 24)
    client = glm4_server.client()
    reply = client.chat.completions.create(model="tiny", messages=ask(question), temperature=0, max_tokens=24)
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(prompt) == len(chat_model.tokenizer(chat_model.render(ask(question)))[
        "input_ids"])  # fmt: skip
    assert reply.usage.completion_tokens == len(new)
    assert reply.choices[0].finish_reason == ("stop" if new[-1] in chat_model.stop_ids else "length")

    chunks = list(client.chat.completions.create(model="tiny", messages=ask(question), temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        reply.choices[0].finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(new)


def test_sse_framing_ends_with_done(glm4_server) -> None:
    body = {"model": "tiny", "messages": ask(), "stream": True, "max_tokens": 4, "temperature": 0}
    with httpx.stream("POST", f"{glm4_server.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_strings_cut_the_answer(glm4_server) -> None:
    client = glm4_server.client()
    full = client.chat.completions.create(model="tiny", messages=ask(), temperature=0, max_tokens=24)
    text = full.choices[0].message.content
    stop = text[3:5]
    assert stop.strip() and text.index(stop) == 3
    cut = client.chat.completions.create(model="tiny", messages=ask(), temperature=0, max_tokens=24, stop=[stop])
    assert cut.choices[0].message.content == text[:3].strip() and cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny", messages=ask(), temperature=0, max_tokens=24, stop=stop,
                                              stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[:3].strip()


def test_n_answers(glm4_server) -> None:
    client = glm4_server.client()
    greedy = client.chat.completions.create(model="tiny", messages=ask(), temperature=0, max_tokens=8, n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    sampled = client.chat.completions.create(model="tiny", messages=ask(), temperature=1.5, max_tokens=16, n=2,
                                             stream=True)  # fmt: skip
    texts = ["", ""]
    for chunk in sampled:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert all(texts) and texts[0] != texts[1]


def test_raw_completions(glm4_server) -> None:
    chat_model = glm4_server.models["tiny"].chat_model
    ids = chat_model.encode("The heart pumps")
    raw = chat_model.generate_ids([ids], chat_model.generation_config(GenerationArguments(temperature=0,
                                                                                         max_new_tokens=6)))[0]  # fmt: skip
    reply = glm4_server.client().completions.create(model="tiny", prompt="The heart pumps", max_tokens=6, temperature=0)
    assert reply.choices[0].text == chat_model.decode(raw)
    assert reply.usage.prompt_tokens == len(ids)


def test_what_continuous_batching_cannot_do_is_decoded_by_generate(glm4_server) -> None:
    """A repetition penalty and a seeded sampled answer: batched generate, equal to `tunestack chat` with those flags."""
    chat_model = glm4_server.models["tiny"].chat_model
    client = glm4_server.client()
    for flags, extra in [
        (dict(temperature=0, repetition_penalty=1.5), dict(temperature=0, extra_body={"repetition_penalty": 1.5})),
        (dict(temperature=1.2, top_k=20, seed=7), dict(temperature=1.2, seed=7, extra_body={"top_k": 20})),
    ]:
        expected = chat_model.answer(ask(), GenerationArguments(max_new_tokens=12, **flags))
        reply = client.chat.completions.create(model="tiny", messages=ask(), max_tokens=12, **extra)
        assert reply.choices[0].message.content == expected
    assert torch.get_num_threads() >= 1


BAD_REQUESTS = [
    ({"model": "nope", "messages": ask()}, 404, "model_not_found", "The model 'nope' does not exist; served: tiny"),
    ({"model": "tiny", "messages": []}, 400, None, "messages: List should have at least 1 item after validation, not 0"),
    ({"model": "tiny", "messages": ask(), "max_tokens": 10**7}, 400, None,
     "max_tokens is 10000000, above this server's limit of 2048 (--max_new_tokens_limit)"),
    ({"model": "tiny", "messages": ask(), "n": 1000}, 400, None, "n must be at most 8"),
    ({"model": "tiny", "messages": ask(), "temperature": -1}, 400, None,
     "temperature: Input should be greater than or equal to 0"),
    ({"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}, 400, None,
     "the conversation must start with a user message"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/"}}]}]}, 400, None,
     "messages[0]: content of type 'image_url' is not supported (text only)"),
    ({"model": "tiny", "messages": ask(), "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": "required"}, 400, None, "tool_choice 'required' is not supported (auto or none)"),
    ({"model": "tiny", "messages": ask(), "tools": [{"type": "function", "function": {"description": "f"}}]}, 400,
     None, "'tools' must be a list of function schemas ({\"name\", \"description\", \"parameters\"}); tools[1] has no 'name'"),
    ({"model": "tiny", "messages": [*ask(), {"role": "tool", "content": "42"}]}, 400, None,
     "messages[1] is a tool result (observation) with no tool call (function_call) before it"),
    ({"model": "tiny", "messages": [*ask(), {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]},
        {"role": "tool", "content": "42"}]}, 400, None,
     "messages[1].tool_calls 'arguments' is not JSON (Expecting property name enclosed in double quotes at column 2)"),
    ({"model": "tiny", "messages": ask() * 300}, 400, None, "at most 256 messages per request"),
    ({"model": "tiny", "messages": ask(), "max_tokens": 300}, 400, "context_length_exceeded",
     "This model's maximum context length is 256 tokens; the messages have 22 tokens and 300 more were asked for"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "code", "message"), BAD_REQUESTS)
def test_bad_requests_get_their_status_and_error_shape(glm4_server, body, status, code, message) -> None:
    response = httpx.post(f"{glm4_server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] == message and error["code"] == code
    assert error["type"] == "invalid_request_error"  # as OpenAI types a 404 of an unknown model too
    ok = glm4_server.client().chat.completions.create(model="tiny", messages=ask(), temperature=0, max_tokens=4)
    assert ok.choices[0].message.content is not None


def test_client_errors_are_openai_exceptions(glm4_server) -> None:
    client = glm4_server.client()
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=ask())
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=ask(), max_completion_tokens=5000)


def test_a_body_too_large_is_413(glm4_server) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    response = httpx.post(f"{glm4_server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 413
    assert response.json()["error"]["message"] == "request body larger than 1048576 bytes (--max_body_bytes)"
    assert glm4_server.client().models.list().data


def test_an_unexpected_failure_is_a_500_without_traceback(glm4_server, monkeypatch) -> None:
    chat_model = glm4_server.models["tiny"].chat_model
    original = chat_model.render

    def render(messages, system=None, tools=()):
        if messages[-1]["content"] == "boom":
            raise RuntimeError("secret detail of the server")
        return original(messages, system, tools)

    monkeypatch.setattr(chat_model, "render", render)
    response = httpx.post(f"{glm4_server.url}/v1/chat/completions", json={"model": "tiny", "messages": ask("boom")})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["message"].startswith("internal server error (err-")
    assert "secret" not in response.text and "Traceback" not in response.text
    assert glm4_server.client().chat.completions.create(model="tiny", messages=ask(), max_tokens=4).choices
