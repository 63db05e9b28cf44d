"""Nothing lost, nobody harmed: folders that are not tunestack's, one writer at a time, unfinished runs, signals in
every phase, a full disk, non-finite PPO updates, pickled weights, and a cache built once by many processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunestack.locks import WriterLock

FIXTURES = Path(__file__).parent.parent / "fixtures"
CHAT = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


@pytest.fixture
def chats(tmp_path: Path) -> Path:
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(CHAT) for _ in range(16)) + "\n")
    return data


def _sft(model: Path, data: Path, out: Path, *extra: object) -> list[str]:
    return [
        "sft", "--model_name_or_path", str(model), "--train_file_dir", str(data), "--output_dir", str(out),
        "--max_steps", "6", "--save_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
        "--logging_steps", "1", "--report_to", "none", *[str(e) for e in extra],
    ]  # fmt: skip


def _run(args: list[str], fault: str | None = None, step: int = 0, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, OMP_NUM_THREADS="1", **env)
    environ["PYTHONPATH"] = os.pathsep.join([str(FIXTURES), environ.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "tunestack", *args]
    if fault:
        environ.update(FAULT=fault, FAULT_STEP=str(step))
        cmd = [sys.executable, str(FIXTURES / "faulty_run.py"), *args]
    return subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=600)


def _status(out: Path) -> str:
    return json.loads((out / "run.json").read_text())["status"]


# ------------------------------------------------------------------------------------------------ whose folder


def test_a_folder_of_the_users_is_never_written_or_replaced(cli, tiny_model, chats, tmp_path):
    mine = tmp_path / "Documents"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    for extra in ((), ("--overwrite_output_dir", "true")):
        code, _, err = cli(*_sft(tiny_model, chats, mine, *extra))
        assert code == 2
        assert f"--output_dir {mine} holds files tunestack did not write (thesis.txt)" in err
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.txt"]


def test_overwrite_removes_the_weights_of_the_earlier_run(cli, tiny_model, chats, tmp_path):
    out = tmp_path / "out"
    assert cli(*_sft(tiny_model, chats, out, "--max_steps", 2))[0] == 0
    assert (out / "adapter_model.safetensors").exists()
    code, _, err = cli(*_sft(tiny_model, chats, out, "--max_steps", 2, "--use_peft", "false", "--overwrite_output_dir", "true"))
    assert code == 0, err
    assert not (out / "adapter_model.safetensors").exists() and (out / "model.safetensors").exists()
    assert json.loads((out / "run.json").read_text())["tuning_method"] == "full"


def test_recipe_outputs_stay_under_the_output_root(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    for output_dir in ("/tmp/elsewhere", "../up"):
        recipe.write_text(f"stages:\n  - {{name: m, stage: merge, lora_model: x, output_dir: {output_dir}}}\n")
        code, _, err = cli("run", recipe, "--dry_run")
        assert code == 2
        assert f"stage 'm': output_dir {output_dir} leaves the output root" in err and "allow_outside_root: true" in err


# ------------------------------------------------------------------------------------------------ one writer


def test_a_second_writer_is_refused_naming_the_first(cli, tiny_model, chats, tmp_path):
    out = tmp_path / "out"
    held = WriterLock(out / ".tunestack.lock", out).acquire()  # another process writing (this one, here)
    try:
        code, _, err = cli(*_sft(tiny_model, chats, out))
        assert code == 2
        assert f"{out} is in use by pid {os.getpid()} on {socket.gethostname()}" in err
    finally:
        held.release()
    # a lock left by a process that is gone is free again: the system released it with the process
    (out / ".tunestack.lock").write_text("999999 some-host\n")
    assert cli(*_sft(tiny_model, chats, out, "--max_steps", 2))[0] == 0


def test_two_pipelines_of_one_recipe_do_not_run_at_once(cli, tmp_path):
    root = tmp_path / "root"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_root: {root}\nstages:\n  - {{name: m, stage: merge, lora_model: {tmp_path}}}\n")
    held = WriterLock(root / ".tunestack.lock", root).acquire()
    try:
        code, _, err = cli("run", recipe)
        assert code == 2 and f"{root} is in use by pid {os.getpid()}" in err
    finally:
        held.release()


# ------------------------------------------------------------------------------------------------ unfinished runs


def test_an_unfinished_run_is_not_used_as_a_model_but_its_checkpoints_are(cli, tiny_model, chats, tmp_path):
    out = tmp_path / "out"
    killed = _run(_sft(tiny_model, chats, out), fault="kill_after_save", step=2)
    assert killed.returncode == -signal.SIGKILL
    code, _, err = cli("chat", "--model", out, "--prompt", "hi", "--max_new_tokens", 2)
    assert code == 2
    assert f"the run in {out} has not finished (status running): resume it, or name a checkpoint-N folder" in err
    code, _, err = cli("merge", "--lora_model", out, "--output_dir", tmp_path / "m")
    assert code == 2 and "has not finished" in err
    code, answer, err = cli("chat", "--model", out / "checkpoint-2", "--prompt", "hi", "--max_new_tokens", 2)
    assert code == 0, err


# ------------------------------------------------------------------------------------------------ signals and faults


def test_sigterm_during_an_evaluation_stops_with_one_checkpoint(tiny_model, chats, tmp_path):
    out = tmp_path / "out"
    args = _sft(tiny_model, chats, out, "--do_train", "true", "--do_eval", "true", "--validation_split_percentage", 25,
                "--eval_strategy", "steps", "--eval_steps", 3, "--save_steps", 100)  # fmt: skip
    stopped = _run(args, fault="sigterm_in_eval", step=3)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "stopped by SIGTERM at step 3" in stopped.stdout
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    assert (out / "checkpoint-3" / "tunestack_checkpoint.json").exists() and _status(out) == "interrupted"
    resumed = _run([*args, "--resume_from_checkpoint", "true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _status(out) == "complete"


def test_a_signal_after_the_training_loop_keeps_the_run_complete(tiny_model, chats, tmp_path):
    out = tmp_path / "out"
    args = _sft(tiny_model, chats, out, "--do_train", "true", "--do_eval", "true", "--validation_split_percentage", 25)
    stopped = _run(args, fault="sigterm_after_train")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["metrics"]["evaluation_stopped"] == "SIGTERM"
    assert (out / "adapter_model.safetensors").exists()


def test_a_full_disk_discards_the_checkpoint_it_was_writing(tiny_model, chats, tmp_path):
    out = tmp_path / "out"
    full = _run(_sft(tiny_model, chats, out), fault="disk_full", step=4)
    assert full.returncode == 1
    errors = [line[line.index("tunestack sft: error: ") :] for line in full.stderr.splitlines() if "error: " in line]
    assert errors == [
        f"tunestack sft: error: no space left on device while writing checkpoint-4 in {out / '.staging'}: it was "
        "discarded, earlier checkpoints are intact; free some space and resume with --resume_from_checkpoint true"
    ]
    assert "Traceback" not in full.stderr
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (out / ".staging" / "checkpoint-4").exists() and _status(out) == "failed"
    resumed = _run([*_sft(tiny_model, chats, out), "--resume_from_checkpoint", "true"])
    assert resumed.returncode == 0 and "checkpoint-2" in resumed.stderr


def test_a_run_that_fails_before_its_first_checkpoint_keeps_its_logs(cli, tiny_model, chats, tmp_path, monkeypatch):
    from transformers import Trainer

    original = Trainer.compute_loss
    monkeypatch.setattr(Trainer, "compute_loss", lambda self, *a, **k: original(self, *a, **k) * float("nan"))
    out = tmp_path / "out"
    code, _, err = cli(*_sft(tiny_model, chats, out, "--sparse_lm_head", "false", "--report_to", "tensorboard"))
    assert code == 1 and "the loss became nan at step 1" in err
    assert _status(out) == "failed" and (out / "metrics.jsonl").exists() and list((out / "runs").iterdir())


def test_ppo_stops_before_a_non_finite_update(cli, tiny_model, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi\nWho are you?\nWhat is blood?\nWhy sleep?\n")
    out = tmp_path / "ppo"
    code, _, err = cli(
        "rl", "--algo", "ppo", "--model_name_or_path", tiny_model, "--train_file_dir", prompts, "--output_dir", out,
        "--reward_funcs", "rewards:not_a_number", "--batch_size", 2, "--mini_batch_size", 2, "--max_target_length", 4,
        "--max_steps", 2, "--report_to", "none",
    )  # fmt: skip
    assert code == 1
    assert "the PPO reward became non-finite at step 1; training stopped before the optimizer step" in err
    assert _status(out) == "failed" and not (out / "adapter_model.safetensors").exists()


def test_sigterm_during_a_merge_leaves_nothing(tiny_model, tmp_path):
    from adapter_fixtures import make_adapter

    adapter = make_adapter(tiny_model, tmp_path / "sft")
    code = (
        "import os, signal, sys\n"
        "from transformers import PreTrainedModel\n"
        "save = PreTrainedModel.save_pretrained\n"
        "def save_then_stop(self, *a, **k):\n"
        "    save(self, *a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "PreTrainedModel.save_pretrained = save_then_stop\n"
        "from tunestack.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    out = tmp_path / "merged"
    proc = subprocess.run(
        [sys.executable, "-c", code, "merge", "--lora_model", str(adapter), "--output_dir", str(out)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "stopped by SIGTERM; nothing half-written is left" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]


@pytest.mark.distributed
def test_sigterm_to_one_rank_stops_both_after_the_same_step(tiny_model, chats, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(FIXTURES / "faulty_run.py"), *_sft(tiny_model, chats, out, "--max_steps", 20, "--save_steps", 100)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", FAULT="sigterm", FAULT_STEP="3", FAULT_RANK="1")
    env["PYTHONPATH"] = os.pathsep.join([str(FIXTURES), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert proc.stderr.count("exitcode  : 143") == 2 or "stopped by SIGTERM at step 3" in proc.stdout, proc.stderr[-4000:]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    assert (out / "checkpoint-3" / "tunestack_checkpoint.json").exists() and _status(out) == "interrupted"


# ------------------------------------------------------------------------------------------------ safe loading


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickled_weights_are_refused_and_never_run(cli, tiny_model, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
              "base_model_name_or_path": str(tiny_model)}  # fmt: skip
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    code, _, err = cli("chat", "--model", adapter, "--prompt", "hi")
    assert code == 2
    assert f"{adapter / 'adapter_model.bin'}: pickled weights can run code when they are loaded" in err
    code, _, err = cli("chat", "--model", adapter, "--prompt", "hi", "--allow_pickle", "true")
    assert code == 2 and "its pickled weights hold more than tensors" in err  # torch's weights_only refused it
    assert not marker.exists()


def test_a_reward_file_named_like_a_standard_module_shadows_nothing(tmp_path):
    from tunestack.rl.rewards import import_reward_function

    (tmp_path / "json.py").write_text("def length(prompts, completions, **kw):\n    return [len(c) for c in completions]\n")
    reward = import_reward_function(f"{tmp_path / 'json.py'}:length")
    assert reward(prompts=["p"], completions=["abc"]) == [3]
    assert json.dumps({"a": 1}) == '{"a": 1}' and sys.modules["json"] is json


# ------------------------------------------------------------------------------------------------ caches


def _build_slowly(target: str, log: str) -> None:
    from tunestack.atomic import build_once

    def build(staging: Path) -> None:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        (staging / "weights").write_text("w")
        (staging / "config").write_text("c")

    build_once(Path(target), build, lambda f: (f / "weights").exists() and (f / "config").exists())


def test_a_cache_folder_is_built_once_by_processes_that_ask_together(tmp_path):
    target, log = tmp_path / "cache" / "model", tmp_path / "builds.log"
    target.mkdir(parents=True)
    (target / "config").write_text("only half of it")  # left by a crash: rebuilt, never trusted
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_build_slowly, args=(str(target), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(log.read_text().split()) == 1
    assert sorted(p.name for p in target.iterdir()) == ["config", "weights"]


def _save_on_rank(rank: int, port: int, model_dir: str, out: str) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from tunestack.model.builtin import save_model_folder

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if rank == 1:  # the rank that took the cache lock: save_pretrained would write no weights here
            save_model_folder(AutoModelForCausalLM.from_pretrained(model_dir), Path(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_cache_folder_built_by_rank_1_of_a_process_group_holds_the_weights(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "converted"
    out.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_save_on_rank, args=(r, port, str(tiny_model), str(out))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    source, saved = AutoModelForCausalLM.from_pretrained(tiny_model), AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(source(ids).logits, saved(ids).logits)
