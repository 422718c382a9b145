"""`python -m lmexp.report`: compare runs without the UI.

Prints a table of the runs of an experiment (or of one sweep, or the one --run): the parameters
that differ, then final train/valid/test perplexity, words/s, epochs and status, sorted by
validation perplexity. Writes it as CSV and Markdown, and draws final perplexity against the swept
parameter and the learning curves as PNGs. `--record FILE` instead writes one run's results record
as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmexp.config import LmexpError
from lmexp.orchestration.outcome import close_stale_sweep
from lmexp.reporting.summary import HISTORY_KEYS, report, report_all, results_record
from lmexp.tracking.queries import SWEEP_FILE, fetch_run, full_run_id, read_sweep
from lmexp.tracking.stores import check_store, resolve_tracking_uri


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lmexp.report", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here"
    )
    parser.add_argument(
        "--experiment",
        help="only this experiment (default: every one, grouped; a --sweep-dir names its own)",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--sweep", metavar="PARENT_RUN_ID", help="only the runs of this sweep")
    group.add_argument(
        "--sweep-dir", type=Path, help="only the runs of the sweep in this multirun folder"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for CSV, Markdown, PNGs (default: report here; with --sweep-dir, the "
        "sweep's own report folder, brought up to date)",
    )
    parser.add_argument("--force", action="store_true", help="replace a report already in --out")
    parser.add_argument(
        "--record", type=Path, help="write the results record of --run to this JSON file"
    )
    group.add_argument(
        "--run", metavar="RUN_ID", help="only this run; with --record, the run to record"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri, Path.cwd())
    try:
        if not args.sweep_dir:
            check_store(uri, read_only=True)  # (a sweep folder names its own store, below)
        if args.run:  # the 8 characters the tables and logs show are enough
            args.run = full_run_id(uri, args.run, "check the run id and --tracking-uri")
        if args.record:
            if not args.run:
                raise LmexpError(
                    "--record needs --run RUN_ID (see the run id in the MLflow UI or the report)."
                )
            record = results_record(uri, args.run)
            args.record.parent.mkdir(parents=True, exist_ok=True)
            args.record.write_text(json.dumps(record, indent=2) + "\n")
            print(f"wrote {args.record}")
            return 0
        parent, swept = args.sweep, None
        if args.sweep_dir:
            sweep = read_sweep(args.sweep_dir)
            if sweep is None:
                raise LmexpError(
                    f"{args.sweep_dir} has no {SWEEP_FILE}; pass a multirun/<date>/<time> folder."
                )
            parent, swept, uri = (
                sweep["parent_run_id"],
                sweep["swept_params"],
                sweep["tracking_uri"],
            )
            check_store(uri, read_only=True)
            args.experiment = sweep.get("experiment", args.experiment or "lmexp")
            closed = close_stale_sweep(
                uri, {"experiment": args.experiment, **sweep}, args.sweep_dir
            )
            if closed:
                print(f"closed the sweep's parent run {parent} as {closed}: its process is gone")
        if args.out is None and args.sweep_dir:  # the sweep's own report, brought up to date
            args.out, args.force = args.sweep_dir / "report", True
        args.out = args.out or Path("report")
        if args.out.exists() and any(args.out.iterdir()) and not args.force:
            raise LmexpError(
                f"{args.out} already holds files (an earlier report?); pass --out for another "
                "folder, or --force to replace them."
            )
        if not (parent or args.run or args.experiment):
            text, files = report_all(uri, args.out)
        else:
            one = [fetch_run(uri, args.run, HISTORY_KEYS)] if args.run else None
            experiment = args.experiment or "lmexp"
            text, files, _ = report(uri, experiment, args.out, parent, swept, one)
    except LmexpError as err:
        print(f"lmexp.report: error: {err}", file=sys.stderr)
        return 2
    print(text, end="")
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
