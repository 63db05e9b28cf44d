"""`tunestack merge`: the merged folder reproduces base + adapter, and a failed merge leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from adapter_fixtures import make_adapter  # tests/fixtures

from tunestack.errors import ConfigError
from tunestack.model import adapters as adapters_module
from tunestack.model.merge import REL_TOLERANCE, MergeCheckError, main

PROMPT_IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 61, 12, 8]])


def live_model(base: Path, adapter: Path, seq_cls: bool = False) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if seq_cls:
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).eval()


def tolerance(logits: torch.Tensor) -> float:
    return REL_TOLERANCE * max(1.0, float(logits.abs().max()))


@pytest.mark.parametrize(
    ("family", "lora"),
    [
        ("glm4", {}),  # untied embeddings, all linear layers
        ("llama", {"target_modules": ["q_proj", "v_proj", "lm_head", "embed_tokens"]}),  # tied, both sides adapted
    ],
)
def test_merged_model_equals_base_plus_adapter(
    tiny_models: dict[str, Path], tmp_path: Path, family: str, lora: dict
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base = tiny_models[family]
    adapter = make_adapter(base, tmp_path / "sft", **lora)
    out = tmp_path / "merged"
    assert main(["--lora_model", str(adapter), "--output_dir", str(out)]) == 0

    live = live_model(base, adapter)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # plain transformers
    with torch.inference_mode():
        expected = live(PROMPT_IDS).logits
        got = merged(PROMPT_IDS).logits
        base_only = AutoModelForCausalLM.from_pretrained(base)(PROMPT_IDS).logits
    assert (expected - base_only).abs().max() > 0.05, "the adapter must change the model for the test to mean anything"
    assert (got - expected).abs().max() <= tolerance(expected)

    with torch.inference_mode():
        kwargs = {"max_new_tokens": 12, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
        assert torch.equal(
            live.generate(input_ids=PROMPT_IDS, **kwargs), merged.generate(input_ids=PROMPT_IDS, **kwargs)
        )

    manifest = json.loads((out / "run.json").read_text())
    assert manifest["stage"] == "merge" and manifest["status"] == "complete"
    assert manifest["base_model"] == str(base.resolve()) and manifest["adapter"] == str(adapter.resolve())
    assert 0 <= manifest["check"]["max_abs_logit_diff"] <= manifest["check"]["tolerance"]
    assert not (out / "adapter_config.json").exists() and list(out.glob("*.safetensors"))
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(base).chat_template
    if family == "llama":
        assert AutoConfig.from_pretrained(base).tie_word_embeddings
        assert not merged.config.tie_word_embeddings  # the adapted lm_head got its own weights
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_untied_merge_of_a_tied_lm_head_is_caught(tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    """Without untying, a LoRA on a tied lm_head also changes the input embedding: the check must fail."""
    adapter = make_adapter(tiny_model, tmp_path / "sft", target_modules=["q_proj", "lm_head"])
    monkeypatch.setattr(adapters_module, "untie_adapted_embeddings", lambda model: False)
    out = tmp_path / "merged"
    with pytest.raises(MergeCheckError, match="does not reproduce base"):
        main(["--lora_model", str(adapter), "--output_dir", str(out)])
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["sft"]


def test_a_stack_of_adapters_merges_into_one_model(tiny_model: Path, tmp_path: Path) -> None:
    """A DPO adapter trained on top of an SFT adapter: both are merged, in order."""
    from transformers import AutoModelForCausalLM

    sft = make_adapter(tiny_model, tmp_path / "sft", seed=1)
    dpo = make_adapter(tiny_model, tmp_path / "dpo", seed=2, target_modules=["q_proj", "v_proj"])
    manifest = json.loads((dpo / "run.json").read_text())
    (dpo / "run.json").write_text(json.dumps({**manifest, "stage": "dpo", "base_model": str(sft)}))
    out = tmp_path / "merged"
    assert main(["--lora_model", str(dpo), "--output_dir", str(out)]) == 0

    from peft import PeftModel

    expected_model = PeftModel.from_pretrained(live_model(tiny_model, sft).merge_and_unload(), dpo).eval()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected, got = expected_model(PROMPT_IDS).logits, merged(PROMPT_IDS).logits
    assert (got - expected).abs().max() <= tolerance(expected)
    assert json.loads((out / "run.json").read_text())["adapters"] == [str(sft.resolve()), str(dpo.resolve())]


def test_keeps_generation_config_tokenizer_and_remote_code(tiny_model: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    (base / "modeling_custom.py").write_text("# remote code the model needs\n")
    adapter = make_adapter(base, tmp_path / "sft")
    (adapter / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1], "pad_token_id": 2}))
    out = tmp_path / "merged"
    # MedicalGPT spelling: --base_model + --lora_model; --model is a synonym of --lora_model.
    assert main(["--base_model", str(base), "--model", str(adapter), "--output_dir", str(out)]) == 0
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 1]
    assert (out / "modeling_custom.py").read_text() == "# remote code the model needs\n"
    assert (out / "tokenizer.json").exists()


def test_replaces_only_its_own_output_and_only_when_told(tiny_model: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_model, tmp_path / "sft")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    for extra in ([], ["--overwrite_output_dir"]):  # a folder of the user's is never replaced
        with pytest.raises(ConfigError, match=r"holds files tunestack did not write \(precious.txt\)") as err:
            main(["--lora_model", str(adapter), "--output_dir", str(out), *extra])
        assert err.value.exit_code == 2
    assert (out / "precious.txt").read_text() == "keep me"

    with pytest.raises(ConfigError, match="would replace the input"):
        main(["--lora_model", str(adapter), "--output_dir", str(adapter), "--overwrite_output_dir"])

    earlier = tmp_path / "earlier"
    assert main(["--lora_model", str(adapter), "--output_dir", str(earlier)]) == 0
    with pytest.raises(ConfigError, match="is not empty; pass --overwrite_output_dir to replace it"):
        main(["--lora_model", str(adapter), "--output_dir", str(earlier)])
    assert main(["--lora_model", str(adapter), "--output_dir", str(earlier), "--overwrite_output_dir"]) == 0
    assert (earlier / "run.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "merged", "sft"]  # no lock or staging left


def test_a_merge_that_dies_mid_write_leaves_no_folder(tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    from transformers import PreTrainedModel

    adapter = make_adapter(tiny_model, tmp_path / "sft")
    original = PreTrainedModel.save_pretrained

    def dies_halfway(self: Any, save_directory: Any, *args: Any, **kwargs: Any) -> None:
        original(self, save_directory, *args, **kwargs)
        (Path(save_directory) / "model.safetensors").write_bytes(b"truncated")
        raise OSError("No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", dies_halfway)
    out = tmp_path / "merged"
    with pytest.raises(OSError, match="No space left"):
        main(["--lora_model", str(adapter), "--output_dir", str(out)])
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["sft"]  # no hidden staging folder either


def test_reward_model_adapter_merges_as_a_classifier(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    adapter = make_adapter(tiny_model, tmp_path / "rm", task_type="SEQ_CLS", modules_to_save=["score"])
    out = tmp_path / "rm-merged"
    assert main(["--lora_model", str(adapter), "--output_dir", str(out)]) == 0

    merged = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.config.num_labels == 1
    live = live_model(tiny_model, adapter, seq_cls=True)
    texts = [PROMPT_IDS, PROMPT_IDS[:, :4], torch.tensor([[30, 31, 32, 33, 34, 35]])]
    with torch.inference_mode():
        expected = torch.cat([live(ids).logits for ids in texts])
        got = torch.cat([merged(ids).logits for ids in texts])
    assert expected.shape == got.shape == (3, 1)
    assert (got - expected).abs().max() <= tolerance(expected)
    assert json.loads((out / "run.json").read_text())["task"] == "sequence_classification"


def test_bfloat16_storage_is_merged_and_checked_in_float32(tiny_model: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    adapter = make_adapter(tiny_model, tmp_path / "sft")
    out = tmp_path / "merged"
    assert main(["--lora_model", str(adapter), "--output_dir", str(out), "--torch_dtype", "bfloat16"]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    check = json.loads((out / "run.json").read_text())["check"]
    assert check["merge_diff_float32"] <= check["tolerance"] and check["save_reload_diff"] <= check["tolerance"]
    assert check["storage_rounding_diff"] > 0


def test_flag_problems_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        main(["--max_shard_size", "huge", "--output_dir", str(tmp_path / "x")])
    assert any("--lora_model is required" in p for p in err.value.problems)
    assert any("--max_shard_size" in p for p in err.value.problems)


@pytest.mark.parametrize(
    ("lora", "direct"),
    [({}, True), ({"use_rslora": True, "target_modules": ["q_proj", "down_proj"]}, True), ({"use_dora": True}, False)],
    ids=["lora", "rslora", "dora"],
)
def test_a_plain_lora_merged_directly_has_the_bits_of_peft_s_merge(
    tiny_model: Path, tmp_path: Path, lora: dict, direct: bool
) -> None:
    """merge_adapter merges a plain LoRA itself (W += (B @ A) * scale, without PEFT's wrappers) and leaves other
    kinds to PEFT; either way the weights are exactly those of PEFT's merge_and_unload."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def fresh() -> Any:
        return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)

    adapter = make_adapter(tiny_model, tmp_path / "adapter", **lora)
    expected = PeftModel.from_pretrained(fresh(), adapter).merge_and_unload().state_dict()
    model = fresh()
    assert (adapters_module._plain_lora_layers(model, adapter) is not None) == direct
    got = adapters_module.merge_adapter(model, adapter).state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    base = fresh().state_dict()
    assert sum(not torch.equal(base[k], expected[k]) for k in expected) >= 2  # the adapter changed weights
