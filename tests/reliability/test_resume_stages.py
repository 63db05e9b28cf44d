"""Every stage resumes: SIGKILL right after checkpoint 2, resume in a fresh process, and the final weights equal an
uninterrupted run's while the resumed process logs only steps 3 and 4. A resume with other options is refused, and
a damaged checkpoint is passed over for the one before it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from preference_sets import preference_dirs
from rewards import QUESTIONS
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent.parent / "fixtures"
COMMON = ["--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--report_to", "none", "--seed", "7"]


def _data(tmp_path: Path) -> dict[str, Path]:
    pairs, _ = preference_dirs(tmp_path / "pairs", n_train=24, n_eval=4)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "p.txt").write_text("\n".join(QUESTIONS * 2) + "\n")
    return {"pairs": pairs, "prompts": prompts}


def _args(stage: str, model: Path, data: dict[str, Path], out: Path) -> list[str]:
    head = ["--model_name_or_path", str(model), "--output_dir", str(out), "--learning_rate", "5e-3", *COMMON]
    if stage in ("rm", "dpo", "kto"):
        return [stage, *head, "--train_file_dir", str(data["pairs"]), "--per_device_train_batch_size", "4"]
    rl = ["rl", "--algo", stage, *head, "--train_file_dir", str(data["prompts"]), "--reward_funcs", "rewards:letter_a"]
    if stage == "ppo":
        return [*rl, "--batch_size", "4", "--mini_batch_size", "2", "--ppo_epochs", "1", "--max_target_length", "8"]
    return [*rl, "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_target_length", "8"]


def _run(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")]))
    env.update(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "tunestack", *args]
    if fault:
        env.update(FAULT=fault, FAULT_STEP="2")
        cmd = [sys.executable, str(FIXTURES / "faulty_run.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _trained(out: Path) -> dict[str, torch.Tensor]:
    state = {}
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        if (out / name).exists():
            state.update({f"{name}:{k}": v for k, v in load_file(out / name).items()})
    return state


def _steps(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r or "reward_mean" in r or "policy_loss" in r]


@pytest.mark.parametrize("stage", ["rm", "dpo", "kto", "grpo", "rloo", "ppo"])
def test_a_killed_stage_resumes_to_the_uninterrupted_weights(stage, tiny_model, tmp_path):
    data = _data(tmp_path)
    reference = _run(_args(stage, tiny_model, data, tmp_path / "a"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "b"
    killed = _run(_args(stage, tiny_model, data, out), fault="kill_after_rl_save" if stage == "ppo" else "kill_after_save")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    logged_before = len(_steps(out))
    resumed = _run([*_args(stage, tiny_model, data, out), "--resume_from_checkpoint", "true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-2" in resumed.stderr
    assert sorted(set(_steps(out)[logged_before:])) == [3, 4]  # the resumed process trained only what was left
    expected, got = _trained(tmp_path / "a"), _trained(out)
    assert expected.keys() == got.keys() and expected
    worst = max((expected[k] - got[k]).abs().max().item() for k in expected)
    assert worst <= 1e-6, f"{stage}: max abs difference {worst}"


def test_resume_with_other_options_is_refused_listing_each(tiny_model, tmp_path):
    data = _data(tmp_path)
    out = tmp_path / "run"
    killed = _run(_args("dpo", tiny_model, data, out), fault="kill_after_save")
    assert killed.returncode == -signal.SIGKILL
    other = [*_args("dpo", tiny_model, data, out), "--lora_rank", "4", "--seed", "8", "--resume_from_checkpoint", "true"]
    refused = _run(other)
    assert refused.returncode == 2
    assert f"cannot resume from {out / 'checkpoint-2'}: it was written by a different run (" in refused.stderr
    assert "lora_rank: checkpoint 8, now 4; seed: checkpoint 7, now 8)" in refused.stderr
    assert refused.stderr.count("\n") == 1  # one line, no traceback


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tiny_model, tmp_path):
    data = _data(tmp_path)
    out = tmp_path / "run"
    args = _args("dpo", tiny_model, data, out)
    args[args.index("--max_steps") + 1] = "6"
    _run(args, fault=None)
    # checkpoint-6 was written whole; now one of its files is cut short (a disk that lost its tail)
    weights = out / "checkpoint-6" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (out / "run.json").write_text(json.dumps({**json.loads((out / "run.json").read_text()), "status": "interrupted"}))
    args[args.index("--max_steps") + 1] = "8"
    resumed = _run([*args, "--resume_from_checkpoint", "true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "ignoring damaged checkpoint" in resumed.stderr and "adapter_model.safetensors has 100 bytes" in resumed.stderr
    assert "resuming from" in resumed.stderr and "checkpoint-4" in resumed.stderr
