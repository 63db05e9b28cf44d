"""Callbacks every stage gets: metrics.jsonl, clean stop on SIGTERM, AdaLoRA budget updates."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tunestack.rundir import append_metrics

logger = logging.getLogger(__name__)


class MetricsFileCallback(TrainerCallback):
    """Append every log (train and eval) as one JSON line to OUTPUT_DIR/metrics.jsonl."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.start = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, "elapsed_s": round(time.time() - self.start, 2)}
        append_metrics(self.output_dir, {**row, **logs})


class StopRequested(Exception):
    """Raised inside an evaluation (or, once training is over, anywhere) when SIGTERM/SIGINT arrived."""


class GracefulStop(TrainerCallback):
    """On SIGTERM/SIGINT: finish the current step, save a checkpoint, stop (`stopped_training`); during an
    evaluation, stop it at once (every rank at the same batch). Once `immediate` is set (training is over and
    the model saved) the signal stops what is running straight away. A second signal aborts."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped_training = False
        self.immediate = False
        self.signum = 0  # the signal that stopped the run (on any rank), 0 while none did
        self._previous: dict[int, Any] = {}

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        if self.immediate:
            logger.warning("%s received: stopping (the trained model is already saved)", self.signal_name)
            raise StopRequested(self.signal_name)
        logger.warning("%s received: saving a checkpoint after this step, then stopping", self.signal_name)

    def should_stop(self) -> bool:
        """Any rank that was signalled stops every rank, so all of them stop at the same point (and every rank
        knows which signal it was)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        import torch

        flag = torch.tensor([float(self.signum)])
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
        if signum and not self.requested:
            self.requested, self.signum = True, signum
        return self.requested

    def on_step_end(self, args, state, control, **kwargs):
        if self.should_stop():
            self.stopped_training = True
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.should_stop():
            raise StopRequested(self.signal_name)


class AdaLoraBudget(TrainerCallback):
    """AdaLoRA reallocates ranks after each optimizer step, before gradients are cleared."""

    def __init__(self, model: Any):
        self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.base_model.update_and_allocate(state.global_step)
