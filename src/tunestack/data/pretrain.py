"""Continued-pretraining data: documents -> tokens (BOS/EOS per document) -> fixed-size blocks.

Tokenization uses the fast tokenizer's own batch encoder (multi-threaded in Rust) and numpy for
concatenation, and the resulting blocks are cached on disk under a fingerprint of the files'
content, the tokenizer and the options, so a second run does not tokenize again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
        text = read_text(path)
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


def _encode_documents(docs: list[str], tokenizer: Any) -> list[np.ndarray]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = tokenizer(docs, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return [np.asarray(bos + ids + eos, dtype=np.int32) for ids in encoded]


def tokenize_files(files: list[Path], tokenizer: Any, text_field: str, keep_linebreaks: bool) -> tuple[np.ndarray, int]:
    """All documents of `files`, tokenized and concatenated. Returns (token array, document count)."""
    from tqdm.auto import tqdm

    chunks: list[np.ndarray] = []
    n_docs = 0
    batch: list[str] = []
    for path in tqdm(files, desc="tokenizing", unit="file", disable=len(files) < 2):
        for doc in iter_documents(path, text_field, keep_linebreaks):
            batch.append(doc)
            if len(batch) >= _BATCH_DOCS:
                chunks.extend(_encode_documents(batch, tokenizer))
                n_docs += len(batch)
                batch = []
    if batch:
        chunks.extend(_encode_documents(batch, tokenizer))
        n_docs += len(batch)
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


def cached_dataset(cache_dir: Path, build: Any, overwrite: bool) -> tuple[Any, dict[str, Any], bool]:
    """Load a saved dataset and its stats, or build (-> dataset, stats) and save both atomically.

    Returns (dataset, stats, was_cached).
    """
    import datasets

    stats_file = "tunestack_stats.json"
    if (cache_dir / stats_file).exists() and not overwrite:
        try:
            return datasets.load_from_disk(str(cache_dir)), json.loads((cache_dir / stats_file).read_text()), True
        except (FileNotFoundError, ValueError):
            shutil.rmtree(cache_dir, ignore_errors=True)
    dataset, stats = build()
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir.parent))
    dataset.save_to_disk(str(staging))
    (staging / stats_file).write_text(json.dumps(stats))
    shutil.rmtree(cache_dir, ignore_errors=True)
    try:
        staging.rename(cache_dir)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(staging, ignore_errors=True)
    return datasets.load_from_disk(str(cache_dir)), stats, False


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
    elif do_eval and data_args.validation_split_percentage > 0 and len(train) > 1:
        n_eval = max(1, int(len(train) * data_args.validation_split_percentage / 100))
        split = train.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
        train, evaluation = split["train"], split["test"]
    if data_args.max_train_samples and data_args.max_train_samples > 0:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    if evaluation is not None and data_args.max_eval_samples and data_args.max_eval_samples > 0:
        evaluation = evaluation.select(range(min(len(evaluation), data_args.max_eval_samples)))
    stats["train_blocks_used"] = len(train)
    stats["eval_blocks_used"] = len(evaluation) if evaluation is not None else 0
    return PretrainCorpus(train, evaluation, hashlib.sha256(f"{fp}|{eval_fp}".encode()).hexdigest()[:16], stats)


def stream_blocks(files: list[Path], tokenizer: Any, data_args: Any, block_size: int) -> Iterator[dict[str, list[int]]]:
    """Blocks produced on the fly, for corpora bigger than memory."""
    buffer = np.zeros(0, dtype=np.int32)
    for path in files:
        batch: list[str] = []
        for doc in iter_documents(path, data_args.text_field, data_args.keep_linebreaks):
            batch.append(doc)
            if len(batch) >= 256:
                buffer = np.concatenate([buffer, *_encode_documents(batch, tokenizer)])
                batch = []
                while len(buffer) >= block_size:
                    yield {"input_ids": buffer[:block_size].tolist()}
                    buffer = buffer[block_size:]
        if batch:
            buffer = np.concatenate([buffer, *_encode_documents(batch, tokenizer)])
        while len(buffer) >= block_size:
            yield {"input_ids": buffer[:block_size].tolist()}
            buffer = buffer[block_size:]
    if data_args.keep_remainder and len(buffer) > 1:
        yield {"input_ids": buffer.tolist()}
