"""lmexp's Optuna sweeper for Hydra (`hydra/sweeper=lmexp_optuna`): a current Optuna, shared
database storage, asynchronous workers and per-epoch pruning. Found by Hydra's plugin scan of
the hydra_plugins namespace; the search itself lives in lmexp.orchestration.search."""
