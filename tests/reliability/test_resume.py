"""Kill, stop and NaN faults: resume continues where it stopped and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent.parent / "fixtures"
TOLERANCE = 1e-6  # CPU fp32 runs with the same seed are bitwise equal in practice; allow rounding noise


def _args(model, corpus, out, method_flags):
    return [
        "pt",
        "--model_name_or_path",
        str(model),
        "--train_file_dir",
        str(corpus),
        "--output_dir",
        str(out),
        "--block_size",
        "32",
        "--max_steps",
        "6",
        "--save_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--learning_rate",
        "5e-3",
        "--logging_steps",
        "1",
        "--keep_linebreaks",
        "false",
        "--report_to",
        "none",
        "--seed",
        "7",
        *method_flags,
    ]


def _run(args, fault=None, step=0):
    env = dict(os.environ, PYTHONPATH=str(FIXTURES))
    cmd = [sys.executable, "-m", "tunestack", *args]
    if fault:
        env.update(FAULT=fault, FAULT_STEP=str(step))
        cmd = [sys.executable, str(FIXTURES / "faulty_run.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    files = sorted(out.glob("adapter_model.safetensors")) or sorted(out.glob("model*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(f))
    return state


def _assert_same(a, b):
    assert a.keys() == b.keys()
    assert all(x.shape == b[k].shape for k, x in a.items())
    worst = max((x - b[k]).abs().max().item() for k, x in a.items() if x.numel())
    assert worst <= TOLERANCE, f"max abs difference {worst}"


METHODS = {
    "lora": [],
    "qlora": ["--qlora", "true"],
    "adalora": ["--tuning_method", "adalora"],
    "full": ["--use_peft", "false"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sigkill_after_second_checkpoint_then_resume_matches_uninterrupted(tiny_model, pt_corpus, tmp_path, method):
    flags = METHODS[method]
    reference = _run(_args(tiny_model, pt_corpus, tmp_path / "a", flags))
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed = _run(_args(tiny_model, pt_corpus, tmp_path / "b", flags), fault="kill_after_save", step=4)
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((tmp_path / "b" / "run.json").read_text())["status"] == "running"
    resumed = _run(_args(tiny_model, pt_corpus, tmp_path / "b", flags) + ["--resume_from_checkpoint", "true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "checkpoint-4" in resumed.stderr
    state = json.loads((tmp_path / "b" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    _assert_same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


def test_kill_while_writing_a_checkpoint_resumes_from_the_previous_one(tiny_model, pt_corpus, tmp_path):
    _run(_args(tiny_model, pt_corpus, tmp_path / "a", []))
    killed = _run(_args(tiny_model, pt_corpus, tmp_path / "b", []), fault="kill_during_save", step=4)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "b" / "checkpoint-2").is_dir()
    assert not (tmp_path / "b" / "checkpoint-4").exists()  # the half-written one is not where resume looks
    resumed = _run(_args(tiny_model, pt_corpus, tmp_path / "b", []) + ["--resume_from_checkpoint", "true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-2" in resumed.stderr
    _assert_same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_model, pt_corpus, tmp_path):
    out = tmp_path / "b"
    stopped = _run(_args(tiny_model, pt_corpus, out, []), fault="sigterm", step=3)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "stopped by SIGTERM at step 3" in stopped.stdout
    assert (out / "checkpoint-3" / "tunestack_checkpoint.json").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    resumed = _run(_args(tiny_model, pt_corpus, out, []) + ["--resume_from_checkpoint", "true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_nan_loss_stops_before_the_weights_change(cli, tiny_model, pt_corpus, tmp_path, monkeypatch):
    from transformers import Trainer

    original = Trainer.compute_loss

    def nan_at_step_3(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        if self.state.global_step == 2:
            loss = loss * float("nan")
        return loss

    monkeypatch.setattr(Trainer, "compute_loss", nan_at_step_3)
    out = tmp_path / "out"
    code, _, err = cli(*_args(tiny_model, pt_corpus, out, ["--sparse_lm_head", "false"]))
    assert code == 1
    assert "the loss became nan at step 3" in err and "checkpoint-2" in err
    before = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert before and json.loads((out / "run.json").read_text())["status"] == "failed"
    assert not (out / "adapter_model.safetensors").exists()


def test_non_finite_gradients_stop_before_the_weights_change(cli, tiny_model, pt_corpus, tmp_path, monkeypatch):
    """A finite loss can still give NaN gradients (e.g. a bad embedding row): caught before the optimizer step."""
    from tunestack.train.trainer import TunestackTrainerMixin

    original = TunestackTrainerMixin.training_step

    def poison_gradients(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        if self.state.global_step == 2:
            next(p for p in model.parameters() if p.requires_grad).grad.fill_(float("nan"))
        return loss

    monkeypatch.setattr(TunestackTrainerMixin, "training_step", poison_gradients)
    out = tmp_path / "out"
    code, _, err = cli(*_args(tiny_model, pt_corpus, out, []))
    assert code == 1
    assert "the gradients became nan at step 3" in err and "checkpoint-2" in err
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_token_budget_sft_resumes_in_its_second_epoch_like_an_uninterrupted_run(tiny_model, tmp_path):
    """Batches cut to a token budget are rebuilt per epoch from the seed, so a resumed run sees the same ones."""
    data = tmp_path / "chat"
    data.mkdir()
    rows = [
        {"messages": [{"role": "user", "content": f"Question {i}?" * (1 + i % 3)}, {"role": "assistant", "content": f"Answer {i}."}]}
        for i in range(24)
    ]  # fmt: skip
    (data / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def args(out):
        return [
            "sft", "--model_name_or_path", str(tiny_model), "--train_file_dir", str(data), "--output_dir", str(out),
            "--max_tokens_per_batch", "96", "--model_max_length", "48", "--num_train_epochs", "2",
            "--save_steps", "2", "--learning_rate", "5e-3", "--logging_steps", "1", "--report_to", "none",
            "--seed", "7",
        ]  # fmt: skip

    reference = _run(args(tmp_path / "a"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    total = json.loads((tmp_path / "a" / "run.json").read_text())["summary"]["global_step"]
    per_epoch = total // 2
    kill_at = per_epoch + 2 - per_epoch % 2  # a checkpoint step inside the second epoch
    assert per_epoch < kill_at < total
    killed = _run(args(tmp_path / "b"), fault="kill_after_save", step=kill_at)
    assert killed.returncode == -signal.SIGKILL
    resumed = _run(args(tmp_path / "b") + ["--resume_from_checkpoint", "true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint-{kill_at}" in resumed.stderr
    _assert_same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
