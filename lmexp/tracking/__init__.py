"""Where runs are recorded: the write-only tracker the engine talks to, the MLflow store checks,
the MLflow run writer and the queries that read runs back. The only package that imports MLflow."""

import logging

# MLflow announces at INFO each new sqlite store ("Creating initial MLflow database tables...")
# and the start and end of its system-metrics monitor (four lines a run, one about a GPU the
# machine may not have); lmexp's own lines say where the run goes. Its warnings still show.
for _name in ("mlflow.store.db.utils", "mlflow.system_metrics"):
    logging.getLogger(_name).setLevel(logging.WARNING)
