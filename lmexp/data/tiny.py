"""data=tiny: a seeded Markov-chain corpus generated in code (no files, no network)."""

from __future__ import annotations

import random

from lmexp.config import DataConfig
from lmexp.data.corpus import EOS, Corpus, build_vocab, encode


def tiny_corpus(vocab_size: int, train_tokens: int, eval_tokens: int, seed: int) -> Corpus:
    """A deterministic corpus with learnable structure: a sparse Markov chain over a small vocabulary.

    Each word has three possible successors (probabilities 0.6/0.3/0.1) and sentences end with
    `<eos>`; a model that learns the chain reaches a perplexity near 2.5, far below the vocabulary
    size a model without it gets.
    """
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab_size - 1)] + [EOS]
    successors = [rng.sample(range(vocab_size), 3) for _ in range(vocab_size)]

    def stream(n: int) -> list[str]:
        out, cur = [], rng.randrange(vocab_size)
        for _ in range(n):
            cur = rng.choices(successors[cur], weights=(0.6, 0.3, 0.1))[0]
            out.append(words[cur])
        return out

    train, valid, test = stream(train_tokens), stream(eval_tokens), stream(eval_tokens)
    vocab = build_vocab(train)
    return Corpus(vocab, encode(train, vocab), encode(valid, vocab), encode(test, vocab))


def load(cfg: DataConfig) -> Corpus:
    return tiny_corpus(
        cfg.tiny_vocab_size, cfg.tiny_train_tokens, cfg.tiny_eval_tokens, cfg.tiny_seed
    )
