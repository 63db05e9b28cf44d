"""Sampling engines for the RL stages' generation, on the same policy and prompts.

RL steps spend a quarter (PPO) to over half (GRPO, RLOO) of their time sampling completions. transformers offers
several ways to sample from the same LoRA policy; this bench times each on the real SmolLM2-135M-Instruct with a
LoRA r8 adapter on every linear layer (B filled with small random values, so the adapter changes the samples), the
demo's RL prompts rendered with the chat template, each prompt repeated --generations times, sampling at
temperature 1 without top-k/top-p, --max_new_tokens tokens, each engine in its own subprocess, in alternating
order:

  (a) generate    `model.generate` with its default dynamic KV cache on left-padded rows: what tunestack's PPO
                  rollouts and TRL's GRPO / RLOO trainers (and so tunestack's) run today
  (b) static      the same with `cache_implementation="static"` (a preallocated cache, no growing `torch.cat`)
  (c) continuous  `model.generate_batch`: transformers' continuous batching on a paged cache, what TRL's
                  `use_transformers_paged` runs
  (d) merged      (a) with the adapter merged into the base weights for the call (PEFT's merge_adapter, then
                  unmerge_adapter): the weights a weight-syncing engine such as vLLM samples from
  (e) packed      (a) on oneDNN-prepacked linear layers, the adapter merged into the packed copies (packing
                  included in each call's time): what tunestack's RL stages and chat/serve run on a CPU
                  (tunestack.model.packed_linear)

Generated tokens/s = tokens up to and including each row's end of turn ÷ the call's seconds (the best of --repeats
calls after one warm-up call; model loading excluded).

    python bench/generation_engines.py                    # 8 prompts x 4, 64 tokens, a b c d e
    python bench/generation_engines.py --systems ae --prompts 2 --max_new_tokens 16   # a quick check

Every engine samples with the same seed; "same samples" says whether its tokens equal (a)'s.

Not a test: numbers depend on the machine; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402  (bench/common.py: subprocess runner, load average)

SYSTEMS = {"a": "generate", "b": "static", "c": "continuous", "d": "merged", "e": "packed"}
PROMPTS = HERE.parent.parent / "examples" / "demo" / "rl" / "prompts.jsonl"


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from tunestack.model.packed_linear import packed_linears

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    model.eval()
    questions = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()][: spec["prompts"]]
    encoded = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False)
        for q in questions
        for _ in range(spec["generations"])
    ]
    stop = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop
    config = GenerationConfig(
        max_new_tokens=spec["max_new_tokens"],
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        eos_token_id=stop,
        pad_token_id=pad,
    )
    engine = spec["engine"]
    if engine == "static":
        config.cache_implementation = "static"
    width = max(len(ids) for ids in encoded)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])

    def kept(row: list[int]) -> int:
        return row.index(stop) + 1 if stop in row else len(row)

    @torch.no_grad()
    def sample() -> list[list[int]]:
        torch.manual_seed(spec["seed"])
        if engine == "continuous":
            out = model.generate_batch(inputs=encoded, generation_config=config, progress_bar=False)
            return [list(r.generated_tokens) for r in out.values()]
        if engine == "merged":
            model.merge_adapter()
        try:
            with packed_linears(model, engine == "packed"):
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        finally:
            if engine == "merged":
                model.unmerge_adapter()
        return out[:, width:].tolist()

    sample()  # warm-up: first-call allocations, the static cache's setup
    seconds, rows = [], []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        rows = sample()
        seconds.append(time.perf_counter() - start)
    tokens = sum(kept(row) for row in rows)
    samples = hashlib.sha256(json.dumps([row[: kept(row)] for row in rows]).encode()).hexdigest()
    return {
        "rows": len(encoded),
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / min(seconds),
        "samples": samples,
    }


CHILDREN = {"sample": _child}


def run_bench(args: argparse.Namespace, model: str, work: Path) -> list[dict[str, Any]]:
    print(f"{common.machine_line()}; float32 matmul {common.matmul_gflops()['best']:.0f} GFLOP/s")
    rows = []
    for i, key in enumerate(common.orders(list(args.systems), args.rounds)):
        spec = {
            "model": model,
            "engine": SYSTEMS[key],
            "prompts": args.prompts,
            "generations": args.generations,
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "seed": args.seed,
        }
        row = common.run_child(HERE, "sample", spec, work / f"run{i}-{key}")
        row["system"] = key
        rows.append(row)
        print(
            f"({key}) {SYSTEMS[key]:<10} {row['rows']} rows  {row['tokens']} tokens  best {min(row['seconds']):.2f} s"
            f"  {row['tok_s']:.1f} tok/s  peak RSS {row['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    first = [r for r in rows if r["system"] == args.systems[0]]
    base = common.median(first, "tok_s")
    print(f"\ngenerated tokens/s, median over rounds, against ({args.systems[0]}):")
    for key in args.systems:
        mine = [r for r in rows if r["system"] == key]
        same = "same samples" if mine[0]["samples"] == first[0]["samples"] else "other samples"
        print(
            f"  ({key}) {SYSTEMS[key]:<10} {common.median(mine, 'tok_s'):7.1f} tok/s  x{common.median(mine, 'tok_s') / base:.2f}  {same}"
        )
    return rows


def main() -> None:
    if common.child_entry(CHILDREN):
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default="abcde", help="which of a b c d e to run (the first is the baseline)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--model", help="model folder (default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--workdir", help="scratch folder to keep (default: a temporary one)")
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args()
    common.run_in_workdir(args, run_bench, "generation")


if __name__ == "__main__":
    main()
