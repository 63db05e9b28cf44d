"""Run a planned pipeline: each stage in its own process, state recorded so that a re-run skips or resumes.

Each stage runs as `python -m tunestack <command> ...` in a child process rather than in this one: its memory
(model, optimizer, dataloader workers) is returned to the system when it ends, a crash or a kill of one stage
cannot leave this process in a half-initialised state (CUDA, torch.distributed, logging), and a stage with
`nproc_per_node: N` is started through `python -m torch.distributed.run --nproc_per_node N`, exactly as a user
would start it. `tunestack run` itself is therefore launched plainly, never under torchrun.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from tunestack.atomic import write_json_atomic
from tunestack.checkpoints import latest_complete_checkpoint
from tunestack.pipeline.plan import CACHED, RESUME, RUN, SKIP, Step, describe_plan
from tunestack.pipeline.recipe import Recipe
from tunestack.rundir import PIPELINE_STATE, read_json, read_jsonl


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - progress of the pipeline


def _stop_with_parent() -> None:
    """In the stage process (Linux): get SIGTERM when the pipeline dies, so the stage saves and stops
    instead of running on orphaned."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _launch(command: list[str]) -> int:
    """Run a stage process to its end; a SIGTERM to the pipeline is passed on (the stage stops cleanly)."""
    sys.stdout.flush()
    sys.stderr.flush()
    proc = subprocess.Popen(command, preexec_fn=_stop_with_parent if sys.platform == "linux" else None)
    forward = None
    try:
        forward = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    except ValueError:  # not the main thread: no forwarding
        pass
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # Ctrl-C reached the stage too; let it stop and save
                continue
    finally:
        if forward is not None:
            signal.signal(signal.SIGTERM, forward)


def _start_stage(step: Step) -> None:
    out = step.spec.output_dir
    out.mkdir(parents=True, exist_ok=True)
    if step.action == RUN:
        (out / "run.json").unlink(missing_ok=True)  # a stale status must not be read as this run's
    write_json_atomic(
        out / PIPELINE_STATE,
        {
            "stage": step.spec.name,
            "kind": step.spec.kind.name,
            "state": "running",
            "fingerprint": step.fingerprint,
            "parts": step.parts,
            "command": step.command()[1:],
            "started": _now(),
        },
    )


def _finish_stage(step: Step, state: str, seconds: float, code: int) -> None:
    path = step.spec.output_dir / PIPELINE_STATE
    record = read_json(path) or {
        "stage": step.spec.name,
        "kind": step.spec.kind.name,
        "fingerprint": step.fingerprint,
        "parts": step.parts,
    }
    record.update(state=state, finished=_now(), seconds=round(seconds, 1), exit_code=code)
    step.spec.output_dir.mkdir(parents=True, exist_ok=True)  # a merge replaces its whole folder
    write_json_atomic(path, record)


def _write_root_state(
    recipe: Recipe, steps: list[Step], rows: dict[str, dict[str, Any]], status: str, gflops: float | None = None
) -> None:
    state = {
        "recipe": str(recipe.path),
        "status": status,
        "finished": _now(),
        "matmul_gflops": gflops,
        "stages": [
            {
                "name": s.spec.name,
                "kind": s.spec.kind.name,
                "output_dir": str(s.spec.output_dir.resolve()),
                "fingerprint": s.fingerprint,
                "action": s.action,
                "reason": s.reason,
                **rows.get(s.spec.name, {}),
            }
            for s in steps
        ],
    }
    recipe.output_root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(recipe.output_root / PIPELINE_STATE, state)


def run_steps(recipe: Recipe, steps: list[Step], report: bool = True) -> int:
    """Run or skip each step in order; stops at the first stage that fails. Returns an exit code."""
    started = time.time()
    _say(describe_plan(recipe, steps))
    if recipe.node_rank > 0:
        return _join_steps(recipe, steps)
    gflops = _machine_rate() if any(s.action in (RUN, RESUME) for s in steps) else None
    rows: dict[str, dict[str, Any]] = {}
    code, status = 0, "complete"
    for i, step in enumerate(steps, start=1):
        spec = step.spec
        head = f"== [{i}/{len(steps)}] {spec.name} ({spec.kind.name})"
        if step.action in (CACHED, SKIP):
            _say(f"{head}: {step.action}: {step.reason}")
            rows[spec.name] = {"status": step.action}
            continue
        verb = "resuming" if step.action == RESUME else "running"
        _say(f"{head}: {verb} ({step.reason})\n   $ {step.shell()}")
        _start_stage(step)
        t0 = time.time()
        code = _launch(step.command())
        took = time.time() - t0
        run = read_json(spec.output_dir / "run.json") or {}
        stopped = code in (130, 143, -signal.SIGTERM, -signal.SIGINT)
        if run.get("status") == "complete" and (code == 0 or stopped):
            # A signal after the stage saved its result (during its final evaluation) leaves it complete.
            _finish_stage(step, "complete", took, code)
            rows[spec.name] = {"status": "complete", "seconds": round(took, 1)}
            _say(f"   {spec.name} done in {took:.0f}s -> {spec.output_dir}")
            if not stopped:
                continue
            status, code = "interrupted", 143
            _say(f"stopped after '{spec.name}' completed: run `tunestack run {recipe.path}` again to go on")
            break
        state = "interrupted" if stopped else "failed"
        _finish_stage(step, state, took, code)
        rows[spec.name] = {"status": state, "seconds": round(took, 1), "exit_code": code}
        status = state
        if code == 0:
            code = 1
            _say(f"stage '{spec.name}' exited without a complete run.json in {spec.output_dir}")
        resumable = spec.kind.resumable and latest_complete_checkpoint(spec.output_dir) is not None
        again = "run" if state == "interrupted" else "fix the problem and run"
        _say(
            f"stage '{spec.name}' {state} (exit code {code}) after {took:.0f}s. Completed stages are kept: {again} "
            f"`tunestack run {recipe.path}` again; "
            + ("this stage resumes from its last checkpoint." if resumable else "this stage starts over.")
        )
        break
    _write_root_state(recipe, steps, rows, status, gflops)
    if report:
        _write_report(recipe)
    if status == "complete":
        _say(f"pipeline complete in {time.time() - started:.0f}s; outputs under {recipe.output_root}")
        _say(stage_times(rows, gflops))
        _say(before_after(steps))
        policies = [s for s in steps if s.spec.makes_policy]
        if policies:
            _say(f"serve the last model: tunestack serve --model {policies[-1].spec.output_dir}")
    return code


