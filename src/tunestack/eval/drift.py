"""The drift probe: how far a model's general behaviour moved from the base model's.

Every model answers the same held-out general prompts (by default the prompts the SFT forgetting guard holds out
of replay: every sixth of tunestack's built-in general set) greedily. The first model evaluated (the base, when
`tunestack eval` adds it) gives the reference answers; for each model two figures are kept:

* drift_rouge_l: ROUGE-L (percent) of its answers against the base model's answers (100 = the same answers);
* drift_perplexity: the perplexity of the base model's answers under this model, each answer given its prompt
  rendered with this model's template (near the base's own value = it would still say the same).
"""

from __future__ import annotations

from typing import Any

from tunestack.eval.metrics import score_answers
from tunestack.eval.perplexity import conditional_perplexity
from tunestack.eval.scoring import pad_id_of
from tunestack.infer.batch import PromptItem, generate_all
from tunestack.train.replay import load_prompts, split_prompts


class DriftProbe:
    def __init__(self, n: int, prompts: str | None, gen: Any, batch_size: int, segmentation: str):
        items, self.source = load_prompts(prompts)
        _, held = split_prompts(items)
        self.items: list[PromptItem] = (held or items)[:n]
        self.gen, self.batch_size, self.segmentation = gen, batch_size, segmentation
        self.reference_label: str | None = None
        self.reference: list[str] = []

    def measure(self, label: str, chat: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(metrics, prediction rows) of one model; the first model measured becomes the reference."""
        system = chat.system_for(self.gen)
        answers = generate_all(chat, self.items, self.gen, self.batch_size, system)
        if self.reference_label is None:
            self.reference_label, self.reference = label, answers
        rouge = score_answers(answers, self.reference, self.segmentation).get("rouge_l", 0.0)
        contexts, targets = [], []
        for item, base_answer in zip(self.items, self.reference, strict=True):
            contexts.append(chat.prompt_ids(item.messages, item.system or system, 0)[0])
            targets.append(chat.tokenizer(base_answer, add_special_tokens=False)["input_ids"])
        metrics: dict[str, Any] = {"drift_rouge_l": rouge, "drift_prompts": len(self.items)}
        if any(targets):  # the base model may answer nothing at all (an untrained model): no perplexity then
            ppl = conditional_perplexity(chat.model, contexts, targets, self.batch_size, pad_id_of(chat.tokenizer))
            metrics["drift_perplexity"] = ppl["perplexity"]
        rows = [
            {"model": label, "set": "drift", "prompt": item.prompt, "response": answer, "reference": base}
            for item, answer, base in zip(self.items, answers, self.reference, strict=True)
        ]
        return metrics, rows
