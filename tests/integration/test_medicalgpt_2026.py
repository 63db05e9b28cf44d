"""MedicalGPT's current (2026) scripts: every flag of examples/medicalgpt/2026/run_*.sh parses with its meaning, the
data folders in MedicalGPT's shapes (examples/data: ShareGPT + glaive tool calls, conversations + chosen/rejected,
question/answer) load as they are, and the SFT, DPO and GRPO scripts finish a run on a tiny model."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import tiny
from cli_runner import run_cli, run_script

from tunestack.cli import COMMANDS, resolve
from tunestack.data.prompts import load_prompts
from tunestack.rl.rewards import accuracy_reward, default_reward_funcs

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPTS = ROOT / "examples" / "medicalgpt" / "2026"
DATA = ROOT / "examples" / "data"

# A stand-in for python and torchrun: writes the arguments it was started with, NUL-separated, to $ARGV_OUT.
SHIM = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$ARGV_OUT"
"""


def _captured_argv(script: str, tmp_path: Path, **env: str) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python", "torchrun"):
        shim = bin_dir / name
        shim.write_text(SHIM)
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / f"{script}.argv"
    run_env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", ARGV_OUT=str(out), **env)
    proc = subprocess.run(["bash", str(SCRIPTS / script)], cwd=tmp_path, env=run_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    argv = out.read_text().split("\0")[:-1]
    if argv[:2] == ["--nproc_per_node", argv[1]]:  # torchrun --nproc_per_node N -m tunestack ...
        argv = argv[2:]
    assert argv[:2] == ["-m", "tunestack"]
    return argv[2:]


def _parsed(argv: list[str]) -> Any:
    stage = resolve(COMMANDS[argv[0]].stage)()
    return stage.parse(argv[1:])


def _check_pt(a: Any) -> None:
    assert a.data.packing is True and a.data.block_size == 512
    assert a.tuning.target_modules == "all" and a.tuning.lora_rank == 8 and a.train.eval_strategy == "steps"


def _check_sft(a: Any) -> None:
    assert a.data.tool_format == "default" and a.model.flash_attn is True
    assert a.data.model_max_length == 512 and a.train.gradient_checkpointing is True


def _check_rm(a: Any) -> None:
    assert a.data.max_source_length == 1024 and a.data.max_target_length == 256
    assert a.train.remove_unused_columns is False


def _check_dpo(a: Any) -> None:
    assert a.data.tool_format == "default" and a.train.max_steps == 100 and a.train.fp16 is False


def _check_orpo(a: Any) -> None:
    assert a.options.loss == "orpo" and a.options.orpo_beta == 0.1


def _check_grpo(a: Any) -> None:
    # space-separated target modules, --lora_r, --beta (the KL weight), --train_samples -1 (every record)
    assert a.data.algo == "grpo" and a.data.num_generations == 4 and a.data.max_target_length == 512
    assert a.tuning.target_modules == "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    assert a.tuning.lora_rank == 16 and a.tuning.lora_alpha == 32 and a.data.kl_coef == 0.001
    assert a.data.max_train_samples == -1 and a.model.torch_dtype == "bfloat16"  # -1: no limit (first_n)
    assert a.tuning.qlora is False and a.model.load_in_4bit is False


def _check_ppo(a: Any) -> None:
    # --sft_model_path wins over --model_name_or_path; --reward_model_path and --max_completion_length are ours
    assert a.model.model_name_or_path == "outputs-sft-v2" and a.data.reward_model == "outputs-rm-v2"
    assert a.data.algo == "ppo" and a.data.max_source_length == 1024 and a.data.max_target_length == 1000
    assert a.model.torch_dtype == "bfloat16"


CHECKS = {
    "run_pt.sh": _check_pt,
    "run_sft.sh": _check_sft,
    "run_rm.sh": _check_rm,
    "run_dpo.sh": _check_dpo,
    "run_orpo.sh": _check_orpo,
    "run_grpo.sh": _check_grpo,
    "run_ppo.sh": _check_ppo,
}


@pytest.mark.parametrize("script", sorted(CHECKS))
def test_every_flag_of_the_2026_scripts_parses_with_its_meaning(script: str, tmp_path: Path) -> None:
    env = {"SFT_MODEL": "outputs-sft-v2"} if script == "run_ppo.sh" else {}
    if script == "run_ppo.sh":
        (tmp_path / "outputs-rm-v2").mkdir()
    argv = _captured_argv(script, tmp_path, **env)
    CHECKS[script](_parsed(argv))


def test_the_ppo_script_refuses_a_missing_reward_model(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(SCRIPTS / "run_ppo.sh")], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2 and "reward model outputs-rm-v2 not found" in proc.stderr


def test_rl_prompts_come_from_the_sft_folder_as_it_is_tool_calls_included() -> None:
    prompts = load_prompts(str(DATA / "sft"))
    assert len(prompts) == 18  # 10 chats + 8 tool-call conversations, none refused
    weather = next(p for p in prompts if p.messages[0].content == "What's the weather in Paris?")
    # the last answer is dropped (it is the reference answer); the call and its result stay in the prompt
    assert [m.role for m in weather.messages] == ["user", "assistant", "tool"]
    assert weather.answer == "It is sunny in Paris, 24 °C." and weather.tools[0]["name"] == "get_weather"


def test_question_answer_records_get_the_accuracy_reward_by_default() -> None:
    prompts = load_prompts(str(DATA / "grpo"))
    assert prompts[0].messages[-1].content == "What is 7 + 5?" and prompts[0].answer == "12"
    assert default_reward_funcs(None, None, [p.answer for p in prompts]) == "accuracy"
    assert default_reward_funcs("rm", None, [None]) is None  # a reward model given: no default added


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("7 + 5 = 12.", "12", 1.0),  # the last number of the answer part
        ("<think>7+5</think><answer>12</answer>", "12", 1.0),
        ("So the total is 1,200 mg", "1200", 1.0),
        ("The answer is 13", "12", 0.0),
        ("Reasoning...\n#### 54", "#### 54", 1.0),
        ("  Paris. ", "paris", 1.0),  # text: no case, spaces or final punctuation
        ("Lyon", "Paris", 0.0),
        ("anything", "", 0.0),  # no reference, no reward
    ],
)
def test_accuracy_reward(completion: str, answer: str, reward: float) -> None:
    assert accuracy_reward(["q"], [completion], answer=[answer]) == [reward]
    conversational = [[{"role": "assistant", "content": completion}]]  # TRL's conversational completions
    assert accuracy_reward(["q"], conversational, answer=[answer]) == [reward]


