"""SFT data: formats -> conversations, chat templates -> trained spans, truncation, collation, preview."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from tokenizers import processors
from transformers import AutoTokenizer

from tunestack.data.formats import Conversation, Message, load_conversations, parse_record
from tunestack.data.preview import preview
from tunestack.data.records import write_rejects
from tunestack.data.supervised import (
    IGNORE_INDEX,
    SegmentTokenizer,
    build_sft_dataset,
    collator_for,
    encode_conversation,
)
from tunestack.data.templates import (
    conversation_segments,
    get_template,
    jinja_chat_template,
    render_prompt,
    stop_token_ids,
    template_names,
)
from tunestack.errors import ConfigError, DataError

SYSTEM = "Be brief."
Q1, A1 = "What is the capital of France?", "Paris."
Q2, A2 = "Who are you?", "I am an assistant."
CONV = Conversation(
    SYSTEM, (Message("user", Q1), Message("assistant", A1), Message("user", Q2), Message("assistant", A2)), "t:1"
)

# Templates whose special tokens the tiny tokenizer lacks get them added (and the model's real EOS).
EXTRA_TOKENS = {
    "llama3": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], None),
    "glm4": (["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"], "<|endoftext|>"),
    "chatglm2": (["[gMASK]", "sop", "</s>"], "</s>"),
    "chatglm3": (["[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "</s>"], "</s>"),
    "vicuna": (["</s>"], "</s>"),
    "mistral": (["<s>", "</s>"], "</s>"),
    "baichuan2": (["<reserved_106>", "<reserved_107>", "</s>"], "</s>"),
    "gemma": (["<start_of_turn>", "<end_of_turn>"], None),
}

# A SmolLM2-style template that injects a default system prompt when none is given.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# GLM-4's own template: a turn ends where the next role token starts, nothing closes the last answer,
# and the generation prompt stops before the newline that the model writes first.
NO_STOP_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Qwen3-style: only the final answer gets an (empty) thinking block.
THINKING_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' and loop.last %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def tokenizers_for(tok):
    """template name -> a copy of the tiny tokenizer with that template's special tokens."""
    cache: dict[str, object] = {}

    def make(name: str):
        if name not in cache:
            t = copy.deepcopy(tok)
            extra, eos = EXTRA_TOKENS.get(name, ([], None))
            t.add_tokens(extra, special_tokens=True)
            if eos:
                t.eos_token = eos
            cache[name] = t
        return cache[name]

    return make


def trained(features: dict, tok) -> str:
    ids = [i for i, label in zip(features["input_ids"], features["labels"], strict=True) if label != IGNORE_INDEX]
    return tok.decode(ids, skip_special_tokens=False)


def ids_of(tok, *texts: str) -> list[int]:
    return [i for text in texts for i in tok(text, add_special_tokens=False)["input_ids"]]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------- formats

FORMAT_RECORDS = {
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": SYSTEM},
            {"from": "human", "value": Q1},
            {"from": "gpt", "value": A1},
            {"from": "human", "value": Q2},
            {"from": "gpt", "value": A2},
        ]
    },
    "sharegpt_user_assistant": {
        "system_prompt": SYSTEM,
        "conversations": [
            {"from": "user", "value": Q1},
            {"from": "assistant", "value": A1},
            {"from": "user", "value": Q2},
            {"from": "assistant", "value": A2},
        ],
    },
    "messages": {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": Q1},
            {"role": "assistant", "content": A1},
            {"role": "user", "content": Q2},
            {"role": "assistant", "content": A2},
        ]
    },
    "alpaca": {"system": SYSTEM, "history": [[Q1, A1]], "instruction": Q2, "input": "", "output": A2},
    "prompt_response": {"system": SYSTEM, "history": [[Q1, A1]], "prompt": Q2, "response": A2},
}


@pytest.mark.parametrize("kind", sorted(FORMAT_RECORDS))
def test_every_format_normalises_to_the_same_conversation(tmp_path, kind):
    path = write_jsonl(tmp_path / "d.jsonl", [FORMAT_RECORDS[kind]])
    loaded = load_conversations([path])
    assert loaded.items == [Conversation(CONV.system, CONV.messages, f"{path}:1")]
    forced = kind.removesuffix("_user_assistant")
    assert load_conversations([path], data_format=forced).items == loaded.items
    assert loaded.formats == {str(path): forced}


def test_alpaca_input_joins_the_instruction():
    conv = parse_record({"instruction": "Translate", "input": "心脏", "output": "heart"})
    assert conv.messages == (Message("user", "Translate\n心脏"), Message("assistant", "heart"))
    assert conv.system is None


