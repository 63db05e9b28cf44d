"""Several adapters on one base, each with its own answers; /v1/score with a trained tiny reward model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from live_server import selection, start_server

from tunestack.config.infer import GenerationArguments, ModelSelection
from tunestack.infer.generate import ChatModel

try:
    import httpx2 as httpx
except ImportError:
    import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
QUESTIONS = ["What is the capital of France?", "Who are you?"]


def test_two_adapters_give_their_own_answers(tiny_models, tmp_path) -> None:
    from test_merge import make_adapter

    from tunestack.serve.command import split_adapters
    from tunestack.serve.models import selections

    base = tiny_models["glm4"]
    med, dpo = make_adapter(base, tmp_path / "med", seed=1), make_adapter(base, tmp_path / "dpo", seed=2)
    rest, adapters = split_adapters(["--model", str(base), "--lora_model", f"med={med}", f"--lora_model=dpo={dpo}"])
    assert rest == ["--model", str(base)] and adapters == [f"med={med}", f"dpo={dpo}"]
    pairs = selections(ModelSelection(model=str(base)), adapters, None)
    assert [name for name, _ in pairs] == ["glm4", "med", "dpo"]
    live = start_server(pairs, max_concurrency=4)
    try:
        client = live.client()
        assert [m.id for m in client.models.list()] == ["glm4", "med", "dpo"]
        greedy = GenerationArguments(temperature=0, max_new_tokens=12)
        for question in QUESTIONS:
            messages = [{"role": "user", "content": question}]
            served = {
                name: client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=12)
                .choices[0]
                .message.content
                for name in ("glm4", "med", "dpo")
            }
            assert len(set(served.values())) == 3, served
            for name, folder in [("glm4", base), ("med", med), ("dpo", dpo)]:
                # Each equals `tunestack chat --model <folder>`: the adapter stacked on its base and merged.
                assert served[name] == ChatModel.load(selection(folder)).answer(messages, greedy)
    finally:
        live.stop()


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_models) -> Path:
    from preference_sets import preference_dirs

    from tunestack.train.rm import main as rm_main

    root = tmp_path_factory.mktemp("rm")
    train, held = preference_dirs(root / "data")
    out = root / "rm"
    argv = [
        "--model_name_or_path",
        tiny_models["llama"],
        "--train_file_dir",
        train,
        "--validation_file_dir",
        held,
        "--do_train",
        "--output_dir",
        out,
        "--num_train_epochs",
        4,
        "--per_device_train_batch_size",
        8,
        "--learning_rate",
        5e-3,
        "--save_strategy",
        "no",
        "--report_to",
        "none",
    ]
    assert rm_main([str(a) for a in argv]) == 0
    return out


def test_score_ranks_chosen_over_rejected(reward_model, tiny_models) -> None:
    from preference_sets import pairs

    from tunestack.data.preference import parse_preference
    from tunestack.model.reward import load_reward_model, score_responses
    from tunestack.serve.models import RewardScorer

    held = [parse_preference(r) for r in pairs(8, seed=1, offset=3)]
    conversations = []
    for pair in held:
        prompt = [{"role": m.role, "content": m.content} for m in pair.prompt_messages]
        for answer in (pair.chosen, pair.rejected):
            conversations.append([*prompt, {"role": "assistant", "content": answer}])
    live = start_server(
        [("tiny", selection(tiny_models["glm4"]))], engine="generate", reward=RewardScorer(str(reward_model))
    )
    try:
        response = httpx.post(f"{live.url}/v1/score", json={"model": "rm", "conversations": conversations}, timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "rm" and [d["index"] for d in body["data"]] == list(range(len(conversations)))
        scores = [d["score"] for d in body["data"]]
        chosen, rejected = scores[0::2], scores[1::2]
        assert sum(c > r for c, r in zip(chosen, rejected, strict=True)) >= 7
        # The same scores as `tunestack score`'s helper: conversations are scored as the reward model was trained.
        model, tokenizer, template = load_reward_model(reward_model)
        prompts = [(p.system, p.prompt_messages) for p in held]
        assert chosen == pytest.approx(
            score_responses(model, tokenizer, template, prompts, [p.chosen for p in held]), abs=1e-4
        )
        bad = httpx.post(f"{live.url}/v1/score", json={"conversations": [[{"role": "user", "content": "hi"}]]})
        assert bad.status_code == 400
        assert bad.json()["error"]["message"] == "conversations[0]: must end with the assistant answer to score"
        assert httpx.get(f"{live.url}/health").json()["score"] is True
    finally:
        live.stop()


def test_score_without_a_reward_model_is_404(glm4_server) -> None:
    response = httpx.post(f"{glm4_server.url}/v1/score", json={"conversations": [[{"role": "user", "content": "x"}]]})
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "no reward model is loaded (start the server with --reward_model)"
