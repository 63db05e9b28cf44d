"""Reward scores from one packed row equal transformers' padded sequence-classification scores."""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

from tunestack.train.fast.packed_scores import use_packed_scores

# Chosen, chosen, rejected, rejected; right-padded with the pad id 2 (= EOS, as in many chat models).
ROWS = [[1, 5, 9, 14, 22, 7, 2], [1, 30, 31, 2], [1, 5, 9, 40, 2], [1, 30, 31, 50, 51, 52, 53, 2]]


def _batch():
    width = max(map(len, ROWS))
    ids = torch.tensor([r + [2] * (width - len(r)) for r in ROWS])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ROWS])
    return ids, mask


def _scores_and_grads(model, ids, mask):
    scores = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.squeeze(-1)
    chosen, rejected = scores.chunk(2)
    (-torch.nn.functional.logsigmoid(chosen - rejected).mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return scores.detach(), grads


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("varlen_on", [False, True], ids=["mask", "varlen"])
def test_packed_scores_equal_padded_scores(tiny_models, family, varlen_on):
    """Under per-sample attention a rejected row runs from where it leaves its chosen row: 18 tokens, not 24."""
    from tunestack.train.fast.varlen import varlen_attention

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models[family], num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = 2
    model = get_peft_model(
        model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    ids, mask = _batch()
    expected, expected_grads = _scores_and_grads(model, ids, mask)

    assert use_packed_scores(model)
    widths = []
    base = model.get_base_model()
    backbone = getattr(base, base.base_model_prefix)

    def record(module, args, kwargs):  # transformers passes input_ids positionally, the packed path by name
        widths.append(tuple((kwargs["input_ids"] if "input_ids" in kwargs else args[0]).shape))

    handle = backbone.register_forward_pre_hook(record, with_kwargs=True)
    with varlen_attention(model) if varlen_on else contextlib.nullcontext():
        scores, grads = _scores_and_grads(model, ids, mask)
    handle.remove()
    # Pairs (0, 2) and (1, 3) share their first 3 tokens.
    packed = sum(map(len, ROWS)) - (6 if varlen_on else 0)
    assert widths == [(1, packed)], "the decoder should run once on the packed real tokens"
    assert torch.allclose(scores, expected, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, expected_grads[name], atol=1e-5, rtol=1e-4), name
