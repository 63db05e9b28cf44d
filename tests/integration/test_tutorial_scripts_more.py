"""The MedicalGPT-style run_sft.sh, run_rm.sh, run_ppo.sh and run_dpo.sh run unchanged (only environment
overrides) on a tiny model, chaining like the tutorials: SFT, then RM, then PPO scored by that RM; DPO."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cli_runner import run_script

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"
SCRIPTS = EXAMPLES / "medicalgpt"


def _run_script(name: str, cwd: Path, **env_overrides: str) -> subprocess.CompletedProcess:
    return run_script(SCRIPTS / name, cwd, **env_overrides)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


@pytest.mark.parametrize(
    ("script", "flags"),
    [
        ("run_sft.sh", ("torchrun --nproc_per_node", "--template_name", "--model_max_length 4096", "--bf16")),
        ("run_rm.sh", ("LAUNCH=(python -m tunestack)", "--max_source_length 1024", "--remove_unused_columns False")),
        ("run_ppo.sh", ("--reward_model_name_or_path", "--early_stopping True", "--target_kl 0.1", "--batch_size 8")),
        ("run_dpo.sh", ("--per_device_eval_batch_size 1", "--max_steps 100", "--fp16 True", "--lora_alpha 16")),
    ],
)
def test_scripts_keep_the_tutorial_flags(script: str, flags: tuple[str, ...]) -> None:
    text = (SCRIPTS / script).read_text()
    for flag in flags:
        assert flag in text, flag
    assert "${EXTRA_ARGS:-}" in text.splitlines()[-1]  # overrides come last and win
    assert subprocess.run(["bash", "-n", str(SCRIPTS / script)], capture_output=True).returncode == 0


def test_run_sft_sh(tiny_model: Path, tmp_path: Path) -> None:
    proc = _run_script(
        "run_sft.sh", tmp_path, MODEL=str(tiny_model), NPROC="1", EXTRA_ARGS="--max_steps 3 --model_max_length 128"
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = _manifest(tmp_path / "outputs-sft-v1")
    assert manifest["status"] == "complete" and manifest["stage"] == "sft"
    assert manifest["summary"]["global_step"] == 3
    options = manifest["options"]
    assert options["data"]["template_name"] == "qwen"
    assert options["data"]["train_file_dir"].endswith("examples/medicalgpt/../demo/sft")
    assert options["data"]["model_max_length"] == 128  # EXTRA_ARGS win
    assert options["tuning"]["lora_rank"] == 8 and options["train"]["bf16"] is True
    assert "eval_perplexity" in manifest["metrics"]
    assert "sft finished in" in proc.stdout


def test_run_ppo_sh_without_a_reward_model_says_what_to_do(tmp_path: Path) -> None:
    proc = _run_script("run_ppo.sh", tmp_path, REWARD_MODEL="nowhere")
    assert proc.returncode == 2
    assert "reward model nowhere not found" in proc.stderr and "run_rm.sh" in proc.stderr


def test_run_rm_then_run_ppo_sh(tiny_model: Path, tmp_path: Path) -> None:
    proc = _run_script("run_rm.sh", tmp_path, MODEL=str(tiny_model), EXTRA_ARGS="--max_steps 3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rm = _manifest(tmp_path / "outputs-rm-v1")
    assert rm["status"] == "complete" and rm["stage"] == "rm" and rm["summary"]["global_step"] == 3
    assert rm["options"]["data"]["max_source_length"] == 1024

    proc = _run_script(
        "run_ppo.sh",
        tmp_path,
        MODEL=str(tiny_model),
        EXTRA_ARGS="--max_steps 2 --batch_size 4 --mini_batch_size 2 --ppo_epochs 1 --max_target_length 8",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rl = _manifest(tmp_path / "outputs-rl-v1")
    assert rl["status"] == "complete" and rl["stage"] == "rl" and rl["summary"]["global_step"] == 2
    assert Path(rl["options"]["data"]["reward_model"]) == Path("outputs-rm-v1")  # --reward_model_name_or_path
    assert rl["options"]["tuning"]["target_modules"] in ("q_proj,v_proj", ["q_proj", "v_proj"])


def test_run_dpo_sh(tiny_model: Path, tmp_path: Path) -> None:
    proc = _run_script("run_dpo.sh", tmp_path, MODEL=str(tiny_model), EXTRA_ARGS="--max_steps 3 --eval_steps 3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = _manifest(tmp_path / "outputs-dpo-v1")
    assert manifest["status"] == "complete" and manifest["stage"] == "dpo"
    assert manifest["summary"]["global_step"] == 3
    assert manifest["options"]["stage"]["beta"] is None and manifest["beta"] == 0.1  # DPO's default
    assert any(k.startswith("eval_rewards/") for k in manifest["metrics"])
