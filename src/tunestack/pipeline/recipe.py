"""Read and check a pipeline recipe: every problem (unknown kind or key, bad reference, cycle) at once.

    output_root: out/demo          # each stage writes OUTPUT_ROOT/<name> unless it sets output_dir
    model: smollm2-135m-instruct   # where the first stage starts (default: the embedded SmolLM2)
    defaults:                      # stage keys given to every stage whose command takes them
      torch_dtype: float32
      lora_rank: 16
    stages:
      - {name: pt, stage: pt, train_file_dir: data/pretrain, max_steps: 30}
      - {name: sft, stage: sft, train_file_dir: data/sft}               # starts from pt's output
      - {name: rm, stage: rm, train_file_dir: data/reward}              # starts from sft's output
      - {name: ppo, stage: ppo, model_name_or_path: ${sft}, train_file_dir: data/prompts}  # reward_model: ${rm}
      - {name: eval, stage: eval, model_name_or_path: "${sft},${ppo}", probe_prompts: probes.jsonl}

A stage's model defaults to the output of the nearest earlier stage that makes a chat model (pt, sft, rl, dpo,
kto, merge; not rm or eval); an rl stage without reward_model/reward_funcs gets the nearest earlier rm.
`${name}` anywhere in a value stands for that stage's output folder; it must name an earlier stage.
Relative paths are relative to the current directory, as for every tunestack command.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunestack.config.parse import FLAG_ALIASES, load_recipe_file
from tunestack.errors import ConfigError
from tunestack.pipeline.kinds import KINDS, LAUNCH_KEYS, PIPELINE_KEYS, Kind, accepts, all_option_names, field_types

TOP_LEVEL_KEYS = ("output_root", "model", "defaults", "stages", "name", "description")
REFERENCE = re.compile(r"\$\{([^}]*)\}")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class StageSpec:
    name: str
    kind: Kind
    options: dict[str, Any]  # the command's options; `${stage}` references are kept as written
    output_dir: Path
    nproc_per_node: int = 1
    refs: list[str] = field(default_factory=list)  # stages whose outputs this one reads, in order
    allow_outside_root: bool = False  # its output_dir may be absolute or leave the output root
    nnodes: int = 1  # several machines: torchrun --nnodes N --node_rank R --master_addr A --master_port P
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500

    @property
    def processes(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def makes_policy(self) -> bool:
        return self.kind.makes_policy


@dataclass
class Recipe:
    path: Path
    output_root: Path
    stages: list[StageSpec]
    node_rank: int = 0  # this machine's rank (tunestack run --node_rank): above 0 it only joins multi-node stages

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)

    def index(self, name: str) -> int:
        return next(i for i, s in enumerate(self.stages) if s.name == name)


def _hint(word: str, choices: list[str] | set[str], fmt: str = "'{}'") -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean {fmt.format(close[0])}?)" if close else ""


def references(value: Any) -> list[str]:
    """Stage names referenced as ${name} in a value (strings, lists and mappings are searched)."""
    if isinstance(value, str):
        return REFERENCE.findall(value)
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in references(v)]
    if isinstance(value, dict):
        return [r for v in value.values() for r in references(v)]
    return []


def substitute(value: Any, outputs: dict[str, str]) -> Any:
    """`value` with every ${name} replaced by outputs[name]."""
    if isinstance(value, str):
        return REFERENCE.sub(lambda m: outputs[m.group(1)], value)
    if isinstance(value, list):
        return [substitute(v, outputs) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, outputs) for k, v in value.items()}
    return value


def _canonical(kind: Kind, key: str) -> str:
    if not accepts(kind, key) and key in FLAG_ALIASES and accepts(kind, FLAG_ALIASES[key]):
        return FLAG_ALIASES[key]
    return key


def _count(key: str, value: Any, where: str, problems: list[str], low: int = 1, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        kind = "a positive integer" if low == 1 and high is None else f"an integer from {low} to {high}"
        problems.append(f"{where}: {key} must be {kind}, got {value!r}")
        return low
    return value


def _launch(raw: dict[str, Any], defaults: dict[str, Any], where: str, problems: list[str]) -> dict[str, Any]:
    """nproc_per_node, nnodes, node_rank, master_addr, master_port of a stage (its own, else the defaults)."""
    given = {k: raw.get(k, defaults.get(k)) for k in LAUNCH_KEYS}
    nnodes = _count("nnodes", given["nnodes"] if given["nnodes"] is not None else 1, where, problems)
    out = {
        "nproc_per_node": _count("nproc_per_node", given["nproc_per_node"] or 1, where, problems),
        "nnodes": nnodes,
        "node_rank": _count("node_rank", given["node_rank"] or 0, where, problems, 0, nnodes - 1),
        "master_port": _count("master_port", given["master_port"] or 29500, where, problems, 1, 65535),
        "master_addr": None if given["master_addr"] is None else str(given["master_addr"]),
    }
    if nnodes > 1 and not out["master_addr"]:
        problems.append(f"{where}: nnodes {nnodes} needs master_addr (the host of node 0, reachable from every node)")
    return out


def _read_stage(i: int, raw: Any, defaults: dict[str, Any], problems: list[str]) -> StageSpec | None:
    if not isinstance(raw, dict):
        problems.append(f"stages[{i}]: expected a mapping with at least 'stage: <kind>', got {type(raw).__name__}")
        return None
    kind_name = raw.get("stage")
    name = str(raw.get("name") or kind_name or f"stage{i + 1}")
    where = f"stage '{name}'"
    if not NAME.match(name):
        problems.append(f"{where}: a name may hold letters, digits, '_', '-' and '.' only")
    if kind_name not in KINDS:
        known = ", ".join(KINDS)
        got = f"unknown stage kind '{kind_name}'{_hint(str(kind_name), list(KINDS))}" if kind_name else "no 'stage:'"
        problems.append(f"{where}: {got}; kinds: {known}")
        return None
    kind = KINDS[kind_name]
    options: dict[str, Any] = {}
    for key, value in raw.items():
        if key in PIPELINE_KEYS:
            continue
        canonical = _canonical(kind, key)
        if not accepts(kind, canonical):
            hint = _hint(key, set(field_types(kind)) | set(PIPELINE_KEYS))
            problems.append(f"{where}: unknown key '{key}' for a {kind.name} stage{hint}")
            continue
        options[canonical] = value
    for key, value in kind.fixed:
        if key in options and options[key] != value:
            problems.append(f"{where}: a {kind.name} stage has {key} {value}; use 'stage: {kind.command}' for another")
        options[key] = value
    for key, value in defaults.items():
        canonical = _canonical(kind, key)
        if canonical not in options and accepts(kind, canonical) and key not in PIPELINE_KEYS:
            options[canonical] = value
    launch = _launch(raw, defaults, where, problems)
    outside = raw.get("allow_outside_root", False)
    if not isinstance(outside, bool):
        problems.append(f"{where}: allow_outside_root must be true or false, got {outside!r}")
    return StageSpec(name, kind, options, Path(), allow_outside_root=outside is True, **launch)


def _check_references(stages: list[StageSpec], problems: list[str]) -> None:
    names = [s.name for s in stages]
    position = {n: i for i, n in enumerate(names)}
    graph: dict[str, list[str]] = {}
    for stage in stages:
        refs = [r for key in stage.options for r in references(stage.options[key])]
        for ref in dict.fromkeys(refs):
            if ref not in position:
                problems.append(
                    f"stage '{stage.name}': ${{{ref}}} names no stage{_hint(ref, names, '${{{}}}')}; "
                    f"stages: {', '.join(names)}"
                )
        graph[stage.name] = [r for r in dict.fromkeys(refs) if r in position]
    cyclic: set[str] = set()
    for cycle in _cycles(graph, names):
        cyclic |= set(cycle)
        if len(cycle) == 2:
            problems.append(f"stage '{cycle[0]}' refers to itself (${{{cycle[0]}}}): a reference cycle")
        else:
            problems.append(f"stage '{cycle[0]}': reference cycle {' -> '.join(cycle)}")
    for stage in stages:
        for ref in graph[stage.name]:
            if stage.name in cyclic and ref in cyclic:
                continue
            if position[ref] > position[stage.name]:
                problems.append(
                    f"stage '{stage.name}' refers to ${{{ref}}}, which comes later; stages run in the listed "
                    f"order, so move '{ref}' before '{stage.name}'"
                )
        stage.refs = graph[stage.name]


def _cycles(graph: dict[str, list[str]], order: list[str]) -> list[list[str]]:
    """Each reference cycle once, as [a, b, ..., a], found by depth-first search in recipe order."""
    found: list[list[str]] = []
    seen_cycles: set[frozenset[str]] = set()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycle = path[path.index(node) :] + [node]
            key = frozenset(cycle)
            if key not in seen_cycles:
                seen_cycles.add(key)
                found.append(cycle)
            return
        if node in done:
            return
        for nxt in graph.get(node, []):
            visit(nxt, [*path, node])
        done.add(node)

    for node in order:
        visit(node, [])
    return found


def _wire_models(stages: list[StageSpec], start_model: Any, problems: list[str]) -> None:
    """Default inputs: the nearest earlier chat-model stage (or the recipe's model), the nearest earlier rm."""
    policy: str | None = None
    reward: str | None = None
    for stage in stages:
        key = stage.kind.model_key
        if key not in stage.options:
            if policy is not None:
                stage.options = {key: f"${{{policy}}}", **stage.options}
                stage.refs = [policy, *[r for r in stage.refs if r != policy]]
            elif start_model is not None and stage.kind.name != "merge":
                stage.options = {key: start_model, **stage.options}
            elif stage.kind.name == "merge":
                problems.append(f"stage '{stage.name}': nothing to merge before it; set lora_model")
        if (
            stage.kind.command == "rl"
            and not stage.options.get("reward_model")
            and not stage.options.get("reward_funcs")
        ):
            if reward is None:
                problems.append(f"stage '{stage.name}': no reward: set reward_model (e.g. ${{rm}}) or reward_funcs")
            else:
                stage.options["reward_model"] = f"${{{reward}}}"
                stage.refs = [*stage.refs, reward]
        if stage.kind.name == "rm":
            reward = stage.name
        elif stage.kind.name == "merge":
            source = references(stage.options.get("lora_model"))
            if source and source[0] == reward:
                reward = stage.name  # a merged reward model is still a reward model
            else:
                policy = stage.name
        elif stage.makes_policy:
            policy = stage.name


def _output_dir(stage: StageSpec, root: Path, problems: list[str]) -> Path:
    """OUTPUT_ROOT/<name>, or the stage's own output_dir under the output root (anywhere with allow_outside_root)."""
    given = stage.options.pop("output_dir", None)
    if given is None:
        return root / stage.name
    path = Path(str(given)).expanduser()
    if stage.allow_outside_root:
        return path if path.is_absolute() else root / path
    if path.is_absolute() or ".." in path.parts:
        problems.append(
            f"stage '{stage.name}': output_dir {given} leaves the output root {root}: give a path inside it, or set "
            "allow_outside_root: true on the stage (tunestack replaces what is in a stage's output folder)"
        )
    return root / path


def load_recipe(path: str | Path, output_root: str | None = None, node_rank: int | None = None) -> Recipe:
    """Parse and check a recipe; raises ConfigError listing every problem. `node_rank` (tunestack run --node_rank)
    is this machine's rank in every stage that runs on several nodes."""
    path = Path(path)
    data = load_recipe_file(path)
    problems: list[str] = []

    for key in data:
        if key not in TOP_LEVEL_KEYS:
            problems.append(f"{path}: unknown top-level key '{key}'{_hint(key, list(TOP_LEVEL_KEYS))}")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.append(f"{path}: 'defaults' must be a mapping of stage keys")
        defaults = {}
    known = all_option_names() | set(FLAG_ALIASES) | set(LAUNCH_KEYS)
    for key in defaults:
        if key not in known or key in ("name", "stage"):
            problems.append(f"defaults: unknown key '{key}'{_hint(key, known)}")
    defaults = {k: v for k, v in defaults.items() if k in known}
    start_model = data.get("model", defaults.pop("model_name_or_path", None))
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError([*problems, f"{path}: 'stages' must be a non-empty list of stages"])
    stages = [s for i, raw in enumerate(raw_stages) if (s := _read_stage(i, raw, defaults, problems)) is not None]
    seen: set[str] = set()
    for stage in stages:
        if stage.name in seen:
            problems.append(f"stage '{stage.name}': two stages have this name; give one of them another 'name:'")
        seen.add(stage.name)
    for stage in stages:
        if node_rank is not None and stage.nnodes > 1:
            if not 0 <= node_rank < stage.nnodes:
                problems.append(
                    f"--node_rank {node_rank}: stage '{stage.name}' runs on {stage.nnodes} nodes, ranked 0 to "
                    f"{stage.nnodes - 1}"
                )
            stage.node_rank = node_rank
    if len(stages) == len(raw_stages) and len(seen) == len(stages):
        _check_references(stages, problems)
    if not problems:
        _wire_models(stages, start_model, problems)
    if problems:
        raise ConfigError(problems)
    root = Path(output_root or data.get("output_root") or Path("out") / path.stem)
    writers: dict[Path, str] = {}
    for stage in stages:
        stage.output_dir = _output_dir(stage, root, problems)
        other = writers.setdefault(stage.output_dir.resolve(), stage.name)
        if other != stage.name:
            problems.append(f"stage '{stage.name}': writes to the output_dir of stage '{other}' ({stage.output_dir})")
    if problems:
        raise ConfigError(problems)
    return Recipe(path, root, stages, node_rank or 0)
