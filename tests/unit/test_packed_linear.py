"""Sampling on oneDNN-prepacked linear layers (model/packed_linear.py): the logits and samples of the plain
model, its LoRA merged into the packed copies, the model's own weights and layers untouched, copies that follow
the weights as they train."""

from __future__ import annotations

import gc

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from tunestack.model import packed_linear
from tunestack.model.packed_linear import PackedLinears, packed_linears

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="the packed kernel is oneDNN's (a CPU build with mkldnn)"
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(folder, target_modules=TARGETS, **config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, **config))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    return model.eval()


def _swapped(model):
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "glm4"])  # qwen2: biases on q/k/v; glm4: fused gate_up
def test_logits_and_samples_are_the_plain_models(tiny_models, family):
    model = _lora(tiny_models[family], target_modules="all-linear")
    ids = torch.randint(3, 300, (3, 12))
    plain = _logits(model, ids)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with packed_linears(model):
        swapped = _swapped(model)
        packed = _logits(model, ids)
        torch.manual_seed(7)
        sampled = model.generate(input_ids=ids, do_sample=True, max_new_tokens=8, top_k=0, pad_token_id=0)
    # Every decoder layer's adapted layers run merged, and the output layer packed.
    layers = model.config.num_hidden_layers
    assert sum(name.endswith("lm_head") for name in swapped) == 1
    assert sum(".self_attn." in name for name in swapped) == 4 * layers
    assert not any("lora_" in name or name.endswith("base_layer") for name in swapped)
    assert torch.allclose(packed, plain, atol=1e-5, rtol=1e-5)
    torch.manual_seed(7)
    expected = model.generate(input_ids=ids, do_sample=True, max_new_tokens=8, top_k=0, pad_token_id=0)
    assert torch.equal(sampled, expected)
    # After the block: the model's own forwards and weights, bit for bit.
    assert _swapped(model) == []
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert torch.equal(_logits(model, ids), plain)


def test_kept_copies_follow_the_weights_as_they_train(tiny_model):
    model = _lora(tiny_model)
    ids = torch.randint(3, 300, (2, 10))
    packed = PackedLinears(model, keep=True)
    with packed():
        before = _logits(model, ids)
    held = dict(packed._copies)
    with packed():  # nothing changed: the same copies, not packed again
        assert _logits(model, ids).equal(before)
    assert all(packed._copies[k][1] is held[k][1] for k in held)
    with torch.no_grad():  # an optimizer step on the adapter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    with packed():
        after = _logits(model, ids)
    assert not torch.allclose(after, before, atol=1e-3)
    assert torch.allclose(after, _logits(model, ids), atol=1e-5, rtol=1e-5)
    # Only the layers whose weights changed were packed again: the output layer's copy is the same.
    head = id(model.get_base_model().lm_head)
    assert packed._copies[head][1] is held[head][1]
    repacked = {k for k in held if packed._copies[k][1] is not held[k][1]}
    assert len(repacked) == len(TARGETS) * model.config.num_hidden_layers


def test_one_block_copies_are_dropped_after_it(tiny_model):
    model = _lora(tiny_model)
    block = PackedLinears(model, keep=False)
    with block():
        assert block._copies
    assert not block._copies


def test_layers_that_cannot_merge_keep_their_own_forward(tiny_model):
    ids = torch.randint(3, 300, (2, 10))
    dora = _lora(tiny_model, use_dora=True)
    plain = _logits(dora, ids)
    with packed_linears(dora):
        swapped = _swapped(dora)
        packed = _logits(dora, ids)
    # DoRA's layers run peft's own forward; only their base layers (and the output layer) are packed.
    assert swapped and all(name.endswith(("base_layer", "lm_head")) for name in swapped)
    assert torch.allclose(packed, plain, atol=1e-5, rtol=1e-5)

    dropout = _lora(tiny_model, lora_dropout=0.3).train()
    with packed_linears(dropout):
        assert all(name.endswith(("base_layer", "lm_head")) for name in _swapped(dropout))
    dropout.eval()  # dropout off: the adapters merge
    with packed_linears(dropout):
        assert any(name.endswith("q_proj") for name in _swapped(dropout))

    disabled = _lora(tiny_model)
    with disabled.disable_adapter():
        base = _logits(disabled, ids)
        with packed_linears(disabled):
            assert torch.allclose(_logits(disabled, ids), base, atol=1e-5, rtol=1e-5)


def test_inputs_that_need_gradients_take_the_plain_path(tiny_model):
    model = _lora(tiny_model)
    ids = torch.randint(3, 300, (2, 10))
    with packed_linears(model):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_nothing_changes_where_the_kernel_is_not_available(tiny_model, monkeypatch):
    model = _lora(tiny_model)
    monkeypatch.setattr(packed_linear, "available", lambda m: False)
    with packed_linears(model):
        assert _swapped(model) == []
    monkeypatch.undo()
    monkeypatch.setattr(packed_linear, "_available_bytes", lambda: 1024)  # copies that would not fit
    with packed_linears(model):
        assert _swapped(model) == []
    with packed_linears(model, enabled=False):
        assert _swapped(model) == []


def test_autocast_keeps_the_layers_own_forward(tiny_model):
    model = _lora(tiny_model)
    ids = torch.randint(3, 300, (2, 10))
    with packed_linears(model), torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16  # the layers ran under autocast, not on the float32 copies


def test_a_frozen_weights_packed_products_equal_the_plain_ones_and_follow_it():
    """frozen_linear (the output layer of the scoring passes): x W^T + b and x W on one packed copy each, the copy
    made again after the weight changed, the plain product where a gradient is recorded."""
    torch.manual_seed(0)
    weight, bias, x = torch.randn(300, 24), torch.randn(300), torch.randn(5, 24)
    grad = torch.randn(5, 300)
    with torch.no_grad():
        assert torch.allclose(packed_linear.frozen_linear(x, weight, bias), x @ weight.T + bias, atol=1e-5)
        assert torch.allclose(packed_linear.frozen_linear(grad, weight, transposed=True), grad @ weight, atol=1e-5)
        held = {slot: copy for slot, (_, copy) in packed_linear._FROZEN.items() if slot[0] == id(weight)}
        assert len(held) == 2
        packed_linear.frozen_linear(x, weight, bias)
        assert packed_linear._FROZEN[(id(weight), False)][1] is held[(id(weight), False)]  # kept, not packed again
        weight.mul_(2)  # an in-place change: the version counter moves
        assert torch.allclose(packed_linear.frozen_linear(x, weight, bias), x @ weight.T + bias, atol=1e-5)
    leaf = x.clone().requires_grad_()
    out = packed_linear.frozen_linear(leaf, weight, bias)
    assert out.grad_fn is not None  # recorded: the plain product, differentiable
    slots = set(held)
    del weight, held, out  # (the graph of `out` holds the weight too)
    gc.collect()
    assert not slots & set(packed_linear._FROZEN)  # the copies went with the weight
