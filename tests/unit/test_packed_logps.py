"""Preference log-probs from one packed row and a completion-only head equal TRL's padded fused head."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from preference_sets import padded_pairs
from transformers import AutoModelForCausalLM

from tunestack.train.fast.packed_logps import use_packed_logps

# Four rows (two chosen, two rejected), right-padded with 0; the first tokens of each row are prompt.
ROWS = [[1, 5, 9, 14, 22, 7, 2], [1, 30, 31, 2], [1, 5, 9, 40, 2], [1, 30, 31, 50, 51, 52, 53, 2]]
PROMPT = [3, 3, 3, 3]


def _batch():
    return padded_pairs(ROWS, PROMPT)


def _model(model_dir, lora=True):
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))  # as DPOTrainer does
    if not lora:
        return model
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _logps_and_grads(model, ids, mask, labels):
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
    chosen, rejected = out.log_probs.sum(1).chunk(2)
    (-(torch.nn.functional.logsigmoid(chosen - rejected)).mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize(
    "family,lora", [("llama", True), ("qwen2", True), ("glm4", True), ("llama", False)], ids=lambda v: str(v)
)
def test_packed_logps_equal_trls_padded_fused_head(tiny_models, family, lora, monkeypatch):
    """LoRA (frozen output layer: gradients taken in the forward pass) and full tuning (the output layer trains:
    checkpointed chunks) both give TRL's values and gradients."""
    from tunestack.train.fast import packed_logps

    model = _model(tiny_models[family], lora)
    ids, mask, labels = _batch()
    expected, expected_grads = _logps_and_grads(model, ids, mask, labels)

    assert use_packed_logps(model)
    heads = []
    fused, checkpointed = packed_logps.TargetLogProbs.apply, packed_logps._head_logprobs
    monkeypatch.setattr(
        packed_logps.TargetLogProbs, "apply", lambda h, *rest: heads.append(("fused", len(h))) or fused(h, *rest)
    )
    monkeypatch.setattr(
        packed_logps,
        "_head_logprobs",
        lambda h, t, head: heads.append(("checkpointed", len(h))) or checkpointed(h, t, head),
    )
    got, grads = _logps_and_grads(model, ids, mask, labels)
    scored = labels[:, 1:] != -100
    for stat in ("log_probs", "entropy", "mean_logits", "is_top1"):  # all that TRL's DPOTrainer reads
        a, b = getattr(got, stat).detach(), getattr(expected, stat).detach()
        assert a.shape == b.shape and a.dtype == b.dtype, stat
        a, b = a.float(), b.float()
        assert torch.allclose(a[scored], b[scored], atol=1e-4), stat
    assert (got.log_probs[~scored] == 0).all()
    # The output layer ran only on the scored completion tokens: once with LoRA, and again in backward for the
    # checkpointed chunks of full tuning.
    n_scored = int(scored.sum())
    assert heads == ([("fused", n_scored)] if lora else [("checkpointed", n_scored)] * 2)
    assert grads
    for name, grad in grads.items():
        assert torch.allclose(grad, expected_grads[name], atol=1e-5, rtol=1e-4), name
    # Calls without fused_lm_head are the model's own forward.
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (*ids.shape, model.config.vocab_size)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_logits_logps_equal_trls_fused_head(tiny_models, lora):
    """What a model's own code gets (TRL's fused-head calls answered from the model's full logits): TRL's values and
    gradients, padding included."""
    from tunestack.train.fast.packed_logps import use_logits_logps

    model = _model(tiny_models["llama"], lora)
    ids, mask, labels = _batch()
    expected, expected_grads = _logps_and_grads(model, ids, mask, labels)
    use_logits_logps(model)
    got, grads = _logps_and_grads(model, ids, mask, labels)
    scored = labels[:, 1:] != -100
    for stat in ("log_probs", "entropy", "mean_logits", "is_top1"):
        a, b = getattr(got, stat).detach(), getattr(expected, stat).detach()
        assert a.shape == b.shape and a.dtype == b.dtype, stat
        assert torch.allclose(a.float()[scored], b.float()[scored], atol=1e-4), stat
    assert (got.log_probs[~scored] == 0).all() and torch.equal(got.label_mask, expected.label_mask)
    assert torch.allclose(got.loss, expected.loss, atol=1e-5)
    for name, grad in grads.items():
        assert torch.allclose(grad, expected_grads[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunks_of_the_output_layer_give_the_values_and_gradients_of_one_pass(temperature):
    """The output layer runs in chunks of rows (about 8 MB of logits each: 42 rows of SmolLM2's 49152); any
    chunking gives what one chunk of every row gives."""
    from tunestack.train.fast.packed_logps import chunked_logprobs, rows_per_chunk

    assert rows_per_chunk(49152) == 42 and rows_per_chunk(151936) == 16
    torch.manual_seed(0)
    head = torch.nn.Linear(24, 300, bias=False).requires_grad_(False)
    hidden, targets = torch.randn(37, 24), torch.randint(0, 300, (37,))
    results = []
    for chunk in (37, 5, 1):
        h = hidden.clone().requires_grad_(True)
        values = chunked_logprobs(h, targets, head, chunk_size=chunk, temperature=temperature)
        (values[0] * torch.linspace(-1, 2, 37)).sum().backward()
        results.append((values.detach(), h.grad))
    for values, grad in results[1:]:
        torch.testing.assert_close(values, results[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-6, atol=1e-6)
