"""The SFT forgetting guard (--replay_ratio): the starting model's answers to general prompts are generated once,
cached, mixed into the training data, trained on, and recorded in run.json."""

from __future__ import annotations

import json

import pytest

from tunestack.infer.generate import ChatModel
from tunestack.train.replay import load_prompts, split_prompts

IDENTITY = {"conversations": [{"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "I am MediBot."}]}
PROMPTS = [f"General question number {i}?" for i in range(1, 13)]  # 12: the 6th and 12th are held out


def test_builtin_prompts_hold_out_every_sixth_for_the_drift_probe():
    items, name = load_prompts(None)
    replay, held = split_prompts(items)
    assert name == "built-in general prompts (240)"
    assert (len(replay), len(held)) == (200, 40)
    assert held[0] is items[5] and held[1] is items[11]
    langs = {"zh" if any("\u4e00" <= ch <= "\u9fff" for ch in it.prompt) else "en" for it in replay}
    assert langs == {"en", "zh"}
    assert len({it.prompt for it in items}) == 240
    assert not [it.prompt for it in items if "France" in it.prompt or "法国" in it.prompt]  # the e2e test asks it


@pytest.fixture(autouse=True)
def _own_replay_cache(tmp_path, monkeypatch):
    """Each test starts with an empty replay cache (tiny models need nothing else from TUNESTACK_HOME)."""
    monkeypatch.setenv("TUNESTACK_HOME", str(tmp_path / "home"))


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "sft"
    folder.mkdir()
    (folder / "id.jsonl").write_text("\n".join(json.dumps(IDENTITY) for _ in range(8)) + "\n")
    prompts = tmp_path / "general.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return folder, prompts


def _sft(cli, model, folder, prompts, out, *extra):
    return cli(
        "sft", "--model_name_or_path", model, "--train_file_dir", folder, "--output_dir", out,
        "--replay_ratio", 0.5, "--replay_prompts", prompts, "--replay_batch_size", 3, "--replay_max_new_tokens", 16,
        "--num_train_epochs", 2, "--per_device_train_batch_size", 4, "--save_strategy", "no", "--report_to", "none",
        *extra,
    )  # fmt: skip


def test_replay_answers_are_mixed_in_trained_on_and_cached(cli, tiny_model, data, tmp_path, monkeypatch):
    from tunestack.train.fast.efficient import TrainedPositionsLossMixin

    folder, prompts = data
    calls: list[int] = []
    real_generate = ChatModel.generate

    def short_answers(self, batch, options, on_text=None):
        """The real generation, cut short: a random tiny model never stops by itself (it writes new lines)."""
        calls.append(len(batch))
        answers = real_generate(self, batch, options, on_text)
        return [f"Reply {sum(calls)}-{i}{a[:5]}." for i, a in enumerate(answers)]

    seen: list[list[int]] = []
    real_loss = TrainedPositionsLossMixin.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        labels = inputs["labels"][0].tolist()
        seen.append([t for t, lab in zip(inputs["input_ids"][0].tolist(), labels, strict=True) if lab != -100])
        return real_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(ChatModel, "generate", short_answers)
    monkeypatch.setattr(TrainedPositionsLossMixin, "compute_loss", spy)
    code, out, err = _sft(cli, tiny_model, folder, prompts, tmp_path / "one")
    assert code == 0, err[-2000:]
    stats = json.loads((tmp_path / "one" / "run.json").read_text())["data_stats"]
    assert stats["samples"] == 8 + 4  # round(0.5 x 8) replay conversations
    assert {k: stats[k] for k in ("replay_samples", "replay_distinct", "replay_generated", "replay_cached")} == {
        "replay_samples": 4, "replay_distinct": 4, "replay_generated": 4, "replay_cached": 0,
    }  # fmt: skip
    assert stats["replay_model"] == str(tiny_model) and stats["replay_prompts"] == str(prompts)
    assert sum(calls) == 4 and max(calls) <= 3  # generated in batches of --replay_batch_size
    assert "replay: 4 self-distilled conversations of" in out

    cache = [json.loads(line) for line in open(stats["replay_cache"] + "/answers.jsonl", encoding="utf-8")]
    assert len(cache) == 4 and all(row["finished"] for row in cache)
    assert len({row["answer"] for row in cache}) == 4
    assert {row["prompt"] for row in cache} <= set(PROMPTS) - {PROMPTS[5], PROMPTS[11]}  # held-out never used
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    trained = tokenizer.decode([t for row in seen for t in row])
    for row in cache:  # every replay answer is a trained answer, in both epochs
        assert trained.count(row["answer"] + "<|im_end|>") >= 2, row["answer"]

    calls.clear()
    code, out, err = _sft(cli, tiny_model, folder, prompts, tmp_path / "two")
    assert code == 0, err[-2000:]
    again = json.loads((tmp_path / "two" / "run.json").read_text())["data_stats"]
    assert calls == []  # nothing generated: every answer came from the cache
    assert (again["replay_generated"], again["replay_cached"], again["replay_samples"]) == (0, 4, 4)
    assert again["replay_cache"] == stats["replay_cache"]

    calls.clear()
    code, _, err = _sft(cli, tiny_model, folder, prompts, tmp_path / "three", "--system_prompt", "Be brief.")
    assert code == 0, err[-2000:]
    other = json.loads((tmp_path / "three" / "run.json").read_text())["data_stats"]
    assert other["replay_cache"] != stats["replay_cache"] and sum(calls) == 4  # a new system prompt: new answers


def test_more_replay_than_prompts_repeats_them(cli, tiny_model, data, tmp_path, monkeypatch):
    folder, prompts = data
    real_generate = ChatModel.generate
    monkeypatch.setattr(ChatModel, "generate", lambda self, b, o, t=None: ["fine"] * len(real_generate(self, b, o, t)))
    code, _, err = _sft(cli, tiny_model, folder, prompts, tmp_path / "out", "--replay_ratio", 2, "--max_steps", 1)
    assert code == 0, err[-2000:]
    stats = json.loads((tmp_path / "out" / "run.json").read_text())["data_stats"]
    assert (stats["replay_samples"], stats["replay_distinct"], stats["samples"]) == (16, 10, 24)


def test_answers_that_never_stop_are_not_used(cli, tiny_model, data, tmp_path):
    folder, prompts = data  # the random tiny model answers until the token budget runs out
    code, _, err = _sft(cli, tiny_model, folder, prompts, tmp_path / "out", "--max_steps", 1)
    assert code == 2
    assert (
        err.strip()
        .splitlines()[-1]
        .endswith(
            "--replay_ratio: none of the 10 replay prompts got a finished answer within --replay_max_new_tokens 16; raise it"
        )
    )
    assert not (tmp_path / "out").exists()


def test_replay_flags_are_checked(cli, tiny_model, data, tmp_path):
    folder, prompts = data
    code, _, err = cli("sft", "--train_file_dir", folder, "--output_dir", tmp_path / "o", "--replay_ratio", -1,
                       "--replay_max_new_tokens", 4)  # fmt: skip
    assert code == 2
    assert "--replay_ratio must be between 0 and 10, got -1.0" in err
    assert "--replay_max_new_tokens must be at least 8, got 4" in err


@pytest.mark.distributed
def test_under_torchrun_one_process_generates_and_the_other_reads_the_cache(tiny_model, data, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    folder, prompts = data
    probe = tmp_path / "probe"
    probe.mkdir()
    script = Path(__file__).parent.parent / "fixtures" / "replay_probe.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PROBE_DIR=str(probe), TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
        "sft", "--model_name_or_path", str(tiny_model), "--train_file_dir", str(folder), "--output_dir",
        str(tmp_path / "out"), "--replay_ratio", "0.5", "--replay_prompts", str(prompts), "--replay_max_new_tokens",
        "16", "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to", "none",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    calls = [json.loads(line) for line in (probe / "rank0.generate.jsonl").read_text().splitlines()]
    assert sum(c["prompts"] for c in calls) == 4
    assert not (probe / "rank1.generate.jsonl").exists()  # rank 1 waited, then read rank 0's answers
    manifest = json.loads((tmp_path / "out" / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["data_stats"]["replay_samples"] == 4
