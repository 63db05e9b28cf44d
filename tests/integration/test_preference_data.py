"""Preference data: every format to one schema, SFT-identical encoding, length rules, bad records named by line."""

from __future__ import annotations

import json

import pytest
from preference_sets import write_jsonl
from transformers import AutoTokenizer

from tunestack.data.formats import Conversation, Message
from tunestack.data.preference import KTOSample, PreferencePair, load_preferences, parse_preference, unpaired
from tunestack.data.preference_encoding import PreferenceEncoder, PreferenceLimits, build_preference_dataset
from tunestack.data.supervised import encode_conversation
from tunestack.data.templates import get_template
from tunestack.errors import DataError

HISTORY = [["Hi", "Hello!"]]
EXPECTED = PreferencePair(
    "Be brief.",
    (Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "2+2?")),
    "4",
    "5",
)
USER = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
]
RECORDS = {
    "medicalgpt": {
        "system": "Be brief.",
        "history": HISTORY,
        "question": "2+2?",
        "response_chosen": "4",
        "response_rejected": "5",
    },
    "chosen_rejected": {"system": "Be brief.", "history": HISTORY, "prompt": "2+2?", "chosen": "4", "rejected": "5"},
    "messages": {
        "chosen": [{"role": "system", "content": "Be brief."}, *USER, {"role": "assistant", "content": "4"}],
        "rejected": [{"role": "system", "content": "Be brief."}, *USER, {"role": "assistant", "content": "5"}],
    },
    "messages_with_prompt": {
        "system": "Be brief.",
        "prompt": USER,
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    },
    "messages_with_string_prompt": {
        "system": "Be brief.",
        "history": HISTORY,
        "prompt": "2+2?",
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    },
}


@pytest.fixture
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_every_pair_format_normalises_to_the_same_pair(name):
    assert parse_preference(RECORDS[name]) == EXPECTED


def test_kto_records_and_pairs_unpaired():
    sample = parse_preference({"prompt": "2+2?", "completion": "4", "label": True})
    assert sample == KTOSample(None, (Message("user", "2+2?"),), "4", True)
    with pytest.raises(DataError, match="'label' must be true or false"):
        parse_preference({"prompt": "2+2?", "completion": "4", "label": "yes"})


def test_kto_stage_splits_pairs_and_dpo_refuses_unpaired_records(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [RECORDS["medicalgpt"]])
    samples = unpaired(load_preferences([path], kind="unpaired").items)
    assert [(s.completion, s.desirable) for s in samples] == [("4", True), ("5", False)]
    kto = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "2+2?", "completion": "4", "label": True}])
    with pytest.raises(DataError, match=r"k\.jsonl:1: a kto record .* tunestack kto"):
        load_preferences([kto], kind="pairs")


def test_encoding_matches_what_sft_trains(tokenizer):
    """The prompt is the inference prompt and each answer exactly the tokens SFT puts a loss on."""
    template = get_template(None, tokenizer)
    encoder = PreferenceEncoder(tokenizer, template)
    row, problem, truncated = encoder.encode_pair(EXPECTED)
    assert problem is None and not truncated
    for answer, ids in (("4", row["chosen_ids"]), ("5", row["rejected_ids"])):
        conv = Conversation(EXPECTED.system, EXPECTED.prompt_messages + (Message("assistant", answer),))
        sft = encode_conversation(conv, tokenizer, template, max_length=512)
        # the last trained span is the pair's answer (the earlier "Hello!" belongs to the prompt)
        last = [i for i, label in enumerate(sft["labels"]) if label != -100][-len(ids) :]
        assert [sft["input_ids"][i] for i in last] == ids
        assert sft["input_ids"][: last[0]] == row["prompt_ids"]
    assert tokenizer.decode(row["chosen_ids"]) == "4<|im_end|>"
    assert tokenizer.decode(row["prompt_ids"]).endswith("<|im_start|>assistant\n")


def test_length_rules(tokenizer):
    template = get_template(None, tokenizer)
    long_history = tuple(m for _ in range(20) for m in (Message("user", "blood " * 5), Message("assistant", "ok")))
    pair = PreferencePair(None, long_history + (Message("user", "2+2?"),), "4", "5")
    full, _, _ = PreferenceEncoder(tokenizer, template).encode_pair(pair)
    row, _, truncated = PreferenceEncoder(tokenizer, template, PreferenceLimits(max_source_length=16)).encode_pair(pair)
    assert truncated and row["prompt_ids"] == full["prompt_ids"][-16:]  # the end of the prompt is kept
    long_answer = PreferencePair(None, (Message("user", "2+2?"),), "four " * 30, "5")
    fine = PreferencePair(None, (Message("user", "x"),), "I am fine.", "A longer answer here.")
    encoder = PreferenceEncoder(tokenizer, template, PreferenceLimits(max_target_length=20, min_target_length=3))
    dataset, stats = build_preference_dataset([long_answer, EXPECTED, fine], encoder)
    assert len(dataset) == stats["samples"] == 1
    assert stats["dropped_too_long"] == 1 and stats["dropped_too_short"] == 1  # "4<|im_end|>" has 2 tokens
    with pytest.raises(DataError, match="no preference sample fits"):
        build_preference_dataset([long_answer], encoder)


BAD = [
    RECORDS["medicalgpt"],
    {"question": "Hi?", "response_chosen": "Hello.", "response_rejected": "Hello."},
    {"question": "Hi?", "response_chosen": "Hello."},
]
BAD_MESSAGES = [
    RECORDS["messages"],
    {
        "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "user", "content": "Hey?"}, {"role": "assistant", "content": "Go."}],
    },
]


@pytest.fixture
def bad_dir(tmp_path):
    folder = tmp_path / "bad"
    write_jsonl(folder / "a.jsonl", BAD)
    write_jsonl(folder / "b.jsonl", BAD_MESSAGES)
    with open(folder / "a.jsonl", "a") as fh:
        fh.write("{not json\n")
    return folder


@pytest.mark.parametrize("stage", ["rm", "dpo", "kto"])
def test_bad_records_are_reported_by_line_with_exit_2(cli, monkeypatch, tiny_model, bad_dir, tmp_path, stage):
    out = tmp_path / "out"
    code, _, err = cli(stage, "--model_name_or_path", tiny_model, "--train_file_dir", bad_dir, "--output_dir", out)
    assert code == 2, err
    a, b = bad_dir / "a.jsonl", bad_dir / "b.jsonl"
    assert f"{a}:2: chosen and rejected answers are identical" in err
    assert f"{a}:3: medicalgpt record has no 'response_rejected'" in err
    assert f"{a}:4: malformed JSON" in err
    assert f"{b}:2: chosen and rejected have different prompts (turn 1 differs)" in err
    assert f"{a}:1" not in err and f"{b}:1" not in err
    assert "Traceback" not in err and not out.exists()


def test_skip_bad_records_writes_rejects(cli, monkeypatch, tiny_model, bad_dir, tmp_path):
    write_jsonl(bad_dir / "c.jsonl", [RECORDS["chosen_rejected"]] * 6)
    out = tmp_path / "out"
    code, stdout, err = cli(
        "dpo", "--model_name_or_path", tiny_model, "--train_file_dir", bad_dir, "--output_dir", out,
        "--skip_bad_records", "true", "--max_steps", 1, "--per_device_train_batch_size", 2,
        "--save_strategy", "no", "--report_to", "none",
    )  # fmt: skip
    assert code == 0, err
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 4 and all(r["reason"] for r in rejects)
    assert "4 bad records skipped" in stdout
