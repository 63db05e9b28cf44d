"""Helpers shared by the benchmarks in this folder (not a test, not part of the package).

* a subprocess per measured workload: `run_child` starts `python SCRIPT _child KIND SPEC.json`, the
  script calls `child_entry(CHILDREN)` first thing in `main()`; the child writes `result.json` with
  its own peak RSS (`VmHWM` from /proc/self/status), and the parent adds the wall time, `ru_maxrss`
  from `os.wait4` (the same peak, seen from outside) and the machine's load average around the run;
* `orders`: the running order of N systems over R rounds (a b c, c b a, a b c ...);
* `matmul_gflops`: the machine's measured matmul rate, the yardstick of "fraction of peak";
* a generated chat set (English and Chinese, single- and multi-turn, fixed seed) for the SFT and
  DPO benchmarks, with its length distribution measured by a real tokenizer.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------
# Subprocess per workload


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def vmhwm_mb() -> float | None:
    """This process's peak resident set size (VmHWM) in MB, or None where /proc is missing."""
    return _status_mb("VmHWM")


def vmrss_mb() -> float | None:
    """This process's resident set size now (VmRSS) in MB."""
    return _status_mb("VmRSS")


def child_entry(children: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> bool:
    """In a child (`SCRIPT _child KIND SPEC.json`): run the workload, write result.json, return True."""
    if len(sys.argv) < 2 or sys.argv[1] != "_child":
        return False
    kind, spec_file = sys.argv[2], Path(sys.argv[3])
    spec = json.loads(spec_file.read_text())
    result = children[kind](spec)
    result["vmhwm_mb"] = vmhwm_mb()
    (spec_file.parent / "result.json").write_text(json.dumps(result))
    return True


def run_child(script: Path, kind: str, spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run one workload of `script` in a fresh process; its result plus wall time, peak RSS and load."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec = {**spec, "work": str(work)}
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    # Every system gets torch's own thread count (one per core), whatever thread limits the calling shell sets.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
    log = work / "log.txt"
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, str(script), "_child", kind, str(spec_file)], stdout=fh, stderr=fh, env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed (exit {proc.returncode}); log: {log}\n{log.read_text()[-3000:]}")
    result = json.loads((work / "result.json").read_text())
    result.update(
        kind=kind,
        wall_s=wall,
        peak_rss_mb=usage.ru_maxrss / 1024,  # Linux: ru_maxrss in KiB
        cpu_s=usage.ru_utime + usage.ru_stime,
        load_before=load_before,
        load_after=os.getloadavg()[0],
    )
    return result


def load_warning(rows: list[dict[str, Any]]) -> str | None:
    """A warning line when the machine was busy during the runs. A CPU run's own threads bring the 1-minute load
    average up to about the number of cores, so only a load above 1.25x the cores says that other work ran."""
    worst = max(max(r["load_before"], r["load_after"]) for r in rows)
    cores = os.cpu_count() or 1
    if worst > 1.25 * cores:
        return (
            f"WARNING: the 1-minute load average reached {worst:.1f} on {cores} cores during the runs: other work "
            "shared the CPUs, so the timings (and their ratios) are noisy; re-run on an idle machine"
        )
    return None


def run_in_workdir(args: Any, run_bench: Callable[[Any, str, Path], list[dict[str, Any]]], name: str) -> None:
    """The end of a bench's main(): the model (--model, else the built-in SmolLM2), the scratch folder (--workdir,
    kept; else a temporary one, removed), `run_bench(args, model, work)`, the load at the end and --json."""
    import tempfile

    from tunestack.model.builtin import builtin_model_dir

    model = args.model or str(builtin_model_dir("smollm2-135m-instruct"))
    temp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        temp = tempfile.mkdtemp(prefix=f"tunestack-{name}-bench-")
        work = Path(temp)
    try:
        rows = run_bench(args, model, work)
        print(f"\n{load_line()} at the end")
        warning = load_warning(rows) if rows else None
        if warning:
            print(warning)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


def orders(kinds: list[str], rounds: int) -> list[str]:
    """a b c, c b a, a b c ...: alternate which system runs first (and last) in each round."""
    out: list[str] = []
    for r in range(rounds):
        out += list(kinds) if r % 2 == 0 else list(reversed(kinds))
    return out


def median(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def machine_line() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores"
    return f"CPU, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads"


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


# ------------------------------------------------------------------------------------------------
# What a transformers Trainer (or any subclass: TRL's, tunestack's) did in each training step


def install_probe() -> dict[str, Any]:
    """Record, for every transformers.Trainer subclass in this process, what each training step consumed.

    Per step: tokens the model was given (padding included), real tokens (attention mask, or all of them
    when the batch has none: packed rows), trained tokens (completion_mask when the batch has one, as in
    TRL's DPO; else labels != -100 after the one-token shift of every causal LM loss), the step's loss and
    the forward+backward seconds. Also Trainer.train()'s metrics (train_runtime) and the process's RSS when
    training starts (model and data loaded). Call before the trainer is built.
    """
    from transformers import Trainer

    probe: dict[str, Any] = {"steps": [], "train_metrics": None, "params": None, "before_train": None}
    training_step, train = Trainer.training_step, Trainer.train

    def probed_training_step(self, model, inputs, num_items_in_batch=None):
        if probe["params"] is None:
            params = list(model.parameters())
            probe["params"] = {
                "total": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
            }
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if inputs.get("completion_mask") is not None:
            trained = int(inputs["completion_mask"].sum())
        elif inputs.get("labels") is not None:
            trained = int((inputs["labels"][..., 1:] != -100).sum())
        else:
            trained = 0
        start = time.perf_counter()
        loss = training_step(self, model, inputs, num_items_in_batch)
        value = float(loss)
        probe["steps"].append(
            {
                "padded_tokens": int(ids.numel()),
                "real_tokens": int(mask.sum()) if mask is not None else int(ids.numel()),
                "trained_tokens": trained,
                "rows": int(ids.shape[0]),
                "loss": value,
                "fwd_bwd_s": time.perf_counter() - start,
            }
        )
        return loss

    def probed_train(self, *args, **kwargs):
        probe["before_train"] = {"vmrss_mb": vmrss_mb(), "vmhwm_mb": vmhwm_mb()}
        out = train(self, *args, **kwargs)
        probe["train_metrics"] = dict(out.metrics)
        return out

    Trainer.training_step = probed_training_step
    Trainer.train = probed_train
    return probe


def probe_result(probe: dict[str, Any]) -> dict[str, Any]:
    import torch

    steps = probe["steps"]
    if not steps or not probe["train_metrics"]:
        raise RuntimeError("the probe saw no training step: did the system train through transformers.Trainer?")
    return {
        "train_runtime": probe["train_metrics"]["train_runtime"],
        "steps": len(steps),
        "padded_tokens": sum(s["padded_tokens"] for s in steps),
        "real_tokens": sum(s["real_tokens"] for s in steps),
        "trained_tokens": sum(s["trained_tokens"] for s in steps),
        "max_step_tokens": max(s["padded_tokens"] for s in steps),
        "rows_per_step": [s["rows"] for s in steps],
        "step_tokens": [[s["padded_tokens"], s["real_tokens"], s["trained_tokens"]] for s in steps],
        "losses": [s["loss"] for s in steps],
        "fwd_bwd_s": [s["fwd_bwd_s"] for s in steps],
        "params_total": probe["params"]["total"],
        "params_trainable": probe["params"]["trainable"],
        "rss_before_train_mb": probe["before_train"]["vmrss_mb"],
        "hwm_before_train_mb": probe["before_train"]["vmhwm_mb"],
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


# ------------------------------------------------------------------------------------------------
# The machine's matmul rate


def matmul_gflops(dtype_name: str = "float32", seconds: float = 1.0) -> dict[str, float]:
    """Best measured torch.mm rate (GFLOP/s) over a few shapes, on the training device (tunestack.timing)."""
    from tunestack.timing import matmul_gflops as measure

    return measure(dtype_name, seconds)


# ------------------------------------------------------------------------------------------------
# Generated chat set: everyday-advice questions and answers, a third Chinese, a third multi-turn.
# Lengths follow a log-normal in tokens (median ~210, p90 ~470, ~8% over 512 with the SmolLM2
# tokenizer); no final answer is longer than ANSWER_CAP tokens, so every sample fits a 512-token
# cutoff once older turns (or the left of a long question) are cut.

_EN_TOPICS = [
    "baking sourdough bread", "growing tomatoes on a balcony", "repainting a small bedroom", "saving for a long trip",
    "learning Spanish verbs", "training a new puppy", "writing unit tests", "choosing a camera lens",
    "running a first 10k race", "fixing a dripping tap", "planning a weekend in Lisbon", "keeping houseplants alive",
    "cooking rice in a pot", "setting up a home network", "reading more books", "brewing coffee at home",
]  # fmt: skip
_EN_ACTIONS = [
    "start with a cheap model", "water the plants every day", "skip the warm-up", "track everything in a spreadsheet",
    "cook with cast iron", "book the train early", "practise in the evening", "buy the larger size",
    "ask a neighbour for help", "wait until spring", "rent the tools instead", "use the default settings",
]  # fmt: skip
_EN_SUBJECTS = [
    "A slow rise", "Fresh basil", "A sharp knife", "The second coat of paint", "A small emergency fund",
    "Daily practice", "A well-drained pot", "The morning train", "A short walk after dinner", "A failing test",
    "A wider lens", "Cold water", "The landlord", "A clear budget", "Regular watering", "Your dog",
    "The night market", "A simple checklist", "A proper warm-up", "The router", "A quiet corner", "Good beans",
]  # fmt: skip
_EN_VERBS = [
    "usually improves", "often changes", "can protect", "will reduce", "quietly shapes", "makes it easier to manage",
    "helps you track", "tends to weaken", "should support", "may delay", "rarely affects", "clearly speeds up",
]  # fmt: skip
_EN_OBJECTS = [
    "the flavour of the dough", "the roots of the tomatoes", "your monthly savings", "the battery life",
    "the pronunciation of new words", "the colour of the walls", "the cost of the trip", "the accuracy of the results",
    "the dog's sleep", "the sharpness of the photos", "the risk of a leak", "your knees", "the evening routine",
    "the exchange rate you get", "the number of bugs", "the signal in the kitchen", "the bitterness of the cup",
]  # fmt: skip
_EN_TAILS = [
    "in the first week", "when the weather turns cold", "if you start early", "on a tight budget",
    "for most beginners", "after a few tries", "without much effort", "during the holidays", "in a small flat",
    "over the long run", "", "",
]  # fmt: skip
_EN_LINKS = ["First, ", "Second, ", "Also, ", "However, ", "Finally, ", "For example, ", "In practice, ", "", "", ""]
_EN_OPENERS = [
    "Good question.", "In short, it depends.", "Here is a practical answer.", "It depends on a few things.",
    "Let me explain step by step.", "Sure, here is what usually works.",
]  # fmt: skip
_EN_QUESTIONS = [
    "How should I approach {topic}?", "Why does {subject} {verb} {object}?",
    "What should I know about {topic} {tail}?", "Is it a good idea to {action}?",
    "Could you compare {topic} and {topic2}?", "What is the most common mistake when {topic}?",
]  # fmt: skip
_EN_CONTEXT = ["Here are my notes so far:", "This is what I read about it:", "My friend sent me this:"]
_EN_SYSTEMS = [
    "You are a friendly assistant who answers briefly.",
    "You are a patient tutor. Explain your reasoning in plain words.",
    "You are a helpful assistant for home, garden and travel questions.",
]

_ZH_TOPICS = ["烤酸面包", "在阳台上种番茄", "粉刷卧室", "为旅行存钱", "学习西班牙语", "训练小狗", "写单元测试", "选择相机镜头",
              "第一次跑十公里", "修理滴水的水龙头", "计划去里斯本的周末", "养活室内植物", "用锅煮米饭", "在家冲咖啡"]  # fmt: skip
_ZH_ACTIONS = ["先买便宜的型号", "每天给植物浇水", "跳过热身", "用表格记录一切", "用铸铁锅做饭", "提前订火车票", "晚上练习",
               "请邻居帮忙", "等到春天再做", "租用工具"]  # fmt: skip
_ZH_SUBJECTS = ["慢速发酵", "新鲜的罗勒", "锋利的刀", "第二遍油漆", "小额应急基金", "每天练习", "排水良好的花盆", "早班火车",
                "饭后散步", "失败的测试", "广角镜头", "冷水", "房东", "清晰的预算", "定期浇水", "你的狗", "夜市",
                "简单的清单", "充分的热身", "路由器"]  # fmt: skip
_ZH_VERBS = ["通常会改善", "往往会改变", "可以保护", "能够减少", "会悄悄影响", "有助于记录", "可能会削弱", "应该支持",
             "可能推迟", "明显加快"]  # fmt: skip
_ZH_OBJECTS = ["面团的风味", "番茄的根系", "每个月的储蓄", "电池的寿命", "新单词的发音", "墙面的颜色", "旅行的费用",
               "结果的准确性", "狗的睡眠", "照片的清晰度", "漏水的风险", "你的膝盖", "晚上的作息", "代码里的错误数量",
               "厨房里的信号", "咖啡的苦味"]  # fmt: skip
_ZH_TAILS = ["在第一周", "在天气变冷的时候", "如果你早点开始", "在预算有限的情况下", "对大多数初学者来说", "试过几次以后",
             "在节假日期间", "在小公寓里", "从长远来看", "", ""]  # fmt: skip
_ZH_LINKS = ["首先，", "其次，", "另外，", "不过，", "最后，", "例如，", "实际上，", "", "", ""]
_ZH_OPENERS = [
    "好问题。",
    "简单来说，这要看情况。",
    "这里有一个实用的回答。",
    "这取决于几个因素。",
    "我来一步一步解释。",
]
_ZH_QUESTIONS = ["我应该怎样开始{topic}？", "为什么{subject}{verb}{object}？", "{tail}{topic}需要注意什么？",
                 "{action}是个好主意吗？", "能比较一下{topic}和{topic2}吗？", "{topic}时最常见的错误是什么？"]  # fmt: skip
_ZH_CONTEXT = ["这是我目前的笔记：", "这是我读到的内容：", "我朋友发给我这段话："]
_ZH_SYSTEMS = ["你是一个乐于助人的助手，请简洁地回答。", "你是一位耐心的老师，请用通俗的话解释你的思路。",
               "你是家居、园艺和旅行方面的助手。"]  # fmt: skip

# Generation-time token estimates for the SmolLM2 tokenizer (measured lengths are printed separately).
_TOKENS_PER_CHAR = {"en": 1 / 4.4, "zh": 2.4}
_TEMPLATE_TOKENS = {"default_system": 20, "message": 5}
ANSWER_CAP = 380
LENGTH_MEDIAN, LENGTH_SIGMA = 195, 0.70  # log-normal target; measured with seed 1234: median 212, p90 470, 8.1% > 512


def _estimate(text: str, lang: str) -> int:
    return max(1, round(len(text) * _TOKENS_PER_CHAR[lang]))


def _sentence(rng: random.Random, lang: str) -> str:
    if lang == "en":
        tail = rng.choice(_EN_TAILS)
        body = (
            f"{rng.choice(_EN_SUBJECTS)} {rng.choice(_EN_VERBS)} {rng.choice(_EN_OBJECTS)}{' ' + tail if tail else ''}."
        )
        link = rng.choice(_EN_LINKS)
        return link + (body[0].lower() + body[1:] if link else body)
    return (
        f"{rng.choice(_ZH_LINKS)}{rng.choice(_ZH_TAILS)}{rng.choice(_ZH_SUBJECTS)}{rng.choice(_ZH_VERBS)}"
        f"{rng.choice(_ZH_OBJECTS)}。"
    )


def _fill(rng: random.Random, lang: str, tokens: int, first: str = "") -> str:
    """Sentences until about `tokens` tokens (estimated)."""
    parts = [first] if first else []
    sep = " " if lang == "en" else ""
    while _estimate(sep.join(parts), lang) < tokens:
        parts.append(_sentence(rng, lang))
    return sep.join(parts)


def _question(rng: random.Random, lang: str, tokens: int) -> str:
    topics = _EN_TOPICS if lang == "en" else _ZH_TOPICS
    topic, topic2 = rng.sample(topics, 2)
    if lang == "en":
        q = rng.choice(_EN_QUESTIONS).format(
            topic=topic, topic2=topic2, action=rng.choice(_EN_ACTIONS), tail=rng.choice(_EN_TAILS),
            subject=rng.choice(_EN_SUBJECTS).lower(), verb=rng.choice(_EN_VERBS), object=rng.choice(_EN_OBJECTS),
        ).replace("  ", " ").replace(" ?", "?")  # fmt: skip
    else:
        q = rng.choice(_ZH_QUESTIONS).format(
            topic=topic, topic2=topic2, action=rng.choice(_ZH_ACTIONS), tail=rng.choice(_ZH_TAILS),
            subject=rng.choice(_ZH_SUBJECTS), verb=rng.choice(_ZH_VERBS), object=rng.choice(_ZH_OBJECTS),
        )  # fmt: skip
    rest = tokens - _estimate(q, lang)
    if rest < 12:
        return q
    context = _fill(rng, lang, rest, rng.choice(_EN_CONTEXT if lang == "en" else _ZH_CONTEXT))
    return context + ("\n\n" if lang == "en" else "\n") + q


def generate_chat(rng: random.Random) -> dict[str, Any]:
    """One conversation in the OpenAI messages format, plus its language and number of turns."""
    lang = "zh" if rng.random() < 1 / 3 else "en"
    pairs = rng.randint(2, 4) if rng.random() < 1 / 3 else 1
    target = min(1400, max(48, round(math.exp(rng.gauss(math.log(LENGTH_MEDIAN), LENGTH_SIGMA)))))
    messages: list[dict[str, str]] = []
    overhead = _TEMPLATE_TOKENS["message"] * 2 * pairs
    if rng.random() < 0.3:
        system = rng.choice(_EN_SYSTEMS if lang == "en" else _ZH_SYSTEMS)
        messages.append({"role": "system", "content": system})
        overhead += _TEMPLATE_TOKENS["message"] + _estimate(system, lang)
    else:
        overhead += _TEMPLATE_TOKENS["default_system"]
    budget = max(16 * pairs, target - overhead)
    weights = [rng.uniform(0.5, 1.5) for _ in range(pairs)]
    shares = [budget * w / sum(weights) for w in weights]
    openers = _EN_OPENERS if lang == "en" else _ZH_OPENERS
    for i, share in enumerate(shares):
        q_tokens = max(8, round(share * rng.uniform(0.15, 0.4)))
        a_tokens = max(8, round(share) - q_tokens)
        if i == pairs - 1 and a_tokens > ANSWER_CAP:  # a long sample: the last question carries the rest
            q_tokens += a_tokens - ANSWER_CAP
            a_tokens = ANSWER_CAP
        answer_first = rng.choice(openers) if rng.random() < 0.7 else ""
        messages.append({"role": "user", "content": _question(rng, lang, q_tokens)})
        messages.append({"role": "assistant", "content": _fill(rng, lang, a_tokens, answer_first)})
    return {"messages": messages, "lang": lang, "turns": pairs}


def generate_chats(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [generate_chat(rng) for _ in range(n)]


def generate_preference_pairs(n: int, seed: int) -> list[dict[str, Any]]:
    """Preference pairs from the chat set: the conversation before its last answer is the prompt, its last
    answer is chosen, and a fresh answer of 50-120% of its length (same language) is rejected."""
    rng = random.Random(seed + 1)
    pairs = []
    for chat in generate_chats(n, seed):
        messages, lang = chat["messages"], chat["lang"]
        chosen = messages[-1]["content"]
        size = max(8, round(_estimate(chosen, lang) * rng.uniform(0.5, 1.2)))
        rejected = _fill(rng, lang, size)
        pairs.append(
            {"prompt": messages[:-1], "chosen": chosen, "rejected": rejected, "lang": lang, "turns": chat["turns"]}
        )
    return pairs


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    """Token ids of a conversation rendered with the tokenizer's chat template."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])


def fit_messages(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> tuple[list[dict[str, str]], bool]:
    """The conversation cut to `max_length` tokens as tunestack cuts it: oldest user/assistant pairs first
    (the system prompt stays), then the left of the last question. Returns (messages, truncated)."""
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if len(chat_ids(tokenizer, messages)) <= max_length:
        return messages, False
    while len(turns) > 2:
        turns = turns[2:]
        if len(chat_ids(tokenizer, system + turns)) <= max_length:
            return system + turns, True
    question = tokenizer(turns[0]["content"], add_special_tokens=False)["input_ids"]
    for _ in range(4):  # re-tokenizing a cut text can differ by a token or two
        over = len(chat_ids(tokenizer, system + turns)) - max_length
        if over <= 0:
            return system + turns, True
        question = question[over:]
        if not question:
            break
        turns = [{"role": "user", "content": tokenizer.decode(question)}, turns[1]]
    raise ValueError("a final answer does not fit the cutoff; the generator keeps answers shorter than that")


def _pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def length_report(tokenizer: Any, chats: list[dict[str, Any]], cutoff: int) -> dict[str, float]:
    """Measured token lengths (chat template included) of generated conversations."""
    lengths = [len(chat_ids(tokenizer, c["messages"])) for c in chats]
    answers = []
    for c in chats:
        n = 0
        for m in c["messages"]:
            if m["role"] == "assistant":
                n += len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) + 1  # + <|im_end|>
        answers.append(n)
    return {
        "n": len(chats),
        "mean": statistics.mean(lengths),
        "median": statistics.median(lengths),
        "p10": _pct(lengths, 0.10),
        "p90": _pct(lengths, 0.90),
        "p99": _pct(lengths, 0.99),
        "max": max(lengths),
        "over_cutoff": sum(n > cutoff for n in lengths) / len(lengths),
        "multi_turn": sum(c["turns"] > 1 for c in chats) / len(chats),
        "chinese": sum(c["lang"] == "zh" for c in chats) / len(chats),
        "answer_share": sum(answers) / sum(lengths),
    }


def format_length_report(r: dict[str, float], cutoff: int) -> str:
    return (
        f"{r['n']} conversations: tokens median {r['median']:.0f}, mean {r['mean']:.0f}, p10 {r['p10']:.0f}, "
        f"p90 {r['p90']:.0f}, p99 {r['p99']:.0f}, max {r['max']:.0f}; {r['over_cutoff']:.1%} longer than {cutoff}; "
        f"{r['multi_turn']:.0%} multi-turn, {r['chinese']:.0%} Chinese; answers {r['answer_share']:.0%} of the tokens"
    )
