"""A scalar head on any causal LM: the reward model for architectures without a *ForSequenceClassification
class (ChatGLM / InternLM2 style remote code, custom models).

`ValueHeadModel(lm)` runs the LM's transformer body and reads the hidden state of the last real token
(found from the attention mask, so a pad token equal to the EOS is no problem) through
`score = Linear(hidden, 1)`. It returns a `SequenceClassifierOutput` whose logits are the scores, like
transformers' sequence classifiers, so TRL's RewardTrainer and PEFT (task_type SEQ_CLS, which trains
`score` fully) work with it unchanged.

On disk (full tuning): the LM as usual (config.json + model*.safetensors) plus `value_head.safetensors`.
With an adapter the head is saved inside the adapter (PEFT modules_to_save) and in value_head.safetensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunestack.model.anatomy import batch_first

VALUE_HEAD_FILE = "value_head.safetensors"


def hidden_size_of(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot find the hidden size in the {type(config).__name__} config")


def last_token_index(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """Index of the rightmost attended position of each row (left or right padding)."""
    batch, length = input_ids.shape[:2]
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(length, device=attention_mask.device)
    return (positions * (attention_mask != 0)).argmax(-1)


class ValueHeadModel(nn.Module):
    """`pretrained_model` (a causal LM) + `score` (Linear(hidden, 1)) on its last real token."""

    main_input_name = "input_ids"
    supports_gradient_checkpointing = True

    def __init__(self, pretrained_model: nn.Module, score: nn.Linear | None = None):
        super().__init__()
        self.pretrained_model = pretrained_model
        self.config = pretrained_model.config
        self.config.num_labels = 1
        if score is None:
            embeddings = pretrained_model.get_input_embeddings().weight
            score = nn.Linear(hidden_size_of(self.config), 1, bias=False, device=embeddings.device)
            std = getattr(self.config, "initializer_range", None) or 0.02
            nn.init.normal_(score.weight, std=std)
            score.to(embeddings.dtype if embeddings.dtype.is_floating_point else torch.float32)
        self.score = score

    # The LM's transformer body: base_model_prefix names it on transformers and remote-code models alike.
    def _body(self) -> nn.Module | None:
        prefix = getattr(self.pretrained_model, "base_model_prefix", "")
        body = getattr(self.pretrained_model, prefix, None) if prefix else None
        return body if isinstance(body, nn.Module) and body is not self.pretrained_model else None

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(batch, length, hidden) last-layer hidden states."""
        body = self._body()
        if body is not None:
            out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
            hidden = out[0]
        else:
            out = self.pretrained_model(
                input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
            )
            hidden = out.hidden_states[-1]
        return batch_first(self.pretrained_model, hidden)  # ChatGLM's body is sequence-first

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        if input_ids is None:
            raise ValueError("ValueHeadModel needs input_ids")
        hidden = self.hidden_states(input_ids, attention_mask)
        last = last_token_index(attention_mask, input_ids).to(hidden.device)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        scores = self.score(pooled.to(self.score.weight.dtype))
        return SequenceClassifierOutput(logits=scores.float())

    # -- what Trainer / TRL / PEFT ask of a model ------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.pretrained_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.pretrained_model.get_output_embeddings()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        self.pretrained_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.pretrained_model.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        lm = self.pretrained_model
        return bool(getattr(lm, "is_activation_checkpointing", getattr(lm, "is_gradient_checkpointing", False)))

    def enable_input_require_grads(self) -> None:
        self.pretrained_model.enable_input_require_grads()

    def add_model_tags(self, tags: Any) -> None:
        if hasattr(self.pretrained_model, "add_model_tags"):
            self.pretrained_model.add_model_tags(tags)

    @property
    def dtype(self) -> torch.dtype:
        return self.score.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.score.weight.device

    # -- saving and loading -------------------------------------------------------------------

    def head_state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.score.weight.detach().to("cpu", torch.float32).contiguous()}

    def save_head(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(folder) / VALUE_HEAD_FILE
        save_file(self.head_state(), str(path), metadata={"hidden_size": str(self.score.in_features)})
        return path

    def load_head(self, folder: str | Path) -> None:
        from safetensors.torch import load_file

        path = Path(folder) / VALUE_HEAD_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: no value head saved there")
        weight = load_file(str(path))["weight"]
        if weight.shape != self.score.weight.shape:
            raise ValueError(
                f"{path}: head of shape {tuple(weight.shape)}, the model needs {tuple(self.score.weight.shape)}"
            )
        with torch.no_grad():
            self.score.weight.copy_(weight.to(self.score.weight.dtype))

    def save_pretrained(self, folder: str | Path, **kwargs: Any) -> None:
        """The LM in its own format plus value_head.safetensors (what full tuning writes)."""
        kwargs.pop("state_dict", None)  # the wrapper's state dict has prefixed names; the LM writes its own
        self.pretrained_model.save_pretrained(str(folder), **kwargs)
        self.save_head(folder)

    def load_weights(self, folder: str | Path) -> None:
        """Restore LM and head saved by `save_pretrained` (resuming a full-tuning run)."""
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for path in sorted(Path(folder).glob("model*.safetensors")):
            state.update(load_file(str(path)))
        if not state:
            raise FileNotFoundError(f"{folder}: no model*.safetensors to restore")
        missing, unexpected = self.pretrained_model.load_state_dict(state, strict=False)
        tied = {k for k in missing if "lm_head" in k or "output_layer" in k or "embed_out" in k}
        if set(missing) - tied or unexpected:
            raise ValueError(
                f"{folder}: weights do not fit the model (missing {sorted(set(missing) - tied)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]})"
            )
        self.load_head(folder)
