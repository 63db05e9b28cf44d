"""Padding-free batches and the trained-positions LM head are exact: same losses and gradients."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tunestack.data.collators import DocumentCollator, PackedCollator, PadCollator, document_position_ids
from tunestack.train.fast.efficient import (
    LinearCrossEntropy,
    hf_model,
    plain_linear_head,
    trained_positions_loss,
)

SAMPLES = [
    {"input_ids": [1, 5, 9, 14, 22, 7, 2], "labels": [-100, -100, -100, 14, 22, 7, 2]},
    {"input_ids": [1, 30, 31, 2], "labels": [-100, -100, 31, 2]},
    {"input_ids": [1, 40, 41, 42, 43, 44, 45, 46, 2], "labels": [-100, -100, -100, -100, 43, 44, 45, 46, 2]},
]


def _lora(model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return _lora_with(model, ["q_proj", "v_proj", "down_proj"])


def _lora_with(model, target_modules):
    model = get_peft_model(model, LoraConfig(r=4, target_modules=target_modules, lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _padded_then_packed(model, chunk_size):
    """transformers' own loss and gradients on the padded batch (full logits, mean over trained tokens), then
    the packed row's trained-positions loss, backpropagated. Returns (reference loss, reference gradients,
    packed loss, trained-token count, output layer, packed hidden states); the model holds the packed grads."""
    padded = PadCollator(pad_token_id=2)(SAMPLES)
    out = model(**padded)
    out.loss.backward()
    reference_loss, reference = out.loss.detach(), _grads(model)
    model.zero_grad()

    packed = PackedCollator()(SAMPLES)
    captured = {}
    base = hf_model(model)
    handle = base.get_decoder().register_forward_hook(lambda m, a, o: captured.update(h=o.last_hidden_state))
    model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], logits_to_keep=1, use_cache=False)
    handle.remove()
    head = base.get_output_embeddings()
    total, count = trained_positions_loss(captured["h"], packed["labels"], head, chunk_size=chunk_size)
    loss = total / count
    loss.backward()
    return reference_loss, reference, loss, count, head, captured["h"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "glm4"])
def test_packed_trained_positions_loss_equals_padded_full_loss(tiny_models, family):
    model = _lora(tiny_models[family])
    reference_loss, reference, loss, count, _, _ = _padded_then_packed(model, chunk_size=3)
    assert count.item() == sum(sum(1 for y in s["labels"][1:] if y != -100) for s in SAMPLES)
    assert torch.allclose(loss, reference_loss, atol=1e-5), (loss.item(), reference_loss.item())
    for name, grad in _grads(model).items():
        assert torch.allclose(grad, reference[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_gradients_equal_the_naive_computation(with_bias):
    """Gradients taken in the forward pass, chunk by chunk, then scaled by the upstream gradient."""
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, requires_grad=True)
    head = torch.nn.Linear(8, 50, bias=with_bias)
    targets = torch.randint(0, 50, (13,))
    naive = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    (0.37 * naive).backward()
    expected = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    hidden.grad = None
    head.zero_grad()

    fused = LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, 5)  # 5 does not divide 13
    (0.37 * fused).backward()
    assert torch.allclose(fused, naive, atol=1e-5)
    for got, want in zip([hidden.grad] + [p.grad for p in head.parameters()], expected, strict=True):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["bf16-weights", "bf16-autocast"])
def test_linear_cross_entropy_in_bfloat16_is_as_close_to_float64_as_the_naive_loss(mode):
    """What a GPU run does: the fused gradients stay as accurate as autograd's through the unfused ops."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if mode == "bf16-weights" else torch.float32
    hidden = torch.randn(37, 64, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(64, 500, bias=False).to(dtype)
    targets = torch.randint(0, 500, (37,))
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, head.weight))
    torch.nn.functional.cross_entropy(h64 @ w64.T, targets, reduction="sum").backward()

    def error(loss_fn):
        hidden.grad, head.weight.grad = None, None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16-autocast"):
            loss = loss_fn()
        loss.backward()
        return [
            ((g.double() - t.grad).norm() / t.grad.norm()).item()
            for g, t in ((hidden.grad, h64), (head.weight.grad, w64))
        ]

    naive = error(lambda: torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum"))
    fused = error(lambda: LinearCrossEntropy.apply(hidden, head.weight, None, targets, 10))
    for got, reference in zip(fused, naive, strict=True):
        assert got < 2 * reference + 1e-3, (fused, naive)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
@pytest.mark.parametrize("lora_on_head", [False, True])
def test_trained_positions_loss_trains_the_head_like_the_full_loss(tiny_model, lora_on_head):
    """Full fine-tuning (the output layer, tied to the embedding, trains) and an adapter on the output layer
    (which takes the checkpointed-module path) give the full computation's gradients too."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    if lora_on_head:
        model = _lora_with(model, ["q_proj", "lm_head"])
    reference_loss, reference, loss, _, head, hidden = _padded_then_packed(model, chunk_size=4)
    assert torch.allclose(loss, reference_loss, atol=1e-5)
    grads = _grads(model)
    assert any("lm_head" in n or "embed_tokens" in n for n in grads)
    assert plain_linear_head(head, hidden) is not lora_on_head
    for name, grad in grads.items():
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


@pytest.mark.parametrize("family", ["llama", "qwen2", "glm4"])
def test_varlen_attention_equals_the_block_diagonal_mask(tiny_models, family, monkeypatch):
    """Per-sample SDPA on a packed row: the same loss and gradients as SDPA through transformers' packed mask,
    and each sample's logits equal its logits when run alone."""
    from tunestack.train.fast import varlen

    model = _lora(tiny_models[family])
    packed = PackedCollator()(SAMPLES)
    inputs = {**packed, "use_cache": False}  # with a cache, transformers does not detect packing
    out = model(**inputs)
    out.loss.backward()
    reference_loss, reference_logits, reference = out.loss.detach(), out.logits.detach(), _grads(model)
    model.zero_grad()

    calls = []
    monkeypatch.setattr(varlen.F, "scaled_dot_product_attention", _counting(calls))
    with varlen.varlen_attention(model):
        out = model(**inputs)
        out.loss.backward()
    assert hf_model(model).config._attn_implementation == "sdpa"  # restored after the block
    layers = hf_model(model).config.num_hidden_layers
    assert len(calls) == layers * len(SAMPLES), "attention did not run once per sample and layer"
    assert max(calls) == max(len(s["input_ids"]) for s in SAMPLES)
    assert torch.allclose(out.loss, reference_loss, atol=1e-5)
    assert torch.allclose(out.logits, reference_logits, atol=1e-5)
    for name, grad in _grads(model).items():
        assert torch.allclose(grad, reference[name], atol=1e-5, rtol=1e-4), name
    with torch.no_grad(), varlen.varlen_attention(model):
        offset = 0
        for sample in SAMPLES:
            alone = model(input_ids=torch.tensor([sample["input_ids"]])).logits[0]
            n = len(sample["input_ids"])
            assert torch.allclose(out.logits[0, offset : offset + n], alone, atol=1e-5)
            offset += n


def _counting(calls):
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, *args, **kwargs):
        calls.append(query.shape[2])
        return original(query, *args, **kwargs)

    return sdpa


