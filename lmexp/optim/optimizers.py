"""Optimizers by kind (`optimizer=<kind>`): lmexp's fused clip-and-SGD step and torch's own.

Every optimizer is a `torch.optim.Optimizer`, so its state (momentum, Adam's moments, ASGD's
average) goes into each checkpoint through `state_dict()` and a resumed run continues it. The
learning rate is not the optimizer's setting: the lr policy sets it each epoch (`set_lr`). No
Hydra, no MLflow.

A new optimizer is one entry in OPTIMIZERS (what it builds, which `optimizer.*` keys it reads)
and one YAML in conf/optimizer/; `lmexp.config.validate` reads the names and keys from here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class FusedSGD(torch.optim.Optimizer):
    """clip_grad_norm_ and plain SGD in one multi-tensor pass, sparse-aware: TF's and the 2017
    port's update (`p -= lr * clip(g)`), lmexp's default.

    Private torch._foreach_* ops because the public path cannot serve: clip_grad_norm_ raises on
    a sparse gradient (torch 2.13: no linalg_vector_norm for SparseCPU), and on the CPU the
    embedding's gradient is sparse here, so only the rows a batch touches are normed and updated.
    The clip coefficient stays on the device (no host sync). It clips by the global norm over
    all its parameters with the first group's max_grad_norm, as clip_grad_norm_ would.
    """

    fuses_clipping = True  # the training step leaves clipping to step()
    supports_sparse_grads = True

    def __init__(self, params: Iterable[nn.Parameter], lr: float, max_grad_norm: float) -> None:
        super().__init__(params, {"lr": lr, "max_grad_norm": max_grad_norm})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Each group's gradients, dense and sparse (coalesced once); the norm is over them all.
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            dense = [p for p in params if not p.grad.is_sparse]
            sparse = [(p, p.grad.coalesce()) for p in params if p.grad.is_sparse]
            groups.append((group["lr"], dense, sparse))
        grads = [p.grad for _, dense, _ in groups for p in dense]
        values = [g.values() for _, _, sparse in groups for _, g in sparse]
        if not grads and not values:
            return loss
        norms = list(torch._foreach_norm(grads)) + [v.norm() for v in values]
        total = torch.linalg.vector_norm(torch.stack(norms))
        max_norm = self.param_groups[0]["max_grad_norm"]
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s rule
        torch._foreach_mul_(grads, coef)
        for lr, dense, sparse in groups:
            if dense:
                torch._foreach_add_(dense, [p.grad for p in dense], alpha=-lr)
            for p, g in sparse:
                p.index_add_(0, g.indices()[0], g.values() * coef, alpha=-lr)
        return loss


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one optimizer, and the optimizer.* keys it reads (the others must stay at
    their defaults: a setting the optimizer would ignore is refused, not dropped)."""

    build: Callable[[list[nn.Parameter], float, float, Any], torch.optim.Optimizer]
    keys: tuple[str, ...]
    what: str


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "fused_sgd": OptimizerSpec(
        lambda params, lr, clip, o: FusedSGD(params, lr, clip),
        (),
        "plain SGD with clipping fused in, sparse embedding gradients on the CPU (TF's update)",
    ),
    "sgd": OptimizerSpec(
        lambda params, lr, clip, o: torch.optim.SGD(
            params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, foreach=True
        ),
        ("momentum", "weight_decay"),
        "torch.optim.SGD after clip_grad_norm_",
    ),
    "asgd": OptimizerSpec(
        # AWD-LSTM's settings by default (t0=0, lambd=0): average every step from the first.
        lambda params, lr, clip, o: torch.optim.ASGD(
            params, lr=lr, t0=o.t0, lambd=o.lambd, weight_decay=o.weight_decay
        ),
        ("t0", "lambd", "weight_decay"),
        "torch.optim.ASGD (averaged SGD) after clip_grad_norm_",
    ),
    "adam": OptimizerSpec(
        lambda params, lr, clip, o: torch.optim.Adam(
            params, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
        ),
        ("beta1", "beta2", "eps", "weight_decay"),
        "torch.optim.Adam after clip_grad_norm_",
    ),
    "adamw": OptimizerSpec(
        lambda params, lr, clip, o: torch.optim.AdamW(
            params, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
        ),
        ("beta1", "beta2", "eps", "weight_decay"),
        "torch.optim.AdamW (decoupled weight decay) after clip_grad_norm_",
    ),
}


def build_optimizer(
    model: nn.Module, settings: Any, lr: float, max_grad_norm: float
) -> torch.optim.Optimizer:
    """The optimizer `settings.kind` names (an OptimizerConfig) over the model's trainable
    parameters, in the model's parameter order."""
    params = [p for p in model.parameters() if p.requires_grad]
    return OPTIMIZERS[settings.kind].build(params, lr, max_grad_norm, settings)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
