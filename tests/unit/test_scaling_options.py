"""The options of scaling out: DeepSpeed by name, FSDP's tutorial words, the multi-node keys of a recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunestack.config.deepspeed import ALIASES, NAMES, fill_auto, resolve_deepspeed, zero_stage
from tunestack.config.fsdp import fsdp_settings
from tunestack.errors import ConfigError

STAGES = {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3, "zero2_offload": 2, "zero3_offload": 3}


@pytest.mark.parametrize("name", NAMES)
def test_every_name_is_a_shipped_config_the_trainer_fills(name: str) -> None:
    path = Path(resolve_deepspeed(name))
    assert path.name == f"{name}.json" and path.parent.name == "deepspeed_configs"
    config = json.loads(path.read_text())
    assert zero_stage(str(path)) == STAGES[name]
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"
    zero = config["zero_optimization"]
    assert ("offload_optimizer" in zero) == name.endswith("_offload")
    assert ("offload_param" in zero) == (name == "zero3_offload")
    if name == "zero3":
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_other_toolkits_names_mean_the_same_configs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Path(resolve_deepspeed("deepspeed_zero2")).name == "zero2.json"  # xtuner
    assert Path(resolve_deepspeed("DeepSpeed_Zero3_Offload")).name == "zero3_offload.json"
    assert Path(resolve_deepspeed("examples/deepspeed/ds_z3_config.json")).name == "zero3.json"  # LLaMA-Factory
    assert Path(resolve_deepspeed("./zero2.json")).name == "zero2.json"  # MedicalGPT, no such file here
    assert set(ALIASES.values()) <= set(NAMES)
    own = tmp_path / "zero2.json"  # a file of that name wins over the shipped config
    own.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert resolve_deepspeed("zero2.json") == "zero2.json" and zero_stage("zero2.json") == 1
    assert resolve_deepspeed('{"zero_optimization": {"stage": 3}}') == {"zero_optimization": {"stage": 3}}


def test_bad_deepspeed_values_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as bad_name:
        resolve_deepspeed("zero5")
    assert str(bad_name.value) == (
        "--deepspeed zero5: no such file, and not a config name; names: zero0, zero1, zero2, zero3, zero2_offload, "
        "zero3_offload (also deepspeed_zero1 ... deepspeed_zero3_offload), or give a DeepSpeed JSON file"
    )
    broken = tmp_path / "ds.json"
    broken.write_text('{"zero_optimization": {"stage": 2},\n}')
    with pytest.raises(ConfigError) as bad_json:
        resolve_deepspeed(str(broken))
    assert (
        str(bad_json.value)
        == f"--deepspeed {broken}: not valid JSON (line 2: Expecting property name enclosed in double quotes)"
    )


def test_deepspeed_that_cannot_start_exits_2_in_one_line(cli, tiny_model, tmp_path, monkeypatch) -> None:
    """Without the package: one line naming the fix, instead of transformers' PackageNotFoundError traceback."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    out = tmp_path / "out"
    code, _, err = cli(
        "sft", "--model_name_or_path", tiny_model, "--train_file_dir", tmp_path, "--output_dir", out,
        "--deepspeed", "zero2", "--fsdp", "full_shard",
    )  # fmt: skip
    assert code == 2
    assert err.strip() == (
        "tunestack sft: error: --deepspeed and --fsdp both shard the model: choose one; --deepspeed zero2: DeepSpeed "
        "is not installed: pip install 'tunestack[deepspeed]' (or pip install deepspeed)"
    )
    assert not out.exists()


def test_help_lists_the_deepspeed_names(cli) -> None:
    code, out, _ = cli("dpo", "--help")
    assert code == 0
    text = " ".join(out.split())
    assert "zero0, zero1, zero2, zero3, zero2_offload, zero3_offload; also deepspeed_zero1" in text


def test_fsdp_words_of_tutorials_become_fsdp_config(tmp_path: Path) -> None:
    assert fsdp_settings("full_shard auto_wrap", None) == (True, {"reshard_after_forward": True})
    assert fsdp_settings("shard_grad_op offload", None) == (True, {"reshard_after_forward": False, "cpu_offload": True})
    config = tmp_path / "fsdp.json"
    config.write_text(json.dumps({"fsdp_version": 1, "fsdp_state_dict_type": "SHARDED_STATE_DICT"}))
    assert fsdp_settings("hybrid_shard", str(config)) == (
        True,
        {"version": 1, "state_dict_type": "SHARDED_STATE_DICT", "reshard_after_forward": "hybrid_shard"},
    )
    assert fsdp_settings(None, None) == (None, None)
    with pytest.raises(ConfigError, match=r"--fsdp hybrid_shard exists only in FSDP1"):
        fsdp_settings("hybrid_shard", None)
    with pytest.raises(ConfigError, match=r"--fsdp full_shrad: unknown word 'full_shrad'"):
        fsdp_settings("full_shrad", None)


