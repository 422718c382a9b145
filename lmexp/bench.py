"""`python -m lmexp.bench [overrides]`: training words/s of lmexp's step against the 2017 ways.

Variants, all on the same model size, data and device, each in a process of its own:
  lmexp      the harness's own step (`lmexp.engine.loop.TrainStep`), called per batch as
             `lmexp.train` calls it, in lmexp's runtime (keep_freed_memory on a CPU);
  stock      the same model and loss with only public torch APIs: dense gradients, cross_entropy,
             clip_grad_norm_(foreach=True), torch.optim.SGD(foreach=True);
  port       the 2017 PyTorch port's loop: fused nn.LSTM, model.zero_grad(), loss.item() every
             batch, a separate clip_grad_norm_, and a manual p.data.add_(-lr * grad) per parameter;
  cell_loop  the port's loop over the same model as a Python loop over time of nn.LSTMCell per
             layer (TF RNNCell style);
  stock_alloc, port_alloc  stock's and port's loops in a process with lmexp's allocator setting.
The baselines are loops written as their originals were, in processes with glibc's default
allocator settings, as those programs ran (docs/benchmarks.md checks them against a stand-alone
copy); their _alloc twins take the setting any program could (glibc keeps freed memory), so
lmexp against port_alloc is what the step alone buys. After a warm-up of each, the variants are timed in turn, `bench.repeats` times, so drifts
in machine speed hit them alike; the median, min and max words/s and each median's ratio to
port's are printed and, with bench.output=PATH, written as JSON. Evaluation words/s of lmexp too.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmexp.config import BenchConfig, LmexpError, flatten
from lmexp.data import batchify, load_corpus, windows
from lmexp.engine.loop import TrainStep, detach, evaluate
from lmexp.engine.runtime import (
    check_device_support,
    configure_threads,
    device_name,
    keep_freed_memory,
    select_device,
)
from lmexp.models import build_model
from lmexp.models.base import State, flatten_recurrent_weights
from lmexp.models.rnn import RNNLanguageModel

log = logging.getLogger("lmexp.bench")
ALLOC = "_alloc"  # a baseline run with lmexp's allocator setting (keep_freed_memory)


class CellLoopLM(nn.Module):
    """The same network with one nn.LSTMCell per layer stepped in Python, as TF's RNNCell did."""

    def __init__(self, reference: RNNLanguageModel) -> None:
        super().__init__()
        h, layers = reference.hidden_size, reference.num_layers
        self.num_layers, self.hidden_size = layers, h
        self.embedding = nn.Embedding(reference.embedding.num_embeddings, h)
        self.cells = nn.ModuleList(nn.LSTMCell(h, h) for _ in range(layers))
        self.decoder = nn.Linear(h, reference.decoder.out_features)
        self.p = reference.p_output
        self.load_from(reference)

    @torch.no_grad()
    def load_from(self, reference: RNNLanguageModel) -> None:
        self.embedding.weight.copy_(reference.embedding.weight)
        self.decoder.load_state_dict(reference.decoder.state_dict())
        for i, cell in enumerate(self.cells):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).copy_(getattr(reference.lstm, f"{name}_l{i}"))

    def init_state(self, batch_size: int) -> State:
        w = self.decoder.weight
        shape = (self.num_layers, batch_size, self.hidden_size)
        return w.new_zeros(shape), w.new_zeros(shape)

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        drop = nn.functional.dropout
        h, c = list(state[0].unbind(0)), list(state[1].unbind(0))
        outputs = []
        for x in drop(self.embedding(tokens), self.p, self.training).unbind(0):
            for i, cell in enumerate(self.cells):
                h[i], c[i] = cell(x, (h[i], c[i]))
                x = drop(h[i], self.p, self.training)
            outputs.append(x)
        return self.decoder(torch.stack(outputs)), (torch.stack(h), torch.stack(c))


# A variant's timed loop: (batches, state) -> state. The baselines are loops over the batches
# written as their originals wrote them (one function for the whole epoch): the same code as a
# step function called per batch ran 12% slower here, the allocator's reuse pattern changing
# with it, so only the original's own shape measures the original.
Loop = Callable[[list[tuple[torch.Tensor, torch.Tensor]], State], State]


def port_loop(model: nn.Module, lr: float, max_grad_norm: float) -> Loop:
    """The 2017 port's run_epoch, line for line (the batches already tensors)."""
    criterion = nn.CrossEntropyLoss()

    def run(batches: list[tuple[torch.Tensor, torch.Tensor]], hidden: State) -> State:
        costs = 0.0
        for inputs, targets in batches:
            model.zero_grad(set_to_none=False)  # 2017 zero_grad: fill the grads with zeros
            hidden = detach(hidden)  # repackage_hidden
            outputs, hidden = model(inputs, hidden)
            loss = criterion(outputs.view(-1, outputs.size(-1)), targets.reshape(-1))
            costs += loss.item() * inputs.size(0)  # a host sync every batch
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            for p in model.parameters():
                p.data.add_(p.grad.data, alpha=-lr)
        return hidden

    return run


