"""`torchrun --nproc_per_node 2 ... tunestack pt` on CPU (gloo): real data parallelism, one complete output folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

PROBE = Path(__file__).parent.parent / "fixtures" / "ddp_probe.py"
STEPS, BATCH, BLOCK = 4, 2, 32

LINES = [
    "The heart pumps blood through the arteries and veins of the body.",
    "Aspirin reduces fever and pain; it also thins the blood.",
    "A doctor listens to the lungs with a stethoscope.",
    "心脏通过动脉和静脉把血液输送到全身。",
    "阿司匹林可以退烧止痛。",
]


def _torchrun(tmp_path: Path, model: Path, *extra: str, timeout: int = 300) -> tuple[subprocess.CompletedProcess, Path]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "corpus.txt").write_text("\n".join(LINES * 60) + "\n", encoding="utf-8")
    probe = tmp_path / "probe"
    probe.mkdir(exist_ok=True)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PROBE_DIR=str(probe), TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(PROBE),
        "pt", "--model_name_or_path", str(model), "--train_file_dir", str(data), "--output_dir", str(out),
        "--block_size", str(BLOCK), "--max_steps", str(STEPS), "--per_device_train_batch_size", str(BATCH),
        "--logging_steps", "1", "--save_steps", "2", "--learning_rate", "5e-3", "--keep_linebreaks", "false",
        "--report_to", "none", "--seed", "3", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    return proc, probe


def _steps(probe: Path, rank: int) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (probe / f"rank{rank}.steps.jsonl").read_text().splitlines()]


def _check_two_ranks(proc: subprocess.CompletedProcess, probe: Path, out: Path) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world_size"] for i in info] == [2, 2], "each rank trained alone instead of data-parallel"
    assert [i["global_step"] for i in info] == [STEPS, STEPS]

    # Ranks read different shards, and the logged loss is their mean.
    steps = [_steps(probe, r) for r in (0, 1)]
    assert [len(s) for s in steps] == [STEPS, STEPS]
    assert all(a["batch"] != b["batch"] for a, b in zip(*steps, strict=True)), "both ranks got the same batch"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in logged if "loss" in row]
    assert len(losses) == STEPS, "metrics.jsonl must hold one line per step, written by rank 0 only"
    for loss, a, b in zip(losses, *steps, strict=True):
        assert loss == pytest.approx((a["loss"] + b["loss"]) / 2, rel=1e-5)

    # Gradients are averaged over ranks, so every rank ends with the same weights ... which are the saved ones.
    w0, w1 = (load_file(probe / f"rank{r}.safetensors") for r in (0, 1))
    assert w0.keys() == w1.keys() and len(w0) == info[0]["n_params"] > 0
    for name, tensor in w0.items():
        assert torch.equal(tensor, w1[name]), f"{name} differs between ranks"
    saved = load_file(out / "adapter_model.safetensors")
    assert len(saved) == len(w0)
    for name, tensor in w0.items():
        assert torch.equal(saved[name.replace(".default", "")], tensor), name
    assert any("lora_B" in n and t.abs().sum() > 0 for n, t in w0.items()), "the adapter did not train"

    # One complete output folder.
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["summary"]["global_step"] == STEPS
    assert manifest["summary"]["tokens_seen"] == STEPS * 2 * BATCH * BLOCK  # counted over both ranks
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in (out / "checkpoint-4").glob("rng_state_*.pth")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]
    assert not (out / ".staging").exists() or not any((out / ".staging").iterdir())
    assert len(list(out.rglob("metrics.jsonl"))) == 1
    assert proc.stdout.count("pt finished in") == 1, proc.stdout  # the summary comes from rank 0 only
    assert "Traceback" not in proc.stderr


def test_two_cpu_ranks_train_one_model(tiny_model: Path, tmp_path: Path) -> None:
    """Plain `torchrun --nproc_per_node 2` on a CPU-only machine forms one data-parallel group (gloo)."""
    proc, probe = _torchrun(tmp_path, tiny_model, timeout=180)
    _check_two_ranks(proc, probe, tmp_path / "out")