def test_bad_records_are_all_reported_with_file_and_line(tmp_path):
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            FORMAT_RECORDS["messages"],
            '{"messages": [{"role": "user", "content": "hi"}',
            {"id": 7},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            {"instruction": "hi", "output": "yo"},
        ],
    )
    typo = write_jsonl(tmp_path / "typo.jsonl", [{"conversation": [{"from": "human", "value": "hi"}]}])
    with pytest.raises(DataError) as err:
        load_conversations([chat, typo])
    assert err.value.problems == [
        f"{chat}:2: malformed JSON (Expecting ',' delimiter at column 48)",
        f"{chat}:3: messages record has no 'messages' (keys: ['id'])",
        f"{chat}:4: turn 2 (assistant) is empty",
        f"{chat}:5: turn 2 is user but should be assistant (turns must alternate user/assistant, starting with user)",
        f"{chat}:6: the file mixes formats: messages (from line 1) and alpaca (this record); use one format per file",
        f"{typo}:1: unrecognised record: keys ['conversation']; expected 'conversations' (sharegpt), "
        "'messages' (openai messages), 'instruction' + 'output' (alpaca), 'prompt' + 'response'; "
        "did you mean 'conversations' instead of 'conversation'?",
    ]
    assert str(err.value).startswith("6 bad records:\n  ")


def test_more_record_problems():
    cases = {
        "the last turn (1) is a user turn; a conversation must end with an assistant answer": {
            "messages": [{"role": "user", "content": "hi"}]
        },
        "turn 3 is a system turn; only the first turn may be a system turn": {
            "conversations": [
                {"from": "human", "value": "a"},
                {"from": "gpt", "value": "b"},
                {"from": "system", "value": "c"},
            ]
        },
        "turn 1 has unknown role 'bot' (accepted: system, human, user, gpt, assistant, function_call, observation, tool, function)": {
            "conversations": [{"from": "bot", "value": "a"}]
        },
        "turn 4 is assistant but should be user (turns must alternate user/assistant, starting with user)": {
            "conversations": [
                {"from": "system", "value": "s"},
                {"from": "human", "value": "a"},
                {"from": "gpt", "value": "b"},
                {"from": "gpt", "value": "c"},
            ]
        },
        "alpaca record has no 'output' (keys: ['input', 'instruction'])": {"instruction": "a", "input": "b"},
        "'messages' is empty": {"messages": []},
        "history[1] has an empty answer": {"prompt": "q", "response": "r", "history": [["q0", ""]]},
    }
    for reason, record in cases.items():
        with pytest.raises(DataError) as err:
            parse_record(record)
        assert str(err.value) == reason


def test_skip_bad_records_keeps_the_good_ones_and_writes_rejects(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [FORMAT_RECORDS["sharegpt"], "{broken", {"conversations": [{"from": "human", "value": "hi"}]}],
    )
    loaded = load_conversations([path], skip_bad_records=True)
    assert [c.origin for c in loaded.items] == [f"{path}:1"]
    assert [(r["where"], r["reason"]) for r in loaded.rejects] == [
        (f"{path}:2", "malformed JSON (Expecting property name enclosed in double quotes at column 2)"),
        (f"{path}:3", "the last turn (1) is a user turn; a conversation must end with an assistant answer"),
    ]
    assert loaded.reason_counts == {"malformed JSON": 1, "bad turn order": 1}
    assert loaded.summary() == "1 conversations, 2 skipped (1 malformed JSON, 1 bad turn order)"
    out = write_rejects(loaded.rejects, tmp_path / "out" / "rejects.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {"where": f"{path}:2", "reason": loaded.rejects[0]["reason"], "record": "{broken"}
    assert rows[1]["record"] == {"conversations": [{"from": "human", "value": "hi"}]}


def test_nothing_valid_is_always_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "plain"}])
    with pytest.raises(DataError, match=r"no valid SFT records: all 1 records were rejected \(1 unrecognised"):
        load_conversations([path], skip_bad_records=True)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no SFT records found"):
        load_conversations([tmp_path / "empty.jsonl"], skip_bad_records=True)


def test_unknown_data_format_is_a_config_error():
    with pytest.raises(ConfigError, match="did you mean 'sharegpt'"):
        load_conversations([], data_format="sharegtp")


# ---------------------------------------------------------------------------------------------- templates

