"""The word-level LSTM language model: embedding -> dropout -> LSTM -> dropout -> linear."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

from lmexp.config import DropoutConfig, ModelConfig

State = tuple[torch.Tensor, torch.Tensor]


def locked_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout with one mask per sequence, shared across time steps; x is (time, batch, features)."""
    if not training or p == 0.0:
        return x
    mask = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1.0 - p) / (1.0 - p)
    return x * mask


class LSTMLanguageModel(nn.Module):
    """Zaremba et al.'s model. Time-major: tokens are (steps, batch), logits (steps, batch, vocab).

    With standard (or no) dropout the recurrence is one fused multi-layer `nn.LSTM` (cuDNN on
    GPU). Variational dropout needs a mask between layers that is shared across time, so it runs
    one fused single-layer `nn.LSTM` per layer; the recurrent path stays inside the fused kernel.
    Weight drop (DropConnect on the hidden-to-hidden matrices) passes dropped copies of those
    matrices to the same fused LSTM call, so it keeps the fused kernel too.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        init_scale: float,
        dropout: DropoutConfig | None = None,
        tie_weights: bool = False,
    ) -> None:
        super().__init__()
        dropout = dropout or DropoutConfig(kind="none")
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.variational = dropout.kind == "variational"
        p = 0.0 if dropout.kind == "none" else 1.0 - dropout.dp_keep_prob

        def drop(keep: float | None) -> float:
            return p if keep is None or not self.variational else 1.0 - keep

        self.p_embedding = drop(dropout.keep_prob_embedding)
        self.p_between = drop(dropout.keep_prob_between)
        self.p_output = drop(dropout.keep_prob_output)
        self.p_weight = dropout.weight_drop if dropout.kind != "none" else 0.0

        self.embedding = nn.Embedding(vocab_size, hidden_size)
        if self.variational:
            self.layers = nn.ModuleList(
                nn.LSTM(hidden_size, hidden_size) for _ in range(num_layers)
            )
        else:
            between = self.p_between if num_layers > 1 else 0.0
            self.lstm = nn.LSTM(hidden_size, hidden_size, num_layers, dropout=between)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        if tie_weights:
            # Embedding size equals hidden size here, so the shapes always match.
            self.decoder.weight = self.embedding.weight
        # TF's uniform initializer covers every variable except the LSTM biases, which
        # BasicLSTMCell starts at zero (the tutorial sets forget_bias=0).
        for name, param in self.named_parameters():
            if name.startswith(("lstm.bias", "layers.")) and ".bias" in name:
                nn.init.zeros_(param)
            else:
                nn.init.uniform_(param, -init_scale, init_scale)

    @classmethod
    def from_config(
        cls, model: ModelConfig, dropout: DropoutConfig, vocab_size: int
    ) -> LSTMLanguageModel:
        return cls(
            vocab_size,
            model.hidden_size,
            model.num_layers,
            model.init_scale,
            dropout=dropout,
            tie_weights=model.tie_weights,
        )

    def init_state(self, batch_size: int) -> State:
        weight = self.decoder.weight
        shape = (self.num_layers, batch_size, self.hidden_size)
        return weight.new_zeros(shape), weight.new_zeros(shape)

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        hidden, state = self.features(tokens, state)
        return self.decoder(hidden), state

    def features(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Everything but the decoder: the (dropped-out) LSTM output, (steps, batch, hidden)."""
        x = self.embedding(tokens)
        if self.variational:
            x = locked_dropout(x, self.p_embedding, self.training)
            hs, cs = [], []
            for i, layer in enumerate(self.layers):
                if i > 0:
                    x = locked_dropout(x, self.p_between, self.training)
                x, (h, c) = self._recur(layer, x, (state[0][i : i + 1], state[1][i : i + 1]))
                hs.append(h)
                cs.append(c)
            x = locked_dropout(x, self.p_output, self.training)
            new_state = (torch.cat(hs), torch.cat(cs))
        else:
            x = F.dropout(x, self.p_embedding, self.training)
            x, new_state = self._recur(self.lstm, x, state)
            x = F.dropout(x, self.p_output, self.training)
        return x, new_state

    def _recur(self, lstm: nn.LSTM, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """lstm(x, state); while training with weight drop, on dropped hidden-to-hidden weights."""
        if not (self.training and self.p_weight):
            return lstm(x, state)
        dropped = {
            name: F.dropout(weight, self.p_weight)
            for name, weight in lstm.named_parameters()
            if name.startswith("weight_hh")
        }
        with warnings.catch_warnings():
            # cuDNN packs weights that are not one flat buffer into one per call, and says so;
            # the dropped matrices are new tensors each batch, so the packing is expected here.
            warnings.filterwarnings("ignore", "RNN module weights are not part of single")
            return torch.func.functional_call(lstm, dropped, (x, state))

    def flatten_parameters(self) -> None:
        """Make the LSTM weights one contiguous cuDNN buffer (call once, after .to(device))."""
        for lstm in self.layers if self.variational else [self.lstm]:
            lstm.flatten_parameters()
