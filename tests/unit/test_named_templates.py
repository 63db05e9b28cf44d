"""Every named template renders byte for byte what its family's own code or official chat template renders.

The expected strings are written out by hand from each family's documentation (named beside each); where the
official jinja template is at hand (TRL ships copies of several), rendering it must give the same text too.
Each case: the text before the model answers (system prompt if the family has one, a first exchange, a second
question), the whole conversation with a second answer as training sees it, and what of it is trained.
"""

from __future__ import annotations

import copy
from importlib import resources

import pytest
from transformers import AutoTokenizer

from tunestack.data.formats import Conversation, Message
from tunestack.data.templates import (
    conversation_segments,
    get_template,
    jinja_chat_template,
    render_prompt,
    stop_token_ids,
    template_names,
)

SYSTEM = "You are a helpful assistant"
EXCHANGE = (Message("user", "Hello"), Message("assistant", "Hi there"), Message("user", "Who are you"))
LAST = "I am an assistant"

# name: (bos, eos, system used, expected generation prompt, expected end of the whole conversation, trained texts)
CASES = {
    # THUDM/chatglm2-6b tokenization_chatglm.py build_prompt, after get_prefix_tokens() = [gMASK] sop;
    # ptuning/main.py trains prompt + answer + EOS.
    "chatglm2": (
        None,
        "</s>",
        None,
        "[gMASK]sop[Round 1]\n\n问：Hello\n\n答：Hi there\n\n[Round 2]\n\n问：Who are you\n\n答：",
        "答：I am an assistant</s>",
        ["Hi there", "I am an assistant</s>"],
    ),
    # THUDM/chatglm3-6b tokenizer_config.json chat_template; finetune_demo trains each reply with the token after
    # it (the next <|user|>) and ends the conversation with the EOS.
    "chatglm3": (
        None,
        "</s>",
        SYSTEM,
        "[gMASK]sop<|system|>\n You are a helpful assistant<|user|>\n Hello<|assistant|>\n Hi there"
        "<|user|>\n Who are you<|assistant|>",
        "<|assistant|>\n I am an assistant</s>",
        ["\n Hi there<|user|>", "\n I am an assistant</s>"],
    ),
    # THUDM/glm-4-9b-chat tokenizer_config.json chat_template (no tools, no metadata); its fine-tuning trains the
    # <|user|> after each reply, appended after the last one.
    "glm4": (
        None,
        "<|endoftext|>",
        SYSTEM,
        "[gMASK]<sop><|system|>\nYou are a helpful assistant<|user|>\nHello<|assistant|>\nHi there<|user|>\n"
        "Who are you<|assistant|>",
        "<|assistant|>\nI am an assistant<|user|>",
        ["\nHi there<|user|>", "\nI am an assistant<|user|>"],
    ),
    # internlm/internlm2-chat-7b modeling_internlm2.py build_inputs (and its chat_template).
    "intern2": (
        "<s>",
        "</s>",
        SYSTEM,
        "<s><|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>assistant\nI am an assistant<|im_end|>\n",
        ["Hi there<|im_end|>", "I am an assistant<|im_end|>"],
    ),
    # baichuan-inc/Baichuan2-7B-Chat generation_utils.py build_chat_input (user_token_id 195 = <reserved_106>,
    # assistant_token_id 196 = <reserved_107>, no EOS in the history); fine-tune.py appends the EOS.
    "baichuan2": (
        None,
        "</s>",
        SYSTEM,
        "You are a helpful assistant<reserved_106>Hello<reserved_107>Hi there<reserved_106>Who are you<reserved_107>",
        "<reserved_107>I am an assistant</s>",
        ["Hi there", "I am an assistant</s>"],
    ),
    # Qwen/Qwen2-7B-Instruct tokenizer_config.json chat_template.
    "qwen": (
        None,
        "<|endoftext|>",
        SYSTEM,
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>assistant\nI am an assistant<|im_end|>\n",
        ["Hi there<|im_end|>", "I am an assistant<|im_end|>"],
    ),
    # meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json chat_template.
    "llama3": (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        SYSTEM,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
        "\n\nHi there<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|start_header_id|>assistant<|end_header_id|>\n\nI am an assistant<|eot_id|>",
        ["Hi there<|eot_id|>", "I am an assistant<|eot_id|>"],
    ),
    # mistralai/Mistral-7B-Instruct-v0.2 tokenizer_config.json chat_template (it has no system role).
    "mistral": (
        "<s>",
        "</s>",
        None,
        "<s>[INST] Hello [/INST]Hi there</s>[INST] Who are you [/INST]",
        "[/INST]I am an assistant</s>",
        ["Hi there</s>", "I am an assistant</s>"],
    ),
    # google/gemma-3-*-it tokenizer_config.json chat_template (the system prompt opens the first user turn;
    # Gemma and Gemma 2 render the same without one).
    "gemma": (
        "<bos>",
        "<eos>",
        SYSTEM,
        "<bos><start_of_turn>user\nYou are a helpful assistant\n\nHello<end_of_turn>\n<start_of_turn>model\n"
        "Hi there<end_of_turn>\n<start_of_turn>user\nWho are you<end_of_turn>\n<start_of_turn>model\n",
        "<start_of_turn>model\nI am an assistant<end_of_turn>\n",
        ["Hi there<end_of_turn>", "I am an assistant<end_of_turn>"],
    ),
    # FastChat conversation.py vicuna_v1.1 (ADD_COLON_TWO, sep " ", sep2 "</s>") with its system message.
    "vicuna": (
        "<s>",
        "</s>",
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions.",
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Hello ASSISTANT: Hi there</s>"
        "USER: Who are you ASSISTANT:",
        "ASSISTANT: I am an assistant</s>",
        [" Hi there</s>", " I am an assistant</s>"],
    ),
}

