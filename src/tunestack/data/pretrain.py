"""Continued-pretraining data: documents -> tokens (BOS/EOS per document) -> fixed-size blocks.

Tokenization uses the fast tokenizer's own batch encoder (multi-threaded in Rust) and numpy for
concatenation, and the resulting blocks are cached on disk under a fingerprint of the files'
content, the tokenizer and the options, so a second run does not tokenize again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from tunestack.atomic import build_once
from tunestack.data.records import held_out_indices
from tunestack.data.sources import TEXT_SUFFIXES, find_data_files, fingerprint_files, iter_records, read_text
from tunestack.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

CACHE_VERSION = "pt-v2"
_BATCH_DOCS = 2000
_ARROW_CHUNK_TOKENS = 1 << 26


@dataclass
class PretrainCorpus:
    """Blocks ready for the Trainer plus what the summary reports."""

    train: Any
    eval: Any
    fingerprint: str
    stats: dict[str, Any] = field(default_factory=dict)


def iter_documents(path: Path, text_field: str, keep_linebreaks: bool) -> Iterator[str]:
    """Documents of one file. .txt: one per line, or the whole file with keep_linebreaks."""
    if path.suffix.lower() in TEXT_SUFFIXES:
        text = read_text(path).replace("\r\n", "\n")  # a file saved on Windows trains the same text
        if keep_linebreaks:
            if text.strip():
                yield text
            return
        for line in text.splitlines():
            if line.strip():
                yield line
        return
    for record in iter_records(path):
        if text_field not in record.data:
            fields = ", ".join(record.data) or "none"
            raise DataError(f"{record.where}: no '{text_field}' field (fields: {fields}); set --text_field")
        value = record.data[text_field]
        if not isinstance(value, str):
            raise DataError(f"{record.where}: field '{text_field}' must be a string, got {type(value).__name__}")
        if value.strip():
            yield value


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else str(sorted(tokenizer.get_vocab().items())).encode())
    h.update(f"{tokenizer.bos_token_id}/{tokenizer.eos_token_id}".encode())
    return h.hexdigest()[:16]


class DocumentEncoder:
    """Documents -> one int32 array of their tokens, each document wrapped in BOS/EOS when the tokenizer has them.

    A fast tokenizer's backend is called directly with `encode_batch_fast` (no character offsets, no
    transformers wrapper: about twice as fast), once checked to give the same ids as the tokenizer's own
    call on the first batch; any other tokenizer is called the usual way.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._fast = getattr(backend, "encode_batch_fast", None)
        self._checked = self._fast is None

    def _ids_slow(self, docs: list[str]) -> list[list[int]]:
        return self.tokenizer(docs, add_special_tokens=False, return_attention_mask=False)["input_ids"]

    def _ids_fast(self, docs: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._fast(docs, add_special_tokens=False)]

    def ids(self, docs: list[str]) -> list[list[int]]:
        if not self._checked:
            self._checked = True
            probe = docs[:64]
            if self._ids_fast(probe) != self._ids_slow(probe):
                logger.debug("tokenizer backend differs from the tokenizer's own call; using the latter")
                self._fast = None
        return self._ids_fast(docs) if self._fast is not None else self._ids_slow(docs)

    def __call__(self, docs: list[str]) -> np.ndarray:
        return self.join(self.ids(docs))

    def join(self, ids: list[list[int]]) -> np.ndarray:
        """Concatenate per-document ids with BOS/EOS around each, without a Python list per document."""
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        body = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
        extra = (self.bos is not None) + (self.eos is not None)
        if not extra:
            return body
        ends = np.cumsum(lengths + extra)
        out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int32)
        body_at = np.ones(len(out), dtype=bool)
        if self.bos is not None:
            starts = ends - lengths - extra
            out[starts] = self.bos
            body_at[starts] = False
        if self.eos is not None:
            out[ends - 1] = self.eos
            body_at[ends - 1] = False
        out[body_at] = body
        return out


