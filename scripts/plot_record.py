"""A results record's learning curves as a picture: train and valid perplexity per epoch.

    python scripts/plot_record.py results/ptb_medium_bf16_cpu.json docs/img/medium_curve.png \
        --published-valid 86.16 --label "TF's medium"

Made for the README's first picture (the medium recipe on a CPU against TF's published valid
perplexity); any record `lmexp.report --record` wrote works.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("record", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--published-valid", type=float, default=None)
    parser.add_argument("--label", default="published")
    args = parser.parse_args()
    record = json.loads(args.record.read_text())
    epochs = [e["epoch"] for e in record["epochs"]]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(epochs, [e["train_ppl"] for e in record["epochs"]], label="train")
    ax.plot(epochs, [e["valid_ppl"] for e in record["epochs"]], label="valid")
    if args.published_valid:
        ax.axhline(args.published_valid, color="grey", ls="--", lw=1,
                   label=f"{args.label} valid {args.published_valid}")  # fmt: skip
    final = record["final"]
    ax.set(xlabel="epoch", ylabel="perplexity (log scale)", yscale="log",
           title=f"{record['run_name']}: test {final['test_ppl']:.2f}")  # fmt: skip
    ax.set_yticks([50, 75, 100, 150, 200, 300, 400])
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