def stock_loop(model: nn.Module, lr: float, max_grad_norm: float, sum_steps: bool) -> Loop:
    """Today's textbook loop with only public torch APIs (pytorch/examples' train() with
    torch.optim.SGD): dense gradients, cross_entropy, clip_grad_norm_(foreach=True) and
    SGD(foreach=True), the loss left on the device."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, foreach=True)

    def run(batches: list[tuple[torch.Tensor, torch.Tensor]], hidden: State) -> State:
        for inputs, targets in batches:
            optimizer.zero_grad(set_to_none=True)
            logits, hidden = model(inputs, detach(hidden))
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
            )
            (loss * inputs.size(0) if sum_steps else loss).backward()
            nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
            optimizer.step()
        return hidden

    return run


def lmexp_loop(step: TrainStep) -> Loop:
    """lmexp's step called once per batch, as lmexp.engine.loop.train_epoch calls it."""

    def run(batches: list[tuple[torch.Tensor, torch.Tensor]], state: State) -> State:
        for inputs, targets in batches:
            state = step(inputs, targets, state)[1]
        return state

    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(
    loop: Loop,
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
) -> float:
    """Words per second of `loop` over `batches` (the clock stops after the device finishes)."""
    model.train()
    state = model.init_state(batches[0][0].size(1))
    sync(device)
    start = time.perf_counter()
    loop(batches, state)
    sync(device)
    words = sum(t.numel() for _, t in batches)
    return words / (time.perf_counter() - start)


# The repeats of a variant on a quiet machine stay within a few percent of each other (at most
# 7% in the committed records: results/bench_cpu_*.json). Past SPREAD_LIMIT the machine was busy
# or throttling, and a median's ratio to another says nothing about the programs.
SPREAD_LIMIT = 0.20


def judge(variants: dict[str, dict[str, float]], repeats: int) -> list[str]:
    """Why the table's ratios cannot be trusted, one sentence each; none when they can."""
    if repeats < 3:
        return [
            f"bench.repeats={repeats}: too few repeats to tell a quiet machine from a busy one; "
            "use 3 or more before comparing the ratios."
        ]
    warnings = []
    for name, v in variants.items():
        spread = (v["wps_max"] - v["wps_min"]) / v["wps_median"]
        if spread > SPREAD_LIMIT:
            warnings.append(
                f"{name}'s repeats spread {spread:.0%} of its median ({v['wps_min']:.0f} to "
                f"{v['wps_max']:.0f} words/s; a quiet machine stays under {SPREAD_LIMIT:.0%}): "
                "something else ran on these cores, so the ratios mean nothing; rerun on a "
                "quiet machine."
            )
    return warnings


def stats(samples: list[float]) -> dict[str, float]:
    return {
        "wps_median": statistics.median(samples),
        "wps_min": min(samples),
        "wps_max": max(samples),
    }


def build_variant(
    name: str, cfg: BenchConfig, vocab_size: int, device: torch.device
) -> tuple[Loop, nn.Module]:
    """One variant's loop and its own model, from the same seed (so the same weights) as the
    others."""
    t = cfg.trainer
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(t.seed)
    name = name.removesuffix(ALLOC)  # the same loop; its process differs (variant_worker)
    model = build_model(cfg.model, cfg.dropout, vocab_size)
    if name == "cell_loop":
        model = CellLoopLM(model)
    model = model.to(device)
    if name == "lmexp":
        flatten_recurrent_weights(model)
        return lmexp_loop(
            TrainStep.from_config(model, t, cfg.optimizer, cfg.lr_policy.lr, cfg.regularizer)
        ), model
    if name == "stock":
        flatten_recurrent_weights(model)
        sum_steps = t.loss_reduction == "sum_steps"
        return stock_loop(model, cfg.lr_policy.lr, t.max_grad_norm, sum_steps), model
    return port_loop(model, cfg.lr_policy.lr, t.max_grad_norm), model


