"""Hydra callback that gives every multirun one MLflow parent run.

on_multirun_start runs once in the sweeping process before any job: it creates (and migrates)
the store and the experiment, so parallel jobs never race on a fresh sqlite file, opens the
parent run and writes its id into the sweep folder, where each job finds it. on_multirun_end
records the best child and attaches the comparison table and plots.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lmexp.train import SWEEP_FILE

log = logging.getLogger("lmexp.sweep")


def _swept_params(config: DictConfig) -> list[str]:
    """The keys a sweep varies, from its command-line overrides and sweeper params."""
    keys = []
    for override in config.hydra.overrides.task:
        key, _, value = override.partition("=")
        if "," in value or value.startswith(("range(", "choice(", "interval(", "tag(", "glob(")):
            keys.append(key.lstrip("+~"))
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    keys.extend(k for k in params if k not in keys)
    return keys


class MlflowSweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.logger.kind != "mlflow":
            return
        from lmexp.tracking import resolve_tracking_uri, start_parent_run

        uri = resolve_tracking_uri(config.logger.tracking_uri, Path(os.getcwd()))
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        swept = _swept_params(config)
        parent = start_parent_run(
            uri,
            config.logger.experiment_name,
            run_name=f"sweep {sweep_dir.name}",
            tags={
                "lmexp.kind": "sweep",
                "sweep_dir": str(sweep_dir.resolve()),
                "swept_params": ",".join(swept),
                "hydra_overrides": " ".join(config.hydra.overrides.task),
                "sweeper": str(OmegaConf.select(config, "hydra.sweeper._target_")),
                "launcher": str(OmegaConf.select(config, "hydra.launcher._target_")),
            },
        )
        (sweep_dir / SWEEP_FILE).write_text(
            json.dumps(
                {
                    "parent_run_id": parent,
                    "tracking_uri": uri,
                    "experiment": config.logger.experiment_name,
                    "swept_params": swept,
                }
            )
        )
        log.info("MLflow sweep parent run %s in %s", parent, uri)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.logger.kind != "mlflow":
            return
        sweep_file = Path(config.hydra.sweep.dir) / SWEEP_FILE
        if not sweep_file.is_file():
            return
        from lmexp.report import summarize_sweep

        sweep = json.loads(sweep_file.read_text())
        summarize_sweep(
            sweep["tracking_uri"],
            config.logger.experiment_name,
            sweep["parent_run_id"],
            sweep["swept_params"],
            Path(config.hydra.sweep.dir),
        )
