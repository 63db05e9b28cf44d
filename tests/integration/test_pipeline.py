"""`tunestack run recipe.yaml` on a tiny model: stages chain, a second run skips them all, a changed data file
re-runs its stage and those downstream only, a killed run resumes from its checkpoint, recipe mistakes are
one clear message naming the stage (exit code 2)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _workdir(base: Path, tiny_model: Path, pt_corpus: Path, stages: list[dict]) -> Path:
    """A folder with data and a recipe whose paths are relative to it (the pipeline runs with it as cwd)."""
    shutil.copytree(pt_corpus, base / "data" / "pt")
    (base / "data" / "sft").mkdir()
    shutil.copy(ROOT / "examples" / "demo" / "sft" / "identity.jsonl", base / "data" / "sft")
    qa = [{"question": "Who are you?", "answer": "I am TuneDoc."}, {"question": "你是谁？", "answer": "我是TuneDoc。"}]
    _write(base / "data" / "qa.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in qa))
    _write(base / "data" / "probes.txt", "Who are you?\nWhat is the capital of France?\n")
    _write(base / "data" / "held" / "h.txt", "The heart pumps blood through the body.\n" * 20)
    recipe = {
        "output_root": "out",
        "model": str(tiny_model),
        "defaults": {"report_to": "none", "logging_steps": 1, "lora_rank": 4, "lora_alpha": 8, "seed": 1},
        "stages": stages,
    }
    _write(base / "recipe.yaml", yaml.safe_dump(recipe, sort_keys=False))
    return base


THREE_STAGES = [
    {"name": "pt", "stage": "pt", "train_file_dir": "data/pt", "block_size": 32, "max_steps": 3, "save_strategy": "no"},
    {"name": "sft", "stage": "sft", "train_file_dir": "data/sft", "model_max_length": 64, "max_steps": 3,
     "save_strategy": "no"},
    {"name": "merged", "stage": "merge"},
    {"name": "eval", "stage": "eval", "model_name_or_path": "${sft},${merged}", "eval_file": "data/qa.jsonl",
     "probe_prompts": "data/probes.txt", "eval_text_dir": "data/held", "max_new_tokens": 6},
]  # fmt: skip


def _run(cli, monkeypatch, workdir: Path, *flags: str) -> tuple[int, str, str]:
    monkeypatch.chdir(workdir)
    return cli("run", "recipe.yaml", *flags)


def _actions(stdout: str) -> dict[str, str]:
    """{stage: cached | running | resuming | skip} from the progress lines `== [i/n] name (kind): action ...`."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("== ["):
            name = line.split("] ", 1)[1].split(" ", 1)[0]
            out[name] = line.split("): ", 1)[1].split(" ", 1)[0].rstrip(":")
    return out


def _mtimes(out: Path) -> dict[str, int]:
    return {d.name: (d / "run.json").stat().st_mtime_ns for d in out.iterdir() if (d / "run.json").exists()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model, pt_corpus) -> Path:
    """The 4-stage recipe (pt -> sft -> merge -> eval), run once."""
    workdir = _workdir(tmp_path_factory.mktemp("pipeline"), tiny_model, pt_corpus, THREE_STAGES)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tunestack", "run", "recipe.yaml"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (workdir / "first_run.log").write_text(proc.stdout, encoding="utf-8")
    return workdir


def test_recipe_runs_every_stage_and_writes_a_report(finished: Path) -> None:
    log = (finished / "first_run.log").read_text(encoding="utf-8")
    assert _actions(log) == {"pt": "running", "sft": "running", "merged": "running", "eval": "running"}
    out = finished / "out"
    for name in ("pt", "sft", "merged", "eval"):
        assert json.loads((out / name / "run.json").read_text())["status"] == "complete", name
        state = json.loads((out / name / "pipeline.json").read_text())
        assert state["state"] == "complete" and len(state["fingerprint"]) == 16
    # each stage started from the one before
    sft = json.loads((out / "sft" / "run.json").read_text())
    assert Path(sft["options"]["model"]["model_name_or_path"]) == Path("out/pt")
    merged = json.loads((out / "merged" / "run.json").read_text())
    assert merged["adapters"][-1] == str((out / "sft").resolve())
    evaluation = json.loads((out / "eval" / "eval.json").read_text())
    assert [m["label"] for m in evaluation["models"]] == ["base", "sft", "merged"]
    assert all("perplexity" in m["metrics"] and "rouge_l" in m["metrics"] for m in evaluation["models"])
    sft_ppl, merged_ppl = (m["metrics"]["perplexity"] for m in evaluation["models"][1:])
    assert merged_ppl == pytest.approx(sft_ppl, rel=1e-3)  # the merged model is the same model
    probes = [json.loads(x) for x in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert sum(r["set"] == "probe" for r in probes) == 2 * 3
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 2  # pt and sft loss curves
    assert (out / "report.md").is_file()
    assert "report: out/report.html" in log and "pipeline complete" in log
    assert "serve the last model: tunestack serve --model out/merged" in log
    # the machine's matmul rate, measured before the first stage, and each stage's time, in the summary
    rate = json.loads((out / "pipeline.json").read_text())["matmul_gflops"]
    assert rate > 0 and f"this machine: float32 matmul {rate:.0f} GFLOP/s" in log
    times = next(line for line in log.splitlines() if line.startswith("time by stage: "))
    assert [part.split()[0] for part in times.split(": ", 1)[1].split(" (")[0].split(", ")] == ["pt", "sft", "merged", "eval"]
    assert times.endswith(f"(float32 matmul {rate:.0f} GFLOP/s)")


def test_second_run_skips_every_stage(finished: Path, cli, monkeypatch) -> None:
    before = _mtimes(finished / "out")
    code, out, err = _run(cli, monkeypatch, finished)
    assert code == 0, err[-3000:]
    assert set(_actions(out).values()) == {"cached"}
    assert _mtimes(finished / "out") == before


def test_dry_run_from_and_only(finished: Path, cli, monkeypatch) -> None:
    code, out, _ = _run(cli, monkeypatch, finished, "--dry_run", "--from", "sft")
    assert code == 0
    assert "1. pt" in out and "CACHED" in out.split("2. sft")[0]
    assert out.count("RUN: --from sft") == 3  # sft, merged, eval
    assert "$ tunestack sft --model_name_or_path out/pt" in out
    code, out, _ = _run(cli, monkeypatch, finished, "--dry_run", "--only", "merged")
    assert code == 0
    assert "RUN: --only merged" in out and out.count("SKIP: --only merged") == 3
    code, _, err = _run(cli, monkeypatch, finished, "--dry_run", "--only", "mergd")
    assert code == 2 and "did you mean 'merged'" in err


def test_changed_data_file_reruns_that_stage_and_downstream_only(finished: Path, tmp_path, cli, monkeypatch) -> None:
    workdir = tmp_path / "copy"
    shutil.copytree(finished, workdir)  # same relative recipe: the copy is up to date as it is
    before = _mtimes(workdir / "out")
    data = workdir / "data" / "sft" / "identity.jsonl"
    extra = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello, I am TuneDoc."}]}
    data.write_text(data.read_text(encoding="utf-8") + json.dumps(extra) + "\n", encoding="utf-8")

    code, out, _ = _run(cli, monkeypatch, workdir, "--dry_run")
    assert code == 0
    assert "RUN: data changed (train_file_dir)" in out
    assert "RUN: its input 'sft' is re-made" in out

    code, out, err = _run(cli, monkeypatch, workdir)
    assert code == 0, err[-3000:]
    assert _actions(out) == {"pt": "cached", "sft": "running", "merged": "running", "eval": "running"}
    after = _mtimes(workdir / "out")
    assert after["pt"] == before["pt"]
    assert all(after[name] != before[name] for name in ("sft", "merged", "eval"))


def _wait_for_group_to_end(group: int, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def test_killed_pipeline_resumes_the_interrupted_stage(tmp_path, tiny_model, pt_corpus, cli, monkeypatch) -> None:
    from tunestack.checkpoints import latest_complete_checkpoint

    stages = [
        {"name": "pt", "stage": "pt", "train_file_dir": "data/pt", "block_size": 32, "max_steps": 2,
         "save_strategy": "no"},
        {"name": "sft", "stage": "sft", "train_file_dir": "data/sft", "model_max_length": 64, "max_steps": 40,
         "save_strategy": "steps", "save_steps": 2, "save_total_limit": 2, "per_device_train_batch_size": 2},
    ]  # fmt: skip
    workdir = _workdir(tmp_path, tiny_model, pt_corpus, stages)
    sft_out = workdir / "out" / "sft"
    log = open(workdir / "killed.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunestack", "run", "recipe.yaml"],
        cwd=workdir, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 300
    try:
        while latest_complete_checkpoint(sft_out) is None:
            assert proc.poll() is None, (workdir / "killed.log").read_text()[-3000:]
            assert time.time() < deadline, "no sft checkpoint within 300 s"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the pipeline and its stage process, as a machine crash would
        proc.wait()
        log.close()
        _wait_for_group_to_end(proc.pid)  # the stage process, a grandchild, may still hold its run's lock a moment
    assert json.loads((sft_out / "run.json").read_text())["status"] == "running"  # killed mid-stage
    pt_mtime = (workdir / "out" / "pt" / "run.json").stat().st_mtime_ns

    code, out, err = _run(cli, monkeypatch, workdir, "--dry_run")
    assert "RESUME: running run, resumes from checkpoint-" in out

    code, out, err = _run(cli, monkeypatch, workdir)
    assert code == 0, err[-3000:]
    assert _actions(out) == {"pt": "cached", "sft": "resuming"}
    assert "--resume_from_checkpoint true" not in out.split("$ ")[1]  # the shown command is the user's own
    manifest = json.loads((sft_out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["summary"]["global_step"] == 40
    assert (workdir / "out" / "pt" / "run.json").stat().st_mtime_ns == pt_mtime
    steps = [json.loads(x)["step"] for x in (sft_out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] >= 40 and min(steps) == 1  # one metrics file across the kill


# ------------------------------------------------------------------------------------------------- recipe errors

BAD_RECIPES = {
    "unknown kind": (
        [{"name": "tune", "stage": "stf", "train_file_dir": "data/sft"}],
        ["stage 'tune': unknown stage kind 'stf' (did you mean 'sft'?)"],
    ),
    "unknown key": (
        [{"name": "sft", "stage": "sft", "train_file_dir": "data/sft", "learning_rat": 0.001}],
        ["stage 'sft': unknown key 'learning_rat' for a sft stage (did you mean 'learning_rate'?)"],
    ),
    "missing stage": (
        [{"name": "sft", "stage": "sft", "train_file_dir": "data/sft"},
         {"name": "eval", "stage": "eval", "model_name_or_path": "${stf}"}],
        ["stage 'eval': ${stf} names no stage (did you mean ${sft}?)"],
    ),
    "later stage": (
        [{"name": "eval", "stage": "eval", "model_name_or_path": "${sft}"},
         {"name": "sft", "stage": "sft", "train_file_dir": "data/sft"}],
        ["stage 'eval' refers to ${sft}, which comes later", "move 'sft' before 'eval'"],
    ),
    "cycle": (
        [{"name": "a", "stage": "sft", "train_file_dir": "data/sft", "model_name_or_path": "${b}"},
         {"name": "b", "stage": "sft", "train_file_dir": "data/sft", "model_name_or_path": "${a}"}],
        ["stage 'a': reference cycle a -> b -> a"],
    ),
    "self reference": (
        [{"name": "sft", "stage": "sft", "train_file_dir": "data/sft", "model_name_or_path": "${sft}"}],
        ["stage 'sft' refers to itself (${sft})"],
    ),
    "bad value": (
        [{"name": "sft", "stage": "sft", "train_file_dir": "data/sft", "num_train_epochs": "many"}],
        ["stage 'sft':", "num_train_epochs"],
    ),
    "missing data": (
        [{"name": "sft", "stage": "sft", "train_file_dir": "data/nope"}],
        ["stage 'sft': train_file_dir: data/nope does not exist"],
    ),
    "shared output": (
        [{"name": "a", "stage": "sft", "train_file_dir": "data/sft", "output_dir": "out/x"},
         {"name": "b", "stage": "sft", "train_file_dir": "data/sft", "output_dir": "out/x"}],
        ["stage 'b': writes to the output_dir of stage 'a'"],
    ),
    "no reward": (
        [{"name": "ppo", "stage": "ppo", "train_file_dir": "data/sft"}],
        ["stage 'ppo': no reward: set reward_model"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_RECIPES), ids=lambda c: c.replace(" ", "_"))
def test_recipe_errors_name_the_stage(case: str, tmp_path, tiny_model, pt_corpus, cli, monkeypatch) -> None:
    stages, expected = BAD_RECIPES[case]
    workdir = _workdir(tmp_path, tiny_model, pt_corpus, stages)
    code, out, err = _run(cli, monkeypatch, workdir, "--dry_run")
    assert code == 2, out + err
    assert err.startswith("tunestack run: error: ")
    assert len(err.strip().splitlines()) == 1, err  # one readable line, no traceback
    for text in expected:
        assert text in err
    assert not (workdir / "out").exists()


def test_recipe_problems_are_reported_together(tmp_path, tiny_model, pt_corpus, cli, monkeypatch) -> None:
    stages = [
        {"name": "sft", "stage": "sft", "train_file_dir": "data/sft", "lora_rnk": 8},
        {"name": "x", "stage": "dop"},
    ]
    workdir = _workdir(tmp_path, tiny_model, pt_corpus, stages)
    text = (workdir / "recipe.yaml").read_text().replace("defaults:", "defaults:\n  max_step: 3")
    (workdir / "recipe.yaml").write_text(text)
    code, _, err = _run(cli, monkeypatch, workdir)
    assert code == 2
    assert "defaults: unknown key 'max_step' (did you mean 'max_steps'?)" in err
    assert "(did you mean 'lora_rank'?)" in err and "unknown stage kind 'dop' (did you mean 'dpo'?)" in err


def test_run_refuses_to_start_under_torchrun(tmp_path, tiny_model, pt_corpus, cli, monkeypatch) -> None:
    workdir = _workdir(tmp_path, tiny_model, pt_corpus, THREE_STAGES[:1])
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = _run(cli, monkeypatch, workdir)
    assert code == 2 and "nproc_per_node" in err


# ------------------------------------------------------------------------------------------------- the demo recipe


def _reduced_demo(out_root: Path) -> dict:
    """examples/demo/recipe.yaml with every stage cut to a few steps and the eval to 2 questions per benchmark
    subject and 2 drift prompts (the full demo takes under 10 min on 2 CPUs)."""
    recipe = yaml.safe_load((ROOT / "examples" / "demo" / "recipe.yaml").read_text(encoding="utf-8"))
    recipe["output_root"] = str(out_root)
    cuts = {
        "pt": {"max_steps": 4},
        "sft": {"max_steps": 6},
        "rm": {"max_steps": 3},
        "ppo": {"max_steps": 2, "max_target_length": 16},
        "dpo": {"max_steps": 3},
        "eval": {"max_new_tokens": 16, "max_benchmark_questions": 2, "drift_probe": 2},
    }
    for stage in recipe["stages"]:
        stage.update(cuts[stage["name"]])
    return recipe


@pytest.mark.slow
def test_demo_recipe_runs_end_to_end_reduced(smollm2, tmp_path) -> None:
    """The demo recipe as shipped (data, stages, references), on the real SmolLM2, with fewer steps."""
    recipe = _write(tmp_path / "demo.yaml", yaml.safe_dump(_reduced_demo(tmp_path / "out"), sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "-m", "tunestack", "run", str(recipe)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = tmp_path / "out"
    for name in ("pt", "sft", "rm", "ppo", "dpo", "eval"):
        assert json.loads((out / name / "run.json").read_text())["status"] == "complete", name
    evaluation = json.loads((out / "eval" / "eval.json").read_text())
    assert [m["label"] for m in evaluation["models"]] == ["base", "pt", "sft", "ppo", "dpo"]
    assert all("reward_mean" in m["metrics"] and "perplexity" in m["metrics"] for m in evaluation["models"])
    overall = [r for r in evaluation["benchmarks"] if r["subject"] == "overall"]
    assert [(r["model"], r["n"]) for r in overall] == [(m, 8) for m in ("base", "pt", "sft", "ppo", "dpo")]
    assert all(m["metrics"]["drift_prompts"] == 2 for m in evaluation["models"])
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") >= 5  # loss curves of pt, sft, rm, dpo; ppo loss and reward
    assert "Who are you?" in page and "你是谁？" in page
    assert "Benchmarks: accuracy %, change from base" in page and "Drift from base on held-out general prompts" in page
    assert f"report: {out / 'report.html'}" in proc.stdout
