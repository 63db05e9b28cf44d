"""The SFT stage end to end on a tiny model: masks, saved stop tokens, bad records, templates, flags."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig

IDENTITY = {"conversations": [{"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "I am MediBot."}]}
MATH = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


@pytest.fixture
def chat_dir(tmp_path):
    folder = tmp_path / "sft"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(json.dumps(IDENTITY) for _ in range(12)) + "\n")
    (folder / "b.jsonl").write_text("\n".join(json.dumps(MATH) for _ in range(12)) + "\n")
    return folder


def _sft(cli, model, data, out, *extra):
    return cli(
        "sft",
        "--model_name_or_path",
        model,
        "--train_file_dir",
        data,
        "--output_dir",
        out,
        "--max_steps",
        4,
        "--per_device_train_batch_size",
        4,
        "--learning_rate",
        1e-2,
        "--logging_steps",
        1,
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        *extra,
    )


def _trained_runs(ids, labels):
    """Maximal runs of consecutive trained positions, as token-id lists."""
    runs, current = [], []
    for token, label in zip(ids.tolist(), labels.tolist(), strict=True):
        if label != -100:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_sft_trains_on_exactly_the_answers(cli, tiny_model, chat_dir, tmp_path, monkeypatch, layout):
    from tunestack.train.fast.efficient import TrainedPositionsLossMixin

    seen = []
    original = TrainedPositionsLossMixin.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append({k: v.clone() for k, v in inputs.items()})
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(TrainedPositionsLossMixin, "compute_loss", spy)
    out = tmp_path / "out"
    flags = ["--padding_free", "false"] if layout == "padded" else []
    code, stdout, err = _sft(cli, tiny_model, chat_dir, out, *flags)
    assert code == 0, err
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    answers = set()
    for batch in seen:
        assert ("attention_mask" in batch) == (layout == "padded")
        masks = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], masks, strict=True):
            answers.update(tokenizer.decode(run) for run in _trained_runs(ids, labels))
            assert (labels[mask == 0] == -100).all()  # padding never trained
    # The real EOS is trained although pad == eos.
    assert answers == {"I am MediBot.<|im_end|>", "4<|im_end|>"}
    gen = GenerationConfig.from_pretrained(out)
    stops = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    assert "data: 24 conversations" in stdout


def test_named_template_is_saved_with_the_tokenizer(cli, tiny_model, chat_dir, tmp_path):
    out = tmp_path / "out"
    code, _, err = _sft(cli, tiny_model, chat_dir, out, "--template_name", "chatml", "--system_prompt", "Be brief.")
    assert code == 0, err
    tokenizer = AutoTokenizer.from_pretrained(out)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>assistant\n")


def test_bad_records_fail_with_file_and_line_and_leave_nothing(cli, tiny_model, chat_dir, tmp_path):
    bad = chat_dir / "c.jsonl"
    bad.write_text(
        json.dumps(IDENTITY) + "\n{not json\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n"
    )
    out = tmp_path / "out"
    code, _, err = _sft(cli, tiny_model, chat_dir, out)
    assert code == 2
    assert f"{bad}:2: malformed JSON" in err and f"{bad}:3:" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_skip_bad_records_writes_rejects(cli, tiny_model, chat_dir, tmp_path):
    bad = chat_dir / "c.jsonl"
    bad.write_text(json.dumps(IDENTITY) + "\n{not json\n")
    out = tmp_path / "out"
    code, stdout, err = _sft(cli, tiny_model, chat_dir, out, "--skip_bad_records", "true")
    assert code == 0, err
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["where"] for r in rejects] == [f"{bad}:2"]
    assert "1 bad records skipped" in stdout


def test_neft_alpha_alias_and_legacy_flags(cli, tiny_model, chat_dir, tmp_path):
    out = tmp_path / "out"
    code, _, err = _sft(
        cli,
        tiny_model,
        chat_dir,
        out,
        "--neft_alpha",
        5,
        "--evaluation_strategy",
        "no",
        "--warmup_ratio",
        0.1,
        "--group_by_length",
        "true",
        "--overwrite_output_dir",
    )
    assert code == 0, err
    train = json.loads((out / "run.json").read_text())["options"]["train"]
    assert train["neftune_noise_alpha"] == 5 and train["train_sampling_strategy"] == "group_by_length"
    assert train["warmup_steps"] == 0.1


def test_sft_from_a_pt_output_stacks_the_adapter(cli, tiny_model, chat_dir, pt_corpus, tmp_path):
    pt = tmp_path / "pt"
    code, _, err = cli(
        "pt",
        "--model_name_or_path",
        tiny_model,
        "--train_file_dir",
        pt_corpus,
        "--output_dir",
        pt,
        "--max_steps",
        2,
        "--block_size",
        32,
        "--keep_linebreaks",
        "false",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
    )
    assert code == 0, err
    out = tmp_path / "sft_out"
    code, _, err = _sft(cli, pt, chat_dir, out)
    assert code == 0, err
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["base_model"] == str(pt.resolve())
    from tunestack.model.ref import resolve_model

    ref = resolve_model(str(out))
    assert ref.adapters == [pt, out] and ref.base_dir == tiny_model


def test_predict_with_generate_scores_the_held_out_answers(cli, tiny_model, chat_dir, tmp_path):
    from tunestack.eval.metrics import score_answers

    held_out = tmp_path / "held_out"
    held_out.mkdir()
    (held_out / "a.jsonl").write_text(json.dumps(IDENTITY) + "\n")
    (held_out / "b.jsonl").write_text(json.dumps(MATH) + "\n")
    flags = ["--validation_file_dir", held_out, "--predict_with_generate", "true", "--max_new_tokens", 12]

    untrained = tmp_path / "untrained"
    code, _, err = _sft(cli, tiny_model, chat_dir, untrained, "--do_train", "false", *flags)
    assert code == 0, err
    full = ["--use_peft", "false", "--learning_rate", 3e-3]
    code, stdout, err = _sft(cli, tiny_model, chat_dir, tmp_path / "out", "--max_steps", 60, *full, *flags)
    assert code == 0, err
    assert "predictions on 2 held-out conversations: BLEU-4" in stdout

    def read(folder):
        rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        metrics = json.loads((folder / "run.json").read_text())["metrics"]
        return rows, metrics

    before_rows, before = read(untrained)
    rows, after = read(tmp_path / "out")
    assert [r["reference"] for r in rows] == ["I am MediBot.", "4"]
    assert [r["prompt"] for r in rows] == ["Who are you?", "2+2?"]
    # The metrics in run.json are the means of the per-answer scores in the file.
    expected = score_answers([r["prediction"] for r in rows], [r["reference"] for r in rows])
    assert after["predict_bleu4"] == expected["bleu4"] and after["predict_rouge_l"] == expected["rouge_l"]
    # Training taught both answers; the random model knew neither.
    assert [r["prediction"] for r in rows] == ["I am MediBot.", "4"], rows
    assert after["predict_exact_match"] == 100.0 and after["predict_bleu4"] > 50
    assert before["predict_exact_match"] == 0.0 and before["predict_rouge_l"] < 50, before_rows


def test_predict_with_generate_needs_held_out_data(cli, tiny_model, chat_dir, tmp_path):
    code, _, err = _sft(cli, tiny_model, chat_dir, tmp_path / "out", "--predict_with_generate", "true")
    assert code == 2
    assert "--predict_with_generate answers held-out conversations" in err
    assert not (tmp_path / "out").exists()


def test_token_budget_batches(cli, tiny_model, chat_dir, tmp_path, monkeypatch):
    from tunestack.train.fast.efficient import TrainedPositionsLossMixin

    rows = []
    original = TrainedPositionsLossMixin.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        if model.training:
            rows.append(inputs["input_ids"])
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(TrainedPositionsLossMixin, "compute_loss", spy)
    budget = 64
    code, stdout, err = _sft(
        cli, tiny_model, chat_dir, tmp_path / "out", "--max_tokens_per_batch", budget, "--model_max_length", 32,
        "--max_steps", -1, "--num_train_epochs", 2,
    )  # fmt: skip
    assert code == 0, err
    assert rows and all(row.shape[0] == 1 and row.shape[1] <= budget for row in rows)
    assert max(row.shape[1] for row in rows) > 32, "batches should hold several samples"
    # Every training sample exactly once per epoch: each epoch's packed rows add up to the whole training set.
    total = json.loads((tmp_path / "out" / "run.json").read_text())["data_stats"]["total_tokens"]
    sizes = [row.shape[1] for row in rows]
    half = next(i for i in range(len(sizes) + 1) if sum(sizes[:i]) == total)
    assert sum(sizes[half:]) == total
    # The second epoch is batched anew (reshuffled), not replayed.
    assert [r.tolist() for r in rows[:half]] != [r.tolist() for r in rows[half:]]

    code, _, err = _sft(cli, tiny_model, chat_dir, tmp_path / "bad", "--max_tokens_per_batch", 16)
    assert code == 2 and "--max_tokens_per_batch 16 is less than --model_max_length 512" in err


def test_run_json_records_every_option_and_no_secret_is_written(cli, tiny_model, chat_dir, tmp_path):
    out = tmp_path / "out"
    secrets = ("hf_SECRETmodel123", "hf_SECRETtrainer456")
    code, _, err = _sft(
        cli, tiny_model, chat_dir, out, "--max_tokens_per_batch", 512, "--model_max_length", 128,
        "--hf_hub_token", secrets[0], "--hub_token", secrets[1], "--report_to", "tensorboard",
        "--save_strategy", "steps", "--save_steps", 2, "--do_train", "true", "--do_eval", "true",
    )  # fmt: skip
    assert code == 0, err
    options = json.loads((out / "run.json").read_text())["options"]
    assert options["train"]["max_tokens_per_batch"] == 512  # a "token" in the name is not a secret
    assert options["train"]["include_num_input_tokens_seen"] == "non_padding"  # as given (the trainer counts all)
    assert options["model"]["hf_hub_token"] == options["train"]["hub_token"] == "<redacted>"
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name.startswith("events.out.tfevents") for p in written) and any("checkpoint-" in str(p) for p in written)
    leaks = [str(p) for p in written for s in secrets if s.encode() in p.read_bytes()]
    assert leaks == []


def test_the_time_of_each_phase_is_in_run_json_and_printed_at_log_level_info(tiny_model, chat_dir, tmp_path):
    """What a run does before its first step and after its last, timed: from the interpreter's start (the real
    command, in its own process) through saving; `--log_level info` prints the same figures."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    argv = ["sft", "--model_name_or_path", tiny_model, "--train_file_dir", chat_dir, "--output_dir", out,
            "--max_steps", 2, "--per_device_train_batch_size", 4, "--report_to", "none", "--log_level", "info"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "tunestack", *map(str, argv)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = json.loads((out / "run.json").read_text())["summary"]["phases"]
    expected = ["start", "imports", "options", "model resolution", "data", "model", "trainer", "training", "saving"]
    assert [p for p in phases if p in expected] == expected
    assert all(isinstance(v, float) and v >= 0 for v in phases.values())
    assert phases["start"] > 0 and phases["training"] > 0
    line = next(line for line in proc.stderr.splitlines() if "time by phase:" in line)
    assert f"start {phases['start']:.1f} s" in line and f"saving {phases['saving']:.1f} s" in line
