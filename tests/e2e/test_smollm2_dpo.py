"""The real SmolLM2-135M-Instruct learns a preference with DPO: after training on pairs whose chosen answer ends
with a sign-off phrase, it writes that phrase on held-out prompts far more often than before.

The loss is DPO plus NLL on the chosen answers (--loss_type sigmoid,sft) with beta 0.5: the rejected answers are
the chosen ones without the phrase, so plain DPO (beta 0.1, lr 2e-4, 4-6 epochs) also learns to push the
end-of-turn token down and greedy answers loop ("Stay healthy! Stay healthy! ..."); the NLL term keeps the
model stopping after the phrase. About 3.5 minutes on 2 idle CPU cores."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo" / "dpo"
PHRASE = "Stay healthy!"
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))


def greedy_answers(model_dir: Path | str, questions: list[str], max_new_tokens: int = 64) -> list[str]:
    from tunestack.config.model import ModelArguments
    from tunestack.model.load import load_model, load_tokenizer
    from tunestack.model.ref import resolve_model

    ref = resolve_model(str(model_dir))
    tokenizer = load_tokenizer(ref)
    tokenizer.padding_side = "left"
    model = load_model(ref, ModelArguments()).eval()
    stops = model.generation_config.eos_token_id
    if (ref.head_dir / "generation_config.json").exists():
        stops = json.loads((ref.head_dir / "generation_config.json").read_text())["eos_token_id"]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    return [tokenizer.decode(row[batch["input_ids"].shape[1] :], skip_special_tokens=True) for row in out]


def signs_off(answer: str) -> bool:
    """The answer ends with the phrase, once, after some content of its own."""
    text = answer.strip()
    return text.endswith(PHRASE) and text.count(PHRASE) == 1 and len(text) > len(PHRASE) + 10


def test_dpo_teaches_the_sign_off_on_held_out_prompts(cli, monkeypatch, smollm2, tmp_path):
    from preference_sets import logp_margins

    held = [json.loads(line) for line in (DEMO / "eval" / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    questions = [r["question"] for r in held]
    before = greedy_answers(smollm2, questions)
    margin_before = logp_margins(smollm2, held)
    out = tmp_path / "dpo"
    code, stdout, err = cli(
        "dpo", "--train_file_dir", DEMO / "train", "--validation_file_dir", DEMO / "eval", "--do_train", "--do_eval",
        "--loss_type", "sigmoid,sft", "--beta", 0.5, "--precompute_ref_log_probs", "true",
        "--num_train_epochs", 4, "--per_device_train_batch_size", 4, "--learning_rate", 2e-4,
        "--lr_scheduler_type", "cosine", "--lora_rank", 8, "--lora_alpha", 16, "--logging_steps", 10,
        "--save_strategy", "no", "--report_to", "none", "--output_dir", out,
    )  # fmt: skip
    assert code == 0, err[-2000:]
    after = greedy_answers(out, questions)
    margin_after = logp_margins(out, held)
    count_before, count_after = (sum(PHRASE in a for a in answers) for answers in (before, after))
    clean_before, clean_after = (sum(signs_off(a) for a in answers) for answers in (before, after))
    shift = sum(a - b for a, b in zip(margin_after, margin_before, strict=True)) / len(held)
    print(  # noqa: T201
        f"'{PHRASE}' in {count_before} -> {count_after} of {len(held)} held-out answers "
        f"({clean_before} -> {clean_after} ending with it exactly once); held-out margin shift {shift:.1f} nats"
    )
    print("\n".join(after))  # noqa: T201
    assert count_after >= count_before + 4, (before, after)
    assert clean_after >= clean_before + 2, after  # real sign-offs, not only "Stay healthy! Stay healthy! ..."
    assert shift > 3.0
    m = json.loads((out / "run.json").read_text())["metrics"]
    assert m["eval_rewards/accuracies"] >= 0.8