@pytest.fixture(scope="module")
def model_1k(tmp_path_factory) -> Path:
    """A tiny random qwen2 with a context of 1024 positions: a record with tool schemas is longer than 256."""
    root = tmp_path_factory.mktemp("model_1k")
    tiny.build_tokenizer(root / "tokenizer")
    return tiny.build_model(
        root / "base", "qwen2", tokenizer_dir=root / "tokenizer", max_position_embeddings=1024, hidden_size=64,
        intermediate_size=128,
    )  # fmt: skip


def _run_script(script: str, cwd: Path, model: Path, extra: str) -> dict[str, Any]:
    proc = run_script(SCRIPTS / script, cwd, MODEL=str(model), NPROC="1", EXTRA_ARGS=extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    return json.loads(next(cwd.glob("outputs-*/run.json")).read_text())


def test_the_2026_sft_script_trains_on_chats_and_tool_calls(model_1k: Path, tmp_path: Path) -> None:
    # a tiny tokenizer of 384 tokens writes the tool schemas in over 512 tokens (a real one in about 250)
    extra = "--max_steps 2 --gradient_accumulation_steps 1 --model_max_length 1024"
    run = _run_script("run_sft.sh", tmp_path, model_1k, extra)
    assert run["status"] == "complete" and run["summary"]["global_step"] == 2
    assert run["data_stats"]["samples"] == 18  # every chat and tool-call record of the folder
    assert not (tmp_path / "outputs-sft-v2" / "rejects.jsonl").exists()
    template = (tmp_path / "outputs-sft-v2" / "chat_template.jinja").read_text()
    assert template.startswith("{#- tunestack tool_format: default -#}")  # chat and serve write tools the same way


def test_the_2026_dpo_script_trains_on_conversations_with_chosen_and_rejected(model_1k: Path, tmp_path: Path) -> None:
    run = _run_script("run_dpo.sh", tmp_path, model_1k, "--max_steps 1 --gradient_accumulation_steps 1")
    assert run["status"] == "complete" and run["summary"]["global_step"] == 1
    assert run["data_stats"]["samples"] == 10  # every pair, those with tools too


def test_the_2026_grpo_script_scores_question_answer_records_by_accuracy(model_1k: Path, tmp_path: Path) -> None:
    """The tiny model is first taught the answers a little (so that some sampled completions are right and some
    are not: the reward varies and GRPO has something to learn from), then the script runs with no reward given."""
    records = [json.loads(line) for line in (DATA / "grpo" / "question_answer.jsonl").read_text().splitlines()]
    chats = tmp_path / "qa_chats.jsonl"
    turns = [[{"from": "human", "value": r["question"]}, {"from": "gpt", "value": r["answer"]}] for r in records]
    chats.write_text("".join(json.dumps({"conversations": t}) + "\n" for t in turns))
    taught = tmp_path / "taught"
    argv = ["sft", "--model_name_or_path", model_1k, "--train_file_dir", chats, "--use_peft", "false",
            "--learning_rate", "5e-3", "--max_steps", "40", "--per_device_train_batch_size", "12",
            "--model_max_length", "128", "--torch_dtype", "float32", "--report_to", "none", "--save_strategy", "no",
            "--seed", "1", "--output_dir", taught]  # fmt: skip
    assert run_cli(argv) == 0
    extra = "--max_steps 3 --max_completion_length 8 --logging_steps 1 --learning_rate 1e-3 --bf16 false --dtype float32"
    run = _run_script("run_grpo.sh", tmp_path, taught, extra)
    assert run["status"] == "complete" and run["summary"]["global_step"] == 3
    assert run["data_stats"]["reward_funcs"] == "accuracy" and run["options"]["data"]["reward_funcs"] is None
    rows = [json.loads(line) for line in (tmp_path / "outputs-grpo-v2" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["rewards/accuracy_reward/mean"] for r in rows if "rewards/accuracy_reward/mean" in r]
    assert len(rewards) == 3 and 0 < max(rewards) <= 1  # some completions answered right, scored against `answer`
