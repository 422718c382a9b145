"""`python -m lmexp.evaluate MODEL [--split test | --text FILE]`: perplexity of a trained model.

MODEL is a checkpoint, an exported model.pt (config.json and vocab.json beside it), or an MLflow
run id (its model/ artifacts). The split is read and batched as training did (same vocabulary,
batch size and window), so the test split reproduces the test_ppl the run logged. A text file is
tokenised like PTB; words outside the vocabulary become <unk>, and how many did is reported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lmexp.config import LmexpError
from lmexp.data import UNK, batchify, encode, read_words
from lmexp.engine.loop import evaluate, perplexity
from lmexp.loading import add_model_args, positive_int, resolve_model, split_tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmexp.evaluate", description=__doc__.splitlines()[0]
    )
    add_model_args(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--split", choices=("train", "valid", "test"), default="test")
    source.add_argument("--text", type=Path, help="a text file to score instead of a split")
    parser.add_argument("--data-root", help="PTB folder, if not where the model was trained")
    parser.add_argument(
        "--batch-size", type=positive_int, help="default: the run's (test: trainer.test_batch_size)"
    )
    args = parser.parse_args(argv)
    try:
        if args.text is not None and not args.text.is_file():  # before the model is loaded
            what = "is a folder; pass a text file" if args.text.is_dir() else "does not exist"
            raise LmexpError(f"--text {args.text} {what}.")
        model, vocab, config = resolve_model(args.model, args.tracking_uri, args.device)
        trainer = config["trainer"]
        if args.text is not None:
            words = read_words(args.text)
            if not words:
                raise LmexpError(f"--text {args.text} holds no words.")
            tokens = encode(words, vocab)
            known = set(vocab)  # always holds <unk>
            unknown = sum(1 for w in words if w not in known)
            label, batch = str(args.text), args.batch_size or 1
        else:
            tokens, label = split_tokens(config, args.split, args.data_root, vocab)
            unknown = 0
            default = (
                trainer["test_batch_size"] if args.split == "test" else trainer["eval_batch_size"]
            )
            batch = args.batch_size or default
        loss, count = evaluate(
            model, batchify(tokens, batch).to(args.device), trainer["eval_num_steps"]
        )
    except LmexpError as err:
        print(f"lmexp.evaluate: error: {err}", file=sys.stderr)
        return 2
    print(
        f"{label}: perplexity {perplexity(loss, count):.4f} over {count} tokens ({unknown} out-of-vocabulary words mapped to {UNK})"
    )
    return 0


if __name__ == "__main__":
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    sys.exit(main())
