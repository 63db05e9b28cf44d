"""A new user's first command is the tutorial's torchrun line on the embedded model, with nothing converted yet,
or with a cache folder left half-written by an older version: it must convert once and train."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.distributed
def test_first_use_under_torchrun_converts_once_and_repairs_a_broken_cache(smollm2, tmp_path):
    home = tmp_path / "home"
    broken = home / "models" / "smollm2-135m-instruct"
    broken.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # what a non-main rank used to leave there
        shutil.copy(smollm2 / name, broken / name)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The heart pumps blood through the arteries and veins of the body.\n" * 40)
    out = tmp_path / "pt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tunestack",
        "pt", "--model_name_or_path", "smollm2-135m-instruct", "--train_file_dir", str(corpus), "--output_dir",
        str(out), "--block_size", "32", "--max_steps", "1", "--per_device_train_batch_size", "1",
        "--report_to", "none", "--save_strategy", "no",
    ]  # fmt: skip
    env = dict(os.environ, TUNESTACK_HOME=str(home), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("converting smollm2-135m-instruct") == 1  # one rank converted, the other waited
    assert sorted(p.name for p in broken.glob("*.safetensors")) == ["model.safetensors"]
    assert (broken / "config.json").is_file() and json.loads((out / "run.json").read_text())["status"] == "complete"
    assert not [p for p in broken.parent.iterdir() if p.name.startswith(".") and p.is_dir()]  # no staging left
