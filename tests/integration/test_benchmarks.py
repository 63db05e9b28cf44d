"""Multiple-choice benchmarks in `tunestack eval`: each layout parses; letter and cloze scores equal a direct
computation on a tiny model (with padding in the batch); a model trained on a set's answers scores 1.0 on it
while an untrained one is near chance; eval.json rows and the printed table."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import benchmark_sets as sets
import pytest
import tiny
import torch

from tunestack.config.infer import ModelSelection
from tunestack.errors import DataError
from tunestack.eval.benchmarks import build_prompt, detect_layout, join_repeated, read_benchmark
from tunestack.eval.mcq import PromptEncoder, letter_token_ids, score_benchmarks
from tunestack.infer.generate import ChatModel


@pytest.fixture(scope="module")
def mcq_model(tmp_path_factory) -> Path:
    """A tiny random llama whose tokenizer has both 'A' and ' A' (as 'ĠA') tokens, like real BPE tokenizers."""
    root = tmp_path_factory.mktemp("mcq_model")
    extra = tuple(f"Answer: {letter}" for letter in "ABCD") * 5
    tiny.build_tokenizer(root / "tok", extra_corpus=extra)
    return tiny.build_model(root / "model", "llama", tokenizer_dir=root / "tok")


@pytest.fixture(scope="module")
def chat(mcq_model) -> ChatModel:
    return ChatModel.load(ModelSelection(model=str(mcq_model), torch_dtype="float32"))


# -- layouts -----------------------------------------------------------------------------------


def test_mmlu_layout_parses_and_prompts_like_mmlu(tmp_path):
    bench = read_benchmark(sets.write_mmlu(tmp_path / "mmlu"))
    assert (bench.layout, bench.lang, bench.split) == ("mmlu", "en", "test")
    assert [(s.name, s.display, len(s.questions), len(s.shots)) for s in bench.subjects] == [
        ("astronomy", "astronomy", 4, 3),
        ("home_cooking", "home cooking", 3, 2),
    ]
    q = bench.subjects[0].questions[3]
    assert (q.question, q.choices, q.answer) == (
        "What causes day and night?",
        ["The Moon", "Clouds", "Comets", "The Earth's rotation"],
        3,
    )
    assert q.where.endswith("test/astronomy_test.csv:4")
    prompt = build_prompt(bench.subjects[1], bench.subjects[1].questions[0], 5, "en", "letter")
    assert prompt == (
        "The following are multiple choice questions (with answers) about home cooking.\n\n"
        "What do you boil pasta in?\nA. Oil\nB. Water\nC. Milk\nD. Sand\nAnswer: B\n\n"
        "Which tool cuts bread?\nA. A knife\nB. A spoon\nC. A cup\nD. A plate\nAnswer: A\n\n"
        "Which of these is a spice?\nA. Pepper\nB. Glass\nC. Paper\nD. Stone\nAnswer:"
    )
    assert build_prompt(bench.subjects[1], bench.subjects[1].questions[0], 0, "en", "cloze") == (
        "The following are multiple choice questions (with answers) about home cooking.\n\n"
        "Which of these is a spice?\nAnswer:"
    )
    assert read_benchmark(tmp_path / "mmlu", split="val").size == 1


def test_ceval_layout_skips_the_test_split_without_answers(tmp_path):
    bench = read_benchmark(sets.write_ceval(tmp_path / "ceval"))
    assert (bench.layout, bench.lang, bench.split) == ("ceval", "zh", "val")
    assert bench.notes == ["ceval: the test split has no answers (scored elsewhere): skipped"]
    physics, geography = bench.subjects
    assert (geography.display, len(geography.questions), len(geography.shots)) == ("初中地理", 3, 2)
    assert geography.questions[1].answer == 2  # 中国的首都是 -> C 北京
    assert build_prompt(physics, physics.questions[1], 5, "zh", "letter") == (
        "以下是中国关于高中物理考试的单项选择题，请选出其中的正确答案。\n\n"
        "光在真空中的速度约为\nA. 3×10^8 m/s\nB. 340 m/s\nC. 1 m/s\nD. 3×10^3 m/s\n答案：A\n\n"
        "力的单位是\nA. 焦耳\nB. 牛顿\nC. 瓦特\nD. 伏特\n答案："
    )
    with pytest.raises(DataError, match=r"ceval: 3 test questions have no answer: .*high_school_physics_test.csv:2"):
        read_benchmark(tmp_path / "ceval", split="test")


def test_cmmlu_layout_parses(tmp_path):
    bench = read_benchmark(sets.write_cmmlu(tmp_path / "cmmlu"))
    assert (bench.layout, bench.lang, bench.split, bench.size) == ("cmmlu", "zh", "test", 5)
    history = bench.subjects[1]
    assert history.name == "chinese_history" and history.shots[0].question == "秦朝的第一位皇帝是"
    assert [q.answer for q in history.questions] == [0, 3, 2]
    assert history.questions[0].where.endswith("test/chinese_history.csv:2")  # the header is line 1


def test_generic_jsonl_and_csv_layout(tmp_path):
    bench = read_benchmark(sets.write_generic(tmp_path / "quiz"))
    assert (bench.layout, bench.lang) == ("generic", "en")
    subjects = {s.name: s for s in bench.subjects}
    assert sorted(subjects) == ["animals", "colours", "numbers"]
    assert [(q.choices, q.answer) for q in subjects["colours"].questions] == [
        (["Black", "White", "Green"], 1),  # "B"
        (["Green", "Red", "Blue"], 0),  # 0
    ]
    assert subjects["numbers"].questions[0].answer == 2  # "4" is the text of the third choice
    assert subjects["animals"].questions[1].choices == ["A cow", "A bird", "A pig"]  # A/B/C columns
    assert subjects["animals"].shots[0].answer == 1  # dev/animals.jsonl: "A cow" among options
    assert "\nC. A snail\nAnswer:" in build_prompt(
        subjects["animals"], subjects["animals"].questions[0], 1, "en", "letter"
    )


def test_bad_benchmark_files_name_file_and_line(tmp_path, cli):
    root = sets.write_mmlu(tmp_path / "mmlu")
    bad = root / "test" / "astronomy_test.csv"
    bad.write_text(bad.read_text() + "Only,four,columns,here\n")
    with pytest.raises(DataError, match=r"astronomy_test.csv:5: expected 6 columns \(question,A,B,C,D,answer\), got 4"):
        read_benchmark(root)
    generic = sets.write_generic(tmp_path / "quiz")
    (generic / "quiz.jsonl").write_text(json.dumps({"question": "Q?", "choices": ["x", "y"], "answer": "E"}) + "\n")
    code, _, err = cli("eval", "--benchmark_dir", generic, "--output_dir", tmp_path / "out", "--probe_prompts", "none")
    assert code == 2
    assert err.strip().splitlines()[-1].endswith("quiz.jsonl:1: answer 'E' is not a letter AB, an index or a choice")
    assert not (tmp_path / "out").exists()  # nothing half-written
    (tmp_path / "mixed").mkdir()
    sets.write_mmlu(tmp_path / "mixed" / "a")
    sets.write_cmmlu(tmp_path / "mixed" / "b")
    with pytest.raises(DataError, match="files of different layouts in one folder"):
        detect_layout(tmp_path / "mixed")


def test_repeated_benchmark_dir_flags_add_up():
    argv = ["--benchmark_dir", "a", "--n_shot", "0", "--benchmark-dir=b", "--benchmark_dir", "c"]
    assert join_repeated(argv, "--benchmark_dir") == [
        "--n_shot",
        "0",
        "--benchmark_dir",
        "a,b,c",
    ]


# -- scoring ------------------------------------------------------------------------------------


def _direct_next_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)


def test_letter_ids_cover_the_letter_with_and_without_a_space(chat):
    tok = chat.tokenizer
    ids = letter_token_ids(tok, 4)
    assert [tok.convert_ids_to_tokens(i) for i in ids] == [["A", "ĠA"], ["B", "ĠB"], ["C", "ĠC"], ["D", "ĠD"]]
    assert tok.encode("Answer: C", add_special_tokens=False)[-1] == ids[2][1]


def test_letter_scores_equal_a_direct_computation_with_padding(tmp_path, chat):
    benches = [read_benchmark(sets.write_mmlu(tmp_path / "mmlu")), read_benchmark(sets.write_generic(tmp_path / "q"))]
    scored, _ = score_benchmarks(chat, benches, "letter", n_shot=2, batch_size=3)  # 12 prompts of many lengths
    items = [(b, s, q) for b in benches for s in b.subjects for q in s.questions]
    lengths = [len(chat.encode(build_prompt(s, q, 2, b.lang, "letter"))) for b, s, q in items]
    assert len(set(lengths)) > 8 and max(lengths) <= 256  # batches mix lengths (padding); all fit the model
    variants = letter_token_ids(chat.tokenizer, 4)
    for (b, s, q), got in zip(items, scored, strict=True):
        logprobs = _direct_next_logprobs(chat.model, chat.encode(build_prompt(s, q, 2, b.lang, "letter")))
        expected = [torch.logsumexp(logprobs[variants[c]], 0).item() for c in range(len(q.choices))]
        assert got.scores == pytest.approx(expected, abs=2e-4)
        assert got.predicted == max(range(len(expected)), key=lambda c: expected[c])
        assert got.answer == q.answer and got.where == q.where
    one_by_one, _ = score_benchmarks(chat, benches, "letter", n_shot=2, batch_size=1)
    for alone, batched in zip(one_by_one, scored, strict=True):
        assert alone.scores == pytest.approx(batched.scores, abs=2e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "glm4"])
def test_a_shared_beginning_runs_once_and_scores_as_the_whole_rows(tiny_models, family):
    from transformers import AutoModelForCausalLM

    from tunestack.eval.scoring import positions_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    head = torch.randint(5, 200, (40,), generator=generator).tolist()
    rows = [head + torch.randint(5, 200, (n,), generator=generator).tolist() for n in (7, 3, 10, 5)]
    seen: list[tuple[int, ...]] = []
    forward = model.forward

    @functools.wraps(forward)  # the signature stays the model's (what the scorer checks)
    def spy(*args, **kwargs):
        seen.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    model.forward = spy
    got = positions_logprobs(model, rows, [[len(r) - 1] for r in rows], pad_id=0)
    assert seen == [(1, 40), (4, 10)]  # the beginning once, then only the tails
    for row, lp in zip(rows, got, strict=True):
        alone = positions_logprobs(model, [row], [[len(row) - 1]], pad_id=0)[0]
        assert torch.allclose(lp, alone, atol=1e-4)
    for first, calls in ((38, [(1, 38), (4, 12)]), (10, [(4, 50)])):  # positions inside the beginning share less
        positions = [[len(r) - 1] for r in rows[:2]] + [list(range(first, len(r) - 1)) for r in rows[2:]]
        seen.clear()
        mixed = positions_logprobs(model, rows, positions, pad_id=0)
        assert seen == calls
        for row, ps, lp in zip(rows, positions, mixed, strict=True):
            assert torch.allclose(lp, positions_logprobs(model, [row], [ps], pad_id=0)[0], atol=1e-4)


def test_rows_that_begin_alike_are_batched_among_themselves():
    from tunestack.eval.scoring import MIN_SHARED_PREFIX, _batches

    a, b = [1] * MIN_SHARED_PREFIX, [2] * MIN_SHARED_PREFIX  # two subjects' shared instructions and shots
    rows = [a + [5], b + [5, 6], a + [6, 7], [3, 4], b + [7], a + [8], [9]]  # interleaved, and two that share nothing
    batches = _batches(rows, batch_size=2)
    assert sorted(i for batch in batches for i in batch) == list(range(len(rows)))
    assert [sorted(batch) for batch in batches] == [[0, 2], [5], [1, 4], [3, 6]]  # a, then b, then the loners


def test_cloze_scores_equal_a_direct_computation(tmp_path, chat):
    bench = read_benchmark(sets.write_mmlu(tmp_path / "mmlu"))
    scored, _ = score_benchmarks(chat, [bench], "cloze", n_shot=1, batch_size=5)
    items = [(s, q) for s in bench.subjects for q in s.questions]
    for (s, q), got in zip(items, scored, strict=True):
        context = build_prompt(s, q, 1, "en", "cloze")
        expected = []
        for choice in q.choices:
            head = chat.encode(context)
            whole = chat.encode(context + " " + choice)
            assert whole[: len(head)] == head
            with torch.no_grad():
                logprobs = chat.model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
            ll = sum(logprobs[t - 1, whole[t]].item() for t in range(len(head), len(whole)))
            expected.append(ll / len(choice))
        assert got.scores == pytest.approx(expected, abs=2e-4)


def test_chat_template_wraps_the_prompt_and_long_prompts_drop_shots(tmp_path, chat):
    bench = read_benchmark(sets.write_mmlu(tmp_path / "mmlu"))
    subject, q = bench.subjects[0], bench.subjects[0].questions[0]
    wrapped = PromptEncoder(chat, True, None).text(build_prompt(subject, q, 1, "en", "letter"))
    assert wrapped.startswith("<|im_start|>user\nThe following are multiple choice questions")
    assert wrapped.endswith("D. Venus\nAnswer:<|im_end|>\n<|im_start|>assistant\n")
    assert len(chat.encode(wrapped)) <= 256
    scored, _ = score_benchmarks(chat, [bench], "letter", n_shot=1, batch_size=4, chat_template=True)
    logprobs = _direct_next_logprobs(chat.model, chat.encode(wrapped))
    variants = letter_token_ids(chat.tokenizer, 4)
    assert scored[0].scores == pytest.approx([torch.logsumexp(logprobs[v], 0).item() for v in variants], abs=2e-4)
    full = len(chat.encode(build_prompt(subject, q, 3, "en", "letter")))
    one_shot = len(chat.encode(build_prompt(subject, q, 1, "en", "letter")))
    encoder = PromptEncoder(chat, False, one_shot + 1)
    assert full > one_shot + 1
    assert encoder.fitted(subject, q, 3, "en", "letter", 1) == build_prompt(subject, q, 1, "en", "letter")


# -- a model that learned the answers -----------------------------------------------------------


def _train_on_answers(model_dir: Path, bench_dir: Path, out: Path, steps: int = 150) -> Path:
    """Teach the model each question's answer letter (0-shot prompt -> ' A' token), plain AdamW steps."""
    chat = ChatModel.load(ModelSelection(model=str(model_dir), torch_dtype="float32"))
    bench = read_benchmark(bench_dir)
    variants = letter_token_ids(chat.tokenizer, 4)
    rows = [
        (chat.encode(build_prompt(s, q, 0, "en", "letter")), variants[q.answer][-1])
        for s in bench.subjects
        for q in s.questions
    ]
    width = max(len(ids) for ids, _ in rows)
    pad = chat.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r, _ in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r, _ in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    targets = torch.tensor([t for _, t in rows])
    model = chat.model.train()
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, loss.item()
    model.eval().save_pretrained(out)
    chat.tokenizer.save_pretrained(out)
    return out