def _document_batches(files: list[Path], text_field: str, keep_linebreaks: bool, size: int) -> Iterator[list[str]]:
    from tqdm.auto import tqdm

    batch: list[str] = []
    empty: list[str] = []
    for path in tqdm(files, desc="tokenizing", unit="file", disable=len(files) < 2):
        found = False
        for doc in iter_documents(path, text_field, keep_linebreaks):
            found = True
            batch.append(doc)
            if len(batch) >= size:
                yield batch
                batch = []
        if not found:
            empty.append(str(path))
    if empty:
        shown = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        logger.warning("skipped %d file%s without text: %s", len(empty), "s" if len(empty) > 1 else "", shown)
    if batch:
        yield batch


def tokenize_files(files: list[Path], tokenizer: Any, text_field: str, keep_linebreaks: bool) -> tuple[np.ndarray, int]:
    """All documents of `files`, tokenized and concatenated. Returns (token array, document count).

    The tokenizer encodes the next batch in a second thread while this one turns the last batch's ids
    into numpy: the Rust encoder releases the GIL, so the two overlap.
    """
    encode = DocumentEncoder(tokenizer)
    chunks: list[np.ndarray] = []
    n_docs = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in _document_batches(files, text_field, keep_linebreaks, _BATCH_DOCS):
            n_docs += len(batch)
            future = pool.submit(encode.ids, batch)
            if pending is not None:
                chunks.append(encode.join(pending.result()))
            pending = future
        if pending is not None:
            chunks.append(encode.join(pending.result()))
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    return tokens, n_docs


def cut_blocks(tokens: np.ndarray, block_size: int, keep_remainder: bool) -> list[np.ndarray]:
    n_full = len(tokens) // block_size
    blocks = list(tokens[: n_full * block_size].reshape(n_full, block_size)) if n_full else []
    rest = tokens[n_full * block_size :]
    if keep_remainder and len(rest) > 1:
        blocks.append(rest)
    return blocks


