"""Every tuning method trains and saves on tiny models of several families; `all` finds the right layers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tunestack.model.tuning import find_linear_names

EXPECTED_LINEAR = {
    "llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "qwen2": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "glm4": ["down_proj", "gate_up_proj", "k_proj", "o_proj", "q_proj", "v_proj"],
}


@pytest.mark.parametrize("family", sorted(EXPECTED_LINEAR))
def test_all_targets_every_linear_layer_but_the_head(tiny_models, family):
    model = AutoModelForCausalLM.from_pretrained(tiny_models[family])
    names = find_linear_names(model)
    assert names == EXPECTED_LINEAR[family]
    assert "lm_head" not in names


def _pt(cli, model, corpus, out, *extra):
    return cli(
        "pt",
        "--model_name_or_path",
        model,
        "--train_file_dir",
        corpus,
        "--output_dir",
        out,
        "--block_size",
        32,
        "--max_steps",
        6,
        "--per_device_train_batch_size",
        4,
        "--learning_rate",
        5e-3,
        "--logging_steps",
        1,
        "--save_steps",
        100,
        "--keep_linebreaks",
        "false",
        "--report_to",
        "none",
        *extra,
    )


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize(
    "family,method,args",
    [
        ("llama", "lora", ["--tuning_method", "lora"]),
        ("qwen2", "lora", ["--tuning_method", "lora"]),
        ("glm4", "lora", ["--tuning_method", "lora"]),
        ("llama", "dora", ["--tuning_method", "dora"]),
        ("llama", "adalora", ["--tuning_method", "adalora"]),
        ("llama", "qlora", ["--qlora", "true"]),
        ("llama", "qlora", ["--load_in_4bit", "true"]),  # the MedicalGPT spelling: a 4-bit base means QLoRA
        ("llama", "full", ["--use_peft", "false"]),
        ("llama", "freeze", ["--tuning_method", "freeze", "--freeze_trainable_layers", "1"]),
    ],
)
def test_method_trains_and_saves(cli, tiny_models, pt_corpus, tmp_path, family, method, args):
    out = tmp_path / "out"
    code, stdout, err = _pt(cli, tiny_models[family], pt_corpus, out, *args)
    assert code == 0, err
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["tuning_method"] == method
    assert manifest["options"]["model"]["load_in_4bit"] == (method == "qlora")
    losses = _losses(out)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    if method in ("full", "freeze"):
        saved = load_file(next(out.glob("model*.safetensors")))
        base = AutoModelForCausalLM.from_pretrained(tiny_models[family]).state_dict()
        # Compare in the saved dtype (bfloat16 on a GPU, where --torch_dtype auto picks it).
        changed = {k for k, v in saved.items() if k in base and not torch.equal(v, base[k].to(v.dtype))}
        assert changed, "no weight changed"
        if method == "freeze":
            assert all(".layers.1." in k for k in changed), changed  # only the last layer trained
    else:
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["peft_type"] == ("ADALORA" if method == "adalora" else "LORA")
        assert config.get("use_dora", False) == (method == "dora")
        weights = load_file(out / "adapter_model.safetensors")
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())


def test_pt_loss_falls(cli, tiny_model, pt_corpus, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = cli(
        "pt",
        "--model_name_or_path",
        tiny_model,
        "--train_file_dir",
        pt_corpus,
        "--output_dir",
        out,
        "--block_size",
        32,
        "--max_steps",
        40,
        "--per_device_train_batch_size",
        8,
        "--learning_rate",
        1e-2,
        "--logging_steps",
        5,
        "--do_train",
        "--do_eval",
        "--validation_split_percentage",
        10,
        "--keep_linebreaks",
        "false",
        "--use_peft",
        "false",
        "--report_to",
        "tensorboard",
    )
    assert code == 0, err
    losses = _losses(out)
    assert losses[-1] < 0.6 * losses[0], losses
    manifest = json.loads((out / "run.json").read_text())
    m = manifest["metrics"]
    assert m["eval_perplexity"] < m["before_eval_perplexity"]
    assert "eval perplexity:" in stdout and "->" in stdout
    assert (out / "loss.png").stat().st_size > 1000
    assert list((out / "runs").rglob("events.out.tfevents.*")), "no TensorBoard events"
