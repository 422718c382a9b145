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

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lmexp.config import ConfigError, first_line
from lmexp.data.batching import windows
from lmexp.engine import checkpoint
from lmexp.engine.loop import detach
from lmexp.models.base import State, pack_state, unpack_state

KINDS = ("rms", "sgd")


@dataclass
class GradientStats:
    """Per-parameter MS (root mean square gradient) and its decay rate, by parameter name."""

    ms: dict[str, torch.Tensor]
    decrate: dict[str, torch.Tensor]
    segments: int


def gradient_stats(
    model: nn.Module,
    data: torch.Tensor,
    segment: int,
    max_segments: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> GradientStats:
    """MS over the training data `data` (batched), as dynamiceval.py's gradstat: one gradient of
    the mean loss per segment, the state carried from segment to segment as in evaluation. A
    stop (should_stop(), polled before each segment) raises EvaluationStopped with no position:
    statistics are kept only whole."""
    model.eval()
    params = dict(model.named_parameters())
    squares = {name: torch.zeros_like(p) for name, p in params.items()}
    state = model.init_state(data.size(1))
    count = 0
    for inputs, targets in windows(data, segment, drop_last=False):
        if max_segments is not None and count >= max_segments:
            break
        if count and should_stop():
            model.zero_grad(set_to_none=True)
            raise EvaluationStopped(None)
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


@dataclass
class DynamicPosition:
    """Where a dynamic evaluation stands after its first `segments` segments: their summed NLL
    (float64, summed in order) and token count, the recurrent state and the adapted weights.
    Continued from it, the evaluation ends with the uninterrupted one's numbers, bit for bit."""

    segments: int
    loss_sum: torch.Tensor
    tokens: int
    state: list[torch.Tensor]
    weights: dict[str, torch.Tensor]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # no copies, unlike asdict


class EvaluationStopped(Exception):
    """should_stop() said stop: `position` (already handed to on_checkpoint) is where to go on;
    None when the gradient statistics were stopped (nothing to keep)."""

    def __init__(self, position: DynamicPosition | None) -> None:
        where = f"after {position.segments} segments" if position else "in the statistics"
        super().__init__(f"stopped {where}")
        self.position = position


class UpdateRule:
    """The per-weight decay and step of one update (see the module's docstring)."""

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        kind: str,
        lr: float,
        decay: float,
        epsilon: float,
        stats: GradientStats | None,
        theta0: dict[str, torch.Tensor],
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        if kind == "rms" and stats is None:
            raise ValueError("the rms update needs gradient statistics (gradient_stats)")
        self.params, self.theta0 = params, theta0
        self.pull: dict[str, torch.Tensor | float]
        self.step: dict[str, torch.Tensor | float]
        if kind == "rms":
            assert stats is not None
            cap = 1.0 / decay if decay > 0 else float("inf")
            # on the weights' device: statistics from a checkpoint are loaded on the CPU
            self.pull = {
                n: decay * stats.decrate[n].to(p.device).clamp(max=cap) for n, p in params.items()
            }
            self.step = {n: lr / (stats.ms[n].to(p.device) + epsilon) for n, p in params.items()}
        else:
            self.pull = dict.fromkeys(params, decay)  # one number for every weight
            self.step = dict.fromkeys(params, lr)

    @torch.no_grad()
    def apply(self) -> None:
        for name, p in self.params.items():
            change = self.pull[name] * (self.theta0[name] - p)
            if p.grad is not None:
                change -= self.step[name] * p.grad
            p += change


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
    start: DynamicPosition | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[DynamicPosition], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[float, int]:
    """Summed NLL and token count over every token of `data` (time-major, batched), each segment
    scored and then learnt from (see the module's docstring). The decay pulls towards `trained`
    (by parameter name; default: the weights the model has now), and the weights it had are put
    back at the end unless restore=False. From `start` it goes on where that position stood;
    every `checkpoint_every` segments, and before it stops because should_stop() (polled before
    each segment) said so, the position goes to on_checkpoint; a stop then raises
    EvaluationStopped."""
    model.eval()
    params = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    rule = UpdateRule(params, kind, lr, decay, epsilon, stats, trained or before)
    at = start or DynamicPosition(0, torch.zeros((), dtype=torch.float64), 0, [], {})
    state, loss_sum, tokens = resume_at(model, params, at, data)

    def position(done: int) -> DynamicPosition:
        weights = {name: p.detach().cpu().clone() for name, p in params.items()}
        packed = [s.detach().cpu() for s in pack_state(state)]
        return DynamicPosition(done, loss_sum.cpu().clone(), tokens, packed, weights)

    try:
        for index, (inputs, targets) in enumerate(windows(data, segment, drop_last=False)):
            if index < at.segments:
                continue
            if index > at.segments and should_stop():
                here = position(index)
                if on_checkpoint is not None:
                    on_checkpoint(here)
                raise EvaluationStopped(here)
            nll, state = score_and_learn(model, inputs, targets, state, rule)
            loss_sum += nll
            tokens += targets.numel()
            if checkpoint_every and on_checkpoint and (index + 1) % checkpoint_every == 0:
                on_checkpoint(position(index + 1))
    finally:
        model.zero_grad(set_to_none=True)
        if restore:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(before[name])
    return loss_sum.item(), tokens


def resume_at(
    model: nn.Module, params: dict[str, nn.Parameter], at: DynamicPosition, data: torch.Tensor
) -> tuple[State, torch.Tensor, int]:
    """The state, loss sum and token count to go on from `at`, its weights put in the model."""
    if at.weights:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(at.weights[name])
    if at.state:
        state = unpack_state([s.to(data.device) for s in at.state])
    else:
        state = model.init_state(data.size(1))
    return state, at.loss_sum.to(data.device, copy=True), at.tokens


def score_and_learn(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    state: State,
    rule: UpdateRule,
) -> tuple[torch.Tensor, State]:
    """One segment: its summed NLL under the model as it is, then one update from its gradient."""
    model.zero_grad(set_to_none=True)
    logits, state = model(inputs, detach(state))
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction="sum"
    )
    (nll / targets.numel()).backward()
    rule.apply()
    return nll.detach(), state


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors' names and bytes: which weights, which tokens."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


