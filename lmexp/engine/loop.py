"""Training and evaluation loops: tensors in, numbers out. No Hydra, no MLflow.

The step keeps the loss on the device and reads it only at log intervals, so a GPU is never
stalled by a per-batch host sync; gradients are set to None rather than zeroed; the update is
whatever torch.optim.Optimizer lmexp.optim.optimizers built (by default its fused, multi-tensor clip + SGD).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lmexp.config import OptimizerConfig, RegularizerConfig, TrainerConfig
from lmexp.data import jittered_windows, num_windows, windows
from lmexp.models.base import State, map_state
from lmexp.optim.optimizers import build_optimizer, set_lr

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite, or the model scores worse than guessing."""


# A uniform guess over the vocabulary scores a perplexity of exactly its size, and an untrained
# model about that. Validation says a run diverged when its perplexity
# - is not finite: at once;
# - is over HOPELESS_OVER_UNIFORM times that guess: at once, orders of magnitude past anything a
#   run recovers from (lr=25 on the tiny corpus: 1e24 to 1e39 on 46 words);
# - or is worse than that guess at DIVERGED_CHECKS validation checks in a row: a run that has
#   learned nothing for that long.
# One bad check is not divergence: a first epoch at a high lr can score several times worse than
# guessing and recover (the tiny corpus at lr 3 on an AMD EPYC: 346 on 46 words, then 34.7 and
# 24.2). Nor is a rising perplexity as a model overfits (the small recipe's rises from 117.39 to
# 118.62 over epochs 6 to 9, results/ptb_small_cpu.json).
HOPELESS_OVER_UNIFORM = 1000.0
DIVERGED_CHECKS = 3


LR_ADVICE = "lower lr_policy.lr or trainer.max_grad_norm"


def check_diverged(valid_history: list[float], vocab_size: int, advice: str = LR_ADVICE) -> None:
    """Raise DivergenceError if the validation perplexities so far (one per epoch, the last just
    measured) say the run diverged; advice ends the sentence."""
    epoch, valid_ppl = len(valid_history), valid_history[-1]
    if not math.isfinite(valid_ppl):
        why = "is not finite"
    elif valid_ppl > HOPELESS_OVER_UNIFORM * vocab_size:
        why = f"is over {HOPELESS_OVER_UNIFORM:g}x a uniform guess"
    elif len(valid_history) >= DIVERGED_CHECKS and all(
        ppl > vocab_size for ppl in valid_history[-DIVERGED_CHECKS:]
    ):
        why = f"has been worse than a uniform guess for {DIVERGED_CHECKS} epochs in a row"
    else:
        return
    raise DivergenceError(
        f"validation perplexity {valid_ppl:.4g} after epoch {epoch} {why} over the "
        f"{vocab_size}-word vocabulary; {advice}"
    )


def perplexity(loss_sum: float, tokens: int) -> float:
    """exp of the mean NLL per token; inf when the mean overflows or is not finite."""
    if tokens == 0:
        return float("nan")
    mean = loss_sum / tokens
    return math.exp(mean) if mean < 709 else float("inf")


def detach(state: State) -> State:
    return map_state(torch.Tensor.detach, state)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