def test_auto_values_filled_for_the_ppo_loop() -> None:
    config = json.loads(Path(resolve_deepspeed("zero3_offload")).read_text())
    filled = fill_auto(
        config, micro_batch=2, accumulation=1, world_size=4, max_grad_norm=0.5, bf16=True, fp16=False,
        learning_rate=1e-5, weight_decay=0.01, hidden_size=64,
    )  # fmt: skip
    assert (filled["train_micro_batch_size_per_gpu"], filled["train_batch_size"], filled["gradient_clipping"]) == (
        2, 8, 0.5,
    )  # fmt: skip
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert filled["optimizer"]["params"] == {"lr": 1e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
    assert filled["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert config["train_batch_size"] == "auto"  # the shipped config is not changed
    with pytest.raises(ConfigError, match=r"cannot fill these 'auto' values here: scheduler.params.warmup"):
        fill_auto(
            {**config, "scheduler": {"params": {"warmup": "auto"}}},
            micro_batch=1,
            accumulation=1,
            world_size=1,
            max_grad_norm=1,
            bf16=False,
            fp16=False,
            learning_rate=1,
            weight_decay=0,
            hidden_size=8,
        )


def _recipe(tmp_path: Path, model: Path, stage: dict) -> Path:
    data = tmp_path / "corpus"
    data.mkdir(exist_ok=True)
    (data / "a.txt").write_text("The heart pumps blood.\n" * 20)
    recipe = tmp_path / "recipe.yaml"
    body = {"output_root": str(tmp_path / "out"), "model": str(model), "stages": [{"name": "pt", "stage": "pt",
            "train_file_dir": str(data), "max_steps": 2, **stage}]}  # fmt: skip
    recipe.write_text(json.dumps(body))
    return recipe


def test_a_recipe_stage_on_two_nodes(tiny_model: Path, tmp_path: Path) -> None:
    from tunestack.pipeline.plan import make_plan
    from tunestack.pipeline.recipe import load_recipe

    launch = {"nnodes": 2, "nproc_per_node": 4, "master_addr": "10.0.0.1", "master_port": 29411, "deepspeed": "zero2"}
    recipe = _recipe(tmp_path, tiny_model, launch)
    steps = {rank: make_plan(load_recipe(recipe, node_rank=rank))[0] for rank in (0, 1)}
    assert steps[1].command()[:14] == [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "1", "--master_addr",
        "10.0.0.1", "--master_port", "29411", "--nproc_per_node", "4", "-m",
    ]  # fmt: skip
    assert steps[0].command()[6] == "0"
    assert steps[0].fingerprint == steps[1].fingerprint, "every node must plan the same stages"
    assert steps[0].parts["nnodes"] == 2 and "zero2" in steps[0].parts["data"]["deepspeed"]

    with pytest.raises(ConfigError) as missing:
        load_recipe(_recipe(tmp_path, tiny_model, {"nnodes": 2}))
    assert missing.value.problems == [
        "stage 'pt': nnodes 2 needs master_addr (the host of node 0, reachable from every node)"
    ]
    with pytest.raises(ConfigError) as rank:
        load_recipe(_recipe(tmp_path, tiny_model, {"nnodes": 2, "master_addr": "h"}), node_rank=2)
    assert rank.value.problems == ["--node_rank 2: stage 'pt' runs on 2 nodes, ranked 0 to 1"]


def test_the_save_check_refuses_zero3_placeholders_but_keeps_adalora_pruned_ranks(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from tunestack.checkpoints import SaveCheckError, verify_saved_model

    def adapter(name: str, tensors: dict[str, torch.Tensor]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        return folder

    trained = {"q.lora_A.weight": torch.ones(4, 16), "q.lora_B.weight": torch.ones(16, 4)}
    placeholders = {**trained, "k.lora_A.weight": torch.empty(0), "k.lora_B.weight": torch.empty(0)}
    with pytest.raises(SaveCheckError, match="2 of its tensors hold no values"):
        verify_saved_model(adapter("zero3", placeholders), trained=True)
    pruned = {**trained, "k.lora_A.weight": torch.empty(0, 16), "k.lora_B.weight": torch.empty(16, 0)}
    verify_saved_model(adapter("adalora", pruned), trained=True)  # a rank pruned to nothing is real


def test_a_non_main_rank_prints_warnings_and_its_own_notes_only() -> None:
    code = (
        "import logging; from tunestack.cli import _setup_logging; _setup_logging(); log = logging.getLogger('tunestack.x');"
        "log.info('plain note'); log.info('converting the model', extra={'every_rank': True}); log.warning('a warning')"
    )
    for rank, shown in (("1", ["[tunestack rank 1] converting the model", "[tunestack rank 1] a warning"]),
                        ("0", ["[tunestack] plain note", "[tunestack] converting the model", "[tunestack] a warning"])):  # fmt: skip
        env = dict(os.environ, RANK=rank)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert proc.stderr.splitlines() == shown
