"""LoRA dropout fused into lora_A: PEFT's values and gradients, less kept for backward."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM
from trl.trainer.utils import disable_dropout_in_model

from tunestack.model.lora_dropout import DropoutLinear, dropout_linear, fuse_lora_dropout

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_dropout_linear_matches_the_plain_computation_with_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    w = torch.randn(4, 16, requires_grad=True)
    keep = torch.rand(2, 5, 16) >= 0.3
    out = dropout_linear(x, w, 0.3, keep)
    (out * torch.arange(4.0)).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    expected = nn.functional.linear(x * keep / 0.7, w)
    (expected * torch.arange(4.0)).sum().backward()
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(gx, x.grad, atol=1e-6) and torch.allclose(gw, w.grad, atol=1e-5)


class _SameMaskDropout(nn.Module):
    """PEFT's dropout drawing its mask exactly like DropoutLinear (rand_like >= p), for a seeded comparison."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return x * (torch.rand_like(x) >= self.p) / (1 - self.p) if self.training else x


def _peft(tiny_model):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    return model


def _step(model, ids, seed):
    model.train()
    torch.manual_seed(seed)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


def test_fused_model_trains_exactly_like_peft(tiny_model):
    reference = _peft(tiny_model)
    fused = copy.deepcopy(reference)
    assert fuse_lora_dropout(fused) == len(TARGETS) * fused.config.num_hidden_layers
    assert sum(isinstance(m, DropoutLinear) for m in fused.modules()) == len(TARGETS) * fused.config.num_hidden_layers
    for module in reference.modules():
        if hasattr(module, "lora_dropout") and isinstance(module.lora_dropout, nn.ModuleDict):
            module.lora_dropout["default"] = _SameMaskDropout(0.25)
    ids = torch.randint(3, 200, (2, 24))
    loss_ref, grads_ref = _step(reference, ids, seed=5)
    loss, grads = _step(fused, ids, seed=5)
    assert torch.allclose(loss, loss_ref, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ref[name], atol=1e-6, rtol=1e-4), name
    # A different seed draws other masks: dropout is really applied.
    assert not torch.allclose(_step(fused, ids, seed=6)[0], loss)
    # Evaluation is deterministic and equal.
    reference.eval(), fused.eval()
    with torch.no_grad():
        assert torch.equal(reference(input_ids=ids).logits, fused(input_ids=ids).logits)
    # Switching dropout off model-wide (as TRL's disable_dropout does) reaches the fused layers.
    disable_dropout_in_model(fused)
    assert torch.allclose(_step(fused, ids, seed=6)[0], _step(fused, ids, seed=7)[0])
    # The adapter saves under the same names.
    assert reference.state_dict().keys() == fused.state_dict().keys()


def _saved_bytes(model, ids):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum()
    return sum(storages.values())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_dropout_keeps_less_for_backward(tiny_models, family):
    reference = _peft(tiny_models[family])
    fused = copy.deepcopy(reference)
    fuse_lora_dropout(fused)
    ids = torch.randint(3, 200, (2, 64))
    assert _saved_bytes(fused, ids) < 0.75 * _saved_bytes(reference, ids)
