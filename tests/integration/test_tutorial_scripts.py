"""The MedicalGPT-style shell scripts in examples/ run unchanged (only environment overrides) and finish a run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cli_runner import run_script as _run_script

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"


def test_sample_pretrain_corpus_is_small_english_and_chinese() -> None:
    files = sorted((EXAMPLES / "data" / "pretrain").glob("*.txt"))
    assert files, "examples/data/pretrain has no .txt files"
    assert sum(f.stat().st_size for f in files) < 100_000
    text = "".join(f.read_text(encoding="utf-8") for f in files)
    assert len(text.splitlines()) >= 200
    assert "heart" in text and "心脏" in text


def test_run_pt_sh(tiny_model: Path, tmp_path: Path) -> None:
    script = EXAMPLES / "medicalgpt" / "run_pt.sh"
    flags = script.read_text()
    for flag in ("torchrun --nproc_per_node", "--preprocessing_num_workers 10", "--bf16", "--target_modules all"):
        assert flag in flags  # the tutorial's own command line, not a simplified one
    proc = _run_script(script, tmp_path, MODEL=str(tiny_model), NPROC="1", EXTRA_ARGS="--max_steps 4 --block_size 64")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr

    out = tmp_path / "outputs-pt-v1"
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["stage"] == "pt"
    assert manifest["tuning_method"] == "lora"
    assert manifest["summary"]["global_step"] == 4
    options = manifest["options"]
    assert options["data"]["block_size"] == 64  # EXTRA_ARGS come last and win
    assert options["data"]["preprocessing_num_workers"] == 10
    assert options["data"]["train_file_dir"].endswith("examples/medicalgpt/../data/pretrain")
    assert options["tuning"]["lora_rank"] == 8 and options["tuning"]["lora_alpha"] == 16
    assert options["model"]["torch_dtype"] == "bfloat16" and options["train"]["bf16"] is True
    assert manifest["data_stats"]["eval_blocks_used"] == 10  # --max_eval_samples 10
    assert "eval_perplexity" in manifest["metrics"] and "before_eval_perplexity" in manifest["metrics"]

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    for name in ("adapter_model.safetensors", "tokenizer_config.json", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    assert list((out / "runs").rglob("events.out.tfevents.*")), "--report_to tensorboard wrote no events"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][0] == 1  # --logging_first_step True
    assert (tmp_path / "cache" / "pt").is_dir()  # --cache_dir ./cache, relative to where it runs
    assert "pt finished in" in proc.stdout and "eval perplexity:" in proc.stdout


@pytest.mark.parametrize("script", sorted((EXAMPLES / "medicalgpt").glob("*.sh")), ids=lambda p: p.name)
def test_scripts_are_valid_bash(script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