def _join_steps(recipe: Recipe, steps: list[Step]) -> int:
    """On a node other than 0: start this node's processes of every multi-node stage that runs, in order. Node 0
    runs the single-node stages and writes every record (the output root is a folder all nodes share)."""
    for step in steps:
        spec = step.spec
        if step.action not in (RUN, RESUME) or spec.nnodes == 1:
            continue
        _say(f"== {spec.name} ({spec.kind.name}): joining as node {spec.node_rank} of {spec.nnodes}")
        code = _launch(step.command())
        if code != 0:
            _say(f"stage '{spec.name}' exited with code {code} on node {spec.node_rank}; see node 0 for its record")
            return code
    _say(f"node {recipe.node_rank}: every multi-node stage of {recipe.path} ran")
    return 0


def _machine_rate() -> float:
    """This machine's float32 matmul rate now (GFLOP/s): what the stage times below are relative to."""
    from tunestack.timing import matmul_gflops

    gflops = matmul_gflops("float32", 1.0)["best"]
    _say(f"this machine: float32 matmul {gflops:.0f} GFLOP/s (measured now; stage times scale with it)")
    return gflops


def stage_times(rows: dict[str, dict[str, Any]], gflops: float | None) -> str:
    """'time by stage: pt 120 s, sft 95 s ... (float32 matmul 101 GFLOP/s)' for the stages that ran."""
    ran = [f"{name} {row['seconds']:.0f} s" for name, row in rows.items() if "seconds" in row]
    if not ran:
        return ""
    rate = f" (float32 matmul {gflops:.0f} GFLOP/s)" if gflops else ""
    return f"time by stage: {', '.join(ran)}{rate}"


def _write_report(recipe: Recipe) -> None:
    from tunestack.errors import TunestackError
    from tunestack.report import write_report

    try:
        html_path, md_path = write_report(recipe.output_root)
    except TunestackError as exc:
        _say(f"no report: {exc}")
        return
    _say(f"report: {html_path} (and {md_path.name})")


def before_after(steps: list[Step], probes: int = 3, width: int = 110) -> str:
    """A few probe answers of the last eval stage, base model first: what the pipeline changed."""
    evals = [s for s in steps if s.spec.kind.name == "eval" and (s.spec.output_dir / "eval.json").is_file()]
    if not evals:
        return ""
    folder = evals[-1].spec.output_dir
    report = read_json(folder / "eval.json") or {}
    labels = [m["label"] for m in report.get("models", [])]
    answers: dict[str, dict[str, str]] = {}
    for row in read_jsonl(folder / "predictions.jsonl"):
        if row.get("set") == "probe":
            answers.setdefault(row["prompt"], {})[row["model"]] = " ".join(str(row.get("response", "")).split())
    changed = [p for p in report.get("probes", []) if len(set(answers.get(p, {}).values())) > 1]
    if not changed or len(labels) < 2:
        return ""
    width_label = max(len(label) for label in labels)
    lines = [f"before -> after ({folder / 'predictions.jsonl'}):"]
    for prompt in changed[:probes]:
        lines.append(f"  Q: {prompt}")
        for label in labels:
            text = answers[prompt].get(label, "")
            text = text if len(text) <= width else text[: width - 1] + "…"
            lines.append(f"     {label:<{width_label}}  {text}")
    return "\n".join(lines)


def refuse_under_torchrun() -> None:
    from tunestack.errors import ConfigError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "launch `tunestack run` plainly, not under torchrun: it starts every stage itself; give a stage "
            "`nproc_per_node: N` (or put it in defaults) to run that stage on N processes"
        )
