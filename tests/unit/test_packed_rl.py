"""GRPO / RLOO on packed rows (and RLOO with one policy pass) train exactly like TRL's own trainers."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from preference_sets import padded_pairs
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from tunestack.train.fast import packed_logps
from tunestack.train.fast.packed_logps import use_packed_logps

# Two prompts left-padded with the pad id, four completions right-padded (one stopped early).
PROMPTS = [[0, 0, 1, 5, 9], [1, 30, 31, 40, 41]]
COMPLETIONS = [[7, 8, 2, 0], [12, 13, 14, 15], [3, 2, 0, 0], [22, 23, 24, 2]]


def _lora_model(model_dir, temperature):
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))  # as GRPOTrainer does
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _grpo_batch():
    """input_ids, attention mask and labels exactly as GRPOTrainer._get_per_token_logps_and_entropies builds them."""
    prompts = torch.tensor([PROMPTS[i // 2] for i in range(4)])
    completions = torch.tensor(COMPLETIONS)
    prompt_mask = (prompts != 0).long()
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    ids, mask = torch.cat([prompts, completions], 1), torch.cat([prompt_mask, completion_mask], 1)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : -completions.shape[1]] = -100
    return ids, mask, labels, completion_mask


@pytest.mark.parametrize("family", ["llama", "qwen2", "glm4"])
def test_packed_logps_equal_trls_fused_head_at_the_sampling_temperature(tiny_models, family):
    ids, mask, labels, completion_mask = _grpo_batch()
    weights = torch.linspace(-1, 1, completion_mask.numel()).view_as(completion_mask)

    def run(model):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        logps, entropy = out.log_probs[:, -4:], out.entropy[:, -4:]
        (logps * weights * completion_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return logps.detach(), entropy.detach(), grads

    model = _lora_model(tiny_models[family], temperature=0.7)
    expected = run(model)
    assert use_packed_logps(model, temperature=0.7)
    got = run(model)
    scored = completion_mask.bool()
    assert torch.allclose(got[0][scored], expected[0][scored], atol=1e-5)
    assert torch.allclose(got[1][scored], expected[1][scored], atol=1e-4)
    assert (got[0][~scored] == 0).all()
    for name, grad in expected[2].items():
        assert torch.allclose(got[2][name], grad, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("family", ["llama", "qwen2", "glm4"])
@pytest.mark.parametrize("layout", ["grpo-shuffled", "dpo"])
def test_rows_with_one_prompt_score_it_once_under_per_sample_attention(tiny_models, family, layout):
    """Under varlen attention the completions of one prompt share its tokens in the packed row: GRPO's groups
    (here in TRL's shuffled order, the rows of one prompt apart) and DPO's chosen and rejected rows (prompt and
    answer flush left, right-padded). The log-probs and gradients are TRL's fused head's; the decoder runs each
    prompt once."""
    from tunestack.train.fast.varlen import varlen_attention

    if layout == "dpo":
        rows = [[1, 5, 9, 7, 8, 2], [1, 30, 31, 12, 13], [1, 5, 9, 3, 2], [1, 30, 31, 22, 23, 24, 2]]
        ids, mask, labels = padded_pairs(rows, [3, 3, 3, 3])
    else:
        ids, mask, labels, _ = _grpo_batch()
        order = torch.tensor([0, 2, 1, 3])  # rows 0 and 1 answer the first prompt
        ids, mask, labels = ids[order], mask[order], labels[order]
    scored = labels[:, 1:] != -100
    weights = torch.linspace(-1, 1, scored.numel()).view_as(scored)

    def run(model):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        (out.log_probs * weights * scored).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return out.log_probs.detach(), grads

    model = _lora_model(tiny_models[family], temperature=1.0)
    expected = run(model)
    assert use_packed_logps(model, temperature=1.0)
    seen = []
    decoder = model.get_base_model().get_decoder()
    decoder.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"].shape[1]), with_kwargs=True)
    with varlen_attention(model):
        got = run(model)
    real = [(ids[r][mask[r].bool()], labels[r][mask[r].bool()] != -100) for r in range(4)]
    prompts = {tuple(row[: int(lab.nonzero()[0])].tolist()) for row, lab in real}
    shared = sum(map(len, prompts)) + sum(int(lab.sum()) for _, lab in real)  # each prompt once, then the answers
    assert seen == [shared] and shared < int(mask.sum())
    assert torch.allclose(got[0][scored], expected[0][scored], atol=1e-5)
    assert (got[0][~scored] == 0).all()
    for name, grad in expected[1].items():
        assert torch.allclose(got[1][name], grad, atol=1e-6, rtol=1e-4), name


def test_packed_logps_change_with_the_temperature(tiny_model):
    """The temperature divides the logits: 0.7 and 1.0 give different log-probs."""
    ids, mask, labels, completion_mask = _grpo_batch()
    model = _lora_model(tiny_model, temperature=1.0)
    use_packed_logps(model, temperature=1.0)
    cold = packed_logps.packed_completion_logps(model, ids, mask, labels, temperature=0.7)["log_probs"]
    plain = packed_logps.packed_completion_logps(model, ids, mask, labels)["log_probs"]
    assert not torch.allclose(cold[:, -4:][completion_mask.bool()], plain[:, -4:][completion_mask.bool()])


# ---------------------------------------------------------------------------------------------- whole trainer steps


class _Grads(TrainerCallback):
    """The gradients of the first optimizer step (after clipping), by parameter name."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.grads:
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _letters(prompts, completions, **kwargs):
    return [float(len(c) % 7) for c in completions]


def _train_one_step(model_dir, algo, mixins, tmp_path, calls):
    import datasets
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from tunestack.train.trainer import with_tunestack

    config_class, trainer_class = (GRPOConfig, GRPOTrainer) if algo == "grpo" else (RLOOConfig, RLOOTrainer)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # the policy differs from the reference: a KL term with a gradient
    args = config_class(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
        max_steps=1, learning_rate=1e-3, beta=0.1, temperature=0.8, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, disable_dropout=True, seed=3,
    )  # fmt: skip
    grads = _Grads()
    trainer = with_tunestack(trainer_class, mixins)(
        model=model,
        reward_funcs=[_letters],
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": ["Who are you?", "What is a fever?"] * 4}),
        processing_class=tokenizer,
        callbacks=[grads],
    )
    counted = packed_logps.packed_completion_logps

    def counting(*a, **k):
        calls.append(torch.is_grad_enabled())
        return counted(*a, **k)

    packed_logps.packed_completion_logps = counting
    try:
        trainer.train()
    finally:
        packed_logps.packed_completion_logps = counted
    logged = trainer.state.log_history[0]
    return logged["loss"], logged["reward"], grads.grads


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_a_packed_trainer_step_equals_trls_step(tiny_model, tmp_path, algo, monkeypatch):
    """One GRPO / RLOO step (generation, reward, reference and policy passes, backward) with tunestack's fast paths
    gives TRL's own loss, reward and gradients; RLOO runs the policy once instead of twice. Sampling on packed
    linear layers draws the same completions."""
    from types import SimpleNamespace

    from tunestack.model.packed_linear import _PackedForward
    from tunestack.train.fast.packed_rl import (
        OnePolicyPassMixin,
        PackedRLMixin,
        PackedSamplingMixin,
        packed_rl_mixins,
    )

    plain_calls: list[bool] = []
    loss, reward, grads = _train_one_step(tiny_model, algo, (), tmp_path / "plain", plain_calls)
    train = SimpleNamespace(padding_free=True, sparse_lm_head=True, varlen_attention=True, packed_sampling=True)
    mixins = packed_rl_mixins(train, algo)
    assert PackedRLMixin in mixins and PackedSamplingMixin in mixins
    assert (OnePolicyPassMixin in mixins) == (algo == "rloo")
    calls: list[bool] = []
    sampled: list[bool] = []  # what the packed layers ran: generation only, never with gradients
    packed_call = _PackedForward.__call__
    monkeypatch.setattr(
        _PackedForward, "__call__", lambda self, x: sampled.append(torch.is_grad_enabled()) or packed_call(self, x)
    )
    got_loss, got_reward, got_grads = _train_one_step(tiny_model, algo, mixins, tmp_path / "fast", calls)
    assert sampled and not any(sampled)
    assert plain_calls == []  # TRL's own head
    # GRPO: reference (no grad) and policy; RLOO: the old-policy pass, kept for the update, and the reference.
    assert calls == ([False, True] if algo == "grpo" else [True, False])
    assert got_reward == reward
    assert got_loss == pytest.approx(loss, abs=1e-6)
    assert grads and set(got_grads) == set(grads)
    for name, grad in grads.items():
        assert torch.allclose(got_grads[name], grad, atol=1e-6, rtol=1e-4), name
