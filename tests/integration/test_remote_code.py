"""Remote-code models (their own configuration_*.py / modeling_*.py, `--trust_remote_code true`) through every stage.

The fixtures (tests/fixtures/remote_models.py) reproduce the quirks that stop toolkits: ChatGLM's missing
embedding accessors, output layer at `transformer.output_layer`, sequence-first hidden states, a tokenizer whose
`_pad` predates `padding_side`, no sequence-classification class; InternLM2's fused `wqkv` and `w1/w2/w3`;
Baichuan's `W_pack` and NormHead output layer. Each test first shows the wall in plain transformers where there is
one, then what tunestack does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import remote_models
import torch
from preference_sets import pairs, preference_dirs, write_jsonl

from tunestack.config.model import ModelArguments
from tunestack.data.formats import Conversation, Message
from tunestack.data.supervised import IGNORE_INDEX, encode_conversation
from tunestack.data.templates import get_template
from tunestack.model.load import load_model, load_tokenizer
from tunestack.model.ref import resolve_model
from tunestack.model.tuning import find_linear_names

FAMILIES = remote_models.FAMILIES
TEMPLATE = {"chatglm": [], "internlm2": [], "baichuan": ["--template_name", "baichuan2"]}
TRUST = ("--trust_remote_code", "true")
CONV = Conversation(
    None,
    (
        Message("user", "What is the capital of France?"),
        Message("assistant", "Paris."),
        Message("user", "Who are you?"),
        Message("assistant", "I am an assistant."),
    ),
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("remote")
    built = {f: remote_models.build_remote_model(root / f, f) for f in FAMILIES}
    built["chatglm-automodel"] = remote_models.build_remote_model(
        root / "chatglm-automodel", "chatglm", causal_lm=False
    )
    return built


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("remote_data")
    turns = [("What is the capital of France?", "Paris."), ("Who are you?", "I am an assistant."),
             ("心脏的作用是什么？", "心脏把血液输送到全身。"), ("What does aspirin do?", "Aspirin reduces fever.")]  # fmt: skip
    sft = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in turns] * 4
    prompts = [{"prompt": q} for q, _ in turns]
    train, held = preference_dirs(root / "pairs", n_train=24, n_eval=16)
    return {
        "sft": write_jsonl(root / "sft" / "train.jsonl", sft).parent,
        "pt": write_jsonl(root / "pt" / "docs.jsonl", [{"text": " ".join(a for _, a in turns)}] * 20).parent,
        "prompts": write_jsonl(root / "prompts" / "p.jsonl", prompts).parent,
        "pairs": train,
        "held": held,
    }


def _args(**kwargs) -> ModelArguments:
    return ModelArguments(torch_dtype="float32", trust_remote_code=True, **kwargs)


# ---------------------------------------------------------------------------------------------- loading


def test_a_tokenizer_whose_pad_predates_padding_side_pads_either_side(models):
    from transformers import AutoTokenizer

    folder = models["chatglm"]
    with pytest.raises(TypeError, match="unexpected keyword argument 'padding_side'"):
        AutoTokenizer.from_pretrained(folder, trust_remote_code=True)("Hello")  # the wall, in plain transformers
    tok = load_tokenizer(resolve_model(str(folder)), trust_remote_code=True)
    short, long = tok.encode("Hi", add_special_tokens=False), tok.encode("Who are you?", add_special_tokens=False)
    assert tok("Hi")["input_ids"] == tok.get_prefix_tokens() + short  # ChatGLM's [gMASK] sop prefix
    pad, n = tok.pad_token_id, len(long) - len(short)
    left = tok(["Hi", "Who are you?"], add_special_tokens=False, padding=True)  # its own side: ChatGLM's own _pad
    assert left["input_ids"][0] == [pad] * n + short and left["attention_mask"][0] == [0] * n + [1] * len(short)
    assert left["position_ids"][0] == [0] * n + list(range(len(short)))
    right = tok.pad({"input_ids": [short, long]}, padding=True, padding_side="right")  # the other side: padded by us
    assert right["input_ids"][0] == short + [pad] * n and right["attention_mask"][0] == [1] * len(short) + [0] * n
    assert right["position_ids"][0] == list(range(len(short))) + [0] * n
    assert right["input_ids"][1] == long and right["attention_mask"][1] == [1] * len(long)


def test_a_model_without_embedding_accessors_gets_them(models):
    from transformers import AutoModelForCausalLM

    folder = models["chatglm"]
    plain = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    with pytest.raises(NotImplementedError, match="get_input_embeddings"):
        plain.get_input_embeddings()  # the wall: PEFT, the Trainer and resizing all call it
    assert plain.get_output_embeddings() is None
    tok = load_tokenizer(resolve_model(str(folder)), trust_remote_code=True)
    model = load_model(resolve_model(str(folder)), _args(), tokenizer=tok)
    assert model.get_input_embeddings() is model.transformer.embedding.word_embeddings
    assert model.get_output_embeddings() is model.transformer.output_layer
    assert model.transformer.get_input_embeddings() is model.transformer.embedding.word_embeddings
    # Resizing goes through the setters: the padded vocabulary (392 rows) grows to the next multiple of 8.
    tok.add_tokens([f"<extra_{i}>" for i in range(10)], special_tokens=True)
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=8)
    assert model.transformer.embedding.word_embeddings.num_embeddings == 400
    assert model.transformer.output_layer.weight.shape[0] == 400


def test_auto_map_without_a_causal_lm_entry_loads_through_automodel(models):
    from transformers import AutoModelForCausalLM

    folder = models["chatglm-automodel"]
    assert "AutoModelForCausalLM" not in json.loads((folder / "config.json").read_text())["auto_map"]
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    model = load_model(resolve_model(str(folder)), _args())
    assert type(model).__name__ == "ChatGLMForConditionalGeneration" and model.can_generate()


def test_without_trust_remote_code_the_error_names_the_code(models, cli):
    code, _, err = cli("sft", "--model_name_or_path", models["internlm2"], "--train_file_dir", "-", "--output_dir", "x")
    assert code == 2
    assert err.strip().endswith(
        f"{models['internlm2']} loads through its own Python code (configuration_internlm2.py, modeling_internlm2.py); "
        "read it, then pass --trust_remote_code true to run it"
    )


def test_trust_remote_code_announces_whose_code_runs(models, tmp_path, caplog):
    folder = shutil.copytree(models["chatglm"], tmp_path / "glm")
    with caplog.at_level("WARNING", logger="tunestack"):
        load_tokenizer(resolve_model(str(folder)), trust_remote_code=True)
    assert (
        f"--trust_remote_code: running the code of {folder.resolve()} "
        "(configuration_chatglm.py, modeling_chatglm.py, tokenization_chatglm.py)"
    ) in caplog.text


@pytest.mark.parametrize(
    "family, linear",
    [
        ("chatglm", ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]),
        ("internlm2", ["w1", "w2", "w3", "wo", "wqkv"]),
        ("baichuan", ["W_pack", "down_proj", "gate_proj", "o_proj", "up_proj"]),
    ],
)
def test_target_modules_all_finds_the_fused_projections(models, family, linear):
    model = load_model(resolve_model(str(models[family])), _args())
    assert find_linear_names(model) == linear  # never the output layer (an nn.Linear for ChatGLM and InternLM2)


# ---------------------------------------------------------------------------------------------- data

# The family's template: the tokenizer's own for ChatGLM (ChatGLM3's) and InternLM2, baichuan2 for Baichuan.
EXPECTED = {
    "chatglm": (
        "[gMASK]sop<|user|>\n What is the capital of France?<|assistant|>\n Paris.<|user|>\n Who are you?"
        "<|assistant|>\n I am an assistant.</s>",
        "\n Paris.<|user|>\n I am an assistant.</s>",
    ),
    "internlm2": (
        "<s><|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\nI am an assistant.<|im_end|>\n",
        "Paris.<|im_end|>I am an assistant.<|im_end|>",
    ),
    "baichuan": (
        "<reserved_106>What is the capital of France?<reserved_107>Paris.<reserved_106>Who are you?"
        "<reserved_107>I am an assistant.</s>",
        "Paris.I am an assistant.</s>",
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_labels_cover_exactly_the_answers_under_the_family_template(models, family):
    tok = load_tokenizer(resolve_model(str(models[family])), trust_remote_code=True)
    template = get_template(TEMPLATE[family][-1] if TEMPLATE[family] else None, tok)
    features = encode_conversation(CONV, tok, template, max_length=512)
    text, trained = EXPECTED[family]
    assert tok.decode(features["input_ids"], skip_special_tokens=False) == text
    kept = [i for i, label in zip(features["input_ids"], features["labels"], strict=True) if label != IGNORE_INDEX]
    assert tok.decode(kept, skip_special_tokens=False) == trained


def test_packed_rows_would_mix_samples_so_sft_pads(models, data, cli, tmp_path):
    """The fixture attends across samples packed into one row (as remote code does): tunestack pads instead."""
    model = load_model(resolve_model(str(models["internlm2"])), _args()).eval()
    a, b = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9, 10, 11]])
    alone = model(input_ids=b).logits[0]
    packed = model(input_ids=torch.cat([a, b], 1), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3]])).logits[0, 3:]
    assert not torch.allclose(alone, packed, atol=1e-4)
    out = tmp_path / "sft"
    code, _, err = cli("sft", "--model_name_or_path", models["internlm2"], *TRUST, "--train_file_dir", data["sft"],
                       "--max_steps", 1, "--output_dir", out, "--report_to", "none")  # fmt: skip
    assert code == 0, err[-2000:]
    assert json.loads((out / "run.json").read_text())["options"]["train"]["padding_free"] is False


# ---------------------------------------------------------------------------------------------- stages


def _stage(cli, stage, model, data_dir, out, family, *extra):
    code, stdout, err = cli(
        stage, "--model_name_or_path", model, *TRUST, *TEMPLATE[family], "--train_file_dir", data_dir,
        "--output_dir", out, "--per_device_train_batch_size", 2, "--learning_rate", 1e-3, "--logging_steps", 1,
        "--save_strategy", "no", "--report_to", "none", *extra,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete"
    losses = [row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in row]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    return run


@pytest.fixture(scope="module")
def trained(models, data, tmp_path_factory):
    """{family: {stage: output folder}} after pt, sft, rm, dpo and ppo on each family (LoRA, 2 steps each)."""
    from cli_runner import run_cli

    root = tmp_path_factory.mktemp("remote_runs")

    def cli(*argv):
        return run_cli(list(argv)), "", ""

    outs: dict[str, dict[str, Path]] = {}
    for family in FAMILIES:
        o = {s: root / f"{family}-{s}" for s in ("pt", "sft", "rm", "dpo", "ppo")}
        base = models[family]
        for stage, model, data_dir, extra in (
            ("pt", base, data["pt"], ("--block_size", 32)),
            ("sft", base, data["sft"], ()),
            ("rm", o["sft"], data["pairs"], ()),
            ("dpo", o["sft"], data["pairs"], ()),
        ):
            code, _, _ = cli(stage, "--model_name_or_path", model, *TRUST, *([] if stage == "pt" else TEMPLATE[family]),
                             "--train_file_dir", data_dir, "--output_dir", o[stage], "--max_steps", 2,
                             "--per_device_train_batch_size", 2, "--logging_steps", 1, "--save_strategy", "no",
                             "--report_to", "none", *extra)  # fmt: skip
            assert code == 0, f"{family} {stage}"
        code, _, _ = cli("rl", "--algo", "ppo", "--model_name_or_path", o["sft"], "--reward_model", o["rm"], *TRUST,
                         *TEMPLATE[family], "--train_file_dir", data["prompts"], "--output_dir", o["ppo"],
                         "--max_steps", 2, "--batch_size", 2, "--mini_batch_size", 1, "--ppo_epochs", 1,
                         "--max_target_length", 6, "--logging_steps", 1, "--report_to", "none")  # fmt: skip
        assert code == 0, f"{family} ppo"
        outs[family] = o
    return outs


@pytest.mark.parametrize("family", FAMILIES)
def test_every_training_stage_runs(trained, family):
    for stage, out in trained[family].items():
        run = json.loads((out / "run.json").read_text())
        assert run["status"] == "complete", (family, stage)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        values = [r.get("loss", r.get("value_loss")) for r in rows]
        assert any(v is not None for v in values), (family, stage)
        assert all(torch.isfinite(torch.tensor(float(v))) for v in values if v is not None), (family, stage)
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA", (family, stage)
    assert json.loads((trained[family]["rm"] / "run.json").read_text())["reward_head"] == "value_head"


def test_a_chatglm_value_head_reward_model_learns_and_scores_any_padding(models, data, cli, tmp_path):
    """No sequence-classification class and sequence-first hidden states: the value head reads each sequence's last
    real token, so it learns the preference rule, and a score does not depend on what it is batched with."""
    from tunestack.data.preference import parse_preference
    from tunestack.model.reward import load_reward_model, score_responses

    sft = tmp_path / "sft"
    _stage(cli, "sft", models["chatglm"], data["sft"], sft, "chatglm", "--max_steps", 1)
    out = tmp_path / "rm"
    run = _stage(cli, "rm", sft, data["pairs"], out, "chatglm", "--num_train_epochs", 6, "--learning_rate", 5e-3,
                 "--per_device_train_batch_size", 8)  # fmt: skip
    assert run["reward_head"] == "value_head"
    model, tok, template = load_reward_model(out, trust_remote_code=True)
    held = [parse_preference(r) for r in pairs(16, seed=1, offset=3)]
    prompts = [(p.system, p.prompt_messages) for p in held]
    chosen = score_responses(model, tok, template, prompts, [p.chosen for p in held], batch_size=16)
    rejected = score_responses(model, tok, template, prompts, [p.rejected for p in held], batch_size=16)
    assert sum(c > r for c, r in zip(chosen, rejected, strict=True)) >= 14
    alone = [score_responses(model, tok, template, [prompts[i]], [held[i].chosen], batch_size=1)[0] for i in range(4)]
    assert alone == pytest.approx(chosen[:4], abs=1e-5)


# ---------------------------------------------------------------------------------------------- merge and use


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_copies_the_code_and_reproduces_base_plus_adapter(trained, models, family, cli, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft, out = trained[family]["sft"], tmp_path / "merged"
    code, _, err = cli("merge", "--lora_model", sft, *TRUST, "--output_dir", out)
    assert code == 0, err[-2000:]
    shipped = {p.name for p in models[family].glob("*.py")}
    assert shipped <= {p.name for p in out.glob("*.py")}
    assert (
        json.loads((out / "config.json").read_text())["auto_map"]
        == json.loads((models[family] / "config.json").read_text())["auto_map"]
    )
    # Plain transformers loads the merged folder, and its logits are those of base + adapter.
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    if family == "chatglm":
        from tunestack.model.compat import fix_tokenizer_pad

        fix_tokenizer_pad(tok)
    merged = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(models[family], trust_remote_code=True, dtype=torch.float32)
    live = PeftModel.from_pretrained(base, sft).eval()
    ids = torch.tensor([tok("病人发烧了，应该怎么办？ What should they do?", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected, got = live(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert tok.chat_template == AutoTokenizer.from_pretrained(sft, trust_remote_code=True).chat_template


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_infer_and_serve_answer_alike(trained, data, family, cli, tmp_path):
    from live_server import selection, start_server

    from tunestack.config.infer import GenerationArguments
    from tunestack.infer.generate import ChatModel

    sft = trained[family]["sft"]
    template = TEMPLATE[family]
    prompts = ["Who are you?", "What is the capital of France?"]
    answers = []
    for prompt in prompts:
        code, stdout, err = cli("chat", "--model", sft, *TRUST, *template, "--prompt", prompt, "--max_new_tokens", 6)
        assert code == 0, err[-2000:]
        answers.append(stdout.strip())
    assert len(set(answers)) == 2, "the answers must depend on the prompt for the comparisons to mean anything"
    # Batched and left padded, without a KV cache for code that predates transformers' cache.
    questions = write_jsonl(tmp_path / "q.jsonl", [{"instruction": p} for p in prompts])
    code, _, err = cli("infer", "--model", sft, *TRUST, *template, "--data_file", questions, "--output_file",
                       tmp_path / "a.jsonl", "--max_new_tokens", 6, "--eval_batch_size", 2)  # fmt: skip
    assert code == 0, err[-2000:]
    batched = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [row["response"] for row in batched] == answers
    name = template[-1] if template else None
    chat_model = ChatModel.load(selection(sft, trust_remote_code=True, template_name=name))
    assert (
        chat_model.answer([{"role": "user", "content": prompts[0]}], GenerationArguments(max_new_tokens=6))
        == (answers[0])
    )
    live = start_server([("m", selection(sft, trust_remote_code=True, template_name=name))])
    try:
        reply = live.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompts[0]}], max_tokens=6, temperature=0
        )
    finally:
        live.stop()
    assert reply.choices[0].message.content == answers[0]


def test_export_writes_safetensors_and_refuses_gguf_with_a_reason(trained, models, cli, tmp_path):
    from transformers import AutoModelForCausalLM

    sft = trained["chatglm"]["sft"]
    code, _, err = cli("export", "--model", sft, *TRUST, "--format", "gguf", "--output_dir", tmp_path / "gguf")
    assert code == 2
    assert "GGUF export does not support the architecture 'chatglm' (ChatGLMForConditionalGeneration)" in err
    assert "`--format safetensors` exports any model" in err
    assert not any((tmp_path / "gguf").glob("*.gguf"))
    code, _, err = cli("export", "--model", sft, *TRUST, "--format", "safetensors", "--output_dir", tmp_path / "hf")
    assert code == 0, err[-2000:]
    assert (tmp_path / "hf" / "modeling_chatglm.py").is_file() and (
        tmp_path / "hf" / "tokenization_chatglm.py"
    ).is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert type(model).__name__ == "ChatGLMForConditionalGeneration"


def test_what_has_no_remote_code_form_is_refused_in_one_line(trained, data, cli, tmp_path):
    code, _, err = cli("merge", "--lora_model", trained["chatglm"]["rm"], *TRUST, "--output_dir", tmp_path / "m")
    assert code == 2
    assert "is a value-head reward model (its family has no sequence-classification class)" in err
    out = tmp_path / "grpo"
    code, _, err = cli("rl", "--algo", "grpo", "--model_name_or_path", trained["chatglm"]["sft"], *TRUST,
                       "--train_file_dir", data["prompts"], "--reward_funcs", "rewards:letter_a", "--output_dir", out)  # fmt: skip
    assert code == 2
    assert err.strip().endswith("ChatGLMConfig is the model's own code: use --algo ppo")
    assert not (tmp_path / "m").exists() and not out.exists()


def test_a_copy_of_the_fixed_tokenizer_pads_as_itself(models):
    import copy

    tok = load_tokenizer(resolve_model(str(models["chatglm"])), trust_remote_code=True)
    twin = copy.deepcopy(tok)
    twin.pad_token = "</s>"  # the copy pads with its own pad token, on the side asked
    padded = twin.pad({"input_ids": [[5], [5, 6]]}, padding=True, padding_side="right")
    assert padded["input_ids"][0] == [5, twin.convert_tokens_to_ids("</s>")]
    assert tok.pad({"input_ids": [[5], [5, 6]]}, padding=True, padding_side="right")["input_ids"][0] == [
        5,
        tok.convert_tokens_to_ids("<unk>"),
    ]