class LinearCrossEntropy(torch.autograd.Function):
    """Decoder (linear) + mean softmax cross-entropy with a leaner backward.

    Forward is the usual log-softmax and NLL. Backward turns the saved log-probabilities into
    probabilities in place, subtracts one at the targets, and applies the 1/N scale to the small
    (tokens x hidden, vocab x hidden) results rather than to the (tokens x vocab) matrix. The
    standard path instead builds a zero-filled one-hot gradient of that size and reads it back,
    so this skips two passes over the largest tensor of the step. Same math, fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):  # type: ignore[override]
        log_probs = torch.log_softmax(torch.addmm(bias, hidden, weight.t()), dim=1)
        nll = -log_probs.gather(1, targets.unsqueeze(1)).mean()
        ctx.save_for_backward(hidden, weight, log_probs, targets)
        return nll

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        hidden, weight, log_probs, targets = ctx.saved_tensors
        probs = log_probs.exp_()  # the buffer is ours: backward runs once
        probs[torch.arange(targets.numel(), device=targets.device), targets] -= 1.0
        scale = grad / targets.numel()
        return (probs @ weight) * scale, (probs.t() @ hidden) * scale, probs.sum(0) * scale, None


def activation_penalty(
    dropped: torch.Tensor, raw: torch.Tensor, ar: float, tar: float
) -> torch.Tensor:
    """AWD-LSTM's AR and TAR on the last layer's output, (steps, batch, hidden): ar times the
    mean square of the dropped output, plus tar times the mean square of the undropped output's
    change from one step to the next (awd-lstm-lm's main.py, alpha and beta)."""
    penalty = dropped.new_zeros((), dtype=torch.float32)
    if ar:
        penalty = penalty + ar * dropped.float().pow(2).mean()
    if tar and raw.size(0) > 1:
        raw = raw.float()
        penalty = penalty + tar * (raw[1:] - raw[:-1]).pow(2).mean()
    return penalty


class TrainStep:
    """One truncated-BPTT step: forward, loss, backward, clip, optimizer step. Exactly what
    `train` runs.

    loss_reduction "sum_steps" scales the per-token mean by the window length, which is TF's loss
    (summed over time steps, averaged over the batch); "mean" is the per-token mean.

    Lean by construction: the loss stays on the device; gradients are dropped (set to None)
    instead of zero-filled and then accumulated into; in fp32 the decoder and loss run as
    `LinearCrossEntropy`. The optimizer is any `torch.optim.Optimizer` (lmexp.optim.optimizers): one that
    fuses clipping (FusedSGD) clips in its own step, for the others the step calls torch's
    clip_grad_norm_ first. On the CPU, with an optimizer that takes sparse gradients, the
    embedding gradient is sparse, so only the rows a batch touches are updated (on a GPU its
    coalesce would sync the host every batch). `state_dict()` holds the optimizer's and the fp16
    grad scaler's state: what a checkpoint needs to continue the step exactly.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        max_grad_norm: float,
        loss_reduction: str = "sum_steps",
        precision: str = "fp32",
        compile_model: bool = False,
        cuda_graphs: bool = False,
        ar: float = 0.0,
        tar: float = 0.0,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.ar, self.tar = ar, tar
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        device = self.params[0].device
        self.max_grad_norm = max_grad_norm
        self.clips_itself = getattr(optimizer, "fuses_clipping", False)
        self.sum_steps = loss_reduction == "sum_steps"
        self.device, self.precision = device, precision
        if cuda_graphs and device.type != "cuda":
            raise ValueError("cuda_graphs needs the model on a CUDA device")
        # CUDA graphs through torch.compile's "reduce-overhead" mode: the fixed-shape forward and
        # backward are captured once and replayed, removing per-kernel launch overhead.
        mode = "reduce-overhead" if cuda_graphs else None
        self.cuda_graphs = cuda_graphs
        compile_model = compile_model or cuda_graphs
        self.fused_head = precision == "fp32" and not compile_model
        self.forward = torch.compile(model, mode=mode) if compile_model else model
        tied = model.decoder.weight is model.embedding.weight
        model.embedding.sparse = (
            device.type == "cpu"
            and not tied
            and precision != "fp16"
            and getattr(optimizer, "supports_sparse_grads", False)
        )
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    @classmethod
    def from_config(
        cls,
        model: nn.Module,
        trainer: TrainerConfig,
        optimizer: OptimizerConfig,
        lr: float,
        regularizer: RegularizerConfig | None = None,
    ) -> TrainStep:
        regularizer = regularizer or RegularizerConfig()
        return cls(
            model,
            build_optimizer(model, optimizer, lr, trainer.max_grad_norm),
            trainer.max_grad_norm,
            trainer.loss_reduction,
            trainer.precision,
            trainer.compile,
            trainer.cuda_graphs,
            regularizer.ar,
            regularizer.tar,
        )

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state and the grad scaler's (None without fp16)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])

    def __call__(
        self, inputs: torch.Tensor, targets: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, State]:
        """Returns the window's summed NLL (a detached device scalar) and the new state."""
        penalty = None
        if self.fused_head:
            hidden, raw, state = self.model.features_and_raw(inputs, detach(state))
            decoder = self.model.decoder
            flat = hidden.reshape(-1, hidden.size(-1))
            mean_nll = LinearCrossEntropy.apply(
                flat, decoder.weight, decoder.bias, targets.reshape(-1)
            )
            if self.ar or self.tar:
                penalty = activation_penalty(hidden, raw, self.ar, self.tar)
        elif self.ar or self.tar:  # not compiled (validation.validate): the model's own parts
            with autocast(self.device, self.precision):
                hidden, raw, state = self.model.features_and_raw(inputs, detach(state))
                logits = self.model.decoder(hidden)
                mean_nll = F.cross_entropy(
                    logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1)
                )
                penalty = activation_penalty(hidden, raw, self.ar, self.tar)
        else:
            if self.cuda_graphs:
                # A new iteration: the graphs' previous outputs may be overwritten from here on.
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(self.device, self.precision):
                logits, state = self.forward(inputs, detach(state))
                if self.cuda_graphs:  # the state lives in graph memory the next replay reuses
                    state = map_state(torch.Tensor.clone, state)
                mean_nll = F.cross_entropy(
                    logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1)
                )
        objective = mean_nll if penalty is None else mean_nll + penalty
        loss = objective * inputs.size(0) if self.sum_steps else objective
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            self.clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.clip()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_nll.detach() * targets.numel(), state

    def clip(self) -> None:
        """torch's clip_grad_norm_, unless the optimizer clips in its own step (FusedSGD)."""
        if not self.clips_itself:
            nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)


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


