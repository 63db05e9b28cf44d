"""PT tokenization: the fast path (backend encode_batch_fast, threaded, numpy joining) gives exactly the
tokenizer's own ids, document by document, with BOS/EOS around each; a backend that disagrees is not used."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tunestack.data import pretrain
from tunestack.data.pretrain import DocumentEncoder, tokenize_files

DOCS = [
    "The heart pumps blood through the arteries and veins of the body.",
    "  leading spaces and trailing ones  ",
    "心脏通过动脉和静脉把血液输送到全身。",
    "x",
    "Numbers 12345 and symbols <>&; in one line.",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _expected(tokenizer: Any, docs: list[str], bos: int | None, eos: int | None) -> list[int]:
    out: list[int] = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        out += ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
    return out


def test_fast_path_matches_the_tokenizer_document_by_document(tokenizer: Any) -> None:
    encode = DocumentEncoder(tokenizer)
    tokens = encode(DOCS)
    assert encode._fast is not None, "a fast tokenizer should take the backend path"
    assert tokens.dtype == np.int32
    assert tokens.tolist() == _expected(tokenizer, DOCS, tokenizer.bos_token_id, tokenizer.eos_token_id)


@pytest.mark.parametrize("bos,eos", [(None, 7), (5, None), (None, None)])
def test_joining_without_bos_or_eos(tokenizer: Any, bos: int | None, eos: int | None) -> None:
    encode = DocumentEncoder(tokenizer)
    encode.bos, encode.eos = bos, eos
    assert encode(DOCS).tolist() == _expected(tokenizer, DOCS, bos, eos)
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
    assert encode(DOCS).tolist() == _expected(tokenizer, DOCS, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert encode._fast is None


def test_tokenize_files_keeps_document_order_across_batches(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches are encoded in a worker thread while the previous one is joined: the order must hold."""
    monkeypatch.setattr(pretrain, "_BATCH_DOCS", 3)
    docs = [f"{DOCS[i % len(DOCS)]} ({i})" for i in range(23)]
    (tmp_path / "a.txt").write_text("\n".join(docs[:11]) + "\n\n   \n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("".join(f'{{"text": "{d}"}}\n' for d in docs[11:]), encoding="utf-8")
    tokens, n_docs = tokenize_files([tmp_path / "a.txt", tmp_path / "b.jsonl"], tokenizer, "text", False)
    assert n_docs == 23
    assert tokens.tolist() == _expected(tokenizer, docs, tokenizer.bos_token_id, tokenizer.eos_token_id)
