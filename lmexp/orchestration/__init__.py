"""How runs are launched and combined: the Hydra job, sweeps and their callback, the Optuna search
and its workers, SLURM. The only package (with the entry points) that imports Hydra or Optuna."""