class EpochMeter:
    """The epoch's loss, summed on the device in float64 batch by batch from where it stood: one
    sum in one order however often it is read, so an epoch stopped and resumed between two reads
    (a signal, a checkpoint) ends with the uninterrupted epoch's train_ppl, bit for bit."""

    def __init__(self, progress: EpochProgress, device: torch.device) -> None:
        self.progress = progress
        self.loss_sum = torch.tensor(progress.loss_sum, dtype=torch.float64, device=device)
        self.pending_tokens = 0
        self.start = time.perf_counter()

    def add(self, nll: torch.Tensor, tokens: int) -> None:
        self.loss_sum.add_(nll)
        self.pending_tokens += tokens
        self.progress.batch += 1

    def flush(self) -> None:
        """Move the pending sum into progress (the only host sync, once per log interval); raise
        DivergenceError when the interval's perplexity is not finite."""
        progress, value, now = self.progress, self.loss_sum.item(), time.perf_counter()
        tokens = self.pending_tokens
        mean = (value - progress.loss_sum) / tokens if tokens else 0.0
        progress.loss_sum = value
        progress.tokens += tokens
        progress.seconds += now - self.start
        self.pending_tokens, self.start = 0, now
        if not math.isfinite(perplexity(mean, 1)):
            raise DivergenceError(
                f"training loss became {mean:.4g} per token (perplexity {perplexity(mean, 1)}) at "
                f"epoch batch {progress.batch}: lower lr_policy.lr or trainer.max_grad_norm"
            )


def epoch_windows(
    data: torch.Tensor, num_steps: int, start: int, lengths: list[int] | None, limit: int | None
) -> tuple[int, Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """The epoch's number of batches and its (inputs, targets) windows from batch `start` on: of
    num_steps, or of the given lengths (trainer.bptt_jitter)."""
    if lengths is None:
        total = num_windows(data, num_steps, drop_last=True)
        batches = windows(data, num_steps, drop_last=True, start=start)
    else:
        total, batches = len(lengths), jittered_windows(data, lengths, start=start)
    return (total if limit is None else min(total, limit)), batches


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
    lengths: list[int] | None = None,
) -> tuple[EpochProgress, State, bool]:
    """Train over `data` (time-major, batched) from progress.batch on: in windows of num_steps,
    or of the given `lengths` (trainer.bptt_jitter), each window then at the epoch's lr times
    its length / num_steps, as AWD-LSTM rescales it.

    Returns the epoch's totals, the final hidden state, and whether it stopped early because
    should_stop() became true (then progress.batch is where to resume). Raises DivergenceError at
    the first log interval whose perplexity is not finite: a NaN or infinite loss, or a mean loss
    too large for exp (which no learning run reaches: uniform guessing over PTB's 10k words is 9.2).
    """
    step.model.train()
    progress = progress or EpochProgress()
    total, batches = epoch_windows(data, num_steps, progress.batch, lengths, limit_batches)
    epoch_lr = step.optimizer.param_groups[0]["lr"]
    meter = EpochMeter(progress, data.device)
    stopped = False
    for inputs, targets in batches:
        if progress.batch >= total:
            break
        if lengths is not None:
            step.set_lr(epoch_lr * inputs.size(0) / num_steps)
        nll, state = step(inputs, targets, state)
        meter.add(nll, targets.numel())
        done = progress.batch >= total
        if done or progress.batch % log_every == 0:
            meter.flush()
            if on_log is not None:
                on_log(progress, total)
        at_checkpoint = checkpoint_every and progress.batch % checkpoint_every == 0
        if at_checkpoint and on_checkpoint and not done:
            meter.flush()
            on_checkpoint(progress, state)
        if not done and should_stop():
            meter.flush()
            stopped = True
            break
    if meter.pending_tokens:
        meter.flush()
    step.set_lr(epoch_lr)  # the epoch's own lr again, after the rescaled windows
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
