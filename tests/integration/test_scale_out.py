"""Beyond one process on CPU (gloo): FSDP, two torchrun nodes, accelerate launch, DeepSpeed ZeRO-2/3.

Every run goes through tests/fixtures/ddp_probe.py, which records per rank the engine accelerate ran, the batches
the rank saw and the trained weights as that rank holds them (gathered where they are sharded). A sharded run
must end where a single process with the same global batch ends.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

FIXTURES = Path(__file__).parent.parent / "fixtures"
PROBE = FIXTURES / "ddp_probe.py"
IDENTITY = {"conversations": [{"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "I am MediBot."}]}
MATH = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
LINES = [
    "The heart pumps blood through the arteries and veins of the body.",
    "Aspirin reduces fever and pain; it also thins the blood.",
    "A doctor listens to the lungs with a stethoscope.",
    "心脏通过动脉和静脉把血液输送到全身。",
]


def _env(probe: Path, home: Path, **extra: str) -> dict[str, str]:
    probe.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")])
    return dict(
        os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PROBE_DIR=str(probe),
        TUNESTACK_HOME=str(home), PYTHONPATH=path, **extra,
    )  # fmt: skip


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), str(PROBE)]


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    return proc


def _info(probe: Path, ranks: int) -> list[dict[str, Any]]:
    return [json.loads((probe / f"rank{r}.json").read_text()) for r in range(ranks)]


def _batches(probe: Path, rank: int) -> list[str]:
    return [json.loads(line)["batch"] for line in (probe / f"rank{rank}.steps.jsonl").read_text().splitlines()]


def _weights(probe: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(probe / f"rank{rank}.safetensors")


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-4) -> None:
    """Equal up to the order of float sums (Adam at lr 1e-2 turns 1e-7 differences of tiny gradients into ~1e-5)."""
    assert a.keys() == b.keys() and a
    for name, tensor in a.items():
        torch.testing.assert_close(tensor, b[name], atol=atol, rtol=1e-4, msg=name)


def _saved_adapter_is(out: Path, weights: dict[str, torch.Tensor]) -> None:
    saved = load_file(out / "adapter_model.safetensors")
    assert len(saved) == len(weights) > 0
    for name, tensor in weights.items():
        assert torch.equal(saved[name.replace(".default", "")], tensor), name
    assert any("lora_B" in n and t.abs().sum() > 0 for n, t in weights.items()), "the adapter did not train"


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chat")
    (folder / "a.jsonl").write_text("\n".join(json.dumps(IDENTITY) for _ in range(12)) + "\n")
    (folder / "b.jsonl").write_text("\n".join(json.dumps(MATH) for _ in range(12)) + "\n")
    return folder


def _sft(model: Path, chat: Path, out: Path, batch: int, *extra: str) -> list[str]:
    return [
        "sft", "--model_name_or_path", str(model), "--train_file_dir", str(chat), "--output_dir", str(out),
        "--max_steps", "3", "--per_device_train_batch_size", str(batch), "--learning_rate", "1e-2",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--lora_dropout", "0",
        "--seed", "3", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(tiny_model: Path, chat: Path, tmp_path_factory) -> Any:
    """The weights a single process reaches with the global batch (4) of two processes of 2, per tuning method."""
    made: dict[str, dict[str, torch.Tensor]] = {}

    def weights(*method: str) -> dict[str, torch.Tensor]:
        if method not in made:
            root = tmp_path_factory.mktemp("one")
            cmd = [sys.executable, str(PROBE), *_sft(tiny_model, chat, root / "out", 4, *method)]
            _run(cmd, _env(root / "probe", root / "home"), root)
            made[method] = _weights(root / "probe")
        return made[method]

    return weights


@pytest.mark.parametrize("method", [(), ("--use_peft", "false")], ids=["lora", "full"])
def test_fsdp_two_processes_end_where_one_process_ends(tiny_model, chat, tmp_path, one_process, method) -> None:
    """`--fsdp "full_shard auto_wrap"` shards for real on CPU (accelerate alone would run DDP there), with the
    fast paths on (padding-free rows, per-sample attention, and with LoRA the trained-positions output layer)."""
    out = tmp_path / "out"
    argv = _sft(tiny_model, chat, out, 2, "--fsdp", "full_shard auto_wrap", *method)
    proc = _run([*_torchrun(2), *argv], _env(tmp_path / "probe", tmp_path / "home"), tmp_path)
    info = _info(tmp_path / "probe", 2)
    assert [(i["world_size"], i["engine"]) for i in info] == [(2, "FSDP")] * 2
    switched = (
        "--sparse_lm_head (the trained-positions output layer) is switched off under FSDP when the output layer trains"
    )
    assert (switched in proc.stderr) == bool(method), "the output layer is frozen under LoRA: the fast path stays on"
    assert _batches(tmp_path / "probe", 0) != _batches(tmp_path / "probe", 1)
    weights = _weights(tmp_path / "probe")
    _assert_close(weights, one_process(*method))
    if method:
        saved = load_file(out / "model.safetensors")
        for name, tensor in weights.items():
            assert torch.equal(saved[name], tensor), name
    else:
        _saved_adapter_is(out, weights)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_end_like_one_node_with_two_processes(tiny_model: Path, tmp_path: Path, cli) -> None:
    """Two torchrun agents (--nnodes 2, one process each, on 127.0.0.1) sharing a cache folder: rank 0 tokenizes
    for longer than --ddp_timeout while rank 1 waits, then rank 1 reads its cache; the run (FSDP, LoRA) ends at the
    weights of one node with two processes, and its adapter merges into the base."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.txt").write_text("\n".join(LINES * 60) + "\n", encoding="utf-8")
    argv = [
        "pt", "--model_name_or_path", str(tiny_model), "--train_file_dir", str(data), "--block_size", "32",
        "--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "5e-3", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--seed", "3", "--lora_dropout", "0",
        "--fsdp", "full_shard auto_wrap",
    ]  # fmt: skip
    one = tmp_path / "one"
    _run([*_torchrun(2), *argv, "--output_dir", str(one / "out")], _env(one / "probe", one / "home"), tmp_path)

    two, port = tmp_path / "two", str(_free_port())
    env = _env(two / "probe", two / "home", PROBE_SLOW_BUILD="10")
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node_rank",
                str(rank),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                "--nproc_per_node",
                "1",
                str(PROBE),
                *argv,
                "--output_dir",
                str(two / "out"),
                "--ddp_timeout",
                "6",
            ],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    results = [agent.communicate(timeout=300) for agent in agents]
    for agent, (_, err) in zip(agents, results, strict=True):
        assert agent.returncode == 0, err[-4000:]
    assert [i["world_size"] for i in _info(two / "probe", 2)] == [2, 2]
    assert (two / "probe" / "rank0.built").exists() and not (two / "probe" / "rank1.built").exists()
    assert _batches(two / "probe", 0) != _batches(two / "probe", 1)
    nodes, node = _weights(two / "probe"), _weights(one / "probe")
    assert nodes.keys() == node.keys()
    for name, tensor in nodes.items():
        assert torch.equal(tensor, node[name]), name
    _saved_adapter_is(two / "out", nodes)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    code, _, err = cli("merge", "--lora_model", two / "out", "--output_dir", tmp_path / "merged")
    assert code == 0, err
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    stacked = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), two / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, stacked(ids).logits, atol=1e-5, rtol=1e-4)


