"""Where runs are recorded: the write-only tracker the engine talks to, the MLflow store checks,
the MLflow run writer and the queries that read runs back. The only package that imports MLflow."""
