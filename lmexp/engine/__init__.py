"""Training without any framework around it: the step and epoch loop, checkpoints, resume, and the
process's runtime (device, threads, seeds, signals, folder locks). Imports no Hydra, MLflow, Optuna
or submitit."""
