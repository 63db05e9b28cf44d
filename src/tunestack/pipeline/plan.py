"""Decide what each stage of a recipe does this time: cached, resume, run or skip.

The plan is computed from files only (the recipe, data files, stage output folders), before anything runs,
so that it is the same wherever and however often it is computed.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from typing import Any

from tunestack.config.parse import mapping_to_argv
from tunestack.errors import ConfigError, TunestackError
from tunestack.pipeline.fingerprint import fingerprint, what_changed
from tunestack.pipeline.kinds import field_types, parse_options
from tunestack.pipeline.recipe import Recipe, StageSpec, _hint, substitute
from tunestack.rundir import LOCK_FILE, PIPELINE_STATE, read_json, require_tunestack_folder

CACHED, RESUME, RUN, SKIP = "cached", "resume", "run", "skip"


@dataclass
class Step:
    spec: StageSpec
    fingerprint: str
    parts: dict[str, Any]
    options: dict[str, Any]  # with ${stage} references replaced by output folders
    action: str = RUN
    reason: str = ""

    @property
    def argv(self) -> list[str]:
        """The stage command's flags (without the runner's --overwrite_output_dir / --resume_from_checkpoint)."""
        return mapping_to_argv(self.options, field_types(self.spec.kind)) + ["--output_dir", str(self.spec.output_dir)]

    def run_argv(self) -> list[str]:
        if self.action == RESUME:
            return [*self.argv, "--resume_from_checkpoint", "true"]
        return [*self.argv, "--overwrite_output_dir", "true"]

    def command(self) -> list[str]:
        """The process to start: `python -m tunestack CMD ...`, through torch.distributed.run for several processes."""
        spec = self.spec
        head = [sys.executable, "-m", "tunestack", spec.kind.command]
        if spec.processes > 1 and spec.kind.resumable:
            launcher = [sys.executable, "-m", "torch.distributed.run"]
            if spec.nnodes > 1:
                launcher += ["--nnodes", str(spec.nnodes), "--node_rank", str(spec.node_rank)]
                launcher += ["--master_addr", str(spec.master_addr), "--master_port", str(spec.master_port)]
            launcher += ["--nproc_per_node", str(spec.nproc_per_node)]
            head = [*launcher, "-m", "tunestack", spec.kind.command]
        return [*head, *self.run_argv()]

    def shell(self) -> str:
        return shlex.join(["tunestack", self.spec.kind.command, *self.argv])


def check_options(step: Step) -> list[str]:
    """What the stage command itself would reject in these options (types, choices, its own checks)."""
    from tunestack.cli import COMMANDS

    if step.spec.kind.command not in COMMANDS:
        return [f"stage '{step.spec.name}': this tunestack has no `{step.spec.kind.command}` command"]
    try:
        parse_options(step.spec.kind, step.argv)
    except ConfigError as exc:
        return [f"stage '{step.spec.name}': {p}" for p in exc.problems]
    except TunestackError as exc:
        return [f"stage '{step.spec.name}': {exc}"]
    return []


def folder_problems(spec: StageSpec) -> list[str]:
    """Why the stage may not write its output folder: it is someone else's, or another process writes it."""
    from tunestack.locks import holder

    try:
        require_tunestack_folder(spec.output_dir, flag="output_dir")
    except ConfigError as exc:
        return [f"stage '{spec.name}': {exc}"]
    who = holder(spec.output_dir / LOCK_FILE)
    return [f"stage '{spec.name}': {spec.output_dir} is in use by {who}"] if who else []