def test_trained_model_scores_one_and_untrained_is_near_chance(tmp_path, mcq_model, cli):
    words = sets.learnable_set(tmp_path / "words")
    trained = _train_on_answers(mcq_model, words, tmp_path / "trained")
    code, out, err = cli(
        "eval", "--model_name_or_path", f"{mcq_model},{trained}", "--include_base", "false",
        "--benchmark_dir", words, "--benchmark_dir", sets.write_mmlu(tmp_path / "mmlu"), "--n_shot", 0,
        "--probe_prompts", "none", "--output_dir", tmp_path / "eval",
    )  # fmt: skip
    assert code == 0, err[-2000:]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    rows = report["benchmarks"]
    assert all(set(r) == {"model", "benchmark", "subject", "correct", "n", "accuracy"} for r in rows)
    overall = {(r["model"], r["benchmark"]): r for r in rows if r["subject"] == "overall"}
    assert overall[("trained", "words")] == {
        "model": "trained", "benchmark": "words", "subject": "overall", "correct": 32, "n": 32, "accuracy": 1.0,
    }  # fmt: skip
    assert overall[("model", "words")]["accuracy"] <= 0.5  # 4 choices, answers spread evenly over A-D
    subject_rows = [
        r for r in rows if r["model"] == "model" and r["benchmark"] == "words" and r["subject"] != "overall"
    ]
    assert [r["subject"] for r in subject_rows] == sorted(sets.LEARN_SUBJECTS)
    assert sum(r["correct"] for r in subject_rows) == overall[("model", "words")]["correct"]  # micro average
    assert overall[("model", "mmlu")]["n"] == 7
    assert report["benchmark_settings"]["folders"][0] == {
        "name": "words", "path": str(words), "layout": "generic", "lang": "en", "split": "test", "subjects": 4,
        "questions": 32,
    }  # fmt: skip
    assert "  words / overall" in out and "100.0%" in out and "  words / macro" in out
    untrained = 100 * overall[("model", "words")]["accuracy"]
    assert f"{untrained:.1f}%" in out.split("words / overall")[1].splitlines()[0]
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "benchmark_predictions.jsonl").open()]
    assert len(predictions) == 2 * (32 + 7)
    assert all(p["correct"] == (p["answer"] == p["predicted"]) for p in predictions)
    assert math.isclose(
        json.loads((tmp_path / "eval" / "run.json").read_text())["metrics"]["trained"]["mcq_words"], 100
    )


