"""Every private method of transformers / TRL that tunestack overrides or calls is pinned here: a library
upgrade within the allowed ranges that renames one or changes its parameters fails this test, not a user's run.
The fast paths' numerical equivalence is pinned in test_efficient.py (trained-positions head, varlen attention),
test_packed_logps.py (DPO log-probs against TRL's fused head) and test_packed_scores.py (RM scores)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _overrides():
    from transformers import Trainer
    from trl import DPOTrainer, KTOTrainer, RewardTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    from tunestack.train.dpo import _dpo_trainer_class, _reference_free_trainer_class
    from tunestack.train.fast.batching import TokenBudgetMixin
    from tunestack.train.fast.efficient import TrainedPositionsLossMixin
    from tunestack.train.fast.varlen import VarlenAttentionMixin
    from tunestack.train.kto import _kto_trainer_class
    from tunestack.train.rm import _reward_trainer_class
    from tunestack.train.trainer import TunestackTrainerMixin

    reward = _reward_trainer_class()
    return [
        (TunestackTrainerMixin, Trainer, "_save_checkpoint"),
        (TunestackTrainerMixin, Trainer, "_load_from_checkpoint"),
        (TunestackTrainerMixin, Trainer, "training_step"),
        (TunestackTrainerMixin, Trainer, "_get_grad_norm"),
        (TunestackTrainerMixin, Trainer, "log"),
        (TrainedPositionsLossMixin, Trainer, "compute_loss"),
        (VarlenAttentionMixin, Trainer, "training_step"),
        (VarlenAttentionMixin, Trainer, "prediction_step"),
        (TokenBudgetMixin, Trainer, "get_train_dataloader"),
        (_dpo_trainer_class(), DPOTrainer, "_prepare_dataset"),
        (_kto_trainer_class(), KTOTrainer, "_prepare_dataset"),
        (_reference_free_trainer_class("orpo"), ORPOTrainer, "tokenize_row"),
        (_reference_free_trainer_class("simpo"), CPOTrainer, "tokenize_row"),
        (reward, RewardTrainer, "prediction_step"),
        (reward, RewardTrainer, "_save"),
        (reward, RewardTrainer, "_load_from_checkpoint"),
        (reward, RewardTrainer, "_load_best_model"),
    ]


@pytest.mark.parametrize("index", range(17))
def test_overridden_library_methods_keep_their_parameters(index: int) -> None:
    ours, library, name = _overrides()[index]
    assert hasattr(library, name), f"{library.__name__}.{name} is gone: tunestack's override is never called"
    assert _params(getattr(library, name)) == _params(getattr(ours, name)), f"{library.__name__}.{name} changed"


def test_library_internals_tunestack_calls_still_exist() -> None:
    from transformers import Trainer
    from transformers.trainer_utils import rotate_checkpoints
    from trl.trainer.utils import FusedCausalLMOutput, disable_dropout_in_model

    assert _params(Trainer._get_output_dir) == ["self", "trial"]  # redirected while a checkpoint is staged
    assert {"output_dir", "save_total_limit", "best_model_checkpoint", "use_mtime"} <= set(_params(rotate_checkpoints))
    fields = set(FusedCausalLMOutput.__dataclass_fields__)
    assert {"loss", "log_probs", "label_mask"} <= fields  # what packed DPO log-probs return to TRL
    assert _params(disable_dropout_in_model) == ["model"]
    # model/packed_linear.py: oneDNN's prepacked linear, as torch.compile's CPU backend calls it.
    if torch.backends.mkldnn.is_available():
        w, x = torch.randn(6, 4), torch.randn(3, 4)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 8)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        assert torch.allclose(out, x @ w.t(), atol=1e-5)


def test_grpo_and_rloo_internals_the_fast_paths_rely_on() -> None:
    """train/fast/packed_rl.py overrides `_get_per_token_logps_and_entropies` (its named parameters, the rest
    multimodal inputs that default to None), RLOO's `_generate_and_score_completions` and `_compute_loss`, and wraps
    `_generate_single_turn` (where transformers' `generate` samples); it relies on every scoring pass calling the
    model with `fused_lm_head=True`, and on RLOO scoring the old policy first after generation, then the
    reference."""
    from trl import GRPOTrainer, RLOOTrainer

    from tunestack.train.fast.packed_rl import OnePolicyPassMixin

    named = ["self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy"]
    for trainer in (GRPOTrainer, RLOOTrainer):
        params = inspect.signature(trainer._get_per_token_logps_and_entropies).parameters
        assert list(params)[: len(named) + 1] == [*named, "compute_aux_loss"], trainer.__name__
        assert all(p.default is None for p in list(params.values())[len(named) + 1 :]), trainer.__name__
        assert "fused_lm_head=True" in inspect.getsource(trainer._get_per_token_logps_and_entropies)
        assert _params(trainer._generate_and_score_completions) == ["self", "inputs"]
        assert _params(trainer._compute_loss) == ["self", "model", "inputs"]
        assert "unwrapped_model.generate(" in inspect.getsource(trainer._generate_single_turn), trainer.__name__
    ours = inspect.signature(OnePolicyPassMixin._get_per_token_logps_and_entropies).parameters
    assert list(ours)[: len(named) + 1] == [*named, "compute_aux_loss"]
    source = inspect.getsource(RLOOTrainer._generate_and_score_completions)
    old = source.index("old_per_token_logps, _, _ = self._get_per_token_logps_and_entropies(")
    assert old < source.index("ref_per_token_logps, _, _ = self._get_per_token_logps_and_entropies(")
    assert source.count("self._get_per_token_logps_and_entropies(") == 3  # old, and the reference two ways


def _train_and_checkpoint(trainer_class: type, model_dir: Path, out: Path) -> Path:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainingArguments

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = [{"input_ids": [1, 5, 9, 14, 22, 7, 2], "labels": [1, 5, 9, 14, 22, 7, 2]}] * 4
    args = TrainingArguments(
        output_dir=str(out), max_steps=2, save_steps=2, per_device_train_batch_size=2, report_to=[],
        use_cpu=True, save_only_model=False, logging_steps=1,
    )  # fmt: skip
    trainer_class(model=model, args=args, train_dataset=Dataset.from_list(rows)).train()
    return out / "checkpoint-2"


def test_a_staged_checkpoint_holds_what_the_trainer_itself_writes(tiny_model: Path, tmp_path: Path) -> None:
    """The checkpoint save is redirected into a staging folder: it must still contain every file transformers
    writes (weights, optimizer, scheduler, RNG, trainer state), plus the completion marker listing them."""
    from transformers import Trainer

    from tunestack.checkpoints import MARKER
    from tunestack.train.trainer import with_tunestack

    plain = _train_and_checkpoint(Trainer, tiny_model, tmp_path / "plain")
    ours = _train_and_checkpoint(with_tunestack(Trainer), tiny_model, tmp_path / "ours")
    plain_files = {p.name for p in plain.iterdir()} - {"training_args.bin"}  # a pickle holding the hub token
    assert {p.name for p in ours.iterdir()} == plain_files | {MARKER}
    marker = json.loads((ours / MARKER).read_text())
    assert marker["step"] == 2 and set(marker["files"]) == plain_files
    assert all(marker["files"][name] == (ours / name).stat().st_size for name in plain_files)
    assert not (tmp_path / "ours" / ".staging" / "checkpoint-2").exists()
