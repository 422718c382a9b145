"""The 2017 PyTorch port's training loop as a program of its own, to check lmexp.bench's `port`
baseline against (docs/benchmarks.md, "Are the baselines as fast as their originals?").

It imports nothing from lmexp: TF's PTB reader (words by frequency, batches from a numpy
iterator, each batch copied to a tensor, transposed and made contiguous), the port's model (an
embedding, dropout, a fused nn.LSTM with dropout between layers, dropout, a linear decoder) and
its step (zero_grad, repackage the hidden state, cross-entropy, the loss read back every
batch, backward, clip_grad_norm_, p.data.add_ per parameter), in today's API spelling.

    python scripts/port_2017_standalone.py ../shared/data/ptb --threads 2   # model=small's sizes

After --warmup batches it times --batches consecutive batches, --repeats times, and prints
the median, min and max training words/s, as lmexp.bench does for each variant.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def read_ids(folder: Path) -> tuple[np.ndarray, int]:
    words = (folder / "ptb.train.txt").read_text().replace("\n", "<eos>").split()
    counts = sorted(collections.Counter(words).items(), key=lambda x: (-x[1], x[0]))
    word_to_id = {w: i for i, (w, _) in enumerate(counts)}
    return np.array([word_to_id[w] for w in words], dtype=np.int32), len(word_to_id)


def ptb_iterator(raw: np.ndarray, batch_size: int, num_steps: int):
    batch_len = len(raw) // batch_size
    data = raw[: batch_size * batch_len].reshape(batch_size, batch_len)
    for i in range((batch_len - 1) // num_steps):
        x = data[:, i * num_steps : (i + 1) * num_steps]
        y = data[:, i * num_steps + 1 : (i + 1) * num_steps + 1]
        yield x, y


class PortLM(nn.Module):
    def __init__(
        self, hidden: int, num_steps: int, batch: int, vocab: int, layers: int, keep: float
    ):
        super().__init__()
        self.hidden, self.num_steps, self.batch, self.vocab = hidden, num_steps, batch, vocab
        self.layers = layers
        self.dropout = nn.Dropout(1 - keep)
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, dropout=1 - keep)
        self.sm_fc = nn.Linear(hidden, vocab)
        self.word_embeddings.weight.data.uniform_(-0.1, 0.1)
        self.sm_fc.bias.data.fill_(0.0)
        self.sm_fc.weight.data.uniform_(-0.1, 0.1)

    def init_hidden(self):
        w = next(self.parameters()).data
        return (w.new_zeros(self.layers, self.batch, self.hidden),
                w.new_zeros(self.layers, self.batch, self.hidden))  # fmt: skip

    def forward(self, inputs, hidden):
        embeds = self.dropout(self.word_embeddings(inputs))
        out, hidden = self.lstm(embeds, hidden)
        out = self.dropout(out)
        logits = self.sm_fc(out.view(-1, self.hidden))
        return logits.view(self.num_steps, self.batch, self.vocab), hidden


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ptb", type=Path)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--keep", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--clip", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    raw, vocab = read_ids(args.ptb)
    model = PortLM(args.hidden, args.num_steps, args.batch, vocab, args.layers, args.keep)
    criterion = nn.CrossEntropyLoss()
    model.train()
    batches = ptb_iterator(raw, args.batch, args.num_steps)
    hidden = model.init_hidden()
    costs = 0.0

    def run(n: int) -> float:
        nonlocal hidden, costs
        start = time.perf_counter()
        for _ in range(n):
            x, y = next(batches)
            inputs = torch.from_numpy(x.astype(np.int64)).transpose(0, 1).contiguous()
            model.zero_grad(set_to_none=False)
            hidden = tuple(h.detach() for h in hidden)
            outputs, hidden = model(inputs, hidden)
            targets = torch.from_numpy(y.astype(np.int64)).transpose(0, 1).contiguous()
            loss = criterion(outputs.view(-1, vocab), targets.view(-1))
            costs += loss.item() * args.num_steps
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            for p in model.parameters():
                p.data.add_(p.grad.data, alpha=-args.lr)
        return n * args.batch * args.num_steps / (time.perf_counter() - start)

    run(args.warmup)
    samples = [run(args.batches) for _ in range(args.repeats)]
    print(
        f"port (standalone)  median {statistics.median(samples):.0f}  min {min(samples):.0f}  "
        f"max {max(samples):.0f} words/s  ({args.repeats} x {args.batches} batches, "
        f"{args.threads} threads, torch {torch.__version__})"
    )


if __name__ == "__main__":
    main()