def _decide(step: Step, upstream: dict[str, Step]) -> tuple[str, str]:
    spec = step.spec
    for ref in spec.refs:
        if upstream[ref].action in (RUN, RESUME):
            return RUN, f"its input '{ref}' is re-made"
    out = spec.output_dir
    if not out.is_dir() or not any(out.iterdir()):
        return RUN, "no output yet"
    state = read_json(out / PIPELINE_STATE)
    run = read_json(out / "run.json") or {}
    status = run.get("status")
    if state is None or state.get("fingerprint") != step.fingerprint:
        return RUN, what_changed((state or {}).get("parts"), step.parts)
    if status == "complete":
        return CACHED, f"complete, fingerprint {step.fingerprint}"
    if status in ("running", "interrupted", "failed") and spec.kind.resumable:
        from tunestack.checkpoints import latest_complete_checkpoint

        checkpoint = latest_complete_checkpoint(out)
        if checkpoint is not None:
            return RESUME, f"{status} run, resumes from {checkpoint.name}"
        return RUN, f"{status} run without a complete checkpoint"
    return RUN, f"the last run did not complete (status: {status or 'none'})"


def make_plan(recipe: Recipe, from_stage: str | None = None, only: str | None = None) -> list[Step]:
    """Fingerprints and decisions of every stage; ConfigError lists every problem found."""
    names = [s.name for s in recipe.stages]
    for flag, name in (("--from", from_stage), ("--only", only)):
        if name is not None and name not in names:
            raise ConfigError(f"{flag} {name}: no stage of that name{_hint(name, names)}; stages: {', '.join(names)}")
    outputs = {s.name: str(s.output_dir) for s in recipe.stages}
    steps: dict[str, Step] = {}
    problems: list[str] = []
    complete: dict[str, bool] = {}
    first_forced = recipe.index(from_stage) if from_stage else None
    for i, spec in enumerate(recipe.stages):
        try:
            fp, parts = fingerprint(spec, {r: steps[r].fingerprint for r in spec.refs})
        except ConfigError as exc:
            problems += [f"stage '{spec.name}': {p}" for p in exc.problems]
            fp, parts = "", {}
        step = Step(spec, fp, parts, substitute(spec.options, outputs))
        problems += check_options(step)
        if only is not None and spec.name != only:
            action, reason = _decide(step, steps)
            complete[spec.name] = action == CACHED
            step.action = SKIP
            step.reason = f"--only {only}" + ("" if action == CACHED else f"; its output is not complete ({reason})")
        elif only is not None:
            step.action, step.reason = RUN, f"--only {only}"
            for ref in spec.refs:
                if not complete[ref]:
                    problems.append(
                        f"--only {only}: it reads the output of '{ref}', which is not complete; run the pipeline "
                        f"up to it first (tunestack run {recipe.path} --from {ref})"
                    )
        elif first_forced is not None and i >= first_forced:
            step.action, step.reason = RUN, f"--from {from_stage}"
        else:
            step.action, step.reason = _decide(step, steps)
        if step.action in (RUN, RESUME) and recipe.node_rank == 0:  # node 0 writes; the others only join
            problems += folder_problems(spec)
        steps[spec.name] = step
    if problems:
        raise ConfigError(problems)
    return list(steps.values())


def describe_plan(recipe: Recipe, steps: list[Step], commands: bool = False) -> str:
    width = max(len(s.spec.name) for s in steps)
    lines = [f"plan of {recipe.path}: {len(steps)} stages, outputs under {recipe.output_root}"]
    for i, step in enumerate(steps, start=1):
        spec = step.spec
        model = spec.options.get(spec.kind.model_key, "(default model)")
        extra = f", {spec.nproc_per_node} processes" if spec.nproc_per_node > 1 else ""
        if spec.nnodes > 1:
            extra = f", {spec.nnodes} nodes x {spec.nproc_per_node} processes (this is node {spec.node_rank})"
        lines.append(
            f"  {i}. {spec.name:<{width}}  {spec.kind.name:<5} {model} -> {spec.output_dir}{extra}\n"
            f"     {step.action.upper()}: {step.reason}"
        )
        if commands and step.action in (RUN, RESUME):
            lines.append(f"     $ {step.shell()}")
    return "\n".join(lines)