def test_lm_eval_engine_agrees_on_the_same_folder(tmp_path, chat):
    pytest.importorskip("lm_eval")
    from tunestack.eval.lm_eval_engine import score_with_lm_eval
    from tunestack.eval.scoring import continuation_logprobs

    benches = [read_benchmark(sets.write_mmlu(tmp_path / "mmlu")), read_benchmark(sets.write_generic(tmp_path / "q"))]
    ours, _ = score_benchmarks(chat, benches, "cloze", n_shot=2, batch_size=4)
    theirs = score_with_lm_eval(chat, benches, "cloze", 2, 4, None)
    assert [(s.where, s.predicted) for s in theirs] == [(s.where, s.predicted) for s in ours]
    for mine, harness in zip(ours, theirs, strict=True):
        assert harness.scores == pytest.approx(mine.scores, abs=1e-3)
    # letter: the harness scores " A" alone; tunestack sums " A" and "A". Its numbers are log P(" A" | prompt).
    letters = score_with_lm_eval(chat, benches[:1], "letter", 2, 4, None)
    bench = benches[0]
    prompts = [chat.encode(build_prompt(s, q, 2, "en", "letter")) for s in bench.subjects for q in s.questions]
    spaced = [chat.tokenizer.encode(f" {c}", add_special_tokens=False) for c in "ABCD"]
    for ids, got in zip(prompts, letters, strict=True):
        expected = [sum(continuation_logprobs(chat.model, [ids], [cont], 1, 0)[0]) for cont in spaced]
        assert got.scores == pytest.approx(expected, abs=1e-3)


def test_recipe_eval_stages_take_benchmark_dir_and_fingerprint_its_content(tmp_path):
    from tunestack.pipeline.fingerprint import data_signature
    from tunestack.pipeline.kinds import KINDS, accepts

    assert all(accepts(KINDS["eval"], key) for key in ("benchmark_dir", "n_shot", "mcq_method", "drift_probe"))
    assert accepts(KINDS["sft"], "replay_ratio") and accepts(KINDS["sft"], "replay_prompts")
    mmlu, cmmlu = sets.write_mmlu(tmp_path / "mmlu"), sets.write_cmmlu(tmp_path / "cmmlu")
    before = data_signature("benchmark_dir", f"{mmlu},{cmmlu}")
    assert sorted(before) == sorted([str(mmlu), str(cmmlu)])
    (mmlu / "test" / "astronomy_test.csv").write_text("Changed?,a,b,c,d,A\n")
    after = data_signature("benchmark_dir", f"{mmlu},{cmmlu}")
    assert after[str(mmlu)] != before[str(mmlu)] and after[str(cmmlu)] == before[str(cmmlu)]
