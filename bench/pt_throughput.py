"""Continued-pretraining benchmark: tunestack against the plain transformers + PEFT recipe tutorials use.

Two measurements, each system in its own subprocess (peak RSS from that process alone, via wait4),
systems in alternating order, same generated English/Chinese data (fixed seed):

1. training: PT with LoRA (r 8, every linear layer) on the real SmolLM2-135M-Instruct, block 512,
   batch 4, N optimizer steps. Trained tokens/s = steps * batch * block / Trainer train_runtime
   (both systems train through transformers' Trainer, so the clock is the same one).
   (a) `tunestack pt ...`
   (b) a plain script: datasets.load_dataset("text") + map(tokenize) + group_texts + get_peft_model
       (LoraConfig target_modules="all-linear") + transformers.Trainer
2. tokenization: a generated corpus (200 MB by default) cut into 512-token blocks by
   (a) tunestack's tokenize_files + cut_blocks, (a') load_pretrain_corpus (the same plus the on-disk cache a
   run writes), and (b) the tutorial recipe (load_dataset("text") + map(tokenize, batched=True) +
   map(group_texts, batched=True), default settings).

    python bench/pt_throughput.py                            # full: 20 steps, 200 MB
    python bench/pt_throughput.py --steps 2 --corpus_mb 5    # a quick check

Not a test: numbers depend on the machine; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402  (bench/common.py: subprocess runner, shared with the other benchmarks)

# ------------------------------------------------------------------------------------------------
# Generated corpus (English and Chinese medical-style sentences, fixed seed)

_EN_SUBJECTS = [
    "The heart", "The liver", "A kidney", "The patient", "The doctor", "The nurse", "An infection", "The vaccine",
    "High blood pressure", "Type 2 diabetes", "The immune system", "A blood test", "The surgeon", "Regular exercise",
    "A balanced diet", "The medicine", "Chronic inflammation", "The lung", "Insulin", "The pharmacist",
]  # fmt: skip
_EN_VERBS = [
    "reduces", "increases", "protects", "damages", "controls", "measures", "improves", "affects", "supports",
    "lowers", "raises", "filters", "treats", "prevents", "detects", "changes",
]  # fmt: skip
_EN_OBJECTS = [
    "the blood flow", "the risk of stroke", "blood glucose", "the heart rate", "kidney function", "the airway",
    "cholesterol levels", "the immune response", "bone density", "the body temperature", "muscle strength",
    "the quality of sleep", "liver enzymes", "the oxygen saturation", "the white cell count", "wound healing",
]  # fmt: skip
_EN_TAILS = [
    "in older adults", "after surgery", "during pregnancy", "in children", "within two weeks", "at rest",
    "over many years", "in most patients", "when taken daily", "without symptoms", "in severe cases", "",
]  # fmt: skip
_ZH_SUBJECTS = ["心脏", "肝脏", "肾脏", "患者", "医生", "护士", "感染", "疫苗", "高血压", "糖尿病", "免疫系统", "血液检查",
                "规律运动", "均衡饮食", "药物", "慢性炎症", "肺部", "胰岛素"]  # fmt: skip
_ZH_VERBS = ["降低", "增加", "保护", "损害", "控制", "测量", "改善", "影响", "支持", "治疗", "预防", "发现"]
_ZH_OBJECTS = ["血流", "中风的风险", "血糖", "心率", "肾功能", "气道", "胆固醇水平", "免疫反应", "骨密度", "体温",
               "肌肉力量", "睡眠质量", "肝酶", "血氧饱和度", "白细胞计数", "伤口愈合"]  # fmt: skip
_ZH_TAILS = [
    "在老年人中",
    "在手术后",
    "在怀孕期间",
    "在儿童中",
    "在两周内",
    "在静息时",
    "在多年以后",
    "在大多数患者中",
    "",
]


def _sentence(rng: random.Random) -> str:
    if rng.random() < 0.6:
        tail = rng.choice(_EN_TAILS)
        number = f" by {rng.randint(2, 95)} percent" if rng.random() < 0.3 else ""
        return (
            f"{rng.choice(_EN_SUBJECTS)} {rng.choice(_EN_VERBS)} {rng.choice(_EN_OBJECTS)}{number}"
            f"{' ' + tail if tail else ''}."
        )
    number = f"约百分之{rng.randint(2, 95)}" if rng.random() < 0.3 else ""
    return (
        f"{rng.choice(_ZH_TAILS)}{rng.choice(_ZH_SUBJECTS)}{rng.choice(_ZH_VERBS)}{rng.choice(_ZH_OBJECTS)}{number}。"
    )


def generate_corpus(folder: Path, total_bytes: int, files: int, seed: int = 1234) -> list[Path]:
    """`files` .txt files, one document (1-6 sentences) per line, about `total_bytes` in all. Reused when present."""
    marker = folder.parent / f"{folder.name}.json"  # beside the folder: the folder holds only data
    spec = {"bytes": total_bytes, "files": files, "seed": seed, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return sorted(folder.glob("*.txt"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    per_file = max(1, total_bytes // files)
    paths = []
    for i in range(files):
        path = folder / f"part-{i:03d}.txt"
        written = 0
        with open(path, "w", encoding="utf-8") as fh:
            while written < per_file:
                lines = [" ".join(_sentence(rng) for _ in range(rng.randint(1, 6))) for _ in range(2000)]
                chunk = "\n".join(lines) + "\n"
                fh.write(chunk)
                written += len(chunk.encode("utf-8"))
        paths.append(path)
    marker.write_text(json.dumps(spec))
    return paths


# ------------------------------------------------------------------------------------------------
# Child workloads (run as `python pt_throughput.py _child KIND SPEC.json`)


def _cuda_peak_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def child_tunestack_train(spec: dict[str, Any]) -> dict[str, Any]:
    from tunestack.cli import main

    out = Path(spec["work"]) / "out"
    argv = [
        "pt", "--model_name_or_path", spec["model"], "--train_file_dir", spec["data"], "--output_dir", str(out),
        "--overwrite_output_dir", "--cache_dir", str(Path(spec["work"]) / "cache"),
        "--block_size", str(spec["block_size"]), "--per_device_train_batch_size", str(spec["batch_size"]),
        "--max_steps", str(spec["steps"]), "--learning_rate", "2e-4", "--seed", "42",
        "--use_peft", "True", "--target_modules", "all", "--lora_rank", "8", "--lora_alpha", "16",
        "--lora_dropout", "0.05", "--keep_linebreaks", "false",
        "--logging_steps", str(spec["steps"]), "--save_strategy", "no", "--report_to", "none",
        "--torch_dtype", spec["dtype"], *(["--bf16"] if spec["dtype"] == "bfloat16" else []),
    ]  # fmt: skip
    try:
        main(argv)
    except SystemExit as exc:
        if exc.code:
            raise
    manifest = json.loads((out / "run.json").read_text())
    return {
        "train_runtime": manifest["metrics"]["train_runtime"],
        "tokens": manifest["summary"]["tokens_seen"],
        "cuda_peak_mb": _cuda_peak_mb(),
    }


def group_texts(examples: dict[str, list[list[int]]], block_size: int) -> dict[str, list[list[int]]]:
    """The tutorial recipe (run_clm.py / MedicalGPT pretraining.py): concatenate, drop the tail, cut."""
    concatenated = {k: list(chain(*examples[k])) for k in examples}
    total = len(concatenated[next(iter(examples))]) // block_size * block_size
    result = {k: [t[i : i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}
    result["labels"] = result["input_ids"].copy()
    return result


def _tutorial_blocks(files: list[str], tokenizer: Any, block_size: int, cache_dir: str) -> Any:
    import datasets

    raw = datasets.load_dataset("text", data_files={"train": files}, cache_dir=cache_dir)["train"]
    tokenized = raw.map(lambda ex: tokenizer(ex["text"]), batched=True, remove_columns=["text"])
    return tokenized.map(group_texts, batched=True, fn_kwargs={"block_size": block_size})


def child_baseline_train(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    torch.manual_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    files = sorted(str(p) for p in Path(spec["data"]).glob("*.txt"))
    blocks = _tutorial_blocks(files, tokenizer, spec["block_size"], str(Path(spec["work"]) / "cache"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype)
    model.config.use_cache = False
    config = LoraConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", bias="none"
    )
    model = get_peft_model(model, config)
    args = TrainingArguments(
        output_dir=str(Path(spec["work"]) / "out"),
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        learning_rate=2e-4,
        seed=42,
        logging_steps=spec["steps"],
        save_strategy="no",
        report_to="none",
        bf16=spec["dtype"] == "bfloat16",
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator)
    metrics = trainer.train().metrics
    tokens = spec["steps"] * spec["batch_size"] * spec["block_size"]
    return {"train_runtime": metrics["train_runtime"], "tokens": tokens, "cuda_peak_mb": _cuda_peak_mb()}


def _default_tokenizer_threads() -> None:
    """Tokenization runs with the library defaults: the runner turns the tokenizers' thread pool off for the
    training children (forked data workers), but the recipe measured here leaves it on, so both systems do."""
    os.environ.pop("TOKENIZERS_PARALLELISM", None)


def child_tunestack_tokenize(spec: dict[str, Any]) -> dict[str, Any]:
    _default_tokenizer_threads()
    from transformers import AutoTokenizer

    from tunestack.data.pretrain import cut_blocks, tokenize_files

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    files = sorted(Path(spec["data"]).glob("*.txt"))
    start = time.perf_counter()
    tokens, _ = tokenize_files(files, tokenizer, "text", keep_linebreaks=False)
    blocks = cut_blocks(tokens, spec["block_size"], keep_remainder=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": len(blocks) * spec["block_size"], "blocks": len(blocks)}


def child_tunestack_corpus(spec: dict[str, Any]) -> dict[str, Any]:
    _default_tokenizer_threads()
    from transformers import AutoTokenizer

    from tunestack.config.pretrain import PretrainDataArguments
    from tunestack.data.pretrain import load_pretrain_corpus

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    args = PretrainDataArguments(train_file_dir=spec["data"], block_size=spec["block_size"], keep_linebreaks=False)
    start = time.perf_counter()
    corpus = load_pretrain_corpus(args, tokenizer, spec["block_size"], Path(spec["work"]) / "cache", False, 42)
    seconds, blocks = time.perf_counter() - start, corpus.stats["train_blocks"]
    return {"seconds": seconds, "tokens": blocks * spec["block_size"], "blocks": blocks}


def child_baseline_tokenize(spec: dict[str, Any]) -> dict[str, Any]:
    _default_tokenizer_threads()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    files = sorted(str(p) for p in Path(spec["data"]).glob("*.txt"))
    start = time.perf_counter()
    blocks = _tutorial_blocks(files, tokenizer, spec["block_size"], str(Path(spec["work"]) / "cache"))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": len(blocks) * spec["block_size"], "blocks": len(blocks)}


CHILDREN = {
    "tunestack-train": child_tunestack_train,
    "baseline-train": child_baseline_train,
    "tunestack-tokenize": child_tunestack_tokenize,
    "tunestack-corpus": child_tunestack_corpus,
    "baseline-tokenize": child_baseline_tokenize,
}


# ------------------------------------------------------------------------------------------------
# Parent: run children, measure, report


def run_child(kind: str, spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run one workload in a fresh process; returns its result plus wall time and its own peak RSS."""
    return common.run_child(HERE, kind, spec, work)


