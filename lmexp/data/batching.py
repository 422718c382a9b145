"""Batching as `ptb_producer` does: the token stream cut into `batch_size` rows, read in
windows of `num_steps`. Here the batched stream is stored time-major, shape (length, batch),
which is what `nn.LSTM` consumes, so a window is a contiguous slice.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lmexp.config import TrainerConfig
from lmexp.data.corpus import Corpus, DataError


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut the stream into batch_size rows (dropping the remainder), time-major: (length, batch)."""
    length = data.numel() // batch_size
    if length < 2:
        raise DataError(
            f"A split of {data.numel()} tokens is too short for batch size {batch_size}; "
            "use a smaller batch size or a larger corpus."
        )
    return data[: length * batch_size].view(batch_size, length).t().contiguous()


def num_windows(batched: torch.Tensor, num_steps: int, drop_last: bool) -> int:
    """Windows per pass: TF's epoch_size = (len - 1) // num_steps when drop_last, else ceil."""
    targets = batched.size(0) - 1
    return targets // num_steps if drop_last else -(-targets // num_steps)


def windows(
    batched: torch.Tensor, num_steps: int, drop_last: bool, start: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) slices of shape (steps, batch); targets are the inputs shifted by one.

    drop_last=True is ptb_producer (training); False also yields the final short window, so that
    evaluation scores every token.
    """
    for i in range(start, num_windows(batched, num_steps, drop_last)):
        lo = i * num_steps
        hi = min(lo + num_steps, batched.size(0) - 1)
        yield batched[lo:hi], batched[lo + 1 : hi + 1]


def jittered_lengths(steps: int, base: int, seed: int, epoch: int) -> list[int]:
    """AWD-LSTM's random BPTT lengths covering `steps` time steps once (awd-lstm-lm's main.py):
    each window's mean is `base` with probability 0.95, else base / 2; its length is a draw from
    N(mean, 5) cut to an integer, at least 5, the last one cut to what is left. The lengths are a
    function of (seed, epoch) alone, so a run resumed inside an epoch trains the same windows."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    lengths, used = [], 0
    while used < steps:
        mean = float(base) if torch.rand((), generator=generator).item() < 0.95 else base / 2
        draw = torch.normal(mean, 5.0, (), generator=generator).item()
        length = min(max(5, int(draw)), steps - used)
        lengths.append(length)
        used += length
    return lengths


def jittered_windows(
    batched: torch.Tensor, lengths: list[int], start: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """windows() with the given lengths, from the start-th on."""
    lo = sum(lengths[:start])
    for length in lengths[start:]:
        yield batched[lo : lo + length], batched[lo + 1 : lo + length + 1]
        lo += length


def batch_splits(corpus: Corpus, trainer: TrainerConfig) -> dict[str, torch.Tensor]:
    """The three splits batched as training and evaluation read them; a split too short for its
    batch size (or, for training, for one window of num_steps) is refused naming the keys."""
    sizes = {
        "train": ("trainer.batch_size", trainer.batch_size),
        "valid": ("trainer.eval_batch_size", trainer.eval_batch_size),
        "test": ("trainer.test_batch_size", trainer.test_batch_size),
    }
    batched = {}
    for split, (key, size) in sizes.items():
        tokens = corpus.split(split).numel()
        if tokens // size < 2:
            raise DataError(
                f"The {split} split has {tokens} tokens, too few for {key}={size} (it needs at "
                f"least {2 * size}); lower {key} or use a larger corpus."
            )
        batched[split] = batchify(corpus.split(split), size)
    needed = trainer.batch_size * (trainer.num_steps + 1)
    if num_windows(batched["train"], trainer.num_steps, drop_last=True) == 0:
        raise DataError(
            f"The train split has {corpus.train.numel()} tokens, too few for one window of "
            f"trainer.batch_size={trainer.batch_size} x trainer.num_steps={trainer.num_steps} "
            f"(it needs at least {needed}); lower trainer.batch_size or trainer.num_steps, or use "
            "a larger corpus."
        )
    return batched
