"""The forgetting guard of SFT (`--replay_ratio R`): the starting model's own answers to general prompts,
mixed into the training data so that fine-tuning on a narrow set does not overwrite general behaviour.

Before training, the model the stage starts from answers general prompts greedily, rendered with the same
template and system prompt as the training conversations. round(R × training conversations) of these
self-distilled conversations join the training set. They are fixed for the run: the same replay conversations are
in every epoch, shuffled with the training data by the trainer (as the training set itself repeats every epoch),
so only that many answers are generated. Answers that hit --replay_max_new_tokens without stopping are not used
(training on them would teach the model to stop mid-sentence); when fewer usable answers exist than asked for, they
repeat.

Answers are cached in $TUNESTACK_HOME/replay/<key>/answers.jsonl, the key being a fingerprint of the starting model
(its reference and the names, sizes and times of its weight and config files), the template, the system prompt,
the generation settings and the dtype; each cached answer is looked up by its prompt, so a second run, or a run with
more prompts, generates only what is missing. Under torchrun the main process generates while the others wait
(the stage prepares data inside `main_process_first`), then they read the cache.

The default prompts are 240 general questions in English and Chinese shipped with tunestack (everyday knowledge,
arithmetic, writing, advice); every sixth one is held out of replay for the drift probe of `tunestack eval`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import random
from importlib import resources
from pathlib import Path
from typing import Any

from tunestack.atomic import write_json_atomic, write_jsonl_atomic
from tunestack.config.infer import GenerationArguments, ModelSelection
from tunestack.data.formats import Conversation, Message
from tunestack.errors import ConfigError
from tunestack.infer.batch import PromptItem, generate_all, read_prompts
from tunestack.infer.generate import ChatModel
from tunestack.model.ref import ModelRef
from tunestack.rundir import read_jsonl, tunestack_home

logger = logging.getLogger("tunestack")

BUILTIN_PROMPTS = "general_prompts.jsonl"  # package data of tunestack.data
HELD_OUT_EVERY = 6  # every sixth prompt is held out of replay (the drift probe's prompts)
_MODEL_FILES = ("config.json", "generation_config.json", "adapter_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def load_prompts(path: str | None) -> tuple[list[PromptItem], str]:
    """All prompts of --replay_prompts (or the built-in set) and a name for them."""
    if path:
        return read_prompts(Path(path).expanduser()), str(path)
    with resources.as_file(resources.files("tunestack.data") / BUILTIN_PROMPTS) as builtin:
        items = read_prompts(builtin)
    return items, f"built-in general prompts ({len(items)})"


def split_prompts(items: list[PromptItem]) -> tuple[list[PromptItem], list[PromptItem]]:
    """(replay prompts, held-out prompts): every sixth prompt (the 6th, 12th ...) is held out."""
    held = [it for i, it in enumerate(items) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    kept = [it for i, it in enumerate(items) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return kept, held


def model_fingerprint(ref: ModelRef) -> dict[str, Any]:
    """The model's reference and its config and weight files' names, sizes and modification times."""
    files: dict[str, str] = {}
    for folder in [ref.base_dir, *ref.adapters]:
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.name in _MODEL_FILES or path.name.startswith("adapter_model") or path.suffix in _WEIGHT_SUFFIXES:
                if ref.gguf_file and path.suffix == ".gguf" and path.name != ref.gguf_file:
                    continue
                stat = path.stat()
                files[str(path)] = f"{stat.st_size}:{stat.st_mtime_ns}"
    return {"reference": ref.reference, "files": files}


def _prompt_key(item: PromptItem, system: str | None) -> str:
    blob = json.dumps([item.system or system, item.messages], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class ReplayCache:
    """answers.jsonl of one (model, template, system prompt, generation settings) key: prompt key -> answer."""

    def __init__(self, key_parts: dict[str, Any]):
        blob = json.dumps(key_parts, sort_keys=True, default=str).encode()
        self.key = hashlib.sha256(blob).hexdigest()[:16]
        self.folder = tunestack_home() / "replay" / self.key
        self.path = self.folder / "answers.jsonl"
        self.key_parts = key_parts
        # a line cut by a kill is skipped: that answer is generated again
        self.entries: dict[str, dict[str, Any]] = {row["key"]: row for row in read_jsonl(self.path) if "key" in row}

    def save(self) -> None:
        if not (self.folder / "key.json").exists():
            write_json_atomic(self.folder / "key.json", self.key_parts)
        write_jsonl_atomic(self.path, list(self.entries.values()))


def _finished(chat: ChatModel, answer: str, max_new_tokens: int) -> bool:
    """Whether the model ended the answer itself: fewer tokens than the budget (a re-encoded answer may differ
    from the generated tokens by a token, hence the margin)."""
    return (
        bool(answer.strip()) and len(chat.tokenizer(answer, add_special_tokens=False)["input_ids"]) < max_new_tokens - 2
    )


def mix_replay(ctx: Any, train: list[Conversation]) -> tuple[list[Conversation], dict[str, Any]]:
    """`train` plus round(--replay_ratio × len(train)) self-distilled conversations, and what run.json records."""
    d, ref = ctx.args.data, ctx.ref
    if ref is None:
        raise ConfigError("--replay_ratio needs a starting model to answer the replay prompts (not --model_config)")
    wanted = max(1, round(d.replay_ratio * len(train)))
    items, source = load_prompts(d.replay_prompts)
    pool, _ = split_prompts(items)
    if not pool:
        pool = items  # fewer than six prompts: nothing is held out
    order = list(range(len(pool)))
    random.Random(ctx.args.train.seed).shuffle(order)
    options = GenerationArguments(max_new_tokens=d.replay_max_new_tokens, temperature=0.0, do_sample=False)
    dtype = "float32" if ctx.args.model.torch_dtype == "auto" and not _on_gpu() else ctx.args.model.torch_dtype
    cache = ReplayCache(
        {
            "model": model_fingerprint(ref),
            "template": d.template_name or "tokenizer",
            "tokenizer": ctx.args.model.tokenizer_name_or_path,
            "system_prompt": d.system_prompt,
            "max_new_tokens": d.replay_max_new_tokens,
            "decoding": "greedy",
            "dtype": dtype,
            "quantization": "4bit" if ctx.args.model.load_in_4bit else "8bit" if ctx.args.model.load_in_8bit else None,
        }
    )
    chosen: list[tuple[PromptItem, str]] = []
    generated = cached = unfinished = 0
    chat: ChatModel | None = None
    batch = max(1, d.replay_batch_size)
    position = 0
    while len(chosen) < wanted and position < len(order):
        # Take as many prompts as answers are still needed; generate the ones the cache lacks (in batches).
        step = [pool[i] for i in order[position : position + wanted - len(chosen)]]
        position += len(step)
        missing = [it for it in step if _prompt_key(it, d.system_prompt) not in cache.entries]
        if missing:
            if chat is None:
                chat = _load_chat(ctx, dtype)
            answers = generate_all(chat, missing, options, batch, d.system_prompt)
            for it, answer in zip(missing, answers, strict=True):
                key = _prompt_key(it, d.system_prompt)
                done = _finished(chat, answer, d.replay_max_new_tokens)
                cache.entries[key] = {"key": key, "prompt": it.prompt, "answer": answer, "finished": done}
            generated += len(missing)
            cache.save()
        for it in step:
            entry = cache.entries[_prompt_key(it, d.system_prompt)]
            if it not in missing:
                cached += 1
            if not entry["finished"]:
                unfinished += 1
            elif len(chosen) < wanted:
                chosen.append((it, entry["answer"]))
    if chat is not None:
        _release(chat)
    if not chosen:
        raise ConfigError(
            f"--replay_ratio: none of the {len(pool)} replay prompts got a finished answer within "
            f"--replay_max_new_tokens {d.replay_max_new_tokens}; raise it"
        )
    replay = [_conversation(it, answer, d.system_prompt, n) for n, (it, answer) in enumerate(_repeat(chosen, wanted))]
    stats = {
        "replay_samples": len(replay),
        "replay_distinct": len(chosen),
        "replay_model": ref.reference,
        "replay_prompts": source,
        "replay_generated": generated,
        "replay_cached": cached,
        "replay_unfinished": unfinished,
        "replay_cache": str(cache.folder),
    }
    logger.info("replay: %d self-distilled conversations of %s mixed in", len(replay), ref.reference)
    return train + replay, stats


def _repeat(chosen: list[Any], wanted: int) -> list[Any]:
    return [chosen[i % len(chosen)] for i in range(wanted)]


def _conversation(item: PromptItem, answer: str, system: str | None, n: int) -> Conversation:
    turns = [Message(m["role"], m["content"]) for m in item.messages]  # type: ignore[arg-type]
    return Conversation(item.system or system, (*turns, Message("assistant", answer)), f"replay:{n + 1}")


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _load_chat(ctx: Any, dtype: str) -> ChatModel:
    """The starting model for generation, on this process's own device under torchrun."""
    m = ctx.args.model
    device_map = None
    if _on_gpu() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device_map = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    selection = ModelSelection(
        model=ctx.ref.reference,
        tokenizer_path=m.tokenizer_name_or_path,
        template_name=ctx.args.data.template_name,
        torch_dtype=dtype,
        device_map=device_map,
        load_in_4bit=m.load_in_4bit,
        load_in_8bit=m.load_in_8bit,
        trust_remote_code=m.trust_remote_code,
    )
    return ChatModel.load(selection)


def _release(chat: ChatModel) -> None:
    import torch

    del chat.model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summary_line(stats: dict[str, Any]) -> str | None:
    """The SFT summary's replay line, or None without replay."""
    if not stats.get("replay_samples"):
        return None
    return (
        f"replay: {stats['replay_samples']} self-distilled conversations of {stats['replay_model']} mixed in "
        f"({stats['replay_distinct']} distinct; {stats['replay_generated']} answers generated, "
        f"{stats['replay_cached']} from the cache {stats['replay_cache']})"
    )