# tatsu-lab/stanford_alpaca train.py: PROMPT_DICT["prompt_no_input"], then the output and the EOS (one turn).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nHello\n\n### Response:"
)

# Official jinja templates not shipped with TRL, as their tokenizer_config.json files hold them.
CHATGLM3_JINJA = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n {{ message['content'] }}"
    "{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MISTRAL_JINJA = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
INTERNLM2_JINJA = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _trl_template(name: str) -> str | None:
    path = resources.files("trl").joinpath("chat_templates", f"{name}.jinja")
    return path.read_text(encoding="utf-8") if path.is_file() else None


# name: (official jinja, the system prompts to compare with). Mistral's template has no system role; InternLM2's
# jinja adds no system prompt where its own chat() code adds its meta instruction (which the template follows).
OFFICIAL_JINJA = {
    "chatglm3": (CHATGLM3_JINJA, (SYSTEM, None)),
    "mistral": (MISTRAL_JINJA, (None,)),
    "intern2": (INTERNLM2_JINJA, (SYSTEM,)),
    "qwen": (QWEN2_JINJA, (SYSTEM, None)),
    "llama3": (_trl_template("llama3"), (SYSTEM, None)),
    "gemma": (_trl_template("gemma3"), (SYSTEM, None)),
}


@pytest.fixture(scope="module")
def base_tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def tokenizer_for(base, name: str, bos: str | None, eos: str):
    """The tiny tokenizer with the template's special tokens, BOS and EOS."""
    tok = copy.deepcopy(base)
    template = get_template_unchecked(name)
    tok.add_tokens([*template.special_tokens, *(t for t in (bos, eos) if t)], special_tokens=True)
    tok.bos_token, tok.eos_token = bos, eos
    return tok


def get_template_unchecked(name: str):
    from tunestack.data.templates import named_templates

    return named_templates()[name]


def messages_of(system: str | None, messages) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": m.role, "content": m.content} for m in messages]


