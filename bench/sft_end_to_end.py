"""SFT end to end: a short LoRA SFT as a user runs it, each system one whole process timed by /usr/bin/time.

  (a) tutorial   the transformers Trainer + PEFT script of bench/sft_throughput.py (a): chat template, prompt
                 tokens -100, padded batches. It saves nothing (save_strategy no, no final save), logs nowhere.
  (c) tunestack  `python -m tunestack sft ...` with its defaults: padding-free batches, TensorBoard events,
                 metrics.jsonl, the final adapter saved, checked and moved into place with the tokenizer, chat
                 template and generation config, loss.png, run.json (with the time of each phase).

Both train LoRA r 8 / alpha 16 / dropout 0.05 on every linear layer of the real SmolLM2-135M-Instruct for one
epoch of the same generated chats (bench/common.py; 64 by default = 16 steps of 4), cutoff 512, lr 2e-4, seed 42,
alternating order. Reported: wall seconds of the whole process (interpreter start to exit), its peak RSS
("Maximum resident set size"), the Trainer's train_runtime, and the rest (what each does before the first step
and after the last).

    python bench/sft_end_to_end.py                 # 64 chats, one round
    python bench/sft_end_to_end.py --rounds 3      # medians of 3, order alternating

Not a test: numbers depend on the machine; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402
import sft_throughput  # noqa: E402  (the tutorial script, its data preparation and learning rate)

SYSTEMS = {"a": ("tutorial", "transformers Trainer + PEFT script"), "c": ("tunestack", "tunestack sft")}


def _timed(command: list[str], log: Path) -> dict[str, float]:
    """Run `command` under /usr/bin/time -v; its wall seconds and peak RSS (MB)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # torch's own thread count, as a user gets it
        env.pop(name, None)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(["/usr/bin/time", "-v", *command], stdout=fh, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{command[:4]} failed (exit {proc.returncode}); log: {log}\n{text[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    parts = [float(x) for x in clock.group(1).split(":")] if clock else [wall]
    seconds = sum(v * 60**i for i, v in enumerate(reversed(parts)))
    return {"wall_s": seconds, "rss_mb": int(rss.group(1)) / 1024 if rss else float("nan"),
            "load_before": load_before, "load_after": os.getloadavg()[0]}  # fmt: skip


def run_tutorial(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "work": str(work)}
    (work / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, str(HERE.parent / "sft_throughput.py"), "_child", "hf-padded", str(work / "spec.json")]
    out = _timed(cmd, work / "log.txt")
    result = json.loads((work / "result.json").read_text())
    return {**out, "train_s": result["train_runtime"], "first_loss": result["losses"][0], "saved": "nothing"}


def run_tunestack(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    out_dir = work / "out"
    cmd = [
        sys.executable, "-m", "tunestack", "sft", "--model_name_or_path", spec["model"],
        "--train_file_dir", spec["raw_dir"], "--output_dir", str(out_dir), "--overwrite_output_dir",
        "--num_train_epochs", "1", "--per_device_train_batch_size", str(spec["batch_size"]),
        "--model_max_length", str(spec["cutoff"]), "--learning_rate", str(sft_throughput.LEARNING_RATE),
        "--seed", str(sft_throughput.TRAIN_SEED), "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0.05",
        "--target_modules", "all", "--torch_dtype", spec["dtype"], "--logging_steps", "1",
    ]  # fmt: skip
    out = _timed(cmd, work / "log.txt")
    run = json.loads((out_dir / "run.json").read_text())
    adapter = out_dir / "adapter_model.safetensors"
    if run["status"] != "complete" or not adapter.is_file():
        raise SystemExit(f"tunestack sft did not leave a complete, checked adapter in {out_dir}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(r["loss"] for r in rows if "loss" in r)
    saved = f"adapter ({adapter.stat().st_size / 2**20:.1f} MB) saved and checked, loss.png, TensorBoard events"
    return {**out, "train_s": run["metrics"]["train_runtime"], "first_loss": first, "saved": saved,
            "phases": run["summary"]["phases"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=64, help="conversations: one epoch of chats / 4 steps")
    parser.add_argument("--rounds", type=int, default=1, help="runs per system (order alternates each round)")
    parser.add_argument("--systems", default="ac", help="a (tutorial script), c (tunestack), or both")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--model", default=None, help="model folder (default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--workdir", default=None, help="scratch folder, kept (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write every run's numbers to this file")
    args = parser.parse_args()
    import torch

    from tunestack.model.builtin import builtin_model_dir

    model = args.model or str(builtin_model_dir("smollm2-135m-instruct"))
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="tunestack-sft-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    batch = 4
    data_args = argparse.Namespace(pool=args.chats, steps=args.chats // batch, batch_size=batch, seed=1234, cutoff=512)
    try:
        print(f"SFT end to end: {common.machine_line()}; {common.load_line()}")
        rate = common.matmul_gflops(dtype)
        print(f"matmul rate ({dtype} torch.mm): best {rate['best']:.1f} GFLOP/s")
        data = sft_throughput.prepare_data(data_args, model, work)
        spec = {"model": model, "steps": data_args.steps, "batch_size": batch, "cutoff": 512, "dtype": dtype, **data}
        kinds = [SYSTEMS[s][0] for s in args.systems if s in SYSTEMS]
        rows = []
        for i, kind in enumerate(common.orders(kinds, args.rounds)):
            runner = run_tutorial if kind == "tutorial" else run_tunestack
            r = {"kind": kind, **runner(spec, work / f"run-{i}-{kind}")}
            r["rest_s"] = r["wall_s"] - r["train_s"]
            rows.append(r)
            phases = ", ".join(f"{k} {v:.1f}" for k, v in r.get("phases", {}).items())
            print(
                f"  {kind:<10} process {r['wall_s']:6.1f} s (training {r['train_s']:6.1f} s, the rest {r['rest_s']:5.1f} s)"
                f"  peak RSS {r['rss_mb']:6.0f} MB  first loss {r['first_loss']:.4f}  saved: {r['saved']}  "
                f"load {r['load_before']:.1f}->{r['load_after']:.1f}" + (f"\n             phases (s): {phases}" if phases else ""),
                flush=True,
            )
        by = {k: [r for r in rows if r["kind"] == k] for k in kinds}
        if len(by) == 2:
            a, c = by["tutorial"], by["tunestack"]
            speed = common.median(a, "wall_s") / common.median(c, "wall_s")
            loop = common.median(a, "train_s") / common.median(c, "train_s")
            rss = common.median(c, "rss_mb") / common.median(a, "rss_mb")
            print(
                f"  tunestack / tutorial, whole process: x{speed:.2f} faster (target x2: {'met' if speed >= 2 else 'MISSED'}; "
                f"training loop alone x{loop:.2f}), peak RSS x{rss:.2f} (target x0.5: {'met' if rss <= 0.5 else 'MISSED'}); "
                "tunestack saved and checked its adapter, the script saved nothing"
            )
        print(f"\n{common.load_line()} at the end")
        warning = common.load_warning(rows) if rows else None
        if warning:
            print(warning)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