def _orders(a: str, b: str, rounds: int) -> list[str]:
    """a b, b a, a b ...: alternate which system runs first (warm file cache, CPU clocks)."""
    return common.orders([a, b], rounds)


_median = common.median


def bench_training(args: argparse.Namespace, model: str, work: Path) -> None:
    import torch

    tokens_needed = args.steps * args.batch_size * args.block_size
    data = work / f"train-corpus-{tokens_needed}"
    generate_corpus(data, total_bytes=max(200_000, tokens_needed * 8), files=2, seed=args.seed)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
    spec = {
        "model": model,
        "data": str(data),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "block_size": args.block_size,
        "dtype": dtype,
    }
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(
        f"\nPT training: LoRA r 8 on every linear layer, {Path(model).name}, block {args.block_size}, "
        f"batch {args.batch_size}, {args.steps} steps, {dtype}, {device}"
    )
    rows: dict[str, list[dict[str, Any]]] = {"tunestack-train": [], "baseline-train": []}
    for i, kind in enumerate(_orders("tunestack-train", "baseline-train", args.rounds)):
        result = run_child(kind, spec, work / f"run-{i}-{kind}")
        result["tok_s"] = result["tokens"] / result["train_runtime"]
        rows[kind].append(result)
        gpu = f"  GPU peak {result['cuda_peak_mb']:.0f} MB" if result.get("cuda_peak_mb") else ""
        print(
            f"  {kind:<16} trained tokens/s {result['tok_s']:9.1f}  train {result['train_runtime']:7.1f} s  "
            f"process {result['wall_s']:6.1f} s  peak RSS {result['peak_rss_mb']:7.0f} MB{gpu}",
            flush=True,
        )
    ts, hf = rows["tunestack-train"], rows["baseline-train"]
    print(f"{'':2}{'system':<26}{'tokens/s':>10}{'process s':>11}{'peak RSS MB':>13}")
    for name, r in (("tunestack pt", ts), ("transformers+PEFT script", hf)):
        print(
            f"{'':2}{name:<26}{_median(r, 'tok_s'):10.1f}{_median(r, 'wall_s'):11.1f}{_median(r, 'peak_rss_mb'):13.0f}"
        )
    print(
        f"  ratio tunestack / baseline: tokens/s x{_median(ts, 'tok_s') / _median(hf, 'tok_s'):.2f}, "
        f"peak RSS x{_median(ts, 'peak_rss_mb') / _median(hf, 'peak_rss_mb'):.2f}"
    )


