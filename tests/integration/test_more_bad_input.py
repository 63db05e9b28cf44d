"""More bad input: each is one line naming the file, line and field, exit code 2, and nothing left behind; the
inputs that are fine (a BOM, Windows line ends) train exactly like their clean twins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunestack.data.pretrain import iter_documents

CHAT = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


def _sft(cli, model, data, out, *extra):
    return cli(
        "sft", "--model_name_or_path", model, "--train_file_dir", data, "--output_dir", out, "--max_steps", 1,
        "--report_to", "none", "--save_strategy", "no", *extra,
    )  # fmt: skip


def _error(result: tuple[int, str, str], out: Path, stage: str = "sft") -> str:
    code, _, err = result
    assert code == 2 and "Traceback" not in err, err
    assert not out.exists(), f"{out} was left behind"
    lines = [line for line in err.splitlines() if line.startswith(f"tunestack {stage}: error: ")]
    assert len(lines) == 1, err
    return lines[0].split("error: ", 1)[1]


def test_a_bom_and_windows_line_ends_load_like_clean_jsonl(cli, tiny_model, tmp_path):
    lines = [json.dumps(CHAT)] * 8
    for name, raw in (("bom", "\ufeff" + "\n".join(lines)), ("crlf", "\r\n".join(lines) + "\r\n")):
        data = tmp_path / name / "d.jsonl"
        data.parent.mkdir()
        data.write_bytes(raw.encode("utf-8"))
        code, out, err = _sft(cli, tiny_model, data, tmp_path / f"out-{name}")
        assert code == 0, err
        assert "data: 8 conversations" in out


def test_windows_line_ends_never_reach_the_trained_text(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_bytes(b"first line\r\nsecond line\r\n")
    assert list(iter_documents(path, "text", keep_linebreaks=True)) == ["first line\nsecond line\n"]
    assert list(iter_documents(path, "text", keep_linebreaks=False)) == ["first line", "second line"]


def test_an_empty_pt_file_beside_good_ones_is_skipped_with_a_note(cli, tiny_model, tmp_path, caplog):
    data = tmp_path / "pt"
    data.mkdir()
    (data / "a.txt").write_text("The heart pumps blood through the body. " * 40)
    (data / "empty.txt").write_text("  \n")
    code, _, err = cli(
        "pt", "--model_name_or_path", tiny_model, "--train_file_dir", data, "--output_dir", tmp_path / "out",
        "--block_size", 32, "--max_steps", 1, "--report_to", "none",
    )  # fmt: skip
    assert code == 0, err
    assert f"skipped 1 file without text: {data / 'empty.txt'}" in caplog.text


@pytest.mark.parametrize(
    "record,message",
    [
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "4"}]},
         "d.jsonl:1: turn 1 'content' must be a string, got int"),
        ({"messages": "x"}, "d.jsonl:1: 'messages' must be a list of turns, got str"),
        ({"messages": [{"role": "user", "content": "\ud83d"}, {"role": "assistant", "content": "4"}]},
         "d.jsonl:1: field 'messages.0.content' holds a lone surrogate escape \\ud83d, which is not text"),
    ],
)  # fmt: skip
def test_wrong_types_and_lone_surrogates_name_the_line_and_field(cli, tiny_model, tmp_path, record, message):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(record) + "\n")  # json.dumps writes a lone surrogate as its \ud83d escape
    out = tmp_path / "out"
    assert _error(_sft(cli, tiny_model, data, out), out).endswith(message)


def test_a_non_utf8_jsonl_names_line_and_byte(cli, tiny_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(json.dumps(CHAT).encode() + b"\n" + b'{"messages": "caf\xe9"}\n')
    out = tmp_path / "out"
    assert _error(_sft(cli, tiny_model, data, out), out) == (
        f"{data}:2: not valid UTF-8 at byte offset {len(json.dumps(CHAT)) + 18} (byte 0xe9); re-save the file as UTF-8"
    )


def test_duplicate_keys_in_a_recipe_are_refused_naming_the_key(cli, tiny_model, tmp_path):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"model_name_or_path: {tiny_model}\nlearning_rate: 1.0e-4\ntrain_file_dir: d\nlearning_rate: 3\n")
    out = tmp_path / "out"
    message = _error(cli("sft", recipe, "--output_dir", out), out)
    assert message == f"{recipe}:4: key 'learning_rate' is given twice in this mapping (first on line 2); keep one"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("stages:\n  - {name: a, stage: sft, name: b}\n")
    code, _, err = cli("run", pipeline)
    assert code == 2 and f"{pipeline}:2: key 'name' is given twice" in err


def test_model_max_length_above_the_context_is_refused(cli, tiny_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(CHAT) + "\n")
    out = tmp_path / "out"
    message = _error(_sft(cli, tiny_model, data, out, "--model_max_length", 4096), out)
    assert message == (
        "--model_max_length 4096 is larger than the model's context of 256 positions (max_position_embeddings); "
        "use at most that"
    )


def _copy_model(source: Path, target: Path, skip: tuple[str, ...] = ()) -> Path:
    target.mkdir()
    for f in source.iterdir():
        if f.is_file() and not any(f.name.startswith(s) for s in skip):
            (target / f.name).write_bytes(f.read_bytes())
    return target


def test_model_folders_that_cannot_load(cli, tiny_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(CHAT) + "\n")
    no_tokenizer = _copy_model(tiny_model, tmp_path / "no_tok", skip=("tokenizer", "special_tokens", "chat_template"))
    out = tmp_path / "out"
    assert _error(_sft(cli, no_tokenizer, data, out), out) == (
        f"{no_tokenizer} has no tokenizer (no tokenizer.json, tokenizer_config.json or vocabulary file): copy the "
        "model's tokenizer files there, or pass --tokenizer_name_or_path"
    )
    corrupt = _copy_model(tiny_model, tmp_path / "corrupt")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message = _error(_sft(cli, corrupt, data, out), out)
    assert message.startswith(f"cannot load the model from {corrupt}: ")


def test_a_truncated_gguf_is_a_clear_error(cli, smollm2_gguf, tmp_path):
    truncated = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as fh:
        truncated.write_bytes(fh.read(4 << 20))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(CHAT) + "\n")
    out = tmp_path / "out"
    message = _error(_sft(cli, truncated, data, out), out)
    assert message.startswith(f"cannot load a tokenizer from {tmp_path}: ") or message.startswith(
        f"cannot load the model from {truncated}: "
    ), message


def test_an_output_folder_is_not_data(cli, tiny_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(CHAT) * 1 + "\n")
    first = tmp_path / "first"
    assert _sft(cli, tiny_model, data, first)[0] == 0
    out = tmp_path / "out"
    assert _error(_sft(cli, tiny_model, first, out), out) == (
        f"{first} is a tunestack output folder (a sft run), not SFT data: point the option at the data files or "
        "the folder that holds them"
    )
