"""Optimizers by kind (`optimizer=<kind>`): lmexp's fused clip-and-SGD step and torch's own.

Every optimizer is a `torch.optim.Optimizer`, so its state (momentum, Adam's moments, ASGD's
average) goes into each checkpoint through `state_dict()` and a resumed run continues it. The
learning rate is not the optimizer's setting: the lr policy sets it each epoch (`set_lr`). No
Hydra, no MLflow.

A new optimizer is one entry in OPTIMIZERS (what it builds, which `optimizer.*` keys it reads)
and one YAML in conf/optimizer/; `lmexp.validation.validate` reads the names and keys from here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
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


def nt_asgd_should_switch(history: list[float], nonmono: int) -> bool:
    """NT-ASGD's trigger (Merity et al. 2017; awd-lstm-lm's main.py): the latest validation
    score `history[-1]` is worse than the best of the checks made more than `nonmono` checks
    before it. awd-lstm-lm: `len(best_val_loss) > nonmono and val_loss >
    min(best_val_loss[:-nonmono])`, best_val_loss being the checks before this one."""
    *before, latest = history
    return len(before) > nonmono and latest > min(before[:-nonmono])


class NTASGD(torch.optim.Optimizer):
    """Non-monotonically triggered averaged SGD (AWD-LSTM): plain SGD with L2 weight decay
    (`p -= lr * (g + weight_decay * p)`, after the step's clip_grad_norm_) until `switch()`,
    then the same update with the running mean of the iterates kept beside each weight, from the
    second step after the switch on: what torch.optim.ASGD(t0=0, lambd=0) computes, which
    awd-lstm-lm switches to.

    The training loop asks `observe(valid_history)` after each validation (it switches when
    nt_asgd_should_switch says so), evaluates and saves the best model inside `averaged()`, and
    ends with `keep_averaged()`. The switch and the averages are in `state_dict()`, so a resumed
    run continues them exactly.
    """

    def __init__(
        self, params: Iterable[nn.Parameter], lr: float, weight_decay: float, nonmono: int
    ) -> None:
        # averaged_steps: None while plain SGD; after the switch, the iterates averaged so far
        defaults = {"lr": lr, "weight_decay": weight_decay, "averaged_steps": None}
        super().__init__(params, defaults)
        self.nonmono = nonmono

    @property
    def averaging(self) -> bool:
        return self.param_groups[0]["averaged_steps"] is not None

    def switch(self) -> None:
        for group in self.param_groups:
            group["averaged_steps"] = 0

    def observe(self, valid_history: list[float]) -> bool:
        """Switch to averaging if the history calls for it; whether it switched now."""
        if self.averaging or not nt_asgd_should_switch(valid_history, self.nonmono):
            return False
        self.switch()
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            torch._foreach_add_(params, grads, alpha=-group["lr"])
            if group["averaged_steps"] is None:
                continue
            group["averaged_steps"] += 1
            n = group["averaged_steps"]
            for p in params:
                state = self.state[p]
                # torch.optim.ASGD's mu = 1 / max(1, step - t0) is set after each step's
                # average, so it lags a step: the average restarts at the second step after the
                # switch and is the mean of the iterates from there on (awd-lstm-lm's too).
                if n <= 2 or "ax" not in state:
                    state["ax"] = p.detach().clone()
                else:
                    state["ax"].add_(p - state["ax"], alpha=1.0 / (n - 1))
        return loss

    def _averaged_params(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (p, self.state[p]["ax"])
            for group in self.param_groups
            for p in group["params"]
            if "ax" in self.state[p]
        ]

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """The model's weights are the averages inside (after the switch), as they were after."""
        pairs = self._averaged_params()
        kept = [p.detach().clone() for p, _ in pairs]
        with torch.no_grad():
            for p, ax in pairs:
                p.copy_(ax)
        try:
            yield
        finally:
            with torch.no_grad():
                for (p, _), k in zip(pairs, kept, strict=True):
                    p.copy_(k)

    @torch.no_grad()
    def keep_averaged(self) -> None:
        """End of training: the model keeps the averages (for the test and the export)."""
        for p, ax in self._averaged_params():
            p.copy_(ax)


def averaged_weights(optimizer: torch.optim.Optimizer) -> contextlib.AbstractContextManager:
    """The weights to evaluate and to save as the best model: an averaging optimizer's averages,
    else the model's own."""
    averaged = getattr(optimizer, "averaged", None)
    return averaged() if averaged is not None else contextlib.nullcontext()


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
    "nt_asgd": OptimizerSpec(
        lambda params, lr, clip, o: NTASGD(params, lr, o.weight_decay, o.nonmono),
        ("weight_decay", "nonmono"),
        "SGD, switching to averaged SGD when validation stops improving (AWD-LSTM's NT-ASGD)",
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