def bench_tokenization(args: argparse.Namespace, model: str, work: Path) -> None:
    size = int(args.corpus_mb * 1_000_000)
    data = work / f"tok-corpus-{args.corpus_mb:g}mb"
    started = time.perf_counter()
    generate_corpus(data, total_bytes=size, files=args.files, seed=args.seed)
    actual = sum(p.stat().st_size for p in data.glob("*.txt"))
    print(
        f"\nTokenization: {actual / 1e6:.1f} MB in {args.files} .txt files (generated/reused in "
        f"{time.perf_counter() - started:.0f} s), {Path(model).name} tokenizer, blocks of {args.block_size}"
    )
    spec = {"model": model, "data": str(data), "block_size": args.block_size}
    kinds = ["tunestack-tokenize", "baseline-tokenize"] + (["tunestack-corpus"] if not args.skip_cache_variant else [])
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    order = _orders("tunestack-tokenize", "baseline-tokenize", args.rounds)
    if not args.skip_cache_variant:
        order += ["tunestack-corpus"] * args.rounds
    for i, kind in enumerate(order):
        result = run_child(kind, spec, work / f"tok-{i}-{kind}")
        rows[kind].append(result)
        print(
            f"  {kind:<20} {result['seconds']:8.1f} s  {actual / 1e6 / result['seconds']:7.2f} MB/s  "
            f"{result['tokens'] / result['seconds']:11.0f} tokens/s  {result['blocks']} blocks  "
            f"peak RSS {result['peak_rss_mb']:7.0f} MB",
            flush=True,
        )
    names = {
        "tunestack-tokenize": "tunestack tokenize_files+cut",
        "tunestack-corpus": "tunestack + on-disk cache",
        "baseline-tokenize": "load_dataset+map+group_texts",
    }
    print(f"{'':2}{'system':<30}{'seconds':>9}{'MB/s':>8}{'peak RSS MB':>13}")
    for kind in kinds:
        r = rows[kind]
        print(
            f"{'':2}{names[kind]:<30}{_median(r, 'seconds'):9.1f}{actual / 1e6 / _median(r, 'seconds'):8.2f}"
            f"{_median(r, 'peak_rss_mb'):13.0f}"
        )
    base = rows["baseline-tokenize"]
    for kind in kinds:
        if kind != "baseline-tokenize":
            r = rows[kind]
            print(
                f"  ratio {names[kind]} / tutorial recipe: speed x{_median(base, 'seconds') / _median(r, 'seconds'):.2f}, "
                f"peak RSS x{_median(r, 'peak_rss_mb') / _median(base, 'peak_rss_mb'):.2f}"
            )


def main() -> None:
    if common.child_entry(CHILDREN):
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per training run (default 20)")
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="auto: bfloat16 on a GPU, float32 on a CPU (CPU bf16 autocast is slow)")  # fmt: skip
    parser.add_argument("--corpus_mb", type=float, default=200, help="tokenization corpus size in MB (default 200)")
    parser.add_argument("--files", type=int, default=8, help="number of .txt files the corpus is split into")
    parser.add_argument("--rounds", type=int, default=1, help="runs per system (order alternates each round)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--model", default=None, help="model folder (default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary folder)")
    parser.add_argument("--skip_train", action="store_true")
    parser.add_argument("--skip_tokenize", action="store_true")
    parser.add_argument("--skip_cache_variant", action="store_true", help="do not time load_pretrain_corpus")
    args = parser.parse_args()

    from tunestack.model.builtin import builtin_model_dir

    model = args.model or str(builtin_model_dir("smollm2-135m-instruct"))
    temp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        temp = tempfile.mkdtemp(prefix="tunestack-bench-")
        work = Path(temp)
    try:
        if not args.skip_train:
            bench_training(args, model, work)
        if not args.skip_tokenize:
            bench_tokenization(args, model, work)
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