def test_every_named_template_has_a_case():
    assert set(template_names()) == {*(get_template_unchecked(n).name for n in CASES), "alpaca", "chatml", "qwen2.5"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_named_template_renders_like_the_family(base_tokenizer, name):
    bos, eos, system, prompt, ending, trained = CASES[name]
    tok = tokenizer_for(base_tokenizer, name, bos, eos)
    template = get_template(name, tok)
    assert render_prompt(template, tok, EXCHANGE, system) == prompt
    whole = Conversation(system, (*EXCHANGE, Message("assistant", LAST)))
    segments = conversation_segments(template, tok, whole)
    text = "".join(s.text for s in segments)
    assert text.startswith(prompt) and text.endswith(ending) and text == prompt + text[len(prompt) :]
    assert [s.text for s in segments if s.trainable] == trained
    # The jinja template saved with the tokenizer renders the same, prompt and whole conversation.
    jinja = jinja_chat_template(template)
    dicts = messages_of(system, whole.messages)
    assert (
        tok.apply_chat_template(dicts[:-1], chat_template=jinja, tokenize=False, add_generation_prompt=True) == prompt
    )
    assert tok.apply_chat_template(dicts, chat_template=jinja, tokenize=False) == text
    # Generation stops at the trained stop token (the first of the stop ids written to generation_config.json).
    stops = [tok.decode([i]) for i in stop_token_ids(template, tok)]
    assert stops[0] == template.stop_strings(tok)[0] and trained[0].endswith(stops[0]) or not template.stop_in_history


@pytest.mark.parametrize("name", sorted(OFFICIAL_JINJA))
def test_named_template_equals_the_official_jinja(base_tokenizer, name):
    official, systems = OFFICIAL_JINJA[name]
    if official is None:
        pytest.skip(f"this TRL version ships no copy of the {name} template")
    bos, eos, system, prompt, _, _ = CASES[name]
    tok = tokenizer_for(base_tokenizer, name, bos, eos)
    template = get_template(name, tok)
    for system in systems:
        dicts = messages_of(system, EXCHANGE)
        expected = tok.apply_chat_template(dicts, chat_template=official, tokenize=False, add_generation_prompt=True)
        assert render_prompt(template, tok, EXCHANGE, system) == expected, system


def test_default_system_prompts_are_the_families(base_tokenizer):
    """Without a system prompt: InternLM2's own chat() meta instruction, Qwen2's and Qwen2.5's defaults."""
    intern = tokenizer_for(base_tokenizer, "intern2", "<s>", "</s>")
    text = render_prompt(get_template("intern2", intern), intern, EXCHANGE[:1])
    assert text.startswith("<s><|im_start|>system\nYou are an AI assistant whose name is InternLM (书生·浦语).\n")
    assert text.endswith("English and 中文.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    qwen = tokenizer_for(base_tokenizer, "qwen", None, "<|endoftext|>")
    assert render_prompt(get_template("qwen", qwen), qwen, EXCHANGE[:1]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    official = _trl_template("qwen2_5")
    q25 = get_template("qwen2.5", qwen)
    text = render_prompt(q25, qwen, EXCHANGE[:1])
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    if official is not None:
        dicts = messages_of(None, EXCHANGE)
        assert render_prompt(q25, qwen, EXCHANGE) == qwen.apply_chat_template(
            dicts, chat_template=official, tokenize=False, add_generation_prompt=True
        )


def test_alpaca_is_stanford_alpacas_prompt(base_tokenizer):
    tok = tokenizer_for(base_tokenizer, "alpaca", "<s>", "</s>")
    template = get_template("alpaca", tok)
    assert render_prompt(template, tok, EXCHANGE[:1]) == ALPACA_PROMPT
    segments = conversation_segments(template, tok, Conversation(None, EXCHANGE[:2]))
    # (the separator of a next exchange follows the EOS, untrained)
    assert "".join(s.text for s in segments) == ALPACA_PROMPT + "Hi there</s>\n\n"
    assert [s.text for s in segments if s.trainable] == ["Hi there</s>"]


def test_chatglm2_rounds_restart_when_old_turns_are_dropped(base_tokenizer):
    tok = tokenizer_for(base_tokenizer, "chatglm2", None, "</s>")
    template = get_template("chatglm2", tok)
    assert render_prompt(template, tok, EXCHANGE[2:]) == "[gMASK]sop[Round 1]\n\n问：Who are you\n\n答："


def test_glm_stop_tokens_are_the_ones_the_families_stop_at(base_tokenizer):
    """GLM-4's generation_config stops at <|endoftext|>, <|user|> and <|observation|>; ChatGLM3's at </s>,
    <|user|> and <|observation|>: the trained stop first."""
    glm4 = tokenizer_for(base_tokenizer, "glm4", None, "<|endoftext|>")
    glm4.add_tokens(["<|observation|>"], special_tokens=True)
    ids = stop_token_ids(get_template("glm4", glm4), glm4)
    assert [glm4.decode([i]) for i in ids] == ["<|user|>", "<|observation|>", "<|endoftext|>"]
    glm3 = tokenizer_for(base_tokenizer, "chatglm3", None, "</s>")
    glm3.add_tokens(["<|observation|>"], special_tokens=True)
    ids = stop_token_ids(get_template("chatglm3", glm3), glm3)
    assert [glm3.decode([i]) for i in ids] == ["<|user|>", "</s>", "<|observation|>"]
