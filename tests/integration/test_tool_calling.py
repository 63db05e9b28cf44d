"""Tool calling end to end on a tiny model trained to call tools: SFT on MedicalGPT-style function_call records,
then chat --tools, infer, eval (tool-call accuracy) and serve (OpenAI tool_calls, streamed or not)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import tiny
from cli_runner import run_cli as _run
from tool_fixtures import BOOK_CALL, HELD_OUT, SHORT_TOOLS, WEATHER_CALL, learning_records

from tunestack.config.infer import GenerationArguments, ModelSelection
from tunestack.data.tools import ToolCall
from tunestack.infer.chat import ChatSession
from tunestack.infer.generate import ChatModel

GREEDY = GenerationArguments(temperature=0, max_new_tokens=80)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory) -> Path:
    """A tiny qwen2 model fully fine-tuned (200 steps) on 54 records: weather messages call get_weather, booking
    messages call book_slot, others get text; the default tool format is saved in front of its chat template."""
    root = tmp_path_factory.mktemp("tool_model")
    tiny.build_tokenizer(root / "tokenizer")
    base = tiny.build_model(
        root / "base", "qwen2", tokenizer_dir=root / "tokenizer", max_position_embeddings=512, hidden_size=64,
        intermediate_size=128,
    )  # fmt: skip
    (root / "data").mkdir()
    data = write_jsonl(root / "data" / "tools.jsonl", learning_records())
    code = _run(["sft", "--model_name_or_path", base, "--train_file_dir", data, "--use_peft", "False",
                 "--learning_rate", "5e-3", "--max_steps", "200", "--per_device_train_batch_size", "8",
                 "--model_max_length", "512", "--warmup_steps", "10", "--seed", "1", "--torch_dtype", "float32",
                 "--tool_format", "default", "--report_to", "none", "--save_strategy", "no",
                 "--output_dir", root / "sft"])  # fmt: skip
    assert code == 0
    return root / "sft"


@pytest.fixture(scope="module")
def tools_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tools") / "tools.json"
    path.write_text(json.dumps(SHORT_TOOLS))
    return path


def test_training_data_preview_trains_the_call_and_masks_the_result(tool_model, capsys):
    data = tool_model.parent / "data"
    assert _run(["data", "preview", "--train_file_dir", data, "--model_name_or_path", tool_model, "--num_samples", "1"]) == 0
    out = capsys.readouterr().out
    assert '⟦Action: get_weather\nAction Input: {"city": "Paris"}<|im_end|>⟧' in out
    assert '<|im_start|>user\nObservation: {"sky": "sunny"}<|im_end|>\n<|im_start|>assistant\n⟦Sunny.<|im_end|>⟧' in out
    saved = json.loads((tool_model / "tokenizer_config.json").read_text()).get("chat_template") or (
        tool_model / "chat_template.jinja"
    ).read_text()
    assert saved.startswith("{#- tunestack tool_format: default -#}")  # the format travels with the model


@pytest.mark.parametrize(("ask", "call"), HELD_OUT)
def test_the_trained_model_calls_the_right_tool_for_a_held_out_request(tool_model, tools_file, ask, call, capsys):
    code = _run(["chat", "--model", tool_model, "--tools", tools_file, "--prompt", ask, "--temperature", "0"])
    assert code == 0
    assert capsys.readouterr().out == json.dumps(call) + "\n"  # one JSON line per call, no text


def test_chat_session_gives_the_result_back_and_the_model_answers_from_it(tool_model):
    session = ChatSession(ChatModel.load(ModelSelection(model=str(tool_model))), GREEDY, tools=tuple(SHORT_TOOLS))
    shown: list[str] = []
    assert session.ask("Hey, weather please.", shown.append) == ""
    assert session.pending_calls == (ToolCall.of("get_weather", {"city": "Paris"}),) and shown == []  # not shown as text
    assert session.give_results(['{"sky": "sunny"}'], shown.append) == "Sunny."
    assert "".join(shown) == "Sunny." and session.pending_calls == ()
    assert [m["role"] for m in session.history] == ["user", "assistant", "tool", "assistant"]
    session.command("/clear")
    assert session.ask("Hi") == "Hello!" and session.pending_calls == ()  # no call: a text answer


def test_chat_refuses_a_bad_tools_file(tool_model, tmp_path, capsys):
    bad = tmp_path / "tools.json"
    bad.write_text(json.dumps([{"description": "no name"}]))
    assert _run(["chat", "--model", tool_model, "--tools", bad, "--prompt", "hi"]) == 2
    assert "tools[1] has no 'name'" in capsys.readouterr().err


def test_infer_returns_tool_calls_for_records_with_tools(tool_model, tmp_path):
    records = [
        {"conversations": [{"from": "human", "value": "Hey, weather please."}], "tools": json.dumps(SHORT_TOOLS)},
        {"messages": [{"role": "user", "content": "Quick: book today?"}], "tools": [{"type": "function", "function": t} for t in SHORT_TOOLS]},
        {
            "conversations": [
                {"from": "human", "value": "Now weather!"},
                {"from": "function_call", "value": json.dumps(WEATHER_CALL)},
                {"from": "observation", "value": '{"sky": "sunny"}'},
            ],
            "tools": SHORT_TOOLS,
        },
        {"prompt": "Hi", "tools": SHORT_TOOLS},
    ]
    data = write_jsonl(tmp_path / "asks.jsonl", records)
    out = tmp_path / "answers.jsonl"
    argv = ["infer", "--model", tool_model, "--data_file", data, "--output_file", out, "--temperature", "0"]
    assert _run([*argv, "--max_new_tokens", "80"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {"prompt": "Hey, weather please.", "response": "", "tool_calls": [WEATHER_CALL]}
    assert rows[1] == {"prompt": "Quick: book today?", "response": "", "tool_calls": [BOOK_CALL]}
    assert rows[2] == {"prompt": '{"sky": "sunny"}', "response": "Sunny."}  # answered from the tool's result
    assert rows[3] == {"prompt": "Hi", "response": "Hello!"}


def test_eval_reports_tool_call_accuracy(tool_model, tmp_path, capsys):
    def record(ask, call):
        turns = [{"from": "human", "value": ask}, {"from": "function_call", "value": json.dumps(call)}]
        return {"conversations": turns, "tools": SHORT_TOOLS}

    reordered = {"name": "book_slot", "arguments": {"day": 3, "doctor": "Li"}}  # key order does not matter
    wrong_city = {"name": "get_weather", "arguments": {"city": "Rome"}}
    held = write_jsonl(
        tmp_path / "held.jsonl",
        [record("Hey, weather please.", WEATHER_CALL), record("Quick: book today?", reordered), record("Weather!", wrong_city)],
    )
    out = tmp_path / "eval"
    argv = ["eval", "--model_name_or_path", tool_model, "--include_base", "false", "--eval_file", held,
            "--probe_prompts", "none", "--output_dir", out, "--temperature", "0", "--max_new_tokens", "80"]  # fmt: skip
    assert _run(argv) == 0
    metrics = json.loads((out / "eval.json").read_text())["models"][0]["metrics"]
    assert metrics["tool_call_accuracy"] == 66.67 and metrics["tool_name_accuracy"] == 100.0
    assert metrics["tool_call_samples"] == 3
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["tool_call_match"] for r in rows] == [True, True, False]
    assert rows[2]["tool_calls"] == [WEATHER_CALL] and rows[2]["reference_tool_calls"] == [wrong_city]
    assert "tool_call_accuracy" in capsys.readouterr().out  # in the summary table

    _run(["report", out])
    assert "tool-call accuracy %" in (out / "report.md").read_text()


@pytest.fixture(scope="module")
def tool_server(tool_model):
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fixtures"))
    from live_server import selection, start_server

    live = start_server([("tools", selection(tool_model))])
    yield live
    live.stop()


OPENAI_TOOLS = [{"type": "function", "function": t} for t in SHORT_TOOLS]


def test_serve_returns_openai_tool_calls(tool_server):
    client = tool_server.client()
    ask = [{"role": "user", "content": "Hey, weather please."}]
    reply = client.chat.completions.create(model="tools", messages=ask, tools=OPENAI_TOOLS, temperature=0, max_tokens=80)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # a JSON string, as OpenAI sends it

    # the result goes back as a tool message; the model answers from it
    follow = [*ask, choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}]
    answer = client.chat.completions.create(model="tools", messages=follow, tools=OPENAI_TOOLS, temperature=0, max_tokens=80)
    assert answer.choices[0].message.content == "Sunny." and answer.choices[0].finish_reason == "stop"
    assert not answer.choices[0].message.tool_calls


def test_serve_streams_tool_calls(tool_server):
    client = tool_server.client()
    ask = [{"role": "user", "content": "Quick: book today?"}]
    chunks = list(
        client.chat.completions.create(model="tools", messages=ask, tools=OPENAI_TOOLS, temperature=0, max_tokens=80, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""  # the call text is not content
    calls = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
        (0, "book_slot", {"doctor": "Li", "day": 3})
    ]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_serve_tool_choice_none_and_malformed_calls_are_plain_content(tool_server):
    client = tool_server.client()
    ask = [{"role": "user", "content": "Hey, weather please."}]
    plain = client.chat.completions.create(
        model="tools", messages=ask, tools=OPENAI_TOOLS, tool_choice="none", temperature=0, max_tokens=80
    )
    assert plain.choices[0].message.content == 'Action: get_weather\nAction Input: {"city": "Paris"}'
    assert plain.choices[0].finish_reason == "stop" and not plain.choices[0].message.tool_calls
    for stream in (False, True):  # a stop string cuts the call's JSON: what is left is text, never a 500
        cut = client.chat.completions.create(
            model="tools", messages=ask, tools=OPENAI_TOOLS, temperature=0, max_tokens=80, stop=["Paris"], stream=stream
        )
        if stream:
            chunks = list(cut)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            text, reasons = cut.choices[0].message.content, [cut.choices[0].finish_reason]
        assert text == 'Action: get_weather\nAction Input: {"city": "' and reasons == ["stop"]
