"""`python -m lmexp.train [overrides]`: train the word-level language model, tracked in MLflow.

The path of one run, top-down: this entry point hands Hydra the task
(lmexp.orchestration.launch checks what it can before Hydra composes anything);
lmexp.orchestration.jobs.task reads Hydra's config into a RunContext and runs one run, a seed
loop or a search's trials; lmexp.run.run_training is one run (data, model, tracking, fit, test,
export); lmexp.engine.fit is its epoch loop.
"""

from __future__ import annotations

import sys

from lmexp.config import TrainConfig


def main() -> None:
    """Console entry point (`lmexp-train`) and `python -m lmexp.train`."""
    from lmexp.orchestration.jobs import task
    from lmexp.orchestration.launch import launch

    launch(task, "train", sys.argv[1:], TrainConfig)


if __name__ == "__main__":
    main()
