"""The tokenizer as GGUF metadata: what llama.cpp (and Ollama, LM Studio) need to tokenize as training did.

Two tokenizer families are written:
- byte-level BPE (GPT-2 style; SmolLM2, Llama 3, Qwen2): `tokenizer.ggml.model = gpt2`, tokens in their byte-level
  spelling, types, merges, and `tokenizer.ggml.pre`, the name of the pre-tokenizer llama.cpp applies before the
  merges. llama.cpp's converter picks that name from a table of tokenizer hashes; here it is found by behaviour:
  the tokenizer's own pre-tokenizer must split a probe text exactly as the candidate's regexes do.
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral): `tokenizer.ggml.model = llama`, tokens with `▁`,
  scores (llama.cpp merges the adjacent pair whose joined token scores highest: the score is minus the rank of the
  merge that makes the token), types (BYTE for <0xXX>), the merges too, and whether a space is prefixed.
Both carry bos / eos / unk / pad ids, whether BOS / EOS are added automatically, the end-of-turn token trained by
the chat template, and the chat template itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tunestack.errors import ModelError

# Token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# llama.cpp pre-tokenizer name -> the regexes it splits with, in order (then bytes -> byte-level symbols).
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "gpt-2": (_GPT2,),
    "llama-bpe": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "smollm": (r"\p{N}", _GPT2),
}
# Contractions in both cases, digit runs, CJK, emoji, accents, runs of spaces, tabs and newlines, code.
PRE_TOKENIZER_PROBE = (
    "Hello world! I've been 'told' he's there, 'RE you sure? 'M not sure I'll make it, 'D you like tea? We'Ve a'lL\n"
    "3 33 333 3333 33333 3.14 1,000,000 v2.0\n\n \n\n\n \t \t\t\n   leading and trailing   \n"
    "心脏通过动脉和静脉把血液输送到全身。你好，世界！🚀🦙 Ünïcödé café naïve — «quotes» ‘x’\n"
    "def f(x):\r\n    return x**2  # 注释\n"
)


@dataclass
class VocabSpec:
    model: str  # gpt2 | llama
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    special_ids: dict[str, int]  # bos / eos / unk / pad / eot / eom -> id
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(
            "GGUF export needs a fast (tokenizers) tokenizer with a tokenizer.json; this tokenizer is "
            f"{type(tokenizer).__name__}"
        )
    return json.loads(backend.to_str())


def _components(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A normalizer / pre-tokenizer / decoder and, for a Sequence, its members."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        members = node.get("pretokenizers") or node.get("normalizers") or node.get("decoders") or []
        return [m for member in members for m in _components(member)]
    return [node]


def _is_spm(spec: dict[str, Any]) -> bool:
    pre = _components(spec.get("pre_tokenizer"))
    norm = _components(spec.get("normalizer"))
    return spec["model"].get("byte_fallback", False) and (
        any(p.get("type") == "Metaspace" for p in pre)
        or any(n.get("type") == "Replace" and n.get("content") == "\u2581" for n in norm)
    )


def _add_space_prefix(spec: dict[str, Any]) -> bool:
    for p in _components(spec.get("pre_tokenizer")):
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never") != "never"
    return any(n.get("type") == "Prepend" and n.get("prepend") == "\u2581" for n in _components(spec.get("normalizer")))


def pre_tokenizer_name(tokenizer: Any) -> str:
    """llama.cpp's name for the pre-tokenizer that splits text exactly as `tokenizer`'s does."""
    from tokenizers import Regex, pre_tokenizers

    backend = tokenizer.backend_tokenizer
    text = backend.normalizer.normalize_str(PRE_TOKENIZER_PROBE) if backend.normalizer else PRE_TOKENIZER_PROBE
    if backend.pre_tokenizer is None:
        raise ModelError("this byte-level BPE tokenizer has no pre-tokenizer; llama.cpp has no equivalent")
    ours = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    for name, regexes in PRE_TOKENIZERS.items():
        steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        candidate = pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if [piece for piece, _ in candidate.pre_tokenize_str(text)] == ours:
            return name
    raise ModelError(
        "this tokenizer splits text (before its merges) unlike any pre-tokenizer tunestack can name for llama.cpp "
        f"({', '.join(PRE_TOKENIZERS)}); llama.cpp would tokenize differently from training"
    )


def _merges(spec: dict[str, Any]) -> list[str]:
    out = []
    for merge in spec["model"].get("merges") or []:
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2 or any(" " in part for part in pair):
            raise ModelError(f"tokenizer merge {merge!r} cannot be written as GGUF (its parts contain spaces)")
        out.append(f"{pair[0]} {pair[1]}")
    return out


def _auto_adds(tokenizer: Any, token_id: int | None, at_start: bool) -> bool:
    """Whether `tokenizer` adds `token_id` by itself at the start (BOS) or end (EOS) of a text."""
    if token_id is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    k = 0 if at_start else -1
    return bool(with_special) and with_special[k] == token_id and (not without or without[k] != token_id)


def vocab_spec(tokenizer: Any, n_vocab: int, stop_ids: list[int]) -> VocabSpec:
    """The GGUF vocabulary of `tokenizer` for a model with `n_vocab` embedding rows."""
    spec = _backend_json(tokenizer)
    model_type = spec["model"].get("type")
    if model_type != "BPE":
        raise ModelError(
            f"GGUF export supports BPE tokenizers (byte-level or SentencePiece-style); this one is {model_type}"
        )
    spm = _is_spm(spec)
    if not spm and not any(p.get("type") == "ByteLevel" for p in _components(spec.get("pre_tokenizer"))):
        raise ModelError(
            "this BPE tokenizer is neither byte-level (GPT-2 style) nor SentencePiece-style (byte fallback)"
        )
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    if max(by_id) >= n_vocab:
        raise ModelError(f"the tokenizer has token ids up to {max(by_id)} but the model only {n_vocab} embedding rows")
    added = tokenizer.added_tokens_decoder
    merges = _merges(spec)
    rank: dict[str, int] = {}
    for i, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), i)
    tokens, types, scores = [], [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            scores.append(-1e9)
            continue
        if i in added:
            token = added[i].content
            kind = CONTROL if added[i].special else USER_DEFINED
        elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            kind = BYTE
        else:
            kind = NORMAL
        if i == tokenizer.unk_token_id and kind == CONTROL and spm:
            kind = UNKNOWN
        tokens.append(token)
        types.append(kind)
        scores.append(
            -float(rank[token] + 1) if token in rank else (0.0 if kind != NORMAL else -float(len(merges) + 1))
        )
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    end_of_turn = [i for i in stop_ids if i != tokenizer.eos_token_id]
    if end_of_turn:
        special["eot"] = end_of_turn[0]
    for i in end_of_turn:
        if tokens[i] == "<|eom_id|>":
            special["eom"] = i
    return VocabSpec(
        model="llama" if spm else "gpt2",
        pre=None if spm else pre_tokenizer_name(tokenizer),
        tokens=tokens,
        types=types,
        scores=scores if spm else None,
        merges=merges,
        special_ids={k: int(v) for k, v in special.items() if v is not None},
        add_bos=_auto_adds(tokenizer, tokenizer.bos_token_id, at_start=True),
        add_eos=_auto_adds(tokenizer, tokenizer.eos_token_id, at_start=False),
        add_space_prefix=_add_space_prefix(spec) if spm else False,
    )


def write_vocab(writer: Any, vocab: VocabSpec, chat_template: str | None) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if chat_template:
        writer.add_chat_template(chat_template)
