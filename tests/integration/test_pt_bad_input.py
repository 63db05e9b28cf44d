"""Bad PT input: one readable line naming what and where, exit code 2, no traceback, no output folder left."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tunestack.errors import ModelError

Cli = Callable[..., tuple[int, str, str]]
PREFIX = "tunestack pt: error: "


def _pt(cli: Cli, model: Path | str, data: Path | str, out: Path, *extra: object) -> tuple[int, str, str]:
    return cli(
        "pt",
        "--model_name_or_path",
        model,
        "--train_file_dir",
        data,
        "--output_dir",
        out,
        "--block_size",
        32,
        "--max_steps",
        2,
        "--report_to",
        "none",
        *extra,
    )


def _user_error(code: int, err: str, out: Path) -> str:
    """Assert the contract of a user error and return its message."""
    assert code == 2, err
    assert "Traceback" not in err, err
    hits = [line[line.index(PREFIX) + len(PREFIX) :] for line in err.splitlines() if PREFIX in line]
    assert len(hits) == 1, err  # one line, printed once
    assert not out.exists(), f"{out} was left behind: {sorted(p.name for p in out.iterdir())}"
    return hits[0]


@pytest.fixture
def good_txt(tmp_path: Path) -> Path:
    folder = tmp_path / "good"
    folder.mkdir()
    (folder / "a.txt").write_text("The heart pumps blood.\n心脏把血液输送到全身。\n" * 40, encoding="utf-8")
    return folder


# ------------------------------------------------------------------------------------------------
# Data


def test_missing_data_folder(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    code, _, err = _pt(cli, tiny_model, missing, tmp_path / "out")
    assert _user_error(code, err, tmp_path / "out") == f"training path does not exist: {missing}"


def test_empty_data_folder(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _pt(cli, tiny_model, empty, tmp_path / "out")
    msg = _user_error(code, err, tmp_path / "out")
    assert msg.startswith(f"{empty}: no training files of a known type .txt/.json/.jsonl/.csv/.parquet")
    assert "(the folder is empty)" in msg


def test_folder_without_known_file_types(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "README.md").write_text("# notes\n")
    (docs / "scan.pdf").write_bytes(b"%PDF-1.4\n")
    code, _, err = _pt(cli, tiny_model, docs, tmp_path / "out")
    msg = _user_error(code, err, tmp_path / "out")
    assert msg.startswith(f"{docs}: no training files of a known type")
    assert "(found: .md, .pdf)" in msg


def test_non_utf8_txt_names_file_line_and_byte_offset(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.txt").write_text("fine text\n" * 50, encoding="utf-8")
    bad = data / "gbk.txt"
    bad.write_bytes(b"first line\n" + "第二行".encode("gbk") + b"\n")  # GBK, not UTF-8
    code, _, err = _pt(cli, tiny_model, data, tmp_path / "out")
    msg = _user_error(code, err, tmp_path / "out")
    assert msg.startswith(f"{bad}:2: not valid UTF-8 at byte offset 11 (byte 0xb5)")
    assert "re-save the file as UTF-8" in msg


def test_malformed_json_line_names_file_and_line(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    bad = data / "corpus.jsonl"
    bad.write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": "three"\n{"text": "four"}\n', encoding="utf-8")
    code, _, err = _pt(cli, tiny_model, data, tmp_path / "out")
    msg = _user_error(code, err, tmp_path / "out")
    assert msg.startswith(f"{bad}:4: malformed JSON (")


def test_malformed_json_array_names_line(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    bad = data / "corpus.json"
    bad.write_text('[\n  {"text": "one"},\n  {"text": "two",}\n]\n', encoding="utf-8")
    code, _, err = _pt(cli, tiny_model, data, tmp_path / "out")
    assert _user_error(code, err, tmp_path / "out").startswith(f"{bad}:3: malformed JSON (")


def test_record_without_text_field_lists_its_fields(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    bad = data / "corpus.jsonl"
    rows = [{"text": "a sentence"}, {"text": "another"}, {"content": "misnamed", "id": 3}]
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    code, _, err = _pt(cli, tiny_model, data, tmp_path / "out")
    msg = _user_error(code, err, tmp_path / "out")
    assert msg == f"{bad}:3: no 'text' field (fields: content, id); set --text_field"


def test_csv_without_text_column_names_row_line(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    bad = data / "notes.csv"
    bad.write_text("id,body\n1,heart\n2,lungs\n", encoding="utf-8")
    code, _, err = _pt(cli, tiny_model, data, tmp_path / "out")
    assert _user_error(code, err, tmp_path / "out") == f"{bad}:2: no 'text' field (fields: id, body); set --text_field"


def test_text_field_of_wrong_type(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    bad = data / "corpus.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": ["a", "list"]}\n', encoding="utf-8")
    code, _, err = _pt(cli, tiny_model, data, tmp_path / "out")
    assert _user_error(code, err, tmp_path / "out") == f"{bad}:2: field 'text' must be a string, got list"


def test_bad_validation_file_is_reported_too(cli: Cli, tiny_model: Path, good_txt: Path, tmp_path: Path) -> None:
    val = tmp_path / "val"
    val.mkdir()
    bad = val / "held_out.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "typo"}\n', encoding="utf-8")
    code, _, err = _pt(cli, tiny_model, good_txt, tmp_path / "out", "--validation_file_dir", val, "--do_eval")
    assert _user_error(code, err, tmp_path / "out") == f"{bad}:2: no 'text' field (fields: txt); set --text_field"


def test_corpus_shorter_than_one_block(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "tiny.txt").write_text("short\n", encoding="utf-8")
    code, _, err = _pt(cli, tiny_model, data, tmp_path / "out")
    msg = _user_error(code, err, tmp_path / "out")
    assert "fewer than one block of 32; lower --block_size or pass --keep_remainder" in msg


def test_malformed_line_found_while_streaming(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    """With --streaming the bad line is met during training; the half-started folder is still removed."""
    data = tmp_path / "data"
    data.mkdir()
    bad = data / "a.jsonl"
    bad.write_text('{"text": "the heart"}\n{"text": "the lungs"\n', encoding="utf-8")
    code, _, err = _pt(cli, tiny_model, data, tmp_path / "out", "--streaming")
    assert _user_error(code, err, tmp_path / "out").startswith(f"{bad}:2: malformed JSON (")


# ------------------------------------------------------------------------------------------------
# Model and options


def test_block_size_larger_than_model_context(cli: Cli, tiny_model: Path, good_txt: Path, tmp_path: Path) -> None:
    code, _, err = _pt(cli, tiny_model, good_txt, tmp_path / "out", "--block_size", 512)
    msg = _user_error(code, err, tmp_path / "out")
    assert msg == (
        "--block_size 512 is larger than the model's context of 256 positions (max_position_embeddings); "
        "use at most that"
    )


def test_unknown_model_alias_says_how_to_get_it_offline(cli: Cli, good_txt: Path, tmp_path: Path) -> None:
    code, _, err = _pt(cli, "Qwen/Qwen1.5-0.5B-Chat-not-here", good_txt, tmp_path / "out")
    msg = _user_error(code, err, tmp_path / "out")
    assert msg.startswith("model 'Qwen/Qwen1.5-0.5B-Chat-not-here' not found")
    assert "built-in alias (smollm2-135m-instruct)" in msg
    assert "tunestack runs offline: download it once (e.g. `hf download Qwen/Qwen1.5-0.5B-Chat-not-here" in msg


def test_missing_model_path(cli: Cli, good_txt: Path, tmp_path: Path) -> None:
    missing = tmp_path / "models" / "qwen-0.5b"
    code, _, err = _pt(cli, missing, good_txt, tmp_path / "out")
    assert _user_error(code, err, tmp_path / "out").startswith(f"model path does not exist: {missing}")


def test_missing_model_path_says_how_to_get_a_model(cli: Cli, good_txt: Path, tmp_path: Path) -> None:
    code, _, err = _pt(cli, tmp_path / "models" / "qwen-0.5b", good_txt, tmp_path / "out")
    msg = _user_error(code, err, tmp_path / "out")
    assert "download" in msg and "smollm2-135m-instruct" in msg


def test_unknown_flag_suggests_the_right_one(cli: Cli, tiny_model: Path, good_txt: Path, tmp_path: Path) -> None:
    code, _, err = _pt(cli, tiny_model, good_txt, tmp_path / "out", "--lora_rnak", 8)
    assert _user_error(code, err, tmp_path / "out") == "unknown option --lora_rnak (did you mean --lora_rank?)"


def test_all_option_problems_in_one_line(cli: Cli, tiny_model: Path, good_txt: Path, tmp_path: Path) -> None:
    code, _, err = _pt(
        cli, tiny_model, good_txt, tmp_path / "out", "--blok_size", 64, "--validation_split_percentage", 100
    )
    msg = _user_error(code, err, tmp_path / "out")
    assert "unknown option --blok_size (did you mean --block_size?)" in msg
    assert "--validation_split_percentage must be in [0, 100)" in msg


def test_streaming_needs_max_steps(cli: Cli, tiny_model: Path, good_txt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = cli("pt", "--model_name_or_path", tiny_model, "--train_file_dir", good_txt, "--output_dir", out,
                       "--streaming", "--report_to", "none")  # fmt: skip
    assert _user_error(code, err, out) == "--streaming needs --max_steps (a stream has no length)"


def test_hub_dataset_is_refused_offline(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = cli("pt", "--model_name_or_path", tiny_model, "--dataset_name", "wikitext", "--output_dir", out)
    msg = _user_error(code, err, out)
    assert "--dataset_name wikitext: tunestack runs offline and does not fetch hub datasets" in msg
    assert "--train_file_dir is required" in msg


def test_folder_of_another_run_is_left_untouched(cli: Cli, tiny_model: Path, good_txt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    manifest = json.dumps({"stage": "sft", "status": "complete"})
    (out / "run.json").write_text(manifest)
    code, _, err = _pt(cli, tiny_model, good_txt, out)
    assert code == 2 and "Traceback" not in err
    assert f"{out} already holds a sft run (complete); pass --overwrite_output_dir to replace it" in err
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]
    assert (out / "run.json").read_text() == manifest


# ------------------------------------------------------------------------------------------------
# bf16


def test_bfloat16_refused_on_a_gpu_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from tunestack.model.load import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100-SXM2-16GB")
    with pytest.raises(ModelError) as info:
        resolve_dtype("bfloat16")
    assert str(info.value) == (
        "this GPU (Tesla V100-SXM2-16GB) has no bfloat16 support; use --torch_dtype float16 --fp16"
    )
    assert resolve_dtype("auto") == torch.float16  # auto picks what the GPU has


def test_bf16_flags_of_a_tutorial_script_run_on_cpu(cli: Cli, tiny_model: Path, good_txt: Path, tmp_path: Path) -> None:
    """MedicalGPT scripts pass `--torch_dtype bfloat16 --bf16`; on a CPU that is torch autocast, not an error."""
    out = tmp_path / "out"
    code, _, err = _pt(cli, tiny_model, good_txt, out, "--bf16", "--torch_dtype", "bfloat16", "--logging_steps", 1)
    assert code == 0, err
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["options"]["model"]["torch_dtype"] == "bfloat16"
    assert manifest["options"]["train"]["bf16"] is True
    losses = [json.loads(line).get("loss") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([x for x in losses if x is not None]) == 2
    assert (out / "adapter_model.safetensors").exists()
