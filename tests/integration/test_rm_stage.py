"""The reward-model stage on tiny models: it learns a preference rule, both heads save and reload, `score` works."""

from __future__ import annotations

import json

import pytest
import torch
from preference_sets import pairs, preference_dirs, write_jsonl

from tunestack.data.preference import parse_preference
from tunestack.model.reward import load_reward_model, reward_head_for, score_responses


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine is shared
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return preference_dirs(tmp_path_factory.mktemp("prefs"))


def _rm(cli, model, data, out, *extra):
    train, held = data
    return cli(
        "rm", "--model_name_or_path", model, "--train_file_dir", train, "--validation_file_dir", held,
        "--do_train", "--do_eval", "--output_dir", out, "--num_train_epochs", 4, "--per_device_train_batch_size", 8,
        "--learning_rate", 5e-3, "--logging_steps", 2, "--save_strategy", "no", "--report_to", "none", *extra,
    )  # fmt: skip


def _held_out_margin(out) -> tuple[float, float]:
    """(pairwise accuracy, mean margin) of the reloaded reward model on the held-out pairs."""
    model, tokenizer, template = load_reward_model(out)
    held = [parse_preference(r) for r in pairs(16, seed=1, offset=3)]
    prompts = [(p.system, p.prompt_messages) for p in held]
    chosen = score_responses(model, tokenizer, template, prompts, [p.chosen for p in held])
    rejected = score_responses(model, tokenizer, template, prompts, [p.rejected for p in held])
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def test_rm_learns_the_preference_rule(cli, tiny_model, data, tmp_path, monkeypatch):
    from tunestack.train.fast import packed_scores

    packed_calls = []
    original = packed_scores.packed_scores
    monkeypatch.setattr(packed_scores, "packed_scores", lambda *a: packed_calls.append(1) or original(*a))
    out = tmp_path / "rm"
    code, stdout, err = _rm(cli, tiny_model, data, out)
    assert code == 0, err[-2000:]
    assert packed_calls, "training should score padding-free packed rows"
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["stage"] == "rm" and manifest["status"] == "complete"
    assert manifest["reward_head"] == "sequence_classification"
    m = manifest["metrics"]
    assert m["eval_pairwise_accuracy"] >= 0.8
    assert m["eval_mean_margin"] > m["before_eval_mean_margin"] + 1.0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    assert (out / "chat_template.jinja").exists() and (out / "metrics.jsonl").exists()
    assert "held-out pairwise accuracy" in stdout
    # The saved model scored the usual padded way agrees with the packed scores of the training-time eval.
    accuracy, margin = _held_out_margin(out)
    assert accuracy == pytest.approx(m["eval_pairwise_accuracy"]) and margin == pytest.approx(
        m["eval_mean_margin"], abs=1e-4
    )


@pytest.mark.parametrize("method", ["lora", "full"])
def test_value_head_trains_saves_and_reloads(cli, tiny_model, data, tmp_path, method):
    out = tmp_path / "rm"
    extra = ("--use_peft", "false", "--learning_rate", 1e-3) if method == "full" else ()
    code, _, err = _rm(cli, tiny_model, data, out, "--reward_head", "value_head", *extra)
    assert code == 0, err[-2000:]
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["reward_head"] == "value_head"
    assert (out / "value_head.safetensors").exists()
    assert (out / ("adapter_config.json" if method == "lora" else "config.json")).exists()
    m = manifest["metrics"]
    assert m["eval_pairwise_accuracy"] >= 0.8
    # Scores of the reloaded model equal those the trained model gave in memory at the end of training.
    accuracy, margin = _held_out_margin(out)
    assert accuracy == pytest.approx(m["eval_pairwise_accuracy"])
    assert margin == pytest.approx(m["eval_mean_margin"], abs=1e-4)


def test_head_choice_follows_the_architecture(tiny_model):
    from transformers import AutoConfig, PretrainedConfig

    from tunestack.errors import ConfigError

    class ChatGLMLikeConfig(PretrainedConfig):  # remote-code style: no AutoModelForSequenceClassification mapping
        model_type = "chatglm_like_test"

    assert reward_head_for(AutoConfig.from_pretrained(tiny_model)) == "sequence_classification"
    assert reward_head_for(ChatGLMLikeConfig()) == "value_head"
    assert reward_head_for(ChatGLMLikeConfig(auto_map={"AutoModelForSequenceClassification": "m.C"}), "auto", True) == (
        "sequence_classification"
    )
    with pytest.raises(ConfigError, match="value_head"):
        reward_head_for(ChatGLMLikeConfig(), "sequence_classification")


def test_value_head_reads_the_last_real_token_when_pad_is_eos(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunestack.model.value_head import ValueHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    model = ValueHeadModel(AutoModelForCausalLM.from_pretrained(tiny_model)).eval()
    short = tokenizer("Hi<|im_end|>", add_special_tokens=False)["input_ids"]
    long = tokenizer("The heart pumps blood.<|im_end|>", add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id
    ids = torch.tensor([short + [pad] * (len(long) - len(short)), long])
    mask = torch.tensor([[1] * len(short) + [0] * (len(long) - len(short)), [1] * len(long)])
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        alone = model(input_ids=torch.tensor([short]), attention_mask=torch.ones(1, len(short))).logits[0, 0]
    assert batched[0] == pytest.approx(float(alone), abs=1e-5)


def test_rm_on_an_sft_output_and_score_command(cli, tiny_model, data, tmp_path):
    sft_data = write_jsonl(
        tmp_path / "sft" / "a.jsonl",
        [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}] * 8,
    )
    sft = tmp_path / "sft_out"
    code, _, err = cli(
        "sft", "--model_name_or_path", tiny_model, "--train_file_dir", sft_data, "--output_dir", sft, "--max_steps", 2,
        "--learning_rate", 1e-2, "--save_strategy", "no", "--report_to", "none",
    )  # fmt: skip
    assert code == 0, err[-2000:]
    out = tmp_path / "rm"
    code, _, err = _rm(cli, sft, data, out)
    assert code == 0, err[-2000:]
    assert json.loads((out / "run.json").read_text())["base_model"] == str(sft.resolve())
    # Pairs get both scores and a pairwise summary; prompt/response and chat records get one score.
    singles = write_jsonl(
        tmp_path / "single.jsonl",
        [{"prompt": "How can I stay healthy?", "response": "Drink water and sleep well. Stay healthy!"}],
    )
    scores = tmp_path / "scores.jsonl"
    code, _, err = cli(
        "score", "--reward_model", out, "--data_file", f"{data[1]},{singles}", "--output_file", scores,
        "--batch_size", 4,
    )  # fmt: skip
    assert code == 0, err[-2000:]
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert len(rows) == 17
    assert all(r["score_chosen"] - r["score_rejected"] == pytest.approx(r["margin"]) for r in rows[:16])
    assert isinstance(rows[16]["score"], float) and rows[16]["where"].endswith("single.jsonl:1")
    assert "16 pairs: pairwise accuracy" in err and "1 answers" in err
