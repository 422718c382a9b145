"""Dynamic evaluation (Krause et al. 2018; benkrause/dynamic-evaluation's dynamiceval.py).

The model is scored segment by segment (5 tokens, batch 1 by default) and, after each segment,
trained on it: every parameter moves by

    rms:  lambda * decrate * (theta0 - theta) - eta * grad / (MS + epsilon)
    sgd:  lambda * (theta0 - theta) - eta * grad

where theta0 are the trained weights, MS the root mean square of each weight's gradient over the
training data (`gradient_stats`, segments of the same length, batch 100), and decrate = MS divided
by the mean over parameter tensors of MS's mean, clipped at 1/lambda so that the decay never
overshoots theta0. Each segment is scored before the model learns from it, so no token is scored by
a model that has seen it. With eta = 0 and lambda = 0 it is plain evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lmexp.data.batching import windows
from lmexp.engine.loop import detach

KINDS = ("rms", "sgd")


@dataclass
class GradientStats:
    """Per-parameter MS (root mean square gradient) and its decay rate, by parameter name."""

    ms: dict[str, torch.Tensor]
    decrate: dict[str, torch.Tensor]
    segments: int


def gradient_stats(
    model: nn.Module, data: torch.Tensor, segment: int, max_segments: int | None = None
) -> GradientStats:
    """MS over the training data `data` (batched), as dynamiceval.py's gradstat: one gradient of
    the mean loss per segment, the state carried from segment to segment as in evaluation."""
    model.eval()
    params = dict(model.named_parameters())
    squares = {name: torch.zeros_like(p) for name, p in params.items()}
    state = model.init_state(data.size(1))
    count = 0
    for inputs, targets in windows(data, segment, drop_last=False):
        if max_segments is not None and count >= max_segments:
            break
        model.zero_grad(set_to_none=True)
        logits, state = model(inputs, detach(state))
        F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1)).backward()
        for name, p in params.items():
            if p.grad is not None:
                squares[name] += p.grad * p.grad
        count += 1
    model.zero_grad(set_to_none=True)
    ms = {name: torch.sqrt(s / max(count, 1)) for name, s in squares.items()}
    scale = torch.stack([m.mean() for m in ms.values()]).mean()
    return GradientStats(ms, {name: m / scale for name, m in ms.items()}, count)


def dynamic_evaluate(
    model: nn.Module,
    data: torch.Tensor,
    segment: int,
    kind: str,
    lr: float,
    decay: float,
    epsilon: float = 0.0,
    stats: GradientStats | None = None,
    restore: bool = True,
    trained: dict[str, torch.Tensor] | None = None,
) -> tuple[float, int]:
    """Summed NLL and token count over every token of `data` (time-major, batched), each segment
    scored and then learnt from (see the module's docstring). The decay pulls towards `trained`
    (by parameter name; default: the weights the model has now), and the weights it had are put
    back at the end unless restore=False."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if kind == "rms" and stats is None:
        raise ValueError("the rms update needs gradient statistics (gradient_stats)")
    model.eval()
    params = {name: p for name, p in model.named_parameters()}
    before = {name: p.detach().clone() for name, p in params.items()}
    theta0 = trained or before
    pull: dict[str, torch.Tensor | float]
    step: dict[str, torch.Tensor | float]
    if kind == "rms":
        assert stats is not None
        cap = 1.0 / decay if decay > 0 else float("inf")
        pull = {name: decay * stats.decrate[name].clamp(max=cap) for name in params}
        step = {name: lr / (stats.ms[name] + epsilon) for name in params}
    else:
        pull = dict.fromkeys(params, decay)  # one number for every weight: no tensors of it
        step = dict.fromkeys(params, lr)
    state = model.init_state(data.size(1))
    loss_sum = torch.zeros((), device=data.device, dtype=torch.float64)
    tokens = 0
    try:
        for inputs, targets in windows(data, segment, drop_last=False):
            model.zero_grad(set_to_none=True)
            logits, state = model(inputs, detach(state))
            nll = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction="sum"
            )
            (nll / targets.numel()).backward()
            loss_sum += nll.detach()
            tokens += targets.numel()
            with torch.no_grad():
                for name, p in params.items():
                    change = pull[name] * (theta0[name] - p)
                    if p.grad is not None:
                        change -= step[name] * p.grad
                    p += change
    finally:
        model.zero_grad(set_to_none=True)
        if restore:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(before[name])
    return loss_sum.item(), tokens
