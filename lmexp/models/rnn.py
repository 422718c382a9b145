"""The word-level recurrent language model: embedding -> dropout -> LSTM, GRU or Elman RNN ->
dropout -> linear. The recurrent cell is `model.cell`, one entry of CELLS; its state is an
LSTM's (h, c), a GRU's or an RNN's h, each (layers, batch, units)."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

from lmexp.config import DropoutConfig, ModelConfig
from lmexp.models.base import SequenceModel, State, map_state, unpack_state

# model.cell -> the fused torch module (cuDNN on a GPU). A cell here takes (input, state) and
# returns (output, state) with its weights named weight_ih_l<k>/weight_hh_l<k>, as torch's do.
CELLS: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN}


def layer_state(state: State, layer: int, size: int | None = None) -> State:
    """Layer `layer`'s state; its first `size` units when layers differ in size (the state is
    kept at the widest layer's size, the narrower layers' rows padded with zeros)."""
    if size is None:
        return map_state(lambda s: s[layer : layer + 1], state)
    # cuDNN takes only a contiguous state, which a column slice of a batch is not
    return map_state(lambda s: s[layer : layer + 1, :, :size].contiguous(), state)


def join_layers(states: list[State], width: int | None = None) -> State:
    """The layers' states as one state; padded with zeros to `width` units where given."""

    def pad(s: torch.Tensor) -> torch.Tensor:
        return F.pad(s, (0, width - s.size(-1))) if width and s.size(-1) < width else s

    if isinstance(states[0], tuple):
        return tuple(torch.cat([pad(p) for p in parts]) for parts in zip(*states, strict=True))
    return torch.cat([pad(s) for s in states])  # type: ignore[arg-type]


def layer_sizes(
    hidden_size: int, num_layers: int, embedding_size: int, tie_weights: bool
) -> list[tuple[int, int]]:
    """(input, output) units of each recurrent layer, as awd-lstm-lm sizes them: the first takes
    the embedding, the last gives the embedding's size when the softmax is tied to it."""
    inputs = [embedding_size] + [hidden_size] * (num_layers - 1)
    outputs = [hidden_size] * (num_layers - 1) + [embedding_size if tie_weights else hidden_size]
    return list(zip(inputs, outputs, strict=True))