class Progress:
    """A dynamic evaluation's checkpoint in its run folder: its statistics, its position, or its
    finished sum. One that belongs to another evaluation (other weights, tokens or settings)
    is refused, before any time is spent, and left as it is."""

    def __init__(self, path: Path, identity: dict[str, Any]) -> None:
        self.path, self.identity = path, identity
        self.stats: GradientStats | None = None
        self.position: DynamicPosition | None = None
        self.done: tuple[float, int] | None = None
        if not path.exists():
            return
        try:
            saved = checkpoint.load(path)
        except checkpoint.CheckpointError as err:
            raise ConfigError(
                f"{path} cannot be read ({first_line(err)}); delete it to start this evaluation "
                "afresh, or rerun without hydra.run.dir (a new folder)."
            ) from None
        if saved.get("identity") != identity:
            differs = sorted(k for k in identity if saved.get("identity", {}).get(k) != identity[k])
            raise ConfigError(
                f"{path} holds a dynamic evaluation of other {', '.join(differs)} than this one; "
                "rerun without hydra.run.dir (a new folder), or delete that file to start afresh."
            )
        if saved["stats"] is not None:
            self.stats = GradientStats(**saved["stats"])
        if saved["position"] is not None:
            self.position = DynamicPosition(**saved["position"])
        if saved["done"] is not None:
            self.done = (saved["done"]["loss_sum"], saved["done"]["tokens"])

    def save(self, stats: GradientStats | None, position: DynamicPosition | None) -> None:
        kept = None if stats is None else vars(stats)
        at = None if position is None else position.to_dict()
        self.write({"stats": kept, "position": at, "done": None})

    def finish(self, loss: tuple[float, int]) -> None:
        done = {"loss_sum": loss[0], "tokens": loss[1]}
        self.write({"stats": None, "position": None, "done": done})

    def write(self, payload: dict[str, Any]) -> None:
        checkpoint.save(self.path, {"identity": self.identity, **payload})
