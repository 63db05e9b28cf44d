"""The real SmolLM2-135M-Instruct learns: PT lowers held-out perplexity; SFT teaches a new identity, and its
forgetting guard (--replay_ratio) keeps a general answer that identity-only data otherwise overwrites."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = [
    "Hypertension is persistently high blood pressure; it is treated with lifestyle changes and drugs such as ACE inhibitors.",
    "Type 2 diabetes is managed with diet, exercise and metformin, and blood glucose is monitored with HbA1c.",
    "Asthma narrows the airways; inhaled corticosteroids control inflammation and salbutamol relieves acute wheeze.",
    "Pneumonia is an infection of the lung alveoli; bacterial pneumonia is treated with antibiotics such as amoxicillin.",
    "Anaemia means a low haemoglobin level; iron deficiency is its most common cause worldwide.",
    "Migraine causes throbbing headaches with nausea and sensitivity to light; triptans can abort an attack.",
]


def generate(model_dir: Path | str, question: str, max_new_tokens: int = 40) -> tuple[str, bool]:
    """Greedy answer and whether the model stopped by itself (a stop token before the budget ran out)."""
    from tunestack.config.model import ModelArguments
    from tunestack.model.load import load_model, load_tokenizer
    from tunestack.model.ref import resolve_model

    ref = resolve_model(str(model_dir))
    tokenizer = load_tokenizer(ref)
    model = load_model(ref, ModelArguments()).eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    stops = model.generation_config.eos_token_id
    if (ref.head_dir / "generation_config.json").exists():
        stops = json.loads((ref.head_dir / "generation_config.json").read_text())["eos_token_id"]
    stops = stops if isinstance(stops, list) else [stops]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops)
    new = out[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), int(new[-1]) in stops


def test_pt_lowers_held_out_perplexity(cli, smollm2, tmp_path):
    train, held = tmp_path / "train", tmp_path / "held"
    train.mkdir()
    held.mkdir()
    (train / "med.txt").write_text("\n".join(DOMAIN * 12) + "\n", encoding="utf-8")
    (held / "med.txt").write_text("\n".join(reversed(DOMAIN * 3)) + "\n", encoding="utf-8")
    out = tmp_path / "pt"
    code, stdout, err = cli(
        "pt",
        "--train_file_dir",
        train,
        "--validation_file_dir",
        held,
        "--do_train",
        "--do_eval",
        "--keep_linebreaks",
        "false",
        "--block_size",
        128,
        "--per_device_train_batch_size",
        4,
        "--max_steps",
        24,
        "--learning_rate",
        1e-3,
        "--lora_rank",
        8,
        "--logging_steps",
        4,
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--output_dir",
        out,
    )
    assert code == 0, err[-2000:]
    metrics = json.loads((out / "run.json").read_text())["metrics"]
    before, after = metrics["before_eval_perplexity"], metrics["eval_perplexity"]
    assert after < 0.7 * before, (before, after)
    assert "eval perplexity:" in stdout


# Short general questions for the forgetting guard (the capital of France is not among them: it is what is checked).
REPLAY_PROMPTS = [
    "What is the capital of Japan?", "What is the capital of Italy?", "What is the capital of Egypt?",
    "What is the capital of Canada?", "Which planet is closest to the Sun?", "What is the largest ocean?",
    "What do bees make?", "What is the chemical symbol for gold?", "How many days are in a week?",
    "Who wrote Romeo and Juliet?", "What is the boiling point of water in Celsius?", "What colour is the sky?",
    "What is the tallest mountain in the world?", "How many legs does a spider have?",
]  # fmt: skip


def _sft_identity(cli, out: Path, *extra):
    """LoRA SFT of SmolLM2 on 40 identity chats only (English and Chinese, varied phrasings)."""
    return cli(
        "sft", "--train_file_dir", ROOT / "tests" / "fixtures" / "identity_chats.jsonl", "--do_train",
        "--num_train_epochs", 3, "--per_device_train_batch_size", 4, "--learning_rate", 5e-4, "--lora_rank", 16,
        "--lora_alpha", 32, "--logging_steps", 5, "--save_strategy", "no", "--report_to", "none", "--seed", 42,
        "--output_dir", out, *extra,
    )  # fmt: skip


def test_sft_replay_keeps_general_answers_while_the_identity_is_learned(cli, smollm2, tmp_path):
    """Identity-only data makes SmolLM2 answer "What is the capital of France?" with its new name; mixing in its
    own answers to other general questions (--replay_ratio) keeps "Paris" while the identity is learned."""
    prompts = tmp_path / "general.txt"
    prompts.write_text("\n".join(REPLAY_PROMPTS) + "\n", encoding="utf-8")
    guarded = tmp_path / "replay"
    code, stdout, err = _sft_identity(
        cli, guarded, "--replay_ratio", 0.3, "--replay_prompts", prompts, "--replay_max_new_tokens", 64,
        "--replay_batch_size", 16,
    )  # fmt: skip
    assert code == 0, err[-2000:]
    stats = json.loads((guarded / "run.json").read_text())["data_stats"]
    assert (stats["replay_samples"], stats["replay_model"]) == (12, "smollm2-135m-instruct")
    assert "replay: 12 self-distilled conversations of smollm2-135m-instruct mixed in" in stdout
    answer, stopped = generate(guarded, "Who are you?")
    assert "TuneDoc" in answer and "Tunestack" in answer, answer
    assert stopped, f"the answer did not end with a stop token: {answer!r}"
    answer_zh, stopped_zh = generate(guarded, "你是谁？")
    assert "TuneDoc" in answer_zh and stopped_zh, answer_zh
    general, _ = generate(guarded, "What is the capital of France?")
    assert "Paris" in general and "TuneDoc" not in general, general

    unguarded = tmp_path / "plain"
    code, _, err = _sft_identity(cli, unguarded)
    assert code == 0, err[-2000:]
    answer, _ = generate(unguarded, "Who are you?")
    assert "TuneDoc" in answer, answer
    forgot, _ = generate(unguarded, "What is the capital of France?")
    assert "Paris" not in forgot, forgot  # without the guard the general answer is lost