def locked_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout with one mask per sequence, shared across time steps; x is (time, batch, features)."""
    if not training or p == 0.0:
        return x
    mask = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1.0 - p) / (1.0 - p)
    return x * mask


def embedding_dropout(weight: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """AWD-LSTM's dropoute: each word's whole embedding row dropped with probability p (one
    mask per batch, so every occurrence of a dropped word sees zeros), the kept rows scaled by
    1/(1 - p)."""
    if not training or p == 0.0:
        return weight
    return weight * row_mask(weight, p)


def row_mask(weight: torch.Tensor, p: float) -> torch.Tensor:
    """(rows, 1): 0 for a dropped row (probability p), 1/(1 - p) for a kept one."""
    return weight.new_empty(weight.size(0), 1).bernoulli_(1.0 - p) / (1.0 - p)


class RNNLanguageModel(SequenceModel):
    """Zaremba et al.'s model (cell="lstm"), or the same with a GRU. Time-major: tokens are
    (steps, batch), logits (steps, batch, vocab).

    With standard (or no) dropout the recurrence is one fused multi-layer `nn.LSTM` (cuDNN on
    GPU), kept as the attribute named by the cell (`lstm`, `gru`), so an LSTM's state_dict keys
    are those lmexp always wrote. Variational dropout needs a mask between layers that is shared
    across time, so it runs one fused single-layer module per layer; the recurrent path stays
    inside the fused kernel. Weight drop (DropConnect on the hidden-to-hidden matrices) passes
    dropped copies of those matrices to the same fused call, so it keeps the fused kernel too.
    """

    keys = ("hidden_size", "num_layers", "embedding_size", "init_scale", "tie_weights", "cell")
    dropout_kinds = ("standard", "variational", "none")

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        init_scale: float,
        dropout: DropoutConfig | None = None,
        tie_weights: bool = False,
        cell: str = "lstm",
        embedding_size: int | None = None,
    ) -> None:
        super().__init__()
        dropout = dropout or DropoutConfig(kind="none")
        self.hidden_size, self.num_layers, self.cell = hidden_size, num_layers, cell
        rnn = CELLS[cell]
        self.variational = dropout.kind == "variational"
        embedding_size = embedding_size or hidden_size
        self.sizes = layer_sizes(hidden_size, num_layers, embedding_size, tie_weights)
        self.uniform = embedding_size == hidden_size
        self.state_size = max(out for _, out in self.sizes)
        if not self.uniform and not self.variational:
            raise ValueError("layers of different sizes need one module per layer (variational)")
        p = 0.0 if dropout.kind == "none" else 1.0 - dropout.dp_keep_prob

        def drop(keep: float | None) -> float:
            return p if keep is None or not self.variational else 1.0 - keep

        self.p_embedding = drop(dropout.keep_prob_embedding)
        self.p_between = drop(dropout.keep_prob_between)
        self.p_output = drop(dropout.keep_prob_output)
        self.p_weight = dropout.weight_drop if dropout.kind != "none" else 0.0
        self.p_words = dropout.embedding if dropout.kind != "none" else 0.0

        self.embedding = nn.Embedding(vocab_size, embedding_size)
        if self.variational:
            self.layers = nn.ModuleList(rnn(i, o) for i, o in self.sizes)
        else:
            between = self.p_between if num_layers > 1 else 0.0
            self.add_module(cell, rnn(hidden_size, hidden_size, num_layers, dropout=between))
        self.decoder = nn.Linear(self.sizes[-1][1], vocab_size)
        if tie_weights:
            # The last layer gives the embedding's size when tied (layer_sizes).
            self.decoder.weight = self.embedding.weight
        # TF's uniform initializer covers every variable except the LSTM biases, which
        # BasicLSTMCell starts at zero (the tutorial sets forget_bias=0); a GRU's alike.
        for name, param in self.named_parameters():
            if name.startswith((f"{cell}.bias", "layers.")) and ".bias" in name:
                nn.init.zeros_(param)
            else:
                nn.init.uniform_(param, -init_scale, init_scale)

    @classmethod
    def from_config(
        cls, model: ModelConfig, dropout: DropoutConfig, vocab_size: int
    ) -> RNNLanguageModel:
        return cls(
            vocab_size,
            model.hidden_size,
            model.num_layers,
            model.init_scale,
            dropout=dropout,
            tie_weights=model.tie_weights,
            cell=model.cell,
            embedding_size=model.embedding_size,
        )

    @property
    def rnn(self) -> nn.RNNBase:
        """The multi-layer recurrent module (without variational dropout)."""
        return getattr(self, self.cell)

    def init_state(self, batch_size: int) -> State:
        weight = self.decoder.weight
        shape = (self.num_layers, batch_size, self.state_size)
        tensors = 2 if CELLS[self.cell] is nn.LSTM else 1  # an LSTM's h and c
        return unpack_state([weight.new_zeros(shape) for _ in range(tensors)])

    def features_and_raw(
        self, tokens: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """The last layer's output after its dropout and before it (what AR and TAR penalise),
        and the new state."""
        x = self.embedding(tokens)
        if self.training and self.p_words:
            # embedding_dropout's rows, taken per token: the same values from the same draws,
            # and the embedding's gradient stays sparse (only the rows a batch touches)
            x = x * row_mask(self.embedding.weight, self.p_words)[tokens]
        if self.variational:
            x = locked_dropout(x, self.p_embedding, self.training)
            states = []
            for i, layer in enumerate(self.layers):
                if i > 0:
                    x = locked_dropout(x, self.p_between, self.training)
                size = None if self.uniform else self.sizes[i][1]
                x, layer_new = self._recur(layer, x, layer_state(state, i, size))
                states.append(layer_new)
            raw = x
            x = locked_dropout(x, self.p_output, self.training)
            new_state = join_layers(states, None if self.uniform else self.state_size)
        else:
            x = F.dropout(x, self.p_embedding, self.training)
            raw, new_state = self._recur(self.rnn, x, state)
            x = F.dropout(raw, self.p_output, self.training)
        return x, raw, new_state

    def _recur(self, rnn: nn.RNNBase, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """rnn(x, state); while training with weight drop, on dropped hidden-to-hidden weights."""
        if not (self.training and self.p_weight):
            return rnn(x, state)
        dropped = {
            name: F.dropout(weight, self.p_weight)
            for name, weight in rnn.named_parameters()
            if name.startswith("weight_hh")
        }
        with warnings.catch_warnings():
            # cuDNN packs weights that are not one flat buffer into one per call, and says so;
            # the dropped matrices are new tensors each batch, so the packing is expected here.
            warnings.filterwarnings("ignore", "RNN module weights are not part of single")
            return torch.func.functional_call(rnn, dropped, (x, state))
