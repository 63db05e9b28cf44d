"""DPO, ORPO, SimPO and KTO on a tiny model: each moves held-out log-probability toward the chosen answers."""

from __future__ import annotations

import json

import pytest
import torch
from preference_sets import logp_margins, pairs, preference_dirs

HELD_OUT = pairs(16, seed=1, offset=3)


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine is shared
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return preference_dirs(tmp_path_factory.mktemp("prefs"))


@pytest.fixture(scope="module")
def base_margin(tiny_model) -> float:
    margins = logp_margins(tiny_model, HELD_OUT)
    return sum(margins) / len(margins)


def _train(cli, stage, model, data, out, *extra):
    train, held = data
    return cli(
        stage, "--model_name_or_path", model, "--train_file_dir", train, "--validation_file_dir", held,
        "--do_train", "--do_eval", "--output_dir", out, "--num_train_epochs", 3, "--per_device_train_batch_size", 8,
        "--learning_rate", 5e-3, "--logging_steps", 2, "--save_strategy", "no", "--report_to", "none", *extra,
    )  # fmt: skip


def _mean_margin(out) -> float:
    margins = logp_margins(out, HELD_OUT)
    return sum(margins) / len(margins)


def test_dpo_under_lora_uses_the_disabled_adapter_as_reference(
    cli, monkeypatch, tiny_model, data, base_margin, tmp_path
):
    from peft import PeftModel
    from transformers import Trainer

    seen = []
    original = Trainer.train

    def spy(self, *args, **kwargs):
        seen.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", spy)
    out = tmp_path / "dpo"
    code, stdout, err = _train(cli, "dpo", tiny_model, data, out)
    assert code == 0, err[-2000:]
    trainer = seen[0]
    assert trainer.ref_model is None and isinstance(trainer.model, PeftModel)
    assert list(trainer.model.peft_config) == ["default"]  # no frozen copy of the adapter either
    assert _mean_margin(out) > base_margin + 2.0
    manifest = json.loads((out / "run.json").read_text())
    m = manifest["metrics"]
    assert m["eval_rewards/margins"] > m["before_eval_rewards/margins"] and m["eval_rewards/accuracies"] >= 0.8
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margins" in row and "rewards/chosen" in row for row in logged)
    assert (out / "adapter_config.json").exists() and (out / "chat_template.jinja").exists()
    assert "held-out reward margin" in stdout


def test_full_dpo_keeps_a_frozen_reference_copy(cli, monkeypatch, tiny_model, data, base_margin, tmp_path):
    from transformers import Trainer

    seen = []
    original = Trainer.train
    monkeypatch.setattr(Trainer, "train", lambda self, *a, **k: (seen.append(self), original(self, *a, **k))[1])
    out = tmp_path / "dpo"
    code, _, err = _train(cli, "dpo", tiny_model, data, out, "--use_peft", "false", "--learning_rate", 1e-3)
    assert code == 0, err[-2000:]
    ref = seen[0].ref_model
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    assert (out / "model.safetensors").exists()
    assert _mean_margin(out) > base_margin + 2.0


@pytest.mark.parametrize(
    ("stage", "extra", "metric"),
    [
        ("dpo", ("--loss_type", "orpo", "--learning_rate", 1e-2), "rewards/margins"),
        ("dpo", ("--loss_type", "simpo"), "rewards/margins"),
        ("kto", (), "rewards/margins"),
    ],
    ids=["orpo", "simpo", "kto"],
)
def test_reference_free_and_unpaired_losses_learn(cli, tiny_model, data, base_margin, tmp_path, stage, extra, metric):
    out = tmp_path / "out"
    code, _, err = _train(cli, stage, tiny_model, data, out, *extra)
    assert code == 0, err[-2000:]
    m = json.loads((out / "run.json").read_text())["metrics"]
    assert m[f"eval_{metric}"] > m[f"before_eval_{metric}"]
    assert _mean_margin(out) > base_margin + 0.5


def test_loss_and_reference_flags_are_checked(cli, tiny_model, data, tmp_path):
    code, _, err = _train(cli, "dpo", tiny_model, data, tmp_path / "a", "--loss_type", "nope")
    assert code == 2 and "--loss_type nope" in err
    code, _, err = _train(cli, "dpo", tiny_model, data, tmp_path / "b", "--ref_model", tiny_model)
    assert code == 2 and "--ref_model is for full-parameter training" in err
