"""What every lmexp language model is: the protocol the engine, evaluation, generation and the
served model use, and the recurrent state they carry between windows without looking inside it.

A model's state is one tensor or a tuple of tensors, each with the batch in dimension 1: an
LSTM's (h, c), a GRU's h, a Transformer's memory of the previous tokens. A model without any
state returns an empty tensor (0 rows) from init_state; the engine treats every state alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from lmexp.config import DropoutConfig, ModelConfig

State = torch.Tensor | tuple[torch.Tensor, ...]


@runtime_checkable
class LanguageModel(Protocol):
    """Time-major: tokens are (steps, batch) ids, logits (steps, batch, vocab)."""

    embedding: nn.Embedding
    decoder: nn.Linear

    def init_state(self, batch_size: int) -> State:
        """The state before the first token of `batch_size` streams."""

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Logits of the next token at each position, and the state after the last."""

    def features(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Everything but the decoder: (steps, batch, features) after dropout, the new state."""

    def features_and_raw(
        self, tokens: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """features, the same before the output dropout (what AR and TAR penalise), the state."""


class Architecture(Protocol):
    """A registry entry: a model class, the model.* keys it reads beyond the common ones and the
    dropout kinds it implements; validation refuses the rest in one sentence."""

    keys: tuple[str, ...]
    dropout_kinds: tuple[str, ...]

    @classmethod
    def from_config(
        cls, model: ModelConfig, dropout: DropoutConfig, vocab_size: int
    ) -> LanguageModel: ...


class SequenceModel(nn.Module):
    """The protocol's forward and features, both read off features_and_raw, which each
    architecture writes."""

    decoder: nn.Linear

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        hidden, state = self.features(tokens, state)
        return self.decoder(hidden), state

    def features(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Everything but the decoder: the output after dropout, (steps, batch, features)."""
        dropped, _, new_state = self.features_and_raw(tokens, state)
        return dropped, new_state

    def features_and_raw(
        self, tokens: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        raise NotImplementedError


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state: State) -> State:
    """fn applied to each tensor of the state, keeping its structure."""
    return tuple(fn(s) for s in state) if isinstance(state, tuple) else fn(state)


def pack_state(state: State) -> list[torch.Tensor]:
    """The state as a list of tensors (what a checkpoint stores)."""
    return list(state) if isinstance(state, tuple) else [state]


def unpack_state(tensors: list[torch.Tensor]) -> State:
    """pack_state's inverse."""
    return tensors[0] if len(tensors) == 1 else tuple(tensors)


def flatten_recurrent_weights(model: nn.Module) -> None:
    """Make each fused recurrent module's weights one contiguous cuDNN buffer (once, after
    .to(device)); nothing for a model without one."""
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            module.flatten_parameters()