def _blocks_dataset(tokens: np.ndarray, block_size: int, keep_remainder: bool):
    """The blocks as an Arrow list column built straight from the token array (no Python ints: a list
    of lists costs ~36 bytes a token, which made the cache step need 3x the memory of tokenization)."""
    import datasets
    import pyarrow as pa

    stop = len(tokens) // block_size * block_size
    if keep_remainder and len(tokens) - stop > 1:
        stop = len(tokens)
    chunks = []
    step = max(1, _ARROW_CHUNK_TOKENS // block_size) * block_size  # int32 offsets: chunks well below 2**31
    for start in range(0, stop, step):
        end = min(start + step, stop)
        offsets = np.arange(start, end + 1, block_size, dtype=np.int64)
        if offsets[-1] != end:
            offsets = np.append(offsets, end)
        values = pa.array(tokens[start:end].astype(np.int32, copy=False))
        chunks.append(pa.ListArray.from_arrays(pa.array(offsets - start, type=pa.int32()), values))
    column = pa.chunked_array(chunks, type=pa.list_(pa.int32()))
    return datasets.Dataset(pa.table({"input_ids": column}))


def resolve_block_size(requested: int | None, model_context: int | None) -> int:
    if requested is None:
        return min(1024, model_context or 1024)
    if model_context and requested > model_context:
        raise ConfigError(
            f"--block_size {requested} is larger than the model's context of {model_context} positions "
            "(max_position_embeddings); use at most that"
        )
    return requested


_STATS_FILE = "tunestack_stats.json"


def cached_dataset(cache_dir: Path, build: Any, overwrite: bool) -> tuple[Any, dict[str, Any], bool]:
    """Load a saved dataset and its stats, or build (-> dataset, stats) and save both, once across processes:
    under torchrun or several nodes, one process tokenizes while the others wait and then read its result.
    With `overwrite` the cache is built again, by the first process only (the others read what it built).

    Returns (dataset, stats, was_cached).
    """
    import datasets

    made: dict[str, Any] = {}
    rebuild = overwrite and int(os.environ.get("RANK", "0")) == 0

    def complete(folder: Path) -> bool:
        if rebuild and "stats" not in made and folder == cache_dir:
            return False
        return (folder / _STATS_FILE).is_file() and (folder / "state.json").is_file()

    def save(staging: Path) -> None:
        dataset, made["stats"] = build()
        dataset.save_to_disk(str(staging))
        (staging / _STATS_FILE).write_text(json.dumps(made["stats"]))

    build_once(cache_dir, save, complete)
    stats = made.get("stats") or json.loads((cache_dir / _STATS_FILE).read_text())
    return datasets.load_from_disk(str(cache_dir)), stats, "stats" not in made


def load_pretrain_corpus(
    data_args: Any, tokenizer: Any, block_size: int, cache_root: Path, do_eval: bool, seed: int
) -> PretrainCorpus:
    train_files = find_data_files(data_args.train_file_dir, what="training")
    eval_files = (
        find_data_files(data_args.validation_file_dir, what="validation") if data_args.validation_file_dir else []
    )
    options = (
        f"{CACHE_VERSION}|{block_size}|{data_args.keep_linebreaks}|{data_args.keep_remainder}|{data_args.text_field}"
    )
    tok_fp = tokenizer_fingerprint(tokenizer)
    stats: dict[str, Any] = {"train_files": len(train_files), "block_size": block_size}

    def build_split(files: list[Path], name: str) -> tuple[Any, str]:
        fp = hashlib.sha256(f"{fingerprint_files(files)}|{tok_fp}|{options}".encode()).hexdigest()[:16]

        def build():
            tokens, n_docs = tokenize_files(files, tokenizer, data_args.text_field, data_args.keep_linebreaks)
            if n_docs == 0:
                raise DataError(f"{name} data has no text: {', '.join(str(f) for f in files[:3])}")
            dataset = _blocks_dataset(tokens, block_size, data_args.keep_remainder)
            if len(dataset) == 0:
                raise DataError(
                    f"{name} data has {len(tokens)} tokens, fewer than one block of {block_size}; "
                    "lower --block_size or pass --keep_remainder"
                )
            return dataset, {"documents": n_docs, "tokens": int(len(tokens))}

        dataset, split_stats, hit = cached_dataset(cache_root / "pt" / fp, build, data_args.overwrite_cache)
        stats.update({f"{name}_{k}": v for k, v in split_stats.items()})
        stats[f"{name}_cache_hit"] = hit
        stats[f"{name}_blocks"] = len(dataset)
        return dataset, fp

    train, fp = build_split(train_files, "train")
    evaluation, eval_fp = None, ""
    if eval_files:
        evaluation, eval_fp = build_split(eval_files, "eval")
    elif do_eval:
        held = held_out_indices(len(train), data_args.validation_split_percentage, seed)
        if held:
            evaluation = train.select(sorted(held))
            train = train.select([i for i in range(len(train)) if i not in held])
    if data_args.max_train_samples and data_args.max_train_samples > 0:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    if evaluation is not None and data_args.max_eval_samples and data_args.max_eval_samples > 0:
        evaluation = evaluation.select(range(min(len(evaluation), data_args.max_eval_samples)))
    stats["train_blocks_used"] = len(train)
    stats["eval_blocks_used"] = len(evaluation) if evaluation is not None else 0
    return PretrainCorpus(train, evaluation, hashlib.sha256(f"{fp}|{eval_fp}".encode()).hexdigest()[:16], stats)


def stream_blocks(files: list[Path], tokenizer: Any, data_args: Any, block_size: int) -> Iterator[dict[str, list[int]]]:
    """Blocks produced on the fly, for corpora bigger than memory."""
    encode = DocumentEncoder(tokenizer)
    buffer = np.zeros(0, dtype=np.int32)
    for path in files:
        batch: list[str] = []
        for doc in iter_documents(path, data_args.text_field, data_args.keep_linebreaks):
            batch.append(doc)
            if len(batch) >= 256:
                buffer = np.concatenate([buffer, encode(batch)])
                batch = []
                while len(buffer) >= block_size:
                    yield {"input_ids": buffer[:block_size].tolist()}
                    buffer = buffer[block_size:]
        if batch:
            buffer = np.concatenate([buffer, encode(batch)])
        while len(buffer) >= block_size:
            yield {"input_ids": buffer[:block_size].tolist()}
            buffer = buffer[block_size:]
    if data_args.keep_remainder and len(buffer) > 1:
        yield {"input_ids": buffer.tolist()}
