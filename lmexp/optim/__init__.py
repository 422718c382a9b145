"""Optimizers (the fused SGD step and torch's own, built by name) and learning-rate schedules."""
