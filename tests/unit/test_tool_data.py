"""Tool calling in data: MedicalGPT / OpenAI tool records, their errors, rendered tool formats, trained spans."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from tool_fixtures import BOOK, QWEN_TOOLS_TEMPLATE, WEATHER, glaive_record, openai_record
from transformers import AutoTokenizer

from tunestack.data.formats import Conversation, Message, load_conversations, parse_record
from tunestack.data.preference import load_preferences, parse_preference
from tunestack.data.supervised import SegmentTokenizer
from tunestack.data.templates import (
    call_format,
    conversation_segments,
    get_template,
    jinja_chat_template,
    render_prompt,
)
from tunestack.data.tool_formats import TOOL_FORMATS, get_tool_format
from tunestack.data.tools import ToolCall, template_tools
from tunestack.errors import ConfigError, DataError

PARIS = ToolCall.of("get_weather", {"city": "Paris"})


@pytest.fixture
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def qwen_tok(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = QWEN_TOOLS_TEMPLATE
    return tokenizer


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return path


def trained_texts(tokenizer, template, conversation: Conversation) -> tuple[list[str], str]:
    """(decoded runs of trained tokens, the whole decoded sample) as training tokenizes them."""
    encoded = SegmentTokenizer(tokenizer, template).encode(conversation)
    runs, current = [], []
    for token, trained in zip(encoded.ids, encoded.answer, strict=True):
        if trained:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    return [decode(r) for r in runs], decode(encoded.ids)


def test_medicalgpt_and_openai_tool_records_become_conversations_with_calls():
    conv = parse_record(glaive_record("Paris"))
    assert conv.tools == (WEATHER, BOOK)  # the JSON string of glaive files, parsed
    assert conv.messages == (
        Message("user", "What is the weather in Paris?"),
        Message("assistant", "", (PARIS,)),
        Message("tool", '{"city": "Paris", "sky": "sunny"}'),
        Message("assistant", "It is sunny in Paris."),
    )
    oai = parse_record(openai_record("Li", 3))
    assert oai.system == "You book appointments." and oai.tools == (WEATHER, BOOK)  # unwrapped from type/function
    assert oai.messages[1] == Message("assistant", "", (ToolCall.of("book_slot", {"doctor": "Li", "day": 3}),))
    assert oai.messages[2] == Message("tool", "booked")


def test_bad_tool_records_are_named_by_file_and_line(tmp_path):
    good = glaive_record("Paris")
    not_json = json.loads(json.dumps(good))
    not_json["conversations"][1]["value"] = "{'name': get_weather}"
    no_name = json.loads(json.dumps(good))
    no_name["conversations"][1]["value"] = json.dumps({"arguments": {"city": "Paris"}})
    orphan = {"conversations": [{"from": "human", "value": "hi"}, {"from": "observation", "value": "42"}]}
    no_result = {
        "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "function_call", "value": json.dumps({"name": "f", "arguments": {}})},
            {"from": "human", "value": "again"},
            {"from": "gpt", "value": "ok"},
        ]
    }
    bad_tools = dict(good, tools=json.dumps({"name": "get_weather"}))
    nameless_tool = dict(good, tools=[{"description": "x"}])
    oai_bad = openai_record("Li", 3)
    oai_bad["messages"][2]["tool_calls"][0]["function"]["arguments"] = "[1, 2]"
    path = write_jsonl(
        tmp_path / "tools.jsonl", [good, not_json, no_name, orphan, no_result, bad_tools, nameless_tool]
    )
    oai_path = write_jsonl(tmp_path / "oai.jsonl", [openai_record("Li", 3), oai_bad])
    with pytest.raises(DataError) as err:
        load_conversations([path, oai_path])
    assert err.value.problems == [
        f"{path}:2: turn 2 (function_call) is not JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{path}:3: turn 2 (function_call) has no 'name' (keys: ['arguments'])",
        f"{path}:4: turn 2 is a tool result (observation) with no tool call (function_call) before it",
        f"{path}:5: turn 3 is user but the tool call of turn 2 has no result before it",
        f"{path}:6: 'tools' must be a list of function schemas "
        '({"name", "description", "parameters"}), got dict',
        f"{path}:7: 'tools' must be a list of function schemas "
        '({"name", "description", "parameters"}); tools[1] has no \'name\'',
        f"{oai_path}:2: turn 3 'tool_calls' 'arguments' must be a JSON object, got list",
    ]


def test_named_tool_format_trains_the_call_and_its_stop_and_masks_the_observation(tok):
    template = get_template(None, tok)  # the tiny ChatML template has no tool support: the default format
    runs, whole = trained_texts(tok, template, parse_record(glaive_record("Paris")))
    assert runs == [
        'Action: get_weather\nAction Input: {"city": "Paris"}<|im_end|>',
        "It is sunny in Paris.<|im_end|>",
    ]
    assert '<|im_start|>user\nObservation: {"city": "Paris", "sky": "sunny"}<|im_end|>' in whole
    assert "Action: the tool's name (one of get_weather, book_slot)" in whole  # the tool list, in the system turn
    assert whole.startswith("<|im_start|>system\nYou can use these tools")


def test_native_template_gets_tools_and_tool_calls_and_trains_the_call(qwen_tok):
    template = get_template(None, qwen_tok)
    assert template.native_tools(qwen_tok)
    runs, whole = trained_texts(qwen_tok, template, parse_record(openai_record("Li", 3)))
    assert runs == [
        '<tool_call>\n{"name": "book_slot", "arguments": {"doctor": "Li", "day": 3}}\n</tool_call><|im_end|>',
        "Dr Li is booked for day 3.<|im_end|>",
    ]
    assert "<|im_start|>user\n<tool_response>\nbooked\n</tool_response><|im_end|>" in whole  # masked
    assert whole.startswith("<|im_start|>system\nYou book appointments.\n\n# Tools\n\n<tools>\n")
    assert call_format(template, qwen_tok).name == "qwen"  # what the native template writes reads back as qwen


def test_explicit_tool_format_wins_over_the_templates_own(qwen_tok):
    template = get_template(None, qwen_tok, "default")
    assert not template.native_tools(qwen_tok)
    runs, _ = trained_texts(qwen_tok, template, parse_record(glaive_record("Oslo")))
    assert runs[0] == 'Action: get_weather\nAction Input: {"city": "Oslo"}<|im_end|>'
    with pytest.raises(ConfigError, match="unknown tool_format 'qwen4' \\(did you mean 'qwen'\\?\\)"):
        get_template(None, qwen_tok, "qwen4")


@pytest.mark.parametrize("name", sorted(TOOL_FORMATS))
def test_a_rendered_call_parses_back_to_the_same_call(name):
    fmt = get_tool_format(name)
    calls = (PARIS, ToolCall.of("book_slot", {"day": 2, "doctor": "李"}))
    assert fmt.parse(fmt.calls_text(calls)) == ("", calls)
    assert fmt.parse(fmt.calls_text(calls[:1]) + "\n") == ("", calls[:1])
    assert fmt.parse("It is sunny in Paris.") is None
    if name in ("default", "qwen"):  # text may come before the calls
        assert fmt.parse("Let me look.\n" + fmt.calls_text(calls[:1])) == ("Let me look.", calls[:1])
    broken = fmt.calls_text(calls[:1]).replace('"Paris"}', '"Paris"')
    assert fmt.parse(broken) is None  # a malformed call is no call


@pytest.mark.parametrize("template_name", [None, "qwen"])
@pytest.mark.parametrize("fmt", sorted(TOOL_FORMATS))
def test_saved_chat_template_renders_tools_exactly_as_training(tok, template_name, fmt):
    template = get_template(template_name, tok, fmt)
    saved = jinja_chat_template(template)
    for record in (glaive_record("Rome"), openai_record("Li", 3)):
        conv = parse_record(record)
        dicts = [{"role": "system", "content": conv.system}] if conv.system else []
        for m in conv.messages:
            d = {"role": m.role, "content": m.content or None}
            if m.tool_calls:
                d["tool_calls"] = [c.as_template_call() for c in m.tool_calls]
            dicts.append(d)
        rendered = tok.apply_chat_template(dicts, tools=template_tools(conv.tools), chat_template=saved, tokenize=False)
        assert rendered == "".join(s.text for s in conversation_segments(template, tok, conv))
        prompt = tok.apply_chat_template(
            dicts[:-1], tools=template_tools(conv.tools), chat_template=saved, tokenize=False, add_generation_prompt=True
        )
        assert prompt == render_prompt(template, tok, conv)
    # the saved template names its tool format, and conversations without tools render as before
    assert call_format(get_template(None, _with_template(tok, saved)), tok).name == fmt
    plain = Conversation(None, (Message("user", "Hi"), Message("assistant", "Hello")))
    assert conversation_segments(get_template(None, _with_template(tok, saved)), tok, plain) == conversation_segments(
        template, tok, plain
    )


def _with_template(tok, source):
    tok.chat_template = source
    return tok


def test_medicalgpt_2026_preference_records_with_tools(tmp_path):
    tools = json.dumps([WEATHER])
    rows = [
        {
            "conversations": [{"from": "human", "value": "Weather in Oslo?"}],
            "tools": tools,
            "chosen": 'Action: get_weather\nAction Input: {"city": "Oslo"}\n',
            "rejected": "It is sunny.",
        },
        {
            "conversations": [
                {"from": "human", "value": "Weather in Oslo?"},
                {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
                {"from": "observation", "value": '{"sky": "rain"}'},
            ],
            "tools": tools,
            "chosen": "It rains in Oslo; take an umbrella.",
            "rejected": "Sunny.",
        },
        {"conversations": [{"from": "human", "value": "2+2?"}], "chosen": "4", "rejected": "5"},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "chosen": "a", "rejected": "b"},
    ]
    path = write_jsonl(tmp_path / "reward.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_preferences([path])
    assert err.value.problems == [
        f"{path}:4: 'conversations': the last turn (2) is an assistant turn; a prompt ends with a user turn or a tool result"
    ]
    pairs = load_preferences([path], skip_bad_records=True).items
    call_pair, answer_pair, plain = pairs
    assert call_pair.chosen_calls == (ToolCall.of("get_weather", {"city": "Oslo"}),) and call_pair.chosen == ""
    assert call_pair.rejected == "It is sunny." and not call_pair.rejected_calls and call_pair.tools == (WEATHER,)
    assert answer_pair.prompt_messages[-1] == Message("tool", '{"sky": "rain"}')
    assert dataclasses.replace(plain, origin="") == parse_preference({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
