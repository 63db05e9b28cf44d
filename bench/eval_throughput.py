"""Benchmark scoring: `tunestack eval --benchmark_dir` (batched) against one question at a time.

Both score the same generated MMLU-layout folder (made-up questions, 5-shot prompts of a few hundred tokens, fixed
seed) with letter scoring on the real SmolLM2-135M-Instruct, each in its own subprocess, in alternating order:

  (a) one-at-a-time  what LLaMA-Factory's evaluator does per question, one question per forward: the 5-shot prompt
                     tokenized, a full forward (logits at every position), the letters' logits at the last one
  (b) tunestack      `tunestack eval --benchmark_dir DIR --n_shot 5` run in-process: batches of --batch_size
                     prompts of one subject, its shared instructions and shots run once (their KV cache repeated
                     over the batch), the questions right padded, only the last position's logits computed

Questions/s = questions ÷ the seconds spent scoring (model loading excluded; (b) times its scoring call inside the
real command). The predictions are compared with the loop's, taken two ways: with the bare letters' tokens ("A",
LLaMA-Factory's `tokenizer.encode(letter)[-1]`) and with the spaced ones (" A", what follows "Answer:" in the shots);
tunestack sums both forms.

    python bench/eval_throughput.py                     # 240 questions, batch 8
    python bench/eval_throughput.py --questions 40      # a quick check

Not a test: numbers depend on the machine; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402  (bench/common.py: subprocess runner, load average)

SYSTEMS = {"a": "one-at-a-time", "b": "tunestack"}
_WORDS = (
    "river mountain engine signal garden harbour window lantern market planet silver copper forest meadow castle "
    "bridge valley island desert station library kitchen theatre museum village tunnel orchard compass ladder "
    "blanket candle mirror pocket ribbon saddle teapot violin whistle anchor basket cabinet"
).split()


def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(n)]
    return " ".join(words).capitalize()


def write_question_set(root: Path, questions: int, subjects: int, seed: int) -> Path:
    """An MMLU-layout folder: `subjects` subjects, 5 dev questions each, `questions` test questions in all."""
    rng = random.Random(seed)
    per_subject = max(1, questions // subjects)
    for s in range(subjects):
        name = f"subject_{s:02d}"
        for split, count in (("dev", 5), ("test", per_subject)):
            folder = root / split
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{name}_{split}.csv", "w", encoding="utf-8", newline="") as fh:
                writer = csv.writer(fh)
                for _ in range(count):
                    question = _sentence(rng, rng.randint(12, 60)) + "?"
                    choices = [_sentence(rng, rng.randint(2, 12)) for _ in range(4)]
                    writer.writerow([question, *choices, "ABCD"[rng.randrange(4)]])
    return root


def _load(model: str) -> Any:
    from tunestack.config.infer import ModelSelection
    from tunestack.infer.generate import ChatModel

    return ChatModel.load(ModelSelection(model=model, torch_dtype="auto"))


def child_one_at_a_time(spec: dict[str, Any]) -> dict[str, Any]:
    import tunestack.cli  # noqa: F401, I001  (first: the allocator setting the command makes before torch loads)
    import torch
    from tunestack.eval.benchmarks import build_prompt, read_benchmark

    chat = _load(spec["model"])
    bench = read_benchmark(Path(spec["data"]))
    letters = [chat.tokenizer.encode(ch, add_special_tokens=False)[-1] for ch in "ABCD"]  # LLaMA-Factory's ids
    spaced = [chat.tokenizer.encode(" " + ch, add_special_tokens=False)[-1] for ch in "ABCD"]
    device = next(chat.model.parameters()).device
    predictions, predictions_spaced, tokens = [], [], 0
    start = time.perf_counter()
    for subject in bench.subjects:
        for q in subject.questions:
            ids = chat.encode(build_prompt(subject, q, spec["n_shot"], bench.lang, "letter"))
            tokens += len(ids)
            with torch.inference_mode():
                logits = chat.model(input_ids=torch.tensor([ids], device=device)).logits[0, -1]
            predictions.append(int(torch.softmax(logits[letters].float(), -1).argmax()))
            predictions_spaced.append(int(logits[spaced].argmax()))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "questions": len(predictions), "prompt_tokens": tokens, "predictions": predictions,
            "predictions_spaced": predictions_spaced}  # fmt: skip


def child_tunestack(spec: dict[str, Any]) -> dict[str, Any]:
    from tunestack.cli import main  # noqa: I001  (first: the allocator setting before torch loads)
    import tunestack.eval.mcq as mcq
    import tunestack.eval.suite as suite

    timing: dict[str, Any] = {}
    real = mcq.score_benchmarks

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        scored, encoder = real(*args, **kwargs)
        timing["seconds"] = time.perf_counter() - start
        timing["predictions"] = [s.predicted for s in scored]
        return scored, encoder

    suite.score_benchmarks = timed
    out = Path(spec["work"]) / "eval"
    argv = ["eval", "--model_name_or_path", spec["model"], "--include_base", "false", "--benchmark_dir", spec["data"],
            "--n_shot", str(spec["n_shot"]), "--eval_batch_size", str(spec["batch_size"]), "--probe_prompts", "none",
            "--output_dir", str(out)]  # fmt: skip
    try:
        main(argv)
    except SystemExit as exc:
        if exc.code:
            raise
    rows = json.loads((out / "eval.json").read_text())["benchmarks"]
    overall = next(r for r in rows if r["subject"] == "overall")
    return {"seconds": timing["seconds"], "questions": overall["n"], "predictions": timing["predictions"],
            "accuracy": overall["accuracy"]}  # fmt: skip


CHILDREN = {"one-at-a-time": child_one_at_a_time, "tunestack": child_tunestack}


def main() -> None:
    if common.child_entry(CHILDREN):
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=240, help="test questions in all (default 240)")
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--n_shot", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=8, help="tunestack's --eval_batch_size (default 8)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per system (order alternates each round)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--model", default=None, help="model folder (default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--workdir", default=None, help="scratch folder, kept (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write every run's numbers to this file")
    args = parser.parse_args()

    from tunestack.model.builtin import builtin_model_dir

    model = args.model or str(builtin_model_dir("smollm2-135m-instruct"))
    temp = None if args.workdir else tempfile.mkdtemp(prefix="tunestack-eval-bench-")
    work = Path(args.workdir or temp)
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = write_question_set(work / "questions", args.questions, args.subjects, args.seed)
        spec = {"model": model, "data": str(data), "n_shot": args.n_shot, "batch_size": args.batch_size}
        print(f"{common.machine_line()}; {common.load_line()}")
        rows = []
        for i, kind in enumerate(common.orders(list(SYSTEMS.values()), args.rounds)):
            row = common.run_child(HERE, kind, spec, work / f"run{i}-{kind}")
            row["qps"] = row["questions"] / row["seconds"]
            print(f"  {kind:<14} {row['questions']} questions in {row['seconds']:.1f}s: {row['qps']:.2f} questions/s, "
                  f"peak RSS {row['peak_rss_mb']:.0f} MB")  # fmt: skip
            rows.append(row)
        by = {k: [r for r in rows if r["kind"] == k] for k in SYSTEMS.values()}
        base, ours = (common.median(by[k], "qps") for k in ("one-at-a-time", "tunestack"))
        ours_pred, loop = by["tunestack"][0]["predictions"], by["one-at-a-time"][0]
        agree = sum(a == b for a, b in zip(ours_pred, loop["predictions"], strict=True))
        agree_spaced = sum(a == b for a, b in zip(ours_pred, loop["predictions_spaced"], strict=True))
        n = by["tunestack"][0]["questions"]
        tokens = by["one-at-a-time"][0]["prompt_tokens"] / n
        print(f"\n{n} questions, {args.n_shot}-shot, {tokens:.0f} prompt tokens on average; batch {args.batch_size}")
        print(
            f"tunestack eval: {ours:.2f} questions/s, one at a time: {base:.2f} questions/s: ratio x{ours / base:.2f}"
        )
        print(f"predictions agree on {agree}/{n} questions with the loop's bare letters ('A', LLaMA-Factory's ids), "
              f"on {agree_spaced}/{n} with its spaced letters (' A')")  # fmt: skip
        print(f"{common.load_line()} at the end")
        warning = common.load_warning(rows)
        if warning:
            print(warning)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