GOLDEN = {
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n"
        "<|im_start|>assistant\nI am an assistant.<|im_end|>\n",
        "<|im_end|>",
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWho are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nI am an assistant.<|eot_id|>",
        "<|eot_id|>",
    ),
    "glm4": (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\nWhat is the capital of France?<|assistant|>\nParis.<|user|>"
        "\nWho are you?<|assistant|>\nI am an assistant.<|user|>",
        "<|user|>",
        "\n",
    ),
    "vicuna": (
        "Be brief. USER: What is the capital of France? ASSISTANT: Paris.</s>USER: Who are you? ASSISTANT:"
        " I am an assistant.</s>",
        "</s>",
        " ",
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN) + ["tokenizer"])
def test_only_answers_and_stop_tokens_are_trained(tokenizers_for, name):
    tok = tokenizers_for(name)
    template = get_template(None if name == "tokenizer" else name, tok)
    text, stop, *lead = GOLDEN["chatml" if name == "tokenizer" else name]
    lead = lead[0] if lead else ""  # what the answer slot writes before the answer (trained: the model writes it)
    features = encode_conversation(CONV, tok, template, max_length=512)
    assert tok.decode(features["input_ids"], skip_special_tokens=False) == text
    assert trained(features, tok) == f"{lead}{A1}{stop}{lead}{A2}{stop}"
    stop_id = tok.convert_tokens_to_ids(stop)
    kept = [i for i, label in zip(features["input_ids"], features["labels"], strict=True) if label != IGNORE_INDEX]
    assert kept == ids_of(tok, lead + A1) + [stop_id] + ids_of(tok, lead + A2) + [stop_id]
    assert all(label in (i, IGNORE_INDEX) for i, label in zip(features["input_ids"], features["labels"], strict=True))
    assert features["attention_mask"] == [1] * len(features["input_ids"])
    assert stop_token_ids(template, tok)[0] == stop_id


def test_special_tokens_in_template_text_are_single_ids(tokenizers_for):
    tok = tokenizers_for("llama3")
    features = encode_conversation(CONV, tok, get_template("llama3", tok), max_length=512)
    ids = features["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|eot_id|>")) == 5
    assert ids.count(tok.convert_tokens_to_ids("<|start_header_id|>")) == 5
    assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")


@pytest.mark.parametrize("name", template_names())
def test_every_named_template_matches_its_jinja_and_trains_only_answers(tokenizers_for, name):
    tok = tokenizers_for(name)
    template = get_template(name, tok)
    segments = conversation_segments(template, tok, CONV)
    dicts = [{"role": "system", "content": SYSTEM}] + [{"role": m.role, "content": m.content} for m in CONV.messages]
    jinja = jinja_chat_template(template)
    rendered = tok.apply_chat_template(dicts, chat_template=jinja, tokenize=False)
    assert rendered == "".join(s.text for s in segments)
    prompt = tok.apply_chat_template(dicts[:-1], chat_template=jinja, tokenize=False, add_generation_prompt=True)
    assert prompt == render_prompt(template, tok, CONV)
    assert rendered.startswith(prompt)
    answers = [template._fill(template.answer, tok, a) for a in (A1, A2)]
    stops = [template.answer_stop(tok, last=False), template.answer_stop(tok, last=True)]
    assert [s.text for s in segments if s.trainable] == [answers[0] + stops[0], answers[1] + stops[1]]
    # Without a system prompt the template's default one (if any) is used, in jinja and in training alike.
    bare = Conversation(None, CONV.messages)
    no_system = tok.apply_chat_template(dicts[1:], chat_template=jinja, tokenize=False)
    assert no_system == "".join(s.text for s in conversation_segments(template, tok, bare))
    if template.default_system:
        assert template.default_system in no_system


