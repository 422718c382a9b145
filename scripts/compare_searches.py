"""Compare Optuna searches (e.g. with and without pruning) from their MLflow parent runs.

    python scripts/compare_searches.py --tracking-uri sqlite:///mlflow.db --out results/x \\
        none=multirun/.../sweep_none median=multirun/.../sweep_median

For each search: its trials by state, the epochs its trials trained (the compute spent), its
wall time (the parent run's start to end), the best validation perplexity and its parameters.
Writes <out>/comparison.json and prints the Markdown table the README shows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from lmexp.tracking.queries import read_sweep


def summary(client: MlflowClient, folder: Path) -> dict:
    """One search, from its parent run, its child runs (one per trial) and its results file."""
    from lmexp.reporting.summary import HISTORY_KEYS
    from lmexp.reporting.tables import summarize
    from lmexp.tracking.queries import fetch_runs

    sweep = read_sweep(folder)
    if sweep is None:
        raise SystemExit(f"{folder} holds no mlflow_sweep.json; give a sweep folder.")
    parent = client.get_run(sweep["parent_run_id"])
    trials = fetch_runs(client.tracking_uri, sweep["experiment"], parent.info.run_id, HISTORY_KEYS)
    rows = [summarize(r) for r in trials]
    finished = [r for r in rows if r["status"] == "FINISHED"]
    best = min(finished, key=lambda r: r["best_valid_ppl"])
    results = _yaml(folder / "optimization_results.yaml")
    return {
        "sweep_dir": folder.name,
        "parent_run_id": parent.info.run_id,
        "status": parent.info.status,
        "trials": len(rows),
        **{
            s.lower(): sum(r["status"] == s for r in rows) for s in ("FINISHED", "PRUNED", "FAILED")
        },
        "epochs_trained": sum(r["epochs"] for r in rows),
        "wall_s": round((parent.info.end_time - parent.info.start_time) / 1000),
        "best_valid_ppl": round(best["best_valid_ppl"], 2),
        "best_test_ppl": round(best["test_ppl"], 2),
        "best_params": {k: round(v, 4) for k, v in results["best_params"].items()},
        "trial_epochs": sorted((r["run"], r["epochs"], r["status"]) for r in rows),
    }


def _yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))  # type: ignore[return-value]


def table(rows: dict[str, dict]) -> str:
    lines = [
        "| pruner | trials | finished | pruned | epochs trained | wall time | best valid ppl | "
        "its test ppl | best dp_keep_prob, lr |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        params = ", ".join(f"{v:.3g}" for v in r["best_params"].values())
        lines.append(
            f"| {name} | {r['trials']} | {r['finished']} | {r['pruned']} | {r['epochs_trained']} | "
            f"{r['wall_s'] / 60:.1f} min | {r['best_valid_ppl']:.2f} | {r['best_test_ppl']:.2f} | "
            f"{params} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("searches", nargs="+", help="name=sweep folder")
    args = parser.parse_args()
    client = MlflowClient(tracking_uri=args.tracking_uri)
    rows = {}
    for item in args.searches:
        name, folder = item.split("=", 1)
        rows[name] = summary(client, Path(folder))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
