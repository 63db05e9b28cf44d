"""PPO on packed rows (output layer at response tokens only, one reference pass, the first update reusing the
old-policy pass) computes what the padded loop computes: the same scores, losses and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunestack.rl.policy import PolicyWithValue
from tunestack.rl.rollout import Rollout, positions
from tunestack.rl.scoring import Scorer, pack_rows, token_chunks

PAD = 0


def _policy(model_dir, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # the policy differs from its reference
    return PolicyWithValue(model, model.config.hidden_size)


def _rollout() -> Rollout:
    """Three left-padded prompts, responses that stop at different points (the mask ends at the stop token)."""
    prompts = [[0, 0, 1, 5, 9], [1, 30, 31, 40, 41], [0, 0, 0, 7, 8]]
    responses = [[11, 12, 2, 0], [13, 14, 15, 16], [17, 2, 0, 0]]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float32)
    prompt_ids = torch.tensor(prompts)
    attention = torch.cat([(prompt_ids != PAD).long(), mask.long()], 1)
    ids = torch.cat([prompt_ids, torch.tensor(responses)], 1)
    n = len(prompts)
    return Rollout(ids, attention, positions(attention), 5, mask, torch.ones(n, dtype=torch.bool),
                   torch.zeros(n), torch.zeros(n), [""] * n, [""] * n)  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen2", "glm4"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_scores_and_gradients_equal_the_padded_ones(tiny_models, family, temperature):
    r = _rollout()
    idx = torch.tensor([2, 0, 1])
    mask = r.mask[idx].bool()
    weights = torch.linspace(-1, 1, mask.numel()).view_as(mask)

    def run(scorer, varlen):
        model = _policy(tiny_models[family])
        scorer = Scorer(packed=scorer == "packed", varlen=varlen, temperature=temperature)
        s = scorer.policy(model, r, idx, entropy=True)
        ((s.logp * weights + s.values * weights.flip(0)) * mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad(), model.policy.disable_adapter():
            ref = scorer.logprobs(model.policy, r, idx)
        return s, grads, ref

    plain, plain_grads, plain_ref = run("padded", False)
    for varlen in (False, True):
        got, grads, ref = run("packed", varlen)
        for name in ("logp", "values", "entropy"):
            assert torch.allclose(getattr(got, name)[mask], getattr(plain, name)[mask], atol=1e-5), name
        assert (got.logp[~mask] == 0).all() and (got.values[~mask] == 0).all()
        assert torch.allclose(ref[mask], plain_ref[mask], atol=1e-5)
        assert not torch.allclose(ref[mask], got.logp[mask].detach(), atol=1e-3)  # the adapter was off
        assert set(grads) == set(plain_grads) and any("value_head" in n for n in grads)
        for name, grad in plain_grads.items():
            # rounding at the scale of the whole gradient (elements near 0 of a large one round at its scale)
            scale = float(grad.abs().max().clamp(min=1))
            assert torch.allclose(grads[name], grad, atol=1e-6 * scale, rtol=1e-4), name


def test_packing_refuses_a_scored_token_after_a_masked_one(tiny_model):
    """A pad id sampled inside an answer leaves a hole in the mask; only the padded way scores that row."""
    r = _rollout()
    r.mask[1, 1] = 0
    r.attention_mask[1, 6] = 0
    assert pack_rows(r, torch.tensor([0, 2])) is not None
    assert pack_rows(r, torch.tensor([0, 1])) is None


def test_token_chunks_keep_order_and_the_budget():
    r = _rollout()  # 6, 9 and 4 real tokens
    idx = torch.arange(3)
    assert [c.tolist() for c in token_chunks(r, idx, budget=10)] == [[0], [1], [2]]
    assert [c.tolist() for c in token_chunks(r, idx, budget=15)] == [[0, 1], [2]]
    assert [c.tolist() for c in token_chunks(r, idx, budget=5)] == [[0], [1], [2]]  # a longer row still goes alone
    assert [c.tolist() for c in token_chunks(r, idx)] == [[0, 1, 2]]


# ---------------------------------------------------------------------------------------------- a whole PPO step


def _loop(model_dir: Path, packed: bool, reward, sampled_old: bool = True, **settings):
    from tunestack.data.prompts import PromptEncoder
    from tunestack.data.templates import get_template, stop_token_ids
    from tunestack.rl.ppo import PPOLoop, PPOSettings

    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    template = get_template(None, tok)
    settings = PPOSettings(
        batch_size=4, mini_batch_size=2, ppo_epochs=2, max_new_tokens=6, learning_rate=1e-3, packed=packed,
        packed_sampling=packed, sampled_old_scores=sampled_old, **settings,
    )  # fmt: skip
    loop = PPOLoop(
        model, tok, PromptEncoder(tok, template, 64), reward, stop_token_ids(template, tok), settings, Path(".")
    )
    grads: list[dict[str, torch.Tensor]] = []
    step = loop.optimizer.step

    def recording_step(*args, **kwargs):
        grads.append({n: p.grad.clone() for n, p in loop.unwrapped.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    loop.optimizer.step = recording_step
    calls = {"policy": 0}
    forward = PolicyWithValue.forward

    def counting(self, *args, **kwargs):
        calls["policy"] += 1
        return forward(self, *args, **kwargs)

    return loop, grads, calls, counting


def _prompts():
    from tunestack.data.formats import Message
    from tunestack.data.prompts import Prompt

    questions = ["Hi", "Why sleep?", "Who are you?", "What is blood?"]
    return [Prompt(None, (Message("user", q),), f"q{i}") for i, q in enumerate(questions)]


@pytest.mark.parametrize("family", ["llama", "qwen2", "glm4"])
@pytest.mark.parametrize(
    ("packed_sampling", "temperature"), [(False, 1.0), (True, 1.0), (True, 0.7)], ids=["plain", "packed", "packed-t0.7"]
)
def test_the_sampling_passes_scores_are_a_scoring_passes(tiny_models, family, packed_sampling, temperature):
    """The old policy's log-probs, entropies and values as the sampling passes computed them equal those of a
    packed scoring pass over the sampled rows (0 after each row's stop), at the sampling temperature."""
    reward = lambda prompts, completions, **kw: [0.0] * len(prompts)  # noqa: E731
    loop = _loop(tiny_models[family], True, reward, temperature=temperature)[0]
    loop.s.packed_sampling = packed_sampling
    torch.manual_seed(3)
    r = loop.rollout(_prompts() * 2, score=True)
    assert r.sampled is not None
    mask = r.mask.bool()
    loop.model.eval()
    with torch.no_grad():
        plain = loop.scorer.policy(loop.model, r, torch.arange(r.input_ids.shape[0]))
        values = loop.unwrapped.value_head(r.sampled.hidden) * r.mask
    for got, expected in ((r.sampled.logp, plain.logp), (r.sampled.entropy, plain.entropy), (values, plain.values)):
        assert torch.allclose(got[mask], expected[mask], atol=1e-4, rtol=1e-4)
        assert (got[~mask] == 0).all()
    assert loop.rollout(_prompts()).sampled is None  # only when asked for


@pytest.mark.parametrize("sampled_old", [True, False], ids=["old-scores-from-sampling", "old-scores-pass"])
def test_a_packed_ppo_step_equals_the_padded_step(tiny_model, monkeypatch, sampled_old):
    """Two PPO steps from the same start: the same rollouts (sampled on packed linear layers or not), statistics and
    gradients of every update. The packed loop runs the policy only for its updates when the old scores come from
    the sampling passes, else once less per step than the padded loop (the first update reuses the old-policy
    pass)."""
    prompts = _prompts()

    def reward(prompts, completions, **kw):
        return [float(c.count("a")) - 0.1 * len(c) for c in completions]

    from tunestack.model.packed_linear import _PackedForward

    results, sampled = {}, {False: 0, True: 0}
    packed_call = _PackedForward.__call__
    for packed in (False, True):
        loop, grads, calls, counting = _loop(tiny_model, packed, reward, sampled_old)
        monkeypatch.setattr(PolicyWithValue, "forward", counting)

        def counting_packed(self, x, packed=packed):
            sampled[packed] += 1
            return packed_call(self, x)

        monkeypatch.setattr(_PackedForward, "__call__", counting_packed)
        torch.manual_seed(1)
        logs = [loop.train_step(prompts) for _ in range(2)]
        results[packed] = (logs, grads, calls["policy"], loop.last_rollout)
        monkeypatch.undo()
    assert sampled[False] == 0 and sampled[True] > 0
    (plain_logs, plain_grads, plain_calls, plain_r), (logs, grads, calls, r) = results[False], results[True]
    assert torch.equal(r.input_ids, plain_r.input_ids)  # the same answers were sampled
    for got, expected in zip(logs, plain_logs, strict=True):
        for key in ("reward_mean", "kl", "entropy", "policy_loss", "value_loss", "clip_fraction", "approx_kl"):
            assert got[key] == pytest.approx(expected[key], abs=1e-5, rel=1e-4), key
    assert len(grads) == len(plain_grads) == 2 * 2 * 2  # steps x epochs x minibatches
    for got, expected in zip(grads, plain_grads, strict=True):
        for name, grad in expected.items():
            assert torch.allclose(got[name], grad, atol=1e-6, rtol=1e-3), name
    assert plain_r.sampled is None and (r.sampled is not None) == sampled_old
    # Per step, padded: 2 old-policy minibatches + 4 updates; packed: the 4 updates (old scores from sampling), or
    # the kept minibatch, one pass for the rest and 3 more updates.
    assert (plain_calls, calls) == (2 * 6, 2 * (4 if sampled_old else 5))


def test_reward_model_scores_on_packed_rows_equal_the_padded_scores(tiny_model, tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from tunestack.model.reward import load_reward_model, score_texts
    from tunestack.rl.rewards import RewardModelFunction
    from tunestack.train.fast import packed_scores

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts = ["<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>user\nHi<|im_end|>\n"]
    completions = ["I am an assistant that answers medical questions.<|im_end|>", "Hello"]
    plain, plain_tok, _ = load_reward_model(tmp_path / "rm")
    expected = score_texts(plain, plain_tok, [p + c for p, c in zip(prompts, completions, strict=True)])
    calls = []
    packed = packed_scores.packed_scores
    monkeypatch.setattr(packed_scores, "packed_scores", lambda *a: calls.append(1) or packed(*a))
    got = RewardModelFunction(str(tmp_path / "rm"))(prompts=prompts, completions=completions)
    assert calls == [1]  # one packed row for the batch
    assert got == pytest.approx(expected, abs=1e-5)
    assert len(set(got)) == 2