def test_tokenizer_template_with_default_system_prompt(tok):
    t = copy.deepcopy(tok)
    t.chat_template = DEFAULT_SYSTEM_TEMPLATE
    template = get_template(None, t)
    features = encode_conversation(Conversation(None, CONV.messages), t, template, max_length=512)
    text = t.decode(features["input_ids"], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>user\n")
    assert trained(features, t) == f"{A1}<|im_end|>{A2}<|im_end|>"
    assert render_prompt(template, t, [{"role": "user", "content": Q1}]).endswith(
        f"{Q1}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tokenizer_template_without_turn_end_gets_eos_appended(tokenizers_for):
    t = copy.deepcopy(tokenizers_for("glm4"))
    t.chat_template = NO_STOP_TEMPLATE
    template = get_template("auto", t)
    features = encode_conversation(CONV, t, template, max_length=512)
    # The next role token ends a turn (as GLM-4 itself does); the last answer gets the EOS.
    assert trained(features, t) == f"\n{A1}<|user|>\n{A2}<|endoftext|>"
    assert (
        t.decode(features["input_ids"], skip_special_tokens=False)
        == t.apply_chat_template(
            [{"role": "system", "content": SYSTEM}] + [{"role": m.role, "content": m.content} for m in CONV.messages],
            tokenize=False,
        )
        + "<|endoftext|>"
    )
    assert stop_token_ids(template, t) == [t.convert_tokens_to_ids(s) for s in ("<|user|>", "<|endoftext|>")]


def test_tokenizer_template_that_renders_the_last_answer_differently(tok):
    t = copy.deepcopy(tok)
    t.chat_template = THINKING_TEMPLATE
    features = encode_conversation(CONV, t, get_template(None, t), max_length=512)
    assert trained(features, t) == f"{A1}<|im_end|>{A2}<|im_end|>"
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\nI am" in t.decode(features["input_ids"])


def test_bos_is_added_once(tokenizers_for):
    t = copy.deepcopy(tokenizers_for("llama3"))
    bos = "<|begin_of_text|>"
    t.bos_token = bos
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, t.convert_tokens_to_ids(bos))]
    )
    assert t("hi")["input_ids"][0] == t.bos_token_id  # this tokenizer adds a BOS by itself
    for name in ("llama3", "chatml"):  # llama3 writes the BOS itself, chatml does not
        ids = encode_conversation(CONV, t, get_template(name, t), max_length=512)["input_ids"]
        assert ids[0] == t.bos_token_id and ids.count(t.bos_token_id) == 1


@pytest.mark.slow
def test_real_smollm2_template(smollm2):
    t = AutoTokenizer.from_pretrained(smollm2)
    assert t.pad_token_id == t.eos_token_id
    template = get_template(None, t)
    features = encode_conversation(Conversation(None, CONV.messages), t, template, max_length=512)
    assert t.decode(features["input_ids"]).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert trained(features, t) == f"{A1}<|im_end|>{A2}<|im_end|>"
    assert stop_token_ids(template, t) == [t.convert_tokens_to_ids("<|im_end|>")]
    # With a system prompt, the named chatml template renders exactly like SmolLM2's own template.
    chatml = encode_conversation(CONV, t, get_template("chatml", t), max_length=512)
    assert chatml == encode_conversation(CONV, t, template, max_length=512)


def test_template_errors(tok):
    with pytest.raises(ConfigError, match="did you mean 'llama3'"):
        get_template("llama-3", tok)
    with pytest.raises(ConfigError, match=r"template 'llama3' needs <\|begin_of_text\|>, .*<\|eot_id\|> as single"):
        get_template("llama3", tok)
    t = copy.deepcopy(tok)
    t.chat_template = None
    with pytest.raises(ConfigError, match="the tokenizer has no chat_template"):
        get_template(None, t)
    assert get_template("intern2", tokenizers_for_internlm(tok)).name == "internlm2"


def tokenizers_for_internlm(tok):
    t = copy.deepcopy(tok)
    t.add_tokens(["<s>"], special_tokens=True)
    t.bos_token = "<s>"
    return t


# ---------------------------------------------------------------------------------------------- encoding


def test_pad_equal_to_eos_keeps_the_real_eos_trained(tok):
    assert tok.pad_token_id == tok.eos_token_id
    template = get_template(None, tok)
    short = Conversation(None, (Message("user", "Hi"), Message("assistant", "Hello")))
    feats = [encode_conversation(c, tok, template, 512) for c in (CONV, short)]
    batch = collator_for(tok)(feats)
    n_long, n_short = len(feats[0]["input_ids"]), len(feats[1]["input_ids"])
    assert batch["input_ids"].shape == (2, n_long)
    eos = tok.eos_token_id
    assert (batch["labels"][0] == eos).sum() == 2 and (batch["labels"][1] == eos).sum() == 1
    assert batch["labels"][1, n_short:].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][1, n_short:].eq(tok.pad_token_id).all()
    assert batch["attention_mask"][1].tolist() == [1] * n_short + [0] * (n_long - n_short)


