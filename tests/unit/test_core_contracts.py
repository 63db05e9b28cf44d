"""The contracts the stages stand on: option parsing, model references, and where a run starts in its folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunestack.checkpoints import MARKER
from tunestack.config.model import ModelArguments
from tunestack.config.parse import parse_into
from tunestack.config.pretrain import PretrainDataArguments
from tunestack.config.train import TrainArguments
from tunestack.config.tuning import TuningArguments
from tunestack.errors import ConfigError, ModelError
from tunestack.model.ref import resolve_model, resolve_stack, root_base, training_system_prompt
from tunestack.rundir import REDACTED, OutputFolder, redact

CLASSES = (ModelArguments, PretrainDataArguments, TuningArguments, TrainArguments)


# ---------------------------------------------------------------------------------------------------- parsing


def test_a_recipe_file_gives_the_keys_and_flags_after_it_win(tmp_path: Path) -> None:
    recipe = tmp_path / "pt.yaml"
    recipe.write_text("train_file_dir: data\nlora_rank: 4\nlearning_rate: 1.0e-3\noutput_dir: out\n")
    model, data, tuning, train = parse_into(CLASSES, [str(recipe), "--lora_rank", "16"], prog="t")
    assert (data.train_file_dir, tuning.lora_rank, train.learning_rate, train.output_dir) == ("data", 16, 1e-3, "out")


def test_tutorial_aliases_and_legacy_flags(tmp_path: Path) -> None:
    argv = ["--train_file_dir", "d", "--output_dir", "o", "--dtype", "float32", "--evaluation_strategy", "steps"]
    model, _, _, train = parse_into(CLASSES, [*argv, "--warmup_ratio", "0.1"], prog="t")
    assert model.torch_dtype == "float32" and train.eval_strategy == "steps" and train.warmup_steps == 0.1


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        parse_into(CLASSES, ["--lora_rnak", "8", "--load_in_4bit", "true", "--load_in_8bit", "true"], prog="t")
    assert err.value.problems == [
        "unknown option --lora_rnak (did you mean --lora_rank?)",
        "--load_in_4bit and --load_in_8bit exclude each other",
        "--train_file_dir is required",
    ]


def test_a_recipe_with_an_unknown_key_names_it(tmp_path: Path) -> None:
    recipe = tmp_path / "pt.yaml"
    recipe.write_text("train_file_dir: data\nblock_sise: 128\n")
    with pytest.raises(ConfigError, match=r"unknown option --block_sise \(did you mean --block_size\?\)"):
        parse_into(CLASSES, [str(recipe)], prog="t")


def test_secrets_are_redacted_by_field_name_at_any_depth() -> None:
    options = {"train": {"hub_token": "hf_abc", "max_tokens_per_batch": 512, "push_to_hub": False},
               "model": {"hf_hub_token": "hf_xyz", "api_key": None}, "serve": [{"api_key": "k"}]}  # fmt: skip
    assert redact(options) == {
        "train": {"hub_token": REDACTED, "max_tokens_per_batch": 512, "push_to_hub": False},
        "model": {"hf_hub_token": REDACTED, "api_key": None},
        "serve": [{"api_key": REDACTED}],
    }


# ---------------------------------------------------------------------------------------------------- references


def _stage_folder(folder: Path, base: str, status: str = "complete", system: str | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "peft_type": "LORA"}))
    run = {"stage": "sft", "status": status, "base_model": base, "options": {"data": {"system_prompt": system}}}
    (folder / "run.json").write_text(json.dumps(run))
    return folder


def test_references_resolve_to_a_base_and_an_adapter_stack(tiny_model: Path, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_model)).base_dir == tiny_model
    pt = _stage_folder(tmp_path / "pt", str(tiny_model))
    sft = _stage_folder(tmp_path / "sft", str(pt), system="Be brief.")
    ref = resolve_model(str(sft))
    assert (ref.base_dir, ref.adapters, ref.head_dir) == (tiny_model, [pt, sft], sft)
    assert training_system_prompt(ref) == "Be brief."
    assert root_base(str(sft)) == str(tiny_model)
    # MedicalGPT's --base_model B --lora_model A: A stacked on B whatever A's run.json says
    assert resolve_stack(str(tiny_model), str(pt)).adapters == [pt]


def test_reference_problems_are_model_errors(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model path does not exist: ./nowhere"):
        resolve_model("./nowhere")
    with pytest.raises(ModelError, match="not a built-in alias"):
        resolve_model("some-org-model")
    a = tmp_path / "a"
    _stage_folder(a, str(tmp_path / "b"))
    _stage_folder(tmp_path / "b", str(a))
    with pytest.raises(ModelError, match="model reference cycle"):
        resolve_model(str(a))
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="a model file must be .gguf"):
        resolve_model(str(tmp_path / "x.bin"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"broken/adapter_config.json: cannot read"):
        resolve_model(str(broken))
    (broken / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="adapter without a base model"):
        resolve_model(str(broken))


# ---------------------------------------------------------------------------------------------------- run folder


def _checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / MARKER).write_text("{}")
    return path


def test_plan_starts_fresh_resumes_or_refuses(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert OutputFolder(out, "sft").plan(None, overwrite=False) is None  # nothing there
    _checkpoint(out, 2)
    latest = _checkpoint(out, 4)
    _checkpoint(out, 6, complete=False)  # killed while writing: never resumed from
    with pytest.raises(ConfigError, match="already holds checkpoints of a run; pass --resume_from_checkpoint true"):
        OutputFolder(out, "sft").plan(None, overwrite=False)
    assert OutputFolder(out, "sft").plan("true", overwrite=False) == latest
    assert OutputFolder(out, "sft").plan(str(out / "checkpoint-2"), overwrite=False) == out / "checkpoint-2"
    with pytest.raises(ConfigError, match="is not a folder"):
        OutputFolder(out, "sft").plan(str(out / "checkpoint-9"), overwrite=False)
    assert OutputFolder(out, "sft").plan(None, overwrite=True) is None
    assert not list(out.glob("checkpoint-*"))
    with pytest.raises(ConfigError, match="no complete checkpoint-N folder"):
        OutputFolder(out, "sft").plan("true", overwrite=False)
    assert OutputFolder(out, "sft").plan("auto", overwrite=False) is None  # auto: resume if possible


def test_plan_refuses_a_folder_holding_another_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"stage": "dpo", "status": "complete"}))
    with pytest.raises(ConfigError, match=r"already holds a dpo run \(complete\); pass --overwrite_output_dir"):
        OutputFolder(out, "sft").plan(None, overwrite=False)


def test_running_records_failure_and_abandons_on_user_errors(tmp_path: Path) -> None:
    from tunestack.errors import DataError

    out = tmp_path / "fresh"
    with pytest.raises(DataError):
        with OutputFolder(out, "sft").running({"options": {}}):
            raise DataError("bad line")
    assert not out.exists()  # a folder this run created, nothing in it worth keeping
    kept = tmp_path / "kept"
    with pytest.raises(RuntimeError):
        with OutputFolder(kept, "sft").running({"options": {}}):
            raise RuntimeError("a bug")
    run = json.loads((kept / "run.json").read_text())
    assert run["status"] == "failed" and run["error"] == "RuntimeError: a bug"