def test_varlen_attention_leaves_padded_batches_and_generation_to_sdpa(tiny_model):
    from tunestack.train.fast.varlen import varlen_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    padded = PadCollator(pad_token_id=2)(SAMPLES)
    prompt = {
        "input_ids": torch.tensor([[2, 2, 1, 5, 9], [1, 30, 31, 40, 41]]),
        "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1] * 5]),
    }
    with torch.no_grad():
        expected = model(**padded).logits
        greedy = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=2)
        with varlen_attention(model):
            assert torch.equal(model(**padded).logits, expected)
            assert torch.equal(model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=2), greedy)


def test_segments_read_samples_and_branches_from_position_ids():
    from tunestack.train.fast.varlen import segments

    # A sample of 5 tokens, a branch continuing its first 2, a sample of 2, a branch continuing its first 1.
    runs = segments(torch.tensor([0, 1, 2, 3, 4, 2, 3, 0, 1, 1, 2]))
    assert runs == [(0, 5, 0, 0), (5, 7, 0, 2), (7, 9, 7, 0), (9, 11, 7, 1)]
    assert segments(torch.tensor([1, 2, 3])) is None  # does not start a sample
    assert segments(torch.tensor([0, 1, 3, 4])) is None  # continues more tokens than the sample has


@pytest.mark.parametrize("family", ["llama", "qwen2", "glm4"])
def test_a_branch_attends_to_its_prompt_as_if_run_alone(tiny_models, family):
    """Two answers to one prompt packed as prompt + answer 1 + answer 2 (positions continuing the prompt), then a
    second sample: each answer's logits and gradients equal those of prompt + answer run on their own."""
    from tunestack.train.fast.varlen import shares_prompts, varlen_attention

    model = _lora(tiny_models[family])
    prompt, first, second, other = [1, 5, 9, 14], [22, 7, 2], [30, 31], [1, 40, 41, 2]
    ids = torch.tensor([prompt + first + second + other])
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 4, 5, 0, 1, 2, 3]])
    weights = torch.linspace(-1, 1, ids.shape[1])
    assert not shares_prompts(model)
    with varlen_attention(model):
        assert shares_prompts(model)
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
        (packed.sum(-1) * weights).sum().backward()
    got = _grads(model)
    model.zero_grad()
    alone = [
        model(input_ids=torch.tensor([seq]), use_cache=False).logits[0]
        for seq in (prompt + first, prompt + second, other)
    ]
    expected_weights = [weights[:7], torch.cat([torch.zeros(4), weights[7:9]]), weights[9:]]
    sum((a.sum(-1) * w).sum() for a, w in zip(alone, expected_weights, strict=True)).backward()
    assert torch.allclose(packed[:7], alone[0], atol=1e-5)
    assert torch.allclose(packed[7:9], alone[1][4:], atol=1e-5)
    assert torch.allclose(packed[9:], alone[2], atol=1e-5)
    for name, grad in _grads(model).items():
        assert torch.allclose(got[name], grad, atol=1e-5, rtol=1e-4), name


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


