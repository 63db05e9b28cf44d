"""transformers' own families (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, glm4, glm): SFT with
`--target_modules all`, merge and chat on a tiny model of each, with the family's official chat template.

A chat model of each family must stop: after SFT on one conversation, the merged model answers the question
with exactly the trained answer and then the family's own end-of-turn token, long before max_new_tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import families
import pytest
import torch
from preference_sets import write_jsonl

from tunestack.config.infer import GenerationArguments, ModelSelection
from tunestack.config.model import ModelArguments
from tunestack.infer.generate import ChatModel
from tunestack.model.load import load_model
from tunestack.model.ref import resolve_model
from tunestack.model.tuning import find_linear_names

NAMES = list(families.FAMILIES)
QUESTION, ANSWER = "What is the capital of France?", "Paris is the capital."
MAX_NEW = 20


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: families.build_family_model(root / name, name) for name in NAMES}


@pytest.fixture(scope="module")
def conversation(tmp_path_factory) -> Path:
    rows = [{"conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER}]}] * 8
    return write_jsonl(tmp_path_factory.mktemp("family_data") / "train.jsonl", rows).parent


def _load(folder: Path):
    return load_model(resolve_model(str(folder)), ModelArguments(torch_dtype="float32"))


@pytest.mark.parametrize("name", NAMES)
def test_target_modules_all_is_every_projection_of_the_family(models, name):
    assert find_linear_names(_load(models[name])) == families.FAMILIES[name].linear


def test_the_trained_positions_head_switches_itself_off_for_soft_capped_logits(models):
    from tunestack.train.fast.efficient import supports_trained_positions

    support = {name: supports_trained_positions(_load(models[name])) for name in NAMES}
    assert support == {name: name != "gemma2" for name in NAMES}  # Gemma 2 soft-caps its logits


@pytest.mark.parametrize("name", NAMES)
def test_a_chat_model_of_each_family_stops(models, conversation, name, cli, tmp_path):
    family = families.FAMILIES[name]
    sft, merged = tmp_path / "sft", tmp_path / "merged"
    code, _, err = cli(
        "sft", "--model_name_or_path", models[name], "--train_file_dir", conversation, "--output_dir", sft,
        "--use_peft", "true", "--target_modules", "all", "--lora_rank", 16, "--lora_alpha", 32, "--lora_dropout", 0,
        "--max_steps", 30, "--learning_rate", 1e-2, "--per_device_train_batch_size", 8, "--warmup_steps", 0,
        "--logging_steps", 10, "--save_strategy", "no", "--report_to", "none",
    )  # fmt: skip
    assert code == 0, err[-3000:]
    assert sorted(json.loads((sft / "adapter_config.json").read_text())["target_modules"]) == family.linear
    code, stdout, err = cli("merge", "--lora_model", sft, "--output_dir", merged)
    assert code == 0, err[-3000:]
    assert "check: max |logit difference| vs base + adapter" in stdout

    chat = ChatModel.load(ModelSelection(model=str(merged)))
    tok = chat.tokenizer
    stop = tok.convert_tokens_to_ids(family.stop)
    assert chat.stop_ids[0] == stop  # the family's end of turn comes first in generation_config.json
    eos = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    assert (eos if isinstance(eos, list) else [eos])[0] == stop
    messages = [{"role": "user", "content": QUESTION}]
    prompt, _ = chat.prompt_ids(messages, None, MAX_NEW)
    # The prompt is the family's own template's rendering (BOS once, where the family puts one).
    official = tok.apply_chat_template(messages, chat_template=family.chat_template(), add_generation_prompt=True,
                                       tokenize=False)  # fmt: skip
    assert tok.decode(prompt, skip_special_tokens=False) == official
    new = chat.generate_ids([prompt], chat.generation_config(GenerationArguments(max_new_tokens=MAX_NEW)))[0]
    # It ends with the token that closed the trained answer: the end of turn, or (GLM, whose template writes
    # nothing after the last answer) the EOS, which its generation config lists too.
    assert new[-1] == tok.convert_tokens_to_ids(family.last_stop or family.stop) and len(new) < MAX_NEW, tok.decode(new)
    assert tok.decode(new[:-1], skip_special_tokens=False).strip() == ANSWER
    # The adapter folder answers as the merged model does.
    code, stdout, _ = cli("chat", "--model", sft, "--prompt", QUESTION, "--max_new_tokens", MAX_NEW)
    assert code == 0 and stdout.strip() == ANSWER
    if family.config.get("tie_word_embeddings", True) and name.startswith("gemma"):
        model = chat.model
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


# The named template that renders every probe conversation as the family's own template does (what
# `tunestack export` writes into an Ollama Modelfile); Qwen2.5's is ChatML with its default system prompt. Qwen3's
# renders a thinking block and Phi-3's has no named twin.
NAMED = {"llama": "llama3", "mistral": "mistral", "qwen2": "chatml", "gemma2": "gemma", "gemma3": "gemma",
         "glm4": "glm4", "glm": "glm4"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(NAMED))
def test_the_family_template_has_its_named_twin(models, name):
    from transformers import AutoTokenizer

    from tunestack.data.templates import TokenizerTemplate
    from tunestack.export.ollama import fit_named_template

    tok = AutoTokenizer.from_pretrained(models[name])
    fitted = fit_named_template(TokenizerTemplate(tok.chat_template), tok)
    assert fitted.name == NAMED[name]
    if name == "qwen2":
        assert fitted.default_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
