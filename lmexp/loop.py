"""Training and evaluation loops: tensors in, numbers out. No Hydra, no MLflow.

The step keeps the loss on the device and reads it only at log intervals, so a GPU is never
stalled by a per-batch host sync; gradients are set to None rather than zeroed; clipping and SGD
use the multi-tensor (foreach) kernels.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lmexp.data import num_windows, windows
from lmexp.model import State

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


def perplexity(loss_sum: float, tokens: int) -> float:
    """exp of the mean NLL per token; inf when the mean overflows or is not finite."""
    if tokens == 0:
        return float("nan")
    mean = loss_sum / tokens
    return math.exp(mean) if mean < 709 else float("inf")


def detach(state: State) -> State:
    return state[0].detach(), state[1].detach()


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


class TrainStep:
    """One truncated-BPTT step: forward, loss, backward, clip, SGD. Exactly what `train` runs.

    loss_reduction "sum_steps" scales the per-token mean by the window length, which is TF's loss
    (summed over time steps, averaged over the batch); "mean" is the per-token mean.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        max_grad_norm: float,
        loss_reduction: str = "sum_steps",
        precision: str = "fp32",
        compile_model: bool = False,
    ) -> None:
        self.model = model
        self.forward = torch.compile(model) if compile_model else model
        self.params = [p for p in model.parameters() if p.requires_grad]
        device = self.params[0].device
        # foreach kernels exist for CUDA; on CPU they fall back to the per-tensor loop anyway.
        self.optimizer = torch.optim.SGD(self.params, lr=lr, foreach=device.type == "cuda")
        self.max_grad_norm = max_grad_norm
        self.sum_steps = loss_reduction == "sum_steps"
        self.device, self.precision = device, precision
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def __call__(
        self, inputs: torch.Tensor, targets: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, State]:
        """Returns the window's summed NLL (a detached device scalar) and the new state."""
        with autocast(self.device, self.precision):
            logits, state = self.forward(inputs, detach(state))
            mean_nll = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1)
            )
        loss = mean_nll * inputs.size(0) if self.sum_steps else mean_nll
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        nn.utils.clip_grad_norm_(
            self.params, self.max_grad_norm, foreach=self.device.type == "cuda"
        )
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_nll.detach() * targets.numel(), state


@dataclass
class EpochProgress:
    """Running totals of one training epoch; checkpoints store it to resume mid-epoch."""

    batch: int = 0  # index of the next batch to train
    loss_sum: float = 0.0  # summed per-token NLL of the batches done
    tokens: int = 0
    seconds: float = 0.0

    @property
    def ppl(self) -> float:
        return perplexity(self.loss_sum, self.tokens)

    @property
    def wps(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def train_epoch(
    step: TrainStep,
    data: torch.Tensor,
    num_steps: int,
    state: State,
    progress: EpochProgress | None = None,
    limit_batches: int | None = None,
    log_every: int = 50,
    on_log: Callable[[EpochProgress, int], None] | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[EpochProgress, State], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[EpochProgress, State, bool]:
    """Train over `data` (time-major, batched) from progress.batch on.

    Returns the epoch's totals, the final hidden state, and whether it stopped early because
    should_stop() became true (then progress.batch is where to resume). Raises DivergenceError as
    soon as a logged loss is not finite.
    """
    step.model.train()
    progress = progress or EpochProgress()
    total = num_windows(data, num_steps, drop_last=True)
    if limit_batches is not None:
        total = min(total, limit_batches)
    pending = torch.zeros((), device=data.device)  # loss summed on the device between reads
    pending_tokens = 0
    start = time.perf_counter()

    def flush() -> None:
        nonlocal pending, pending_tokens, start
        value = pending.item()  # the only host sync, once per log interval
        now = time.perf_counter()
        progress.loss_sum += value
        progress.tokens += pending_tokens
        progress.seconds += now - start
        pending, pending_tokens, start = torch.zeros((), device=data.device), 0, now
        if not math.isfinite(value):
            raise DivergenceError(
                f"training loss became {value} at epoch batch {progress.batch}: lower lr_policy.lr "
                "or trainer.max_grad_norm"
            )

    stopped = False
    for inputs, targets in windows(data, num_steps, drop_last=True, start=progress.batch):
        if progress.batch >= total:
            break
        nll, state = step(inputs, targets, state)
        pending += nll
        pending_tokens += targets.numel()
        progress.batch += 1
        done = progress.batch >= total
        if done or progress.batch % log_every == 0:
            flush()
            if on_log is not None:
                on_log(progress, total)
        if (
            checkpoint_every
            and progress.batch % checkpoint_every == 0
            and not done
            and on_checkpoint
        ):
            flush()
            on_checkpoint(progress, state)
        if not done and should_stop():
            flush()
            stopped = True
            break
    if pending_tokens:
        flush()
    return progress, state, stopped


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: torch.Tensor,
    num_steps: int,
    limit_batches: int | None = None,
    precision: str = "fp32",
) -> tuple[float, int]:
    """Summed NLL and token count over every token of `data` (time-major, batched)."""
    model.eval()
    state = model.init_state(data.size(1))
    loss_sum = torch.zeros((), device=data.device, dtype=torch.float64)
    tokens = 0
    device = data.device
    for i, (inputs, targets) in enumerate(windows(data, num_steps, drop_last=False)):
        if limit_batches is not None and i >= limit_batches:
            break
        with autocast(device, precision):
            logits, state = model(inputs, state)
        nll = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction="sum"
        )
        loss_sum += nll
        tokens += targets.numel()
    return loss_sum.item(), tokens
