"""`tunestack chat` and `tunestack infer` on tiny models (the glm4 one answers differently per prompt)."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tunestack.config.infer import GenerationArguments, ModelSelection
from tunestack.errors import DataError
from tunestack.infer import batch, chat
from tunestack.infer.chat import ChatSession
from tunestack.infer.decoding import SAMPLING_KEYS as SAMPLING
from tunestack.infer.generate import ChatModel

GREEDY = GenerationArguments(temperature=0, max_new_tokens=8)
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def chat_model(tiny_models: dict[str, Path]) -> ChatModel:
    return ChatModel.load(ModelSelection(model=str(tiny_models["glm4"])))


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_one_shot_prompt_prints_only_the_answer(tiny_models: dict[str, Path], chat_model: ChatModel, capsys) -> None:
    argv = [
        "--model",
        str(tiny_models["glm4"]),
        "--prompt",
        "Who are you?",
        "--temperature",
        "0",
        "--max_new_tokens",
        "6",
    ]
    assert chat.main(argv) == 0
    out = capsys.readouterr().out
    expected = chat_model.answer(user("Who are you?"), GenerationArguments(temperature=0, max_new_tokens=6))
    assert expected and out == expected + "\n"
    answer_tokens = chat_model.tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert len(answer_tokens) <= 6 + 2  # max_new_tokens bounds it (re-tokenizing may split differently)


def test_generation_stops_at_every_generation_config_eos(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_models["glm4"], model_dir)
    loaded = ChatModel.load(ModelSelection(model=str(model_dir)))
    ids, _ = loaded.prompt_ids(user("What is the capital of France?"), None, 8)
    with torch.inference_mode():
        raw = loaded.model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(ids) :].tolist()
    cut = next(i for i in range(1, len(raw)) if raw[i] not in raw[:i])  # a token not generated before
    eos = loaded.tokenizer.eos_token_id
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [raw[cut], eos]}))

    stopping = ChatModel.load(ModelSelection(model=str(model_dir)))
    assert stopping.stop_ids == [raw[cut], eos]
    answer = stopping.answer(user("What is the capital of France?"), GREEDY)
    assert answer == loaded.tokenizer.decode(raw[:cut], skip_special_tokens=True).strip()


def test_stop_str_cuts_the_answer(chat_model: ChatModel) -> None:
    full = chat_model.answer(user("Who are you?"), GREEDY)
    stop = full[2:4]
    assert stop.strip() and len(full) > 4
    options = GenerationArguments(temperature=0, max_new_tokens=8, stop_str=stop)
    assert chat_model.answer(user("Who are you?"), options) == full.split(stop, 1)[0].strip()


def test_a_model_without_chat_template_needs_a_template_name(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from tunestack.errors import ConfigError

    model_dir = tmp_path / "base-model"
    shutil.copytree(tiny_models["glm4"], model_dir)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="no chat template"):
        ChatModel.load(ModelSelection(model=str(model_dir)))
    named = ChatModel.load(ModelSelection(model=str(model_dir), template_name="chatml"))
    assert (
        named.render(user("Hi"), "Sys")
        == "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert named.stop_ids == [named.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_the_second_prompt_carries_the_first_turn(chat_model: ChatModel) -> None:
    session = ChatSession(chat_model, GenerationArguments(temperature=0, max_new_tokens=6, system_prompt="Be brief."))
    first = session.ask("What is the capital of France?")
    second_prompt = chat_model.tokenizer.decode(session.prompt_ids("Who are you?"))
    assert second_prompt == chat_model.render(
        [*user("What is the capital of France?"), {"role": "assistant", "content": first}, *user("Who are you?")],
        "Be brief.",
    )
    assert "Be brief." in second_prompt and "What is the capital of France?" in second_prompt
    assert session.command("/clear") == "(conversation cleared)" and session.history == []
    assert session.command("/system You are a doctor.") is not None and session.system == "You are a doctor."
    assert "capital" not in chat_model.tokenizer.decode(session.prompt_ids("Who are you?"))
    assert session.command("hello") is None and "unknown command" in str(session.command("/nope"))


def test_old_turns_are_dropped_when_the_context_is_full(chat_model: ChatModel) -> None:
    messages = []
    for i in range(40):
        messages += [*user(f"question {i} about the heart"), {"role": "assistant", "content": f"answer {i} " * 3}]
    messages += user("last question")
    ids, dropped = chat_model.prompt_ids(messages, None, 8)
    assert dropped > 0 and len(ids) <= chat_model.context_length - 8
    assert "last question" in chat_model.tokenizer.decode(ids)


def _read_until(fd: int, buffer: list[str], pattern: str, count: int, timeout: float = 120.0) -> str:
    deadline = time.time() + timeout
    while "".join(buffer).count(pattern) < count:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.time()))
        if not ready:
            raise AssertionError(f"timed out waiting for {pattern!r} #{count}; got:\n{''.join(buffer)}")
        try:
            data = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            data = b""
        if not data:
            raise AssertionError(f"chat ended before {pattern!r} #{count}; got:\n{''.join(buffer)}")
        buffer.append(data.decode("utf-8", errors="replace"))
    return "".join(buffer)


def test_interactive_chat_in_a_terminal(tiny_models: dict[str, Path]) -> None:
    import pty

    main, child = pty.openpty()
    code = "import sys; from tunestack.infer.chat import main; sys.exit(main(sys.argv[1:]))"
    args = ["--model", str(tiny_models["glm4"]), "--max_new_tokens", "4", "--temperature", "0", "--show_prompt"]
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "TERM": "dumb"}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=child, stdout=child, stderr=child, env=env)
    os.close(child)
    buffer: list[str] = []
    try:
        _read_until(main, buffer, "User: ", 1)
        for n, line in enumerate(["What is the capital of France?", "Who are you?", "/clear", "Drink water?"], 2):
            os.write(main, (line + "\n").encode())
            _read_until(main, buffer, "User: ", n)
        os.write(main, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)
    text = "".join(buffer).replace("\r\n", "\n")
    prompts = re.findall(r"--- prompt \(\d+ tokens\) ---\n(.*?)\n--- end of prompt ---", text, re.S)
    assert len(prompts) == 3 and text.count("Assistant: ") == 3
    assert "What is the capital of France?" in prompts[1] and prompts[1].count("<|im_start|>assistant") == 2
    assert "(conversation cleared)" in text
    assert "capital" not in prompts[2] and "Drink water?" in prompts[2]


def test_batch_infer_matches_one_at_a_time(tiny_models: dict[str, Path], chat_model: ChatModel, tmp_path: Path) -> None:
    records = [
        {"prompt": "What is the capital of France?"},
        {"instruction": "Explain this sentence", "input": "The heart pumps blood.", "output": "It is about the heart."},
        {"question": "你是谁？"},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                *user("Hi"),
                {"role": "assistant", "content": "Hello"},
                *user("0 1 2 3 4 5 6 7 8 9"),
            ]
        },
        {"conversations": [{"from": "human", "value": "Aspirin?"}, {"from": "gpt", "value": "It reduces fever."}]},
    ]
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "predictions.jsonl"
    argv = ["--model", str(tiny_models["glm4"]), "--data_file", str(data), "--output_file", str(out)]
    assert batch.main([*argv, "--eval_batch_size", "2", "--temperature", "0", "--max_new_tokens", "8"]) == 0

    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    items = batch.read_prompts(data)
    singles = [chat_model.generate([chat_model.prompt_ids(it.messages, it.system, 8)[0]], GREEDY)[0] for it in items]
    assert [r["response"] for r in rows] == singles
    assert len(set(singles)) > 1, "the answers must depend on the prompt for the comparison to mean anything"
    assert [r["prompt"] for r in rows] == [
        "What is the capital of France?",
        "Explain this sentence\nThe heart pumps blood.",
        "你是谁？",
        "0 1 2 3 4 5 6 7 8 9",
        "Aspirin?",
    ]
    assert rows[1]["reference"] == "It is about the heart." and rows[4]["reference"] == "It reduces fever."
    assert items[3].system == "Be brief." and len(items[3].messages) == 3


def test_infer_reads_text_files_and_names_bad_records(tmp_path: Path) -> None:
    txt = tmp_path / "prompts.txt"
    txt.write_text("first question\n\nsecond question\n", encoding="utf-8")
    assert [i.prompt for i in batch.read_prompts(txt)] == ["first question", "second question"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "ok"}\n{"text": "no prompt here"}\n{"messages": [{"role": "assistant", "content": "x"}]}\n'
    )
    with pytest.raises(DataError) as err:
        batch.read_prompts(bad)
    assert f"{bad}:2: no prompt" in str(err.value) and f"{bad}:3: 'messages' has no user turn" in str(err.value)


@pytest.mark.parametrize(
    ("family", "lora"),
    [("glm4", {}), ("llama", {"target_modules": ["q_proj", "v_proj", "lm_head"]})],  # llama: tied lm_head
)
def test_base_plus_lora_answers_like_the_merged_model(
    tiny_models: dict[str, Path], tmp_path: Path, family: str, lora: dict
) -> None:
    from adapter_fixtures import make_adapter

    from tunestack.model.merge import main as merge_main

    base = tiny_models[family]
    adapter = make_adapter(base, tmp_path / "sft", **lora)
    manifest = json.loads((adapter / "run.json").read_text())
    manifest["options"] = {"data": {"system_prompt": "You are a careful doctor."}}
    (adapter / "run.json").write_text(json.dumps(manifest))
    assert merge_main(["--lora_model", str(adapter), "--output_dir", str(tmp_path / "merged")]) == 0
    question = user("What is the capital of France?")
    stacked = ChatModel.load(ModelSelection(base_model=str(base), lora_model=str(adapter)))
    stage = ChatModel.load(ModelSelection(model=str(adapter)))
    merged = ChatModel.load(ModelSelection(model=str(tmp_path / "merged")))
    plain = ChatModel.load(ModelSelection(model=str(base)))
    answers = [m.answer(question, GREEDY) for m in (stacked, stage, merged)]
    assert answers[0] == answers[1] == answers[2] != plain.answer(question, GREEDY)
    # The system prompt of training is kept by merge and used by chat unless --system_prompt replaces it.
    assert [m.default_system for m in (stacked, stage, merged, plain)] == ["You are a careful doctor."] * 3 + [None]
    session = ChatSession(merged, GREEDY)
    assert "You are a careful doctor." in merged.tokenizer.decode(session.prompt_ids("Hi"))
    replaced = ChatSession(merged, GenerationArguments(temperature=0, max_new_tokens=8, system_prompt=""))
    assert "careful doctor" not in merged.tokenizer.decode(replaced.prompt_ids("Hi"))


def test_flag_problems_are_reported_together() -> None:
    from tunestack.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        batch.main(["--temperature", "-1", "--eval_batch_size", "0", "--top_p", "2"])
    problems = " | ".join(err.value.problems)
    for needle in ("--temperature", "--eval_batch_size", "--top_p", "--data_file is required"):
        assert needle in problems


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france_at_its_default_sampling(smollm2: Path) -> None:
    """No sampling flag: the converted folder's generation_config.json (the model card's values) decides."""
    assert {k: v for k, v in json.loads((smollm2 / "generation_config.json").read_text()).items() if k in SAMPLING} == {
        "do_sample": True,
        "temperature": 0.2,
        "top_p": 0.9,
    }
    argv = ["--model", "smollm2-135m-instruct", "--prompt", "What is the capital of France?", "--seed", "0"]
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.run(
        [sys.executable, "-m", "tunestack", "chat", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
