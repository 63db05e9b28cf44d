"""`torchrun --nproc_per_node 2 ... tunestack rl --algo ppo` on CPU (gloo): ranks roll out different prompts,
average their gradients, end with identical weights, and write one output folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rewards import QUESTIONS  # tests/fixtures, on sys.path from conftest
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

FIXTURES = Path(__file__).parent.parent / "fixtures"
STEPS, BATCH = 4, 4


def test_ppo_under_torchrun_on_two_cpu_ranks(tiny_model: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "train.txt").write_text("\n".join(QUESTIONS * 4) + "\n")
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    (held_out / "eval.txt").write_text("What is a cold?\nWhat is a cough?\n")
    probe = tmp_path / "probe"
    probe.mkdir()
    out = tmp_path / "out"
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PROBE_DIR=str(probe),
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(FIXTURES / "rl_ddp_probe.py"),
        "rl", "--algo", "ppo", "--model_name_or_path", str(tiny_model), "--train_file_dir", str(prompts),
        "--validation_file_dir", str(held_out), "--output_dir", str(out), "--reward_funcs", "rewards:letter_a",
        "--batch_size", str(BATCH), "--mini_batch_size", "2", "--ppo_epochs", "2", "--max_target_length", "8",
        "--learning_rate", "5e-3", "--max_steps", str(STEPS), "--save_steps", "2", "--logging_steps", "1",
        "--report_to", "none",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]

    info = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert info == [{"world_size": 2, "steps": STEPS}] * 2, "each rank trained alone instead of data-parallel"

    # Each rank rolls out its own shard of the prompts.
    steps = [[json.loads(line) for line in (probe / f"rank{r}.steps.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [len(s) for s in steps] == [STEPS, STEPS]
    seen = [{p for row in s for p in row["prompts"]} for s in steps]
    assert seen[0] and seen[1] and not seen[0] & seen[1], "both ranks rolled out the same prompts"
    assert all(len(row["prompts"]) == BATCH for s in steps for row in s)

    # metrics.jsonl: one line per step from rank 0, its reward the mean over both ranks' rollouts.
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [row["reward_mean"] for row in logged if "reward_mean" in row]
    assert len(rewards) == STEPS
    for value, a, b in zip(rewards, *steps, strict=True):
        assert value == pytest.approx((a["reward"] + b["reward"]) / 2, rel=1e-5)

    # Gradients are averaged over ranks: identical weights on both, and those are the saved ones.
    w0, w1 = (load_file(probe / f"rank{r}.safetensors") for r in (0, 1))
    assert w0.keys() == w1.keys() and any("value_head" in n for n in w0)
    for name, tensor in w0.items():
        assert torch.equal(tensor, w1[name]), f"{name} differs between ranks"
    saved = load_file(out / "adapter_model.safetensors")
    lora = {n: t for n, t in w0.items() if "lora_" in n}
    assert len(saved) == len(lora) > 0
    for name, tensor in lora.items():
        key = name.removeprefix("policy.").replace(".default", "")
        assert torch.equal(saved[key], tensor), name
    assert any("lora_B" in n and t.abs().sum() > 0 for n, t in lora.items()), "the adapter did not train"

    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["summary"]["global_step"] == STEPS
    assert "before_eval_reward" in run["metrics"] and "eval_reward" in run["metrics"]
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    assert proc.stdout.count("rl finished in") == 1, proc.stdout
    assert "Traceback" not in proc.stderr