@pytest.mark.parametrize("varlen_on", [False, True], ids=["mask", "varlen"])
def test_document_attention_loss_is_the_loss_of_each_document_alone(tiny_model, varlen_on):
    """PT blocks with --document_attention: a block's loss is that of its documents run one by one."""
    from tunestack.train.fast.varlen import varlen_attention

    documents = [[1, 5, 9, 14, 2], [1, 30, 31, 32, 33, 34, 2], [1, 40, 41, 2], [1, 50, 51, 52, 53, 54, 55, 56, 2]]
    flat = [t for d in documents for t in d]  # 25 tokens: two blocks of 12, cut across documents like PT does
    blocks = [{"input_ids": flat[:12], "labels": flat[:12]}, {"input_ids": flat[12:24], "labels": flat[12:24]}]
    batch = DocumentCollator(pad_token_id=2, eos_token_id=2)(blocks)
    assert "attention_mask" not in batch
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        with varlen_attention(model) if varlen_on else contextlib.nullcontext():
            logits = model(**batch, use_cache=False).logits
        got = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), reduction="sum"
        )
        # Each block's pieces of documents, run alone; a piece's first token is never predicted.
        expected, count = torch.zeros(()), 0
        for block in blocks:
            piece = []
            for token in block["input_ids"]:
                piece.append(token)
                if token == 2:
                    expected += _alone_loss(model, piece)
                    count += len(piece) - 1
                    piece = []
            if piece:
                expected += _alone_loss(model, piece)
                count += len(piece) - 1
    assert int((batch["labels"][:, 1:] != -100).sum()) == count
    assert torch.allclose(got, expected, atol=1e-4), (got.item(), expected.item())


def _alone_loss(model, ids):
    if len(ids) < 2:
        return torch.zeros(())
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum")
