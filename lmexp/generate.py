"""`python -m lmexp.generate MODEL --prompt "the company" --words 30`: sample text from a model.

Deterministic for a given --seed. Prompt words outside the vocabulary are reported and fed as
<unk>, never dropped silently. <eos> is printed as a line break.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from lmexp.config import LmexpError
from lmexp.data import EOS, UNK, encode, tokenize
from lmexp.loading import add_model_args, resolve_model


@torch.no_grad()
def sample(
    model,
    vocab: list[str],
    prompt: list[str],
    words: int,
    temperature: float,
    top_k: int,
    seed: int,
) -> list[str]:
    """Feed the prompt, then draw `words` words from the model's distribution."""
    device = model.decoder.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    state = model.init_state(1)
    tokens = encode(prompt or [EOS], vocab).to(device).view(-1, 1)
    logits, state = model(tokens, state)
    out = []
    for _ in range(words):
        scores = logits[-1, 0].float() / temperature
        if 0 < top_k < scores.numel():
            kth = torch.topk(scores, top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        index = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator)
        out.append(vocab[int(index)])
        logits, state = model(index.view(1, 1), state)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmexp.generate", description=__doc__.splitlines()[0]
    )
    add_model_args(parser)
    parser.add_argument("--prompt", default="", help="words to start from (PTB style: lower case)")
    parser.add_argument("--words", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--top-k", type=int, default=0, help="sample among the k likeliest words; 0: all"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.words < 1 or not 0 < args.temperature < math.inf or args.top_k < 0:
            raise LmexpError(
                "--words must be >= 1, --temperature a finite number > 0 and --top-k >= 0."
            )
        model, vocab, _ = resolve_model(args.model, args.tracking_uri, args.device)
    except LmexpError as err:
        print(f"lmexp.generate: error: {err}", file=sys.stderr)
        return 2
    prompt = tokenize(args.prompt)
    known = set(vocab)
    unknown = [w for w in prompt if w not in known]
    if unknown:
        print(
            f"lmexp.generate: not in the vocabulary, fed as {UNK}: {', '.join(unknown)}",
            file=sys.stderr,
        )
    words = sample(model, vocab, prompt, args.words, args.temperature, args.top_k, args.seed)
    text = " ".join(prompt + words).replace(f" {EOS} ", "\n").replace(EOS, "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
