"""PT data: the tokenized cache is reused and invalidated, documents keep their BOS/EOS, every input format reads;
the fast encoding path (backend encode_batch_fast, threaded, numpy joining) gives exactly the tokenizer's ids."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from tunestack.config.pretrain import PretrainDataArguments
from tunestack.data import pretrain
from tunestack.data.collators import IGNORE_INDEX, PadCollator
from tunestack.data.pretrain import DocumentEncoder, PretrainCorpus, load_pretrain_corpus, tokenize_files

Cli = Callable[..., tuple[int, str, str]]

DOCS = [
    "The heart pumps blood through the arteries and veins of the body.",
    "Aspirin reduces fever and pain; it also thins the blood.",
    "心脏通过动脉和静脉把血液输送到全身。",
    "A doctor listens to the lungs with a stethoscope.",
    "阿司匹林可以退烧止痛。",
]
# Edge cases for the encoder: surrounding spaces, a one-character document, digits and symbols.
ENCODING_DOCS = [*DOCS, "  leading spaces and trailing ones  ", "x", "Numbers 12345 and symbols <>&; in one line."]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _corpus(tokenizer: Any, data: Path, cache: Path, block_size: int = 16, **options: Any) -> PretrainCorpus:
    args = PretrainDataArguments(train_file_dir=str(data), block_size=block_size, **options)
    return load_pretrain_corpus(args, tokenizer, block_size, cache, do_eval=False, seed=0)


def _stream(corpus: PretrainCorpus) -> list[int]:
    return [t for block in corpus.train["input_ids"] for t in block]


def _expected(tokenizer: Any, docs: list[str], special: tuple[int | None, int | None] | None = None) -> list[int]:
    """BOS + document + EOS, document after document (`special`: other BOS/EOS ids than the tokenizer's, None
    for none)."""
    bos, eos = special if special is not None else (tokenizer.bos_token_id, tokenizer.eos_token_id)
    out: list[int] = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        out += ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
    return out


def _pt(cli: Cli, model: Path, data: Path, out: Path, *extra: object) -> tuple[int, str, str]:
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
        "--per_device_train_batch_size",
        2,
        "--logging_steps",
        1,
        "--report_to",
        "none",
        *extra,
    )


def _manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "run.json").read_text())


def _write_txt(folder: Path, lines: list[str], name: str = "a.txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# The tokenized-data cache


def test_second_run_reuses_the_cache_without_tokenizing(
    cli: Cli, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    _write_txt(data, DOCS * 30)
    code, stdout, err = _pt(cli, tiny_model, data, tmp_path / "run1", "--cache_dir", cache)
    assert code == 0, err
    first = _manifest(tmp_path / "run1")["data_stats"]
    assert first["train_cache_hit"] is False
    assert "(tokenized data from cache)" not in stdout

    def no_tokenizing(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("tokenize_files was called although the cache is valid")

    monkeypatch.setattr(pretrain, "tokenize_files", no_tokenizing)
    code, stdout, err = _pt(cli, tiny_model, data, tmp_path / "run2", "--cache_dir", cache)
    assert code == 0, err
    second = _manifest(tmp_path / "run2")
    assert second["status"] == "complete"
    assert second["data_stats"]["train_cache_hit"] is True
    assert second["data_fingerprint"] == _manifest(tmp_path / "run1")["data_fingerprint"]
    for key in ("train_documents", "train_tokens", "train_blocks"):
        assert second["data_stats"][key] == first[key]
    assert "(tokenized data from cache)" in stdout


def test_changed_file_or_option_tokenizes_again(
    cli: Cli, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    path = _write_txt(data, DOCS * 30)
    calls: list[int] = []
    real = pretrain.tokenize_files

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "tokenize_files", counting)

    def run(name: str, *extra: object) -> dict[str, Any]:
        code, _, err = _pt(cli, tiny_model, data, tmp_path / name, "--cache_dir", cache, *extra)
        assert code == 0, err
        return _manifest(tmp_path / name)

    first = run("r1")
    assert len(calls) == 1 and first["data_stats"]["train_cache_hit"] is False

    path.write_text(path.read_text(encoding="utf-8") + "A new line about the kidneys.\n", encoding="utf-8")
    changed = run("r2")
    assert len(calls) == 2, "a changed file must be tokenized again"
    assert changed["data_stats"]["train_cache_hit"] is False
    assert changed["data_stats"]["train_tokens"] > first["data_stats"]["train_tokens"]
    assert changed["data_fingerprint"] != first["data_fingerprint"]

    assert run("r3")["data_stats"]["train_cache_hit"] is True and len(calls) == 2
    assert run("r4", "--block_size", 48)["data_stats"]["train_cache_hit"] is False and len(calls) == 3
    assert run("r5", "--keep_linebreaks", "false")["data_stats"]["train_cache_hit"] is False and len(calls) == 4
    assert run("r6", "--overwrite_cache")["data_stats"]["train_cache_hit"] is False and len(calls) == 5


# ------------------------------------------------------------------------------------------------
# Documents and blocks


def test_documents_are_separated_by_bos_and_eos(tokenizer: Any, tmp_path: Path) -> None:
    _write_txt(tmp_path / "data", DOCS)
    corpus = _corpus(tokenizer, tmp_path / "data", tmp_path / "cache", block_size=16, keep_linebreaks=False)
    expected = _expected(tokenizer, DOCS)
    blocks = corpus.train["input_ids"]
    assert all(len(b) == 16 for b in blocks)
    assert _stream(corpus) == expected[: len(blocks) * 16]  # the partial last block is dropped
    assert len(expected) - len(blocks) * 16 < 16
    assert corpus.stats["train_documents"] == len(DOCS)
    assert corpus.stats["train_tokens"] == len(expected)
    text = tokenizer.decode(_stream(corpus))
    assert text.startswith(f"<|im_start|>{DOCS[0]}<|im_end|><|im_start|>{DOCS[1]}<|im_end|>")


def test_keep_remainder_keeps_the_last_partial_block(tokenizer: Any, tmp_path: Path) -> None:
    _write_txt(tmp_path / "data", DOCS)
    corpus = _corpus(
        tokenizer, tmp_path / "data", tmp_path / "cache", block_size=16, keep_linebreaks=False, keep_remainder=True
    )
    expected = _expected(tokenizer, DOCS)
    assert len(expected) % 16, "the corpus must not fill whole blocks for this test"
    assert _stream(corpus) == expected
    assert len(corpus.train["input_ids"][-1]) == len(expected) % 16


def test_padding_of_the_partial_block_carries_no_loss(tiny_model: Path, tokenizer: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    _write_txt(tmp_path / "data", DOCS)
    corpus = _corpus(
        tokenizer, tmp_path / "data", tmp_path / "cache", block_size=16, keep_linebreaks=False, keep_remainder=True
    )
    full, partial = corpus.train[0], corpus.train[len(corpus.train) - 1]
    n = len(partial["input_ids"])
    batch = PadCollator(tokenizer.pad_token_id)([full, partial])
    assert batch["input_ids"].shape == (2, 16)
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][1, n:] == 0).all()
    assert (batch["labels"][1, :n] == torch.tensor(partial["input_ids"])).all()
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        padded = model(**{k: v[1:] for k, v in batch.items()}).loss
        alone = PadCollator(tokenizer.pad_token_id)([partial])
        unpadded = model(**alone).loss
    torch.testing.assert_close(padded, unpadded)


def test_keep_remainder_trains_and_counts_no_padding(
    cli: Cli, tiny_model: Path, tokenizer: Any, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    _write_txt(data, DOCS)
    n_tokens = len(_expected(tokenizer, DOCS))
    code, stdout, err = cli(
        "pt", "--model_name_or_path", tiny_model, "--train_file_dir", data, "--output_dir", tmp_path / "out",
        "--block_size", 32, "--keep_linebreaks", "false", "--keep_remainder", "--num_train_epochs", 1,
        "--per_device_train_batch_size", 8, "--report_to", "none", "--cache_dir", tmp_path / "cache",
    )  # fmt: skip
    assert code == 0, err
    manifest = _manifest(tmp_path / "out")
    assert manifest["data_stats"]["train_blocks"] == -(-n_tokens // 32)
    assert manifest["summary"]["global_step"] == 1  # every block, the partial one included, in one batch
    assert manifest["summary"]["tokens_seen"] == n_tokens  # padding is not counted as trained tokens
    assert f"tokens trained: {n_tokens:,}" in stdout


# ------------------------------------------------------------------------------------------------
# Input formats


def test_json_jsonl_csv_parquet_with_a_text_field(tokenizer: Any, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.json").write_text(json.dumps([{"text": DOCS[0], "id": 1}, {"text": DOCS[1]}], ensure_ascii=False))
    (data / "b.jsonl").write_text(
        json.dumps({"text": DOCS[2], "source": "x"}, ensure_ascii=False) + "\n\n" + json.dumps({"text": ""}) + "\n",
        encoding="utf-8",
    )
    with open(data / "c.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "text"])
        writer.writerow([1, DOCS[3]])
    pq.write_table(pa.table({"text": [DOCS[4]], "n": [5]}), data / "d.parquet")
    corpus = _corpus(tokenizer, data, tmp_path / "cache", block_size=256, keep_remainder=True)
    assert corpus.stats["train_files"] == 4
    assert corpus.stats["train_documents"] == 5  # the empty text is skipped
    assert _stream(corpus) == _expected(tokenizer, DOCS)


def test_text_field_option(cli: Cli, tiny_model: Path, tokenizer: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"content": doc, "text": "NOT THIS"} for doc in DOCS]
    (data / "notes.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    corpus = _corpus(tokenizer, data, tmp_path / "cache", block_size=256, keep_remainder=True, text_field="content")
    assert _stream(corpus) == _expected(tokenizer, DOCS)
    (data / "notes.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows * 20), encoding="utf-8")
    code, _, err = _pt(
        cli, tiny_model, data, tmp_path / "out", "--text_field", "content", "--cache_dir", tmp_path / "c"
    )
    assert code == 0, err
    manifest = _manifest(tmp_path / "out")
    assert manifest["options"]["data"]["text_field"] == "content"
    assert manifest["data_stats"]["train_documents"] == 100


def test_csv_field_spanning_lines_keeps_its_line_breaks(tokenizer: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    note = "Patient history:\nno allergies.\r\nBlood pressure normal."
    with open(data / "notes.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "text"])
        writer.writerow([1, note])
        writer.writerow([2, DOCS[0]])
        writer.writerow([3, ""])
    corpus = _corpus(tokenizer, data, tmp_path / "cache", block_size=256, keep_remainder=True)
    assert _stream(corpus) == _expected(tokenizer, [note, DOCS[0]])


def test_csv_errors_name_the_line_where_the_row_starts(tmp_path: Path) -> None:
    from tunestack.data.sources import iter_records

    path = tmp_path / "notes.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "text"])
        writer.writerow([1, "one\ntwo\nthree"])
        writer.writerow([2, "four"])
    assert [(r.data["id"], r.line) for r in iter_records(path)] == [("1", 2), ("2", 5)]


def test_jsonl_with_unicode_line_separators_in_text(tokenizer: Any, tmp_path: Path) -> None:
    """json.dumps(ensure_ascii=False) writes U+2028/U+2029/U+0085 raw; they are not line ends of a JSONL file."""
    data = tmp_path / "data"
    data.mkdir()
    docs = ["第一段\u2028第二段", "para one\u2029para two", "next\x85line", "form\x0cfeed"]
    (data / "web.jsonl").write_text(
        "\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs) + "\n", encoding="utf-8"
    )
    corpus = _corpus(tokenizer, data, tmp_path / "cache", block_size=256, keep_remainder=True)
    assert corpus.stats["train_documents"] == 4
    assert _stream(corpus) == _expected(tokenizer, docs)


def test_txt_one_document_per_line_or_whole_file(tokenizer: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    lines = [DOCS[0], "", DOCS[1], "   ", DOCS[2]]
    _write_txt(data, lines, "a.txt")
    _write_txt(data, [DOCS[3], DOCS[4]], "b.txt")

    per_line = _corpus(tokenizer, data, tmp_path / "c1", block_size=256, keep_remainder=True, keep_linebreaks=False)
    assert per_line.stats["train_documents"] == 5  # blank lines are not documents
    assert _stream(per_line) == _expected(tokenizer, DOCS)

    whole = _corpus(tokenizer, data, tmp_path / "c2", block_size=256, keep_remainder=True, keep_linebreaks=True)
    assert whole.stats["train_documents"] == 2  # one per file, line breaks kept inside
    file_a = "\n".join(lines) + "\n"
    file_b = f"{DOCS[3]}\n{DOCS[4]}\n"
    assert _stream(whole) == _expected(tokenizer, [file_a, file_b])


# ------------------------------------------------------------------------------------------------
# Streaming and sample limits


def test_streaming_with_max_steps_trains(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_txt(data, DOCS * 40)
    val = tmp_path / "val"
    _write_txt(val, DOCS * 10)
    code, stdout, err = _pt(
        cli, tiny_model, data, tmp_path / "out", "--streaming", "--max_steps", 3, "--keep_linebreaks", "false",
        "--do_train", "--do_eval", "--validation_file_dir", val, "--cache_dir", tmp_path / "cache",
    )  # fmt: skip
    assert code == 0, err
    manifest = _manifest(tmp_path / "out")
    assert manifest["status"] == "complete"
    assert manifest["data_stats"]["streaming"] is True
    assert manifest["summary"]["global_step"] == 3
    assert manifest["summary"]["tokens_seen"] == 3 * 2 * 32
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert "eval_perplexity" in manifest["metrics"] and "before_eval_perplexity" in manifest["metrics"]
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_max_train_and_eval_samples(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_txt(data, DOCS * 40)
    code, _, err = _pt(
        cli, tiny_model, data, tmp_path / "out", "--max_steps", -1, "--num_train_epochs", 1,
        "--max_train_samples", 6, "--do_train", "--do_eval", "--validation_split_percentage", 20,
        "--max_eval_samples", 3, "--cache_dir", tmp_path / "cache",
    )  # fmt: skip
    assert code == 0, err
    manifest = _manifest(tmp_path / "out")
    stats = manifest["data_stats"]
    assert stats["train_blocks"] > 20
    assert stats["train_blocks_used"] == 6 and stats["eval_blocks_used"] == 3
    assert manifest["summary"]["global_step"] == 3  # 6 blocks / batch 2, one epoch
    assert manifest["summary"]["tokens_seen"] == 6 * 32


def test_fast_encoding_matches_the_tokenizer_document_by_document(tokenizer: Any) -> None:
    encode = DocumentEncoder(tokenizer)
    tokens = encode(ENCODING_DOCS)
    assert encode._fast is not None, "a fast tokenizer should take the backend path"
    assert tokens.dtype == np.int32
    assert tokens.tolist() == _expected(tokenizer, ENCODING_DOCS)


@pytest.mark.parametrize("special", [(None, 7), (5, None), (None, None)])
def test_joining_without_bos_or_eos(tokenizer: Any, special: tuple[int | None, int | None]) -> None:
    encode = DocumentEncoder(tokenizer)
    encode.bos, encode.eos = special
    assert encode(ENCODING_DOCS).tolist() == _expected(tokenizer, ENCODING_DOCS, special)
    assert encode([]).tolist() == []


def test_a_backend_that_disagrees_is_not_used(tokenizer: Any) -> None:
    """Some tokenizers add Python-side steps around their backend; the first batch catches the difference."""

    class Wrong:
        def encode_batch_fast(self, docs: list[str], add_special_tokens: bool) -> list[Any]:
            return [SimpleNamespace(ids=[1, 2, 3]) for _ in docs]

    class Wrapped:
        backend_tokenizer = Wrong()
        bos_token_id = tokenizer.bos_token_id
        eos_token_id = tokenizer.eos_token_id

        def __call__(self, docs: list[str], **kwargs: Any) -> Any:
            return tokenizer(docs, **kwargs)

    encode = DocumentEncoder(Wrapped())
    assert encode(ENCODING_DOCS).tolist() == _expected(tokenizer, ENCODING_DOCS)
    assert encode._fast is None


def test_tokenize_files_keeps_document_order_across_batches(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches are encoded in a worker thread while the previous one is joined: the order must hold."""
    monkeypatch.setattr(pretrain, "_BATCH_DOCS", 3)
    docs = [f"{ENCODING_DOCS[i % len(ENCODING_DOCS)]} ({i})" for i in range(23)]
    (tmp_path / "a.txt").write_text("\n".join(docs[:11]) + "\n\n   \n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[11:]), encoding="utf-8")
    tokens, n_docs = tokenize_files([tmp_path / "a.txt", tmp_path / "b.jsonl"], tokenizer, "text", False)
    assert n_docs == 23
    assert tokens.tolist() == _expected(tokenizer, docs)
