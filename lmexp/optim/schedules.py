"""Learning-rate policies: pure functions of (0-based epoch, validation history).

Being pure, they need no state in a checkpoint beyond the validation history, and a resumed run
gets exactly the lr the uninterrupted run would have had.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lmexp.config import LrPolicyConfig


def zaremba_lr(epoch: int, lr: float, lr_decay: float, max_epoch: int) -> float:
    """TF tutorial: constant for max_epoch epochs, then multiplied by lr_decay each epoch."""
    return lr * lr_decay ** max(epoch + 1 - max_epoch, 0)


def port_lr(epoch: int, lr: float, lr_decay: float, flat_epochs: int) -> float:
    """The 2017 PyTorch port: `lr = lr * lr_decay ** max(epoch - flat_epochs, 0)` every epoch.

    The decay compounds: after k = epoch - flat_epochs decaying epochs the exponent is
    1 + 2 + ... + k = k (k + 1) / 2.
    """
    k = max(epoch - flat_epochs, 0)
    return lr * lr_decay ** (k * (k + 1) // 2)


def plateau_lr(
    valid_history: Sequence[float], lr: float, factor: float, patience: int, min_lr: float = 0.0
) -> float:
    """Divide lr by factor whenever validation ppl has not improved for more than `patience` epochs."""
    best, bad = float("inf"), 0
    for value in valid_history:
        if value < best:
            best, bad = value, 0
        else:
            bad += 1
            if bad > patience:
                lr, bad = lr / factor, 0
    return max(lr, min_lr)


# lr_policy.kind -> the lr of a 0-based epoch, given the policy and the validation ppl of the
# epochs before it. A new schedule is one entry here (and conf/lr_policy/<name>.yaml).
SCHEDULES: dict[str, Callable[[LrPolicyConfig, int, Sequence[float]], float]] = {
    "zaremba": lambda p, epoch, _: max(zaremba_lr(epoch, p.lr, p.lr_decay, p.max_epoch), p.min_lr),
    "port": lambda p, epoch, _: max(port_lr(epoch, p.lr, p.lr_decay, p.max_epoch), p.min_lr),
    "plateau": lambda p, epoch, valid: plateau_lr(
        valid[:epoch], p.lr, p.plateau_factor, p.plateau_patience, p.min_lr
    ),
    "constant": lambda p, _epoch, _valid: p.lr,
}


def learning_rate(policy: LrPolicyConfig, epoch: int, valid_history: Sequence[float] = ()) -> float:
    """The lr for 0-based `epoch`, given the validation ppl of the epochs before it."""
    return SCHEDULES[policy.kind](policy, epoch, valid_history)
