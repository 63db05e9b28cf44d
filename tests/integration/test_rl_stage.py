"""RL stage on tiny models: PPO raises a rule reward with a finite KL, the stop penalty, resume, GRPO/RLOO."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rewards import QUESTIONS  # tests/fixtures, on sys.path from conftest

FIXTURES = Path(__file__).parent.parent / "fixtures"


@pytest.fixture
def prompts(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "p.txt").write_text("\n".join(QUESTIONS * 4) + "\n")
    (folder / "sft.jsonl").write_text(
        json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}) + "\n"
    )
    return folder


@pytest.fixture(autouse=True)
def _reward_module(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))


@pytest.fixture(scope="module")
def peaked_model(tiny_model, tmp_path_factory):
    """The tiny llama with its (tied) output layer scaled x12: a random model whose next-token distributions are
    peaked like a trained one's (entropy ~3 nats instead of a flat ~6 over its 384 tokens), so that the policy's
    whole distribution, which PPO samples, moves visibly within a few steps."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("peaked")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(12.0)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def _rl(model, prompts, out, *extra):
    return [
        "rl",
        "--model_name_or_path",
        model,
        "--train_file_dir",
        prompts,
        "--do_eval",
        "true",
        "--output_dir",
        out,
        "--reward_funcs",
        "rewards:letter_a",
        "--batch_size",
        8,
        "--mini_batch_size",
        4,
        "--learning_rate",
        5e-3,
        "--max_target_length",
        16,
        "--init_kl_coef",
        0.05,
        "--logging_steps",
        1,
        "--report_to",
        "none",
        *extra,
    ]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ppo_raises_a_rule_reward_with_finite_kl(cli, peaked_model, prompts, tmp_path):
    out = tmp_path / "ppo"
    code, stdout, err = cli(*_rl(peaked_model, prompts, out, "--max_steps", 24, "--save_steps", 100))
    assert code == 0, err[-3000:]
    rows = [r for r in _rows(out) if "reward_mean" in r]
    assert len(rows) == 24
    first = sum(r["reward_mean"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-5:]) / 5
    assert last > first + 0.2, (first, last)
    assert all(abs(r["kl"]) < 50 for r in rows)
    for key in ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "entropy", "stopped_fraction"):
        assert key in rows[-1]
    manifest = json.loads((out / "run.json").read_text())
    m = manifest["metrics"]
    assert m["eval_reward"] > m["before_eval_reward"]
    assert "held-out reward:" in stdout
    assert (out / "value_head.safetensors").exists() and (out / "adapter_model.safetensors").exists()
    assert (out / "reward.png").exists() and (out / "samples.jsonl").exists()


def _loop(model_dir, **settings):
    """A PPO loop on a tiny model with LoRA and a constant reward of 1."""
    from tunestack.config.model import ModelArguments
    from tunestack.config.tuning import TuningArguments
    from tunestack.data.prompts import PromptEncoder
    from tunestack.data.templates import get_template, stop_token_ids
    from tunestack.model.load import load_model, load_tokenizer
    from tunestack.model.ref import resolve_model
    from tunestack.model.tuning import apply_tuning
    from tunestack.rl.ppo import PPOLoop, PPOSettings

    ref = resolve_model(str(model_dir))
    tok = load_tokenizer(ref)
    model = apply_tuning(load_model(ref, ModelArguments()), TuningArguments(), "lora", 1)
    template = get_template(None, tok)
    return PPOLoop(
        model,
        tok,
        PromptEncoder(tok, template, 64),
        lambda **kw: [1.0] * len(kw["prompts"]),
        stop_token_ids(template, tok),
        PPOSettings(**settings),
        Path("."),
    )


def test_missing_stop_token_is_penalised(tiny_model, prompts):
    from tunestack.data.prompts import load_prompts

    loop = _loop(tiny_model, batch_size=4, mini_batch_size=2, max_new_tokens=3, missing_eos_penalty=2.5)
    r = loop.rollout(load_prompts(str(prompts / "p.txt"))[:4])
    expected = 1.0 - 2.5 * (~r.stopped).float()
    assert (r.scores == expected).all()
    assert (~r.stopped).any()  # 3 tokens from a random model rarely end with the stop token


def test_rollouts_sample_the_whole_distribution_whatever_the_models_generation_defaults(tiny_model, prompts):
    """transformers fills what a generation config leaves unset from the model's own defaults: a model that asks
    for top_k 1 (greedy) must not make PPO's samples greedy, nor its top_p / repetition penalty apply."""
    from tunestack.data.prompts import load_prompts
    from tunestack.train.fast.efficient import hf_model

    loop = _loop(tiny_model, max_new_tokens=6)
    model = hf_model(loop.unwrapped.policy)
    model.generation_config.update(top_k=1, top_p=0.1, repetition_penalty=5.0, temperature=0.01)
    saved = model.generation_config
    r = loop.rollout(load_prompts(str(prompts / "p.txt"))[:1] * 12)
    assert len(set(r.completions)) > 6  # a random model's 12 samples of one prompt all differ, nearly
    assert model.generation_config is saved and model.generation_config.top_k == 1  # the user's model untouched
    greedy = loop.rollout(load_prompts(str(prompts / "p.txt"))[:1] * 3, greedy=True)
    assert len(set(greedy.completions)) == 1


def test_ppo_resumes_after_a_kill_at_the_right_step(tiny_model, prompts, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")]))
    args = [str(a) for a in _rl(tiny_model, prompts, tmp_path / "b", "--max_steps", 4, "--save_steps", 2)]
    killed = subprocess.run(
        [sys.executable, str(FIXTURES / "faulty_run.py"), *args],
        capture_output=True,
        text=True,
        env=dict(env, FAULT="kill_after_rl_save", FAULT_STEP="2"),
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = subprocess.run(
        [sys.executable, "-m", "tunestack", *args, "--resume_from_checkpoint", "true"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "at step 2" in resumed.stderr
    steps = [r["step"] for r in _rows(tmp_path / "b") if "reward_mean" in r]
    assert steps == [1, 2, 3, 4]  # continued at step 3, nothing repeated
    assert json.loads((tmp_path / "b" / "run.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_trl_algorithms_raise_a_rule_reward(cli, tiny_models, prompts, tmp_path, algo):
    out = tmp_path / algo
    code, _, err = cli(
        "rl",
        "--algo",
        algo,
        "--model_name_or_path",
        tiny_models["glm4"],
        "--train_file_dir",
        prompts,
        "--output_dir",
        out,
        "--reward_funcs",
        "rewards:letter_a",
        "--num_generations",
        4,
        "--per_device_train_batch_size",
        8,
        "--max_target_length",
        12,
        "--learning_rate",
        2e-2,
        "--max_steps",
        16,
        "--logging_steps",
        1,
        "--save_strategy",
        "no",
        "--report_to",
        "none",
    )
    assert code == 0, err[-3000:]
    rewards = [r["reward"] for r in _rows(out) if "reward" in r]
    assert len(rewards) >= 10
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4, rewards


def test_a_temperature_of_zero_is_refused_before_anything_loads(cli, tiny_model, prompts, tmp_path):
    out = tmp_path / "t0"
    code, _, err = cli(*_rl(tiny_model, prompts, out, "--temperature", 0, "--max_steps", 1))
    assert code == 2 and "--temperature must be positive (rollouts are sampled), got 0.0" in err
    assert not out.exists()