def test_truncation_drops_oldest_turns_and_keeps_the_system_prompt(tok):
    template = get_template(None, tok)
    three = Conversation(SYSTEM, (Message("user", "Hi"), Message("assistant", "Hello")) + CONV.messages, "t:1")
    full = encode_conversation(three, tok, template, 512)
    last_two = encode_conversation(three.drop_pairs(1), tok, template, 512)
    assert len(last_two["input_ids"]) < len(full["input_ids"])
    cut = encode_conversation(three, tok, template, max_length=len(last_two["input_ids"]))
    assert cut == last_two
    assert tok.decode(cut["input_ids"]).startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>")
    assert trained(cut, tok) == f"{A1}<|im_end|>{A2}<|im_end|>"
    only_last = encode_conversation(three, tok, template, max_length=len(last_two["input_ids"]) - 1)
    assert trained(only_last, tok) == f"{A2}<|im_end|>"


def test_truncation_trims_the_left_of_the_question_then_drops(tok):
    template = get_template(None, tok)
    question = "The heart pumps blood through the arteries and veins of the body. " * 3 + Q2
    conv = Conversation(SYSTEM, (Message("user", question), Message("assistant", A2)))
    n = len(encode_conversation(conv, tok, template, 512)["input_ids"])
    cut = encode_conversation(conv, tok, template, max_length=n - 20)
    assert len(cut["input_ids"]) <= n - 20
    text = tok.decode(cut["input_ids"])
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert text.endswith(f"{Q2}<|im_end|>\n<|im_start|>assistant\n{A2}<|im_end|>\n")
    assert trained(cut, tok) == f"{A2}<|im_end|>"
    assert encode_conversation(conv, tok, template, max_length=20) is None


def test_source_and_target_caps(tok):
    template = get_template(None, tok)
    last_pair_prompt = SegmentTokenizer(tok, template).encode(CONV.drop_pairs(1)).last_answer_start
    features = encode_conversation(CONV, tok, template, 512, max_source_length=last_pair_prompt)
    assert trained(features, tok) == f"{A2}<|im_end|>"  # the first pair no longer fits in the prompt budget
    n_answer = len(ids_of(tok, A2)) + 1
    assert encode_conversation(CONV, tok, template, 512, max_target_length=n_answer) is not None
    assert encode_conversation(CONV, tok, template, 512, max_target_length=n_answer - 1) is None


def test_train_on_inputs_trains_everything(tok):
    features = encode_conversation(CONV, tok, get_template(None, tok), 512, train_on_inputs=True)
    assert features["labels"] == features["input_ids"]


def test_build_dataset_counts_dropped_and_tokens(tok):
    template = get_template(None, tok)
    long_answer = Conversation(None, (Message("user", "Hi"), Message("assistant", "Paris. " * 80)), "t:2")
    fits = len(encode_conversation(CONV, tok, template, 512)["input_ids"])
    dataset, stats = build_sft_dataset([CONV, long_answer, CONV], tok, template, max_length=fits)
    assert len(dataset) == 2 and set(dataset.column_names) == {"input_ids", "labels", "attention_mask"}
    n = len(dataset[0]["input_ids"])
    n_trained = sum(1 for label in dataset[0]["labels"] if label != IGNORE_INDEX)
    assert stats == {
        "samples": 2,
        "dropped_too_long": 1,
        "truncated": 0,
        "trainable_tokens": 2 * n_trained,
        "total_tokens": 2 * n,
    }
    with pytest.raises(DataError, match="all 1 conversations are too long: no last answer fits in max_length=64"):
        build_sft_dataset([long_answer], tok, template, max_length=64)


def test_prompt_ids_match_training_ids(tok):
    template = get_template(None, tok)
    encoder = SegmentTokenizer(tok, template)
    prompt = encoder.encode_prompt(CONV)
    full = encode_conversation(CONV, tok, template, 512)["input_ids"]
    assert full[: len(prompt)] == prompt
    assert tok.decode(full[len(prompt) :]) == f"{A2}<|im_end|>\n"


def test_preview_marks_the_trained_span_and_reports_lengths(tok):
    template = get_template(None, tok)
    n = len(encode_conversation(CONV, tok, template, 512)["input_ids"])
    long_answer = Conversation(None, (Message("user", "Hi"), Message("assistant", "Paris. " * 80)), "t:2")
    text = preview([CONV, long_answer], tok, template, max_length=n, n=2, color=False)
    assert f"assistant\n⟦{A1}<|im_end|>⟧\n<|im_start|>user" in text
    assert "--- t:2: dropped (its last answer does not fit" in text
    assert f"token lengths of 2 samples: min {n}," in text
    assert f"at max_length {n}: 0 truncated (oldest turns or the question cut), 1 dropped" in text
