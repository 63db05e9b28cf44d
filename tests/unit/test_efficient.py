"""Padding-free batches and the trained-positions LM head are exact: same losses and gradients."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tunestack.data.collators import PadCollator
from tunestack.train.efficient import PackedCollator, document_position_ids, hf_model, trained_positions_loss

SAMPLES = [
    {"input_ids": [1, 5, 9, 14, 22, 7, 2], "labels": [-100, -100, -100, 14, 22, 7, 2]},
    {"input_ids": [1, 30, 31, 2], "labels": [-100, -100, 31, 2]},
    {"input_ids": [1, 40, 41, 42, 43, 44, 45, 46, 2], "labels": [-100, -100, -100, -100, 43, 44, 45, 46, 2]},
]


def _lora(model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "qwen2", "glm4"])
def test_packed_trained_positions_loss_equals_padded_full_loss(tiny_models, family):
    model = _lora(tiny_models[family])
    padded = PadCollator(pad_token_id=2)(SAMPLES)
    out = model(**padded)  # transformers' own loss: full logits, mean over trained tokens
    out.loss.backward()
    reference_loss, reference = out.loss.detach(), _grads(model)
    model.zero_grad()

    packed = PackedCollator()(SAMPLES)
    captured = {}
    base = hf_model(model)
    handle = base.get_decoder().register_forward_hook(lambda m, a, o: captured.update(h=o.last_hidden_state))
    model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], logits_to_keep=1, use_cache=False)
    handle.remove()
    total, count = trained_positions_loss(captured["h"], packed["labels"], base.get_output_embeddings(), chunk_size=3)
    loss = total / count
    loss.backward()
    assert count.item() == sum(sum(1 for y in s["labels"][1:] if y != -100) for s in SAMPLES)
    assert torch.allclose(loss, reference_loss, atol=1e-5), (loss.item(), reference_loss.item())
    for name, grad in _grads(model).items():
        assert torch.allclose(grad, reference[name], atol=1e-5, rtol=1e-4), name


def test_packed_attention_stays_inside_each_sample(tiny_model):
    """Each sample's logits in the packed row equal its logits when run alone."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    packed = PackedCollator()(SAMPLES)
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        offset = 0
        for sample in SAMPLES:
            alone = model(input_ids=torch.tensor([sample["input_ids"]])).logits[0]
            n = len(sample["input_ids"])
            assert torch.allclose(together[offset : offset + n], alone, atol=1e-5)
            offset += n


def test_document_positions_restart_after_each_eos():
    ids = torch.tensor([[5, 6, 2, 7, 8, 9, 2, 4]])
    assert document_position_ids(ids, eos_id=2).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]


def test_sft_losses_match_with_and_without_the_optimisations(cli, tiny_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Who are you?" * (1 + i % 3)},
                {"role": "assistant", "content": "I am a small helpful model." * (1 + i % 2)},
            ]
        }
        for i in range(16)
    ]
    (data / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    losses = {}
    for name, flags in {"fast": [], "plain": ["--padding_free", "false", "--sparse_lm_head", "false"]}.items():
        out = tmp_path / name
        code, _, err = cli(
            "sft",
            "--model_name_or_path",
            tiny_model,
            "--train_file_dir",
            data,
            "--output_dir",
            out,
            "--max_steps",
            4,
            "--per_device_train_batch_size",
            4,
            "--learning_rate",
            1e-2,
            "--logging_steps",
            1,
            "--lora_dropout",
            0,
            "--save_strategy",
            "no",
            "--report_to",
            "none",
            *flags,
        )
        assert code == 0, err
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses["fast"]) == 4
    assert losses["fast"] == pytest.approx(losses["plain"], rel=1e-3)