def test_accelerate_launch_runs_one_process_per_rank(tiny_model: Path, chat: Path, tmp_path: Path) -> None:
    """`accelerate launch --multi_gpu --num_processes 2 -m ...` trains data parallel like torchrun (over gloo here);
    `--num_processes 2 --cpu`, which accelerate turns into one process without mpirun, is refused in one line."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    argv = _sft(tiny_model, chat, tmp_path / "out", 2)
    env = _env(tmp_path / "probe", tmp_path / "home")
    _run([*accelerate, "--multi_gpu", "--num_processes", "2", "-m", "ddp_probe", *argv], env, tmp_path)
    info = _info(tmp_path / "probe", 2)
    assert [i["world_size"] for i in info] == [2, 2]
    a, b = _batches(tmp_path / "probe", 0), _batches(tmp_path / "probe", 1)
    assert len(a) == len(b) == 3 and all(x != y for x, y in zip(a, b, strict=True)), "the ranks shared batches"
    _saved_adapter_is(tmp_path / "out", _weights(tmp_path / "probe"))

    cmd = [*accelerate, "--num_processes", "2", "--cpu", "-m", "tunestack", *_sft(tiny_model, chat, tmp_path / "x", 2)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert (
        "tunestack sft: error: accelerate launch --num_processes 2 --cpu started a single process (on CPUs accelerate "
        "starts several only through mpirun)"
    ) in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_lora_on_two_cpu_processes(tiny_model, chat, tmp_path, one_process, config) -> None:
    """ZeRO-2 / ZeRO-3 with LoRA by name: the same weights as one process; ZeRO-3's adapter is gathered for the save
    (not its empty placeholders), and a run resumed from its ZeRO checkpoint ends at the same weights."""
    out = tmp_path / "out"
    argv = _sft(tiny_model, chat, out, 2, "--deepspeed", config)
    argv[argv.index("--save_strategy") + 1 : argv.index("--save_strategy") + 2] = ["steps", "--save_steps", "2"]
    proc = _run([*_torchrun(2), *argv], _env(tmp_path / "probe", tmp_path / "home"), tmp_path)
    assert [(i["world_size"], i["engine"]) for i in _info(tmp_path / "probe", 2)] == [(2, "DEEPSPEED")] * 2
    weights = _weights(tmp_path / "probe")
    _assert_close(weights, one_process())
    _saved_adapter_is(out, weights)
    shards = sorted(p.name for p in (out / "checkpoint-2" / "global_step2").glob("*optim_states.pt"))
    assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1]
    if config == "zero2":
        return
    assert "--sparse_lm_head (the trained-positions output layer) is switched off under ZeRO-3" in proc.stderr

    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoint-3")
    manifest = json.loads((resumed / "run.json").read_text())
    (resumed / "run.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    argv[argv.index("--output_dir") + 1] = str(resumed)
    again = _run(
        [*_torchrun(2), *argv, "--resume_from_checkpoint", "true"], _env(tmp_path / "p2", tmp_path / "home"), tmp_path
    )
    assert "resuming from" in again.stderr
    assert json.loads((tmp_path / "p2" / "rank0.json").read_text())["global_step"] == 3
    _saved_adapter_is(resumed, weights)


def test_ppo_under_zero3_saves_the_gathered_policy(tiny_model: Path, tmp_path: Path) -> None:
    """PPO (tunestack's own loop, through accelerate) with `--deepspeed zero3`: generation in step on both
    processes, identical weights on both, and the saved adapter and value head are the gathered trained ones."""
    from rewards import QUESTIONS  # tests/fixtures

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "train.txt").write_text("\n".join(QUESTIONS * 4) + "\n")
    out, probe = tmp_path / "out", tmp_path / "probe"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(FIXTURES / "rl_ddp_probe.py"), "rl", "--algo", "ppo", "--model_name_or_path", str(tiny_model),
        "--train_file_dir", str(prompts), "--output_dir", str(out), "--reward_funcs", "rewards:letter_a",
        "--batch_size", "4", "--mini_batch_size", "2", "--ppo_epochs", "1", "--max_target_length", "6",
        "--learning_rate", "5e-3", "--max_steps", "2", "--save_steps", "2", "--report_to", "none",
        "--deepspeed", "zero3",
    ]  # fmt: skip
    _run(cmd, _env(probe, tmp_path / "home"), tmp_path)
    assert [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)] == [{"world_size": 2, "steps": 2}] * 2
    w0, w1 = _weights(probe, 0), _weights(probe, 1)
    assert w0.keys() == w1.keys()
    for name, tensor in w0.items():
        assert torch.equal(tensor, w1[name]), name
    adapter = {n.removeprefix("policy."): t for n, t in w0.items() if "lora_" in n}
    _saved_adapter_is(out, adapter)
    head = load_file(out / "value_head.safetensors")
    for name, tensor in head.items():
        assert torch.equal(tensor, w0[f"value_head.{name}"]), name
    shards = sorted(p.name for p in (out / "checkpoint-2" / "zero").glob("*optim_states.pt"))
    assert len(shards) == 2, shards
