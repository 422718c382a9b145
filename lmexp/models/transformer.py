"""A causal Transformer language model (model.arch=transformer): embedding scaled by
sqrt(hidden_size) plus sinusoidal positions, pre-norm blocks of multi-head self-attention and a
feed-forward layer, a final LayerNorm and the (optionally tied) softmax. pytorch/examples'
`word_language_model --model Transformer`, with nanoGPT's pre-norm block.

Unlike pytorch/examples, which scores each window without what came before it, the model keeps
the last `model.context` token ids as its state: each window attends to them as well as to its
own earlier tokens, so the truncated-BPTT batching, checkpoints and exact resume work unchanged,
and a window's first words are not scored blind. The memory is recomputed, not cached, so no
gradient or activation crosses a window (as the recurrent state is detached between windows).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lmexp.config import DropoutConfig, ModelConfig
from lmexp.models.base import SequenceModel, State
from lmexp.models.rnn import row_mask


def positions(length: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """Sinusoidal position codes (length, 1, width), as "Attention is all you need" defines them."""
    position = torch.arange(length, dtype=torch.float32, device=like.device).unsqueeze(1)
    rate = torch.exp(
        torch.arange(0, width, 2, dtype=torch.float32, device=like.device)
        * (-math.log(10000.0) / width)
    )
    codes = torch.zeros(length, width, device=like.device)
    codes[:, 0::2] = torch.sin(position * rate)
    codes[:, 1::2] = torch.cos(position * rate[: width // 2])
    return codes.unsqueeze(1).to(like.dtype)


class Block(nn.Module):
    """x + attention(norm(x)), then x + feed_forward(norm(x)); dropout p on both branches."""

    def __init__(self, width: int, heads: int, ffn_size: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_attention = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attention_out = nn.Linear(width, width)
        self.norm_ffn = nn.LayerNorm(width)
        self.ffn_in = nn.Linear(width, ffn_size)
        self.ffn_out = nn.Linear(ffn_size, width)

    def forward(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """x: (batch, time, width); position t attends to positions 0..t."""
        batch, time, width = x.shape
        q, k, v = self.qkv(self.norm_attention(x)).split(width, dim=2)
        q, k, v = (t.view(batch, time, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(batch, time, width)
        x = x + F.dropout(self.attention_out(y), p, self.training)
        y = self.ffn_out(F.gelu(self.ffn_in(self.norm_ffn(x))))
        return x + F.dropout(y, p, self.training)


class TransformerLanguageModel(SequenceModel):
    """Time-major like every lmexp model: tokens (steps, batch), logits (steps, batch, vocab)."""

    keys = (
        "hidden_size",
        "num_layers",
        "init_scale",
        "tie_weights",
        "num_heads",
        "ffn_size",
        "context",
    )
    dropout_kinds = ("standard", "none")

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        ffn_size: int,
        context: int,
        init_scale: float,
        dropout: float = 0.0,
        embedding_dropout: float = 0.0,
        tie_weights: bool = False,
    ) -> None:
        super().__init__()
        self.hidden_size, self.context = hidden_size, context
        self.p, self.p_words = dropout, embedding_dropout
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.blocks = nn.ModuleList(
            Block(hidden_size, num_heads, ffn_size) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        # pytorch/examples' initialisation: the embedding and softmax uniform, the softmax bias
        # zero, the blocks as torch initialises them.
        nn.init.uniform_(self.embedding.weight, -init_scale, init_scale)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            self.decoder.weight = self.embedding.weight
        else:
            nn.init.uniform_(self.decoder.weight, -init_scale, init_scale)

    @classmethod
    def from_config(
        cls, model: ModelConfig, dropout: DropoutConfig, vocab_size: int
    ) -> TransformerLanguageModel:
        off = dropout.kind == "none"
        return cls(
            vocab_size,
            model.hidden_size,
            model.num_layers,
            model.num_heads,
            model.ffn_size or 4 * model.hidden_size,
            model.context,
            model.init_scale,
            dropout=0.0 if off else 1.0 - dropout.dp_keep_prob,
            embedding_dropout=0.0 if off else dropout.embedding,
            tie_weights=model.tie_weights,
        )

    def init_state(self, batch_size: int) -> State:
        """No tokens remembered yet: (0, batch) ids."""
        return torch.zeros(0, batch_size, dtype=torch.long, device=self.decoder.weight.device)

    def features_and_raw(
        self, tokens: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        assert isinstance(state, torch.Tensor)
        seen = torch.cat([state, tokens]) if state.numel() else tokens
        x = self.embedding(seen)
        if self.training and self.p_words:
            x = x * row_mask(self.embedding.weight, self.p_words)[seen]
        x = x * math.sqrt(self.hidden_size) + positions(len(seen), self.hidden_size, x)
        x = F.dropout(x, self.p, self.training).transpose(0, 1)  # (batch, time, width)
        for block in self.blocks:
            x = block(x, self.p)
        raw = self.norm(x).transpose(0, 1)[len(seen) - len(tokens) :]
        memory = seen[max(len(seen) - self.context, 0) :] if self.context else seen[:0]
        return F.dropout(raw, self.p, self.training), raw, memory