def bench_batches(
    cfg: BenchConfig, device: torch.device
) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The corpus, and the warm-up and timed batches: the first training windows of PTB."""
    b, t = cfg.bench, cfg.trainer
    corpus = load_corpus(cfg.data)
    data = batchify(corpus.train, t.batch_size).to(device)
    needed = b.warmup_batches + b.batches
    batches = list(
        itertools.islice(
            itertools.cycle(list(windows(data, t.num_steps, drop_last=True))[:needed]), needed
        )
    )
    return corpus, batches[: b.warmup_batches], batches[b.warmup_batches :]


def variant_worker(name: str, cfg: BenchConfig, device_name_: str, conn: Any) -> None:
    """One variant in a process of its own, as each implementation runs in its own program:
    variants sharing a process share its allocator and oneDNN caches, which made a baseline
    measured there slower than the same loop run alone. It builds its data and model, then
    answers the parent: "warmup" (bench.warmup_batches batches; cuDNN picks its kernels then,
    so the parent warms one variant at a time), "time" (bench.batches batches, timed), "eval"
    (validation words/s), and ends on "stop" or when the parent is gone."""
    try:
        device = torch.device(device_name_)
        configure_threads(cfg.trainer.threads)
        # as lmexp.train does; the baselines as their programs did, their twins as lmexp
        kept = device.type == "cpu" and (name == "lmexp" or name.endswith(ALLOC))
        kept = kept and keep_freed_memory()
        corpus, warmup, timed = bench_batches(cfg, device)
        loop, model = build_variant(name, cfg, corpus.vocab_size, device)
        conn.send(("ready", kept))
        while True:
            request = conn.recv()
            if request == "warmup":
                conn.send(("warmup", time_loop(loop, model, warmup, device)))
            elif request == "time":
                conn.send(("time", time_loop(loop, model, timed, device)))
            elif request == "eval":
                t = cfg.trainer
                valid = batchify(corpus.valid, t.eval_batch_size).to(device)
                sync(device)
                start = time.perf_counter()
                _, tokens = evaluate(
                    model, valid, t.eval_num_steps, cfg.bench.eval_batches, t.precision
                )
                sync(device)
                conn.send(("eval", tokens / (time.perf_counter() - start)))
            else:
                return
    except (EOFError, BrokenPipeError):
        return  # the parent is gone
    except Exception as err:  # noqa: BLE001 - handed to the parent, which reports it
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(err).__name__}: {err}"))


class Variants:
    """The variants' worker processes: started together, warmed up one after another, stopped
    together, also when one fails (`with Variants(cfg, device) as variants`)."""

    def __init__(self, cfg: BenchConfig, device: torch.device) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork after CUDA (or oneDNN) is set up
        self.workers: dict[str, tuple[Any, Any]] = {}
        self.keeps_freed_memory: dict[str, bool] = {}  # each variant's allocator, as it reported
        for name in cfg.bench.variants:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=variant_worker, args=(name, cfg, str(device), child))
            proc.start()
            child.close()  # the worker's end is the worker's: its death is then our EOF
            self.workers[name] = (proc, parent)

    def __enter__(self) -> Variants:
        try:
            for name in self.workers:  # it has built its data and model
                self.keeps_freed_memory[name] = bool(self.ask(name, None))
            for name in self.workers:
                log.info("warming up %s", name)
                self.ask(name, "warmup")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ask(self, name: str, request: str | None) -> float | None:
        proc, conn = self.workers[name]
        try:
            if request is not None:
                conn.send(request)
            kind, value = conn.recv()
        except (EOFError, OSError):
            proc.join(timeout=5)
            raise LmexpError(
                f"bench variant {name}'s process ended (exit code {proc.exitcode}), out of memory "
                f"or crashed; run it alone with bench.variants=[{name}] to see why."
            ) from None
        if kind == "error":
            raise LmexpError(f"bench variant {name} failed: {value}")
        return value

    def close(self) -> None:
        for _, conn in self.workers.values():
            with contextlib.suppress(OSError):
                conn.send("stop")
            conn.close()
        for proc, _ in self.workers.values():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()


def time_variants(variants: Variants, repeats: int) -> dict[str, list[float]]:
    """Each variant's words/s per repeat; the variants take turns, starting one later each
    repeat, so a drift in machine speed hits them alike. One runs at a time: the others wait."""
    names = list(variants.workers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            samples[name].append(variants.ask(name, "time"))  # type: ignore[arg-type]
            log.info("repeat %d %-9s %10.0f words/s", repeat + 1, name, samples[name][-1])
    return samples


def run_bench(cfg: BenchConfig, device: torch.device) -> dict[str, Any]:
    b, t = cfg.bench, cfg.trainer
    check_device_support(t, device.type)
    threads = configure_threads(t.threads)
    load_corpus(cfg.data)  # a corpus that cannot be read is one sentence here, not in a worker
    with Variants(cfg, device) as variants:
        samples = time_variants(variants, b.repeats)
        eval_samples = (
            [variants.ask("lmexp", "eval") for _ in range(b.repeats)]
            if "lmexp" in b.variants
            else []
        )
        allocator = variants.keeps_freed_memory
    variants = {
        name: {**stats(values), "keeps_freed_memory": allocator[name]}
        for name, values in samples.items()
    }
    port = variants.get("port", {}).get("wps_median")
    port_alloc = variants.get("port" + ALLOC, {}).get("wps_median")
    for values in variants.values():
        values["ratio_vs_port"] = values["wps_median"] / port if port else None
        if port_alloc:  # what the step alone buys: both with lmexp's allocator setting
            values["ratio_vs_port_alloc"] = values["wps_median"] / port_alloc
    result: dict[str, Any] = {
        "device": device_name(device),
        "torch_version": torch.__version__,
        "config": {
            **flatten({"model": vars(cfg.model)}),
            "dropout.kind": cfg.dropout.kind,
            "dropout.dp_keep_prob": cfg.dropout.dp_keep_prob,
            "dropout.weight_drop": cfg.dropout.weight_drop,
            **{
                f"trainer.{k}": getattr(t, k)
                for k in ("batch_size", "num_steps", "precision", "compile", "loss_reduction")
            },
            "threads": threads,
            "bench.batches": b.batches,
            "bench.repeats": b.repeats,
            "bench.warmup_batches": b.warmup_batches,
        },
        "variants": variants,
        "warnings": judge(variants, b.repeats),
    }
    if eval_samples:
        result["eval"] = {"lmexp": stats(eval_samples)}  # type: ignore[arg-type]
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"device: {result['device']}  torch {result['torch_version']}",
        f"{'variant':<10} {'median w/s':>12} {'min':>10} {'max':>10} {'vs port':>8}",
    ]
    for name, v in result["variants"].items():
        ratio = f"{v['ratio_vs_port']:.2f}x" if v["ratio_vs_port"] else "-"
        lines.append(
            f"{name:<10} {v['wps_median']:>12.0f} {v['wps_min']:>10.0f} {v['wps_max']:>10.0f} {ratio:>8}"
        )
    lmexp, port_alloc = result["variants"].get("lmexp"), result["variants"].get("port_alloc")
    if lmexp and port_alloc:
        lines.append(
            f"lmexp vs port_alloc: {lmexp['ratio_vs_port_alloc']:.2f}x (the step alone: both "
            "with lmexp's allocator setting)"
        )
    for name, v in result.get("eval", {}).items():
        lines.append(
            f"{name + ' eval':<10} {v['wps_median']:>12.0f} {v['wps_min']:>10.0f} {v['wps_max']:>10.0f}"
        )
    return "\n".join(lines)


def task(cfg: Any) -> None:
    from omegaconf import OmegaConf

    from lmexp.validation import validate

    try:
        typed = OmegaConf.to_object(cfg)
        validate(typed)
        uri = bench_store(typed)  # checked first: a store that refuses costs no benchmark
        result = run_bench(typed, select_device(typed.trainer.device))
    except LmexpError as err:
        log.error("%s", err)
        sys.exit(2)
    print(format_table(result), flush=True)
    for warning in result["warnings"]:
        log.warning("Not a result: %s", warning)
    if typed.bench.output:
        out = Path(typed.bench.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", out)
    if uri is not None:
        from lmexp.tracking.base import KIND_TAG
        from lmexp.tracking.runs import open_tracker

        tracker = open_tracker(
            "mlflow", uri, typed.logger.experiment_name, None, "bench", {KIND_TAG: "bench"}
        )
        tracker.log_params(result["config"])
        metrics = {
            f"{n}.{k}": v
            for n, vs in result["variants"].items()
            for k, v in vs.items()
            if v is not None
        }
        tracker.log_metrics(metrics, step=0)
        tracker.finish()


def bench_store(typed: Any) -> str | None:
    """The checked store for bench.log_mlflow=true (reachable, writable, the login accepted)."""
    if not typed.bench.log_mlflow:
        return None
    from hydra.core.hydra_config import HydraConfig

    from lmexp.tracking.stores import configured_store

    launch_dir = Path(HydraConfig.get().runtime.cwd)
    lg = typed.logger  # no fallback: a benchmark's figures go where they were asked to, or nowhere
    return configured_store(lg.tracking_uri, None, launch_dir, lg.connect_timeout_s)[0]


def main() -> None:
    """Console entry point (`lmexp-bench`) and `python -m lmexp.bench`."""
    from lmexp.orchestration.launch import launch

    launch(task, "bench", sys.argv[1:], BenchConfig)


if __name__ == "__main__":
    from lmexp.bench import main as _main

    _main()
