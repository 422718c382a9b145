"""The continuous cache and dynamic evaluation against their definitions (pointer.py, Grave et al.
2017; dynamiceval.py, Krause et al. 2018), and lmexp.adapt on a run trained by the real entry
point, its scores logged to that run."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY, mlflow_runs, run_module
from mlflow.tracking import MlflowClient
from torch import nn
from torch.nn import functional as F

from lmexp.data import batchify
from lmexp.engine import checkpoint
from lmexp.engine.cache import cache_evaluate
from lmexp.engine.dynamic_eval import EvaluationStopped, dynamic_evaluate, gradient_stats
from lmexp.engine.loop import evaluate
from lmexp.models.rnn import RNNLanguageModel
from lmexp.models.transformer import TransformerLanguageModel

unit = pytest.mark.unit


def tiny_lstm(seed: int = 0, vocab: int = 7) -> RNNLanguageModel:
    torch.manual_seed(seed)
    return RNNLanguageModel(vocab, hidden_size=6, num_layers=2, init_scale=0.5)


def stream(n: int, vocab: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


class TableModel(nn.Module):
    """A model whose feature for a token is a fixed row of a table (no recurrence), so that the
    cache's attention can be computed by hand."""

    def __init__(self, features: torch.Tensor, decoder: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(features)
        self.decoder = nn.Linear(features.size(1), decoder.size(0), bias=False)
        self.decoder.weight.data.copy_(decoder)

    def init_state(self, batch: int) -> torch.Tensor:
        return torch.zeros(1, batch, 1)

    def features(self, tokens: torch.Tensor, state: torch.Tensor):
        return self.table[tokens], state

    def forward(self, tokens: torch.Tensor, state: torch.Tensor):
        return self.decoder(self.table[tokens]), state


@unit
def test_cache_probabilities_equal_a_hand_computation_of_the_pointer():
    torch.manual_seed(3)
    vocab, window, theta, lambd = 5, 3, 0.7, 0.3
    model = TableModel(torch.randn(vocab, 4), torch.randn(vocab, 4))
    words = [0, 1, 2, 1, 0, 2, 1, 3, 1, 4, 0, 2]
    # by hand: position t's feature is h(words[t]); earlier position j points at words[j + 1]
    h = model.table.detach().tolist()
    w = model.decoder.weight.detach().tolist()
    expected = 0.0
    for t in range(len(words) - 1):
        logits = [sum(a * b for a, b in zip(row, h[words[t]], strict=True)) for row in w]
        p_model = math.exp(logits[words[t + 1]]) / sum(math.exp(x) for x in logits)
        earlier = range(max(0, t - window), t)
        if earlier:
            scores = [
                theta * sum(a * b for a, b in zip(h[words[t]], h[words[j]], strict=True))
                for j in earlier
            ]
            total = sum(math.exp(s) for s in scores)
            p_cache = sum(
                math.exp(s) / total
                for s, j in zip(scores, earlier, strict=True)
                if words[j + 1] == words[t + 1]
            )
            p = lambd * p_cache + (1 - lambd) * p_model
        else:
            p = p_model  # nothing stored before the first position
        expected -= math.log(p)
    data = batchify(torch.tensor(words), 1)
    for steps in (2, 5, 11):  # the cache carried across windows of any length
        loss, count = cache_evaluate(model, data, steps, window, theta, lambd)
        assert count == len(words) - 1
        assert loss == pytest.approx(expected, rel=1e-6)


@unit
def test_cache_gives_each_column_of_a_batch_its_own_history():
    model, tokens = tiny_lstm(), stream(400)
    together = cache_evaluate(model, batchify(tokens, 2), 35, 50, 40.0, 0.2)[0]
    halves = [
        cache_evaluate(model, batchify(half, 1), 35, 50, 40.0, 0.2)[0]
        for half in tokens.view(2, -1)
    ]
    assert together == pytest.approx(sum(halves), rel=1e-6)


@unit
def test_cache_with_lambda_zero_is_plain_evaluation():
    model, data = tiny_lstm(), batchify(stream(500), 2)
    assert cache_evaluate(model, data, 35, 100, 1.0, 0.0) == pytest.approx(
        evaluate(model, data, 35), rel=1e-7
    )
    assert cache_evaluate(model, data, 35, 100, 1.0, 0.1)[0] != pytest.approx(
        evaluate(model, data, 35)[0], rel=1e-3
    )


@unit
def test_dynamic_evaluation_without_steps_or_decay_is_plain_evaluation_and_restores_weights():
    model, data = tiny_lstm(), batchify(stream(300), 1)
    stats = gradient_stats(model, batchify(stream(600, seed=2), 4), 5)
    trained = copy.deepcopy(model.state_dict())
    for kind in ("rms", "sgd"):
        assert dynamic_evaluate(model, data, 5, kind, 0.0, 0.0, 1e-3, stats) == pytest.approx(
            evaluate(model, data, 5), rel=1e-7
        )
    adapted = dynamic_evaluate(model, data, 5, "rms", 2e-3, 0.01, 1e-3, stats)
    assert adapted[0] < evaluate(model, data, 5)[0]  # it learns from what it has scored
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name


@unit
def test_gradient_statistics_are_the_root_mean_square_gradient_per_weight():
    model, train = (
        tiny_lstm(),
        batchify(stream(42, seed=4), 2),
    )  # 21 steps, 20 targets: 4 segments of 5
    stats = gradient_stats(model, train, 5)
    squares, state = {}, model.init_state(2)
    for lo in range(0, 20, 5):
        model.zero_grad()
        logits, state = model(train[lo : lo + 5], tuple(s.detach() for s in state))
        F.cross_entropy(logits.reshape(-1, 7), train[lo + 1 : lo + 6].reshape(-1)).backward()
        for name, p in model.named_parameters():
            squares[name] = squares.get(name, 0) + p.grad**2
    assert stats.segments == 4
    ms = {name: (s / 4).sqrt() for name, s in squares.items()}
    scale = sum(m.mean() for m in ms.values()) / len(ms)
    for name in ms:
        assert torch.allclose(stats.ms[name], ms[name], rtol=1e-5, atol=1e-9)
        assert torch.allclose(stats.decrate[name], ms[name] / scale, rtol=1e-5, atol=1e-9)


@unit
@pytest.mark.parametrize("kind", ["rms", "sgd"])
def test_each_update_is_dynamiceval_formula_and_decay_pulls_back_to_the_trained_weights(kind):
    lr, decay, eps = (3e-3 if kind == "rms" else 0.3), 0.4, 1e-3  # steps of similar size
    model = tiny_lstm()
    stats = gradient_stats(model, batchify(stream(600, seed=2), 4), 3)
    stats.decrate["decoder.bias"] *= 50  # over 1/decay: the clip must hold it
    tokens = stream(10, seed=5)  # segments [0:3], [3:6], [6:9]: three updates
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    by_hand, state, expected = copy.deepcopy(model), model.init_state(1), 0.0
    for lo in range(0, 9, 3):
        by_hand.zero_grad()
        logits, state = by_hand(tokens[lo : lo + 3, None], tuple(s.detach() for s in state))
        nll = F.cross_entropy(logits.reshape(-1, 7), tokens[lo + 1 : lo + 4], reduction="sum")
        (nll / 3).backward()
        expected += nll.item()
        with torch.no_grad():
            for name, p in by_hand.named_parameters():
                if kind == "rms":
                    rate = stats.decrate[name].clamp(max=1 / decay)
                    p += decay * rate * (theta0[name] - p) - lr * p.grad / (stats.ms[name] + eps)
                else:
                    p += decay * (theta0[name] - p) - lr * p.grad
    loss, count = dynamic_evaluate(
        model, batchify(tokens, 1), 3, kind, lr, decay, eps, stats, restore=False
    )
    assert count == 9 and loss == pytest.approx(expected, rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), by_hand.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), (name, (p - q).abs().max())
    # the decay alone (eta = 0): each of 13 updates keeps (1 - lambda * decrate) of the distance
    before = {n: p.detach() - theta0[n] for n, p in model.named_parameters()}
    later = batchify(stream(40, seed=6), 1)  # 39 targets: 13 segments of 3
    dynamic_evaluate(model, later, 3, kind, 0.0, decay, eps, stats, False, theta0)
    for name, p in model.named_parameters():
        rate = stats.decrate[name].clamp(max=1 / decay) if kind == "rms" else 1.0
        kept = (1 - decay * rate) ** 13 * before[name]
        assert torch.allclose(p - theta0[name], kept, rtol=1e-4, atol=1e-6), (
            name,
            (p - theta0[name] - kept).abs().max(),
        )
    assert sum(d.abs().sum() for d in before.values()) > 0.1


def tiny_transformer(seed: int = 0, vocab: int = 7) -> TransformerLanguageModel:
    torch.manual_seed(seed)
    return TransformerLanguageModel(vocab, 8, 2, 2, 16, 6, 0.1)


@unit
@pytest.mark.parametrize("build", [tiny_lstm, tiny_transformer], ids=["lstm", "transformer"])
def test_dynamic_evaluation_stopped_and_resumed_is_the_uninterrupted_one_bit_for_bit(build):
    """Stopped before segment 23 of 60 (the position checkpointed every 10 segments and at the
    stop), then continued from the stop by a fresh copy of the trained model: the same summed
    NLL, token count and adapted weights as one uninterrupted pass, compared with ==."""
    data = batchify(stream(301, seed=7), 1)  # 300 targets: 60 segments of 5
    stats = gradient_stats(build(), batchify(stream(600, seed=2), 4), 5)
    args = (5, "rms", 2e-3, 0.01, 1e-3, stats)
    whole_model = build()
    whole = dynamic_evaluate(whole_model, data, *args, restore=False)

    saved, polls = [], iter(range(1, 1000))
    with pytest.raises(EvaluationStopped) as stopped:
        dynamic_evaluate(
            build(),
            data,
            *args,
            checkpoint_every=10,
            on_checkpoint=saved.append,
            should_stop=lambda: next(polls) == 22,  # polled before segments 1, 2, ...
        )
    assert [p.segments for p in saved] == [10, 20, 22]
    assert stopped.value.position is saved[-1]
    resumed_model = build()
    resumed = dynamic_evaluate(resumed_model, data, *args, restore=False, start=saved[-1])
    assert resumed == whole and whole[1] == 300
    for (name, p), q in zip(
        whole_model.named_parameters(), resumed_model.parameters(), strict=True
    ):
        assert torch.equal(p, q), name
    # and from the position at segment 10, whose state and weights are the earlier ones
    assert dynamic_evaluate(build(), data, *args, start=saved[0]) == whole


@unit
def test_a_stop_during_the_gradient_statistics_ends_them_at_once_keeping_nothing():
    model, train = tiny_lstm(), batchify(stream(600, seed=2), 4)  # 149 steps: 30 segments
    polls = iter(range(1, 100))
    with pytest.raises(EvaluationStopped) as stopped:
        gradient_stats(model, train, 5, should_stop=lambda: next(polls) == 3)
    assert stopped.value.position is None and next(polls) == 4  # polled before segments 1-3
    assert all(p.grad is None for p in model.parameters())
    assert gradient_stats(model, train, 5).segments == 30


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("adapt")
    proc = run_module("lmexp.train", *TINY, "trainer.max_epochs=1", "hydra.run.dir=run", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = mlflow_runs(cwd / "mlflow.db")
    return cwd, run.info.run_id, run.data.metrics


@pytest.mark.slow
def test_adapt_logs_cache_and_dynamic_scores_to_the_trained_run(trained):
    cwd, run_id, metrics = trained
    short = run_id[:8]
    # switched off, both reproduce the run's own test_ppl through the real entry point
    off = run_module("lmexp.adapt", f"source={short}", "cache.lambd=0", cwd=cwd)
    assert off.returncode == 0, off.stderr[-3000:]
    logged = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}").get_run(run_id).data
    assert logged.metrics["test_ppl_cache"] == pytest.approx(metrics["test_ppl"], rel=1e-6)
    assert logged.tags["lmexp.test_ppl_cache"] == "window=500 theta=1.0 lambd=0.0 batch_size=1"
    sgd_off = ("method=dynamic", "dynamic.kind=sgd", "dynamic.lr=0", "dynamic.decay=0")
    off = run_module("lmexp.adapt", f"source={short}", *sgd_off, cwd=cwd)
    assert off.returncode == 0, off.stderr[-3000:]
    logged = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}").get_run(run_id).data
    assert logged.metrics["test_ppl_dynamic"] == pytest.approx(metrics["test_ppl"], rel=1e-6)
    # the report shows them beside test_ppl, and a results record keeps them with their settings
    for args in (("--out", "report"), ("--record", "rec.json")):
        report = run_module("lmexp.report", *args, "--run", short, cwd=cwd)
        assert report.returncode == 0, report.stderr[-3000:]
    with open(cwd / "report" / "runs.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert list(row)[list(row).index("test_ppl") + 1 : list(row).index("test_ppl") + 3] == [
        "test_ppl_cache",
        "test_ppl_dynamic",
    ]
    assert float(row["test_ppl_dynamic"]) == pytest.approx(logged.metrics["test_ppl_dynamic"])
    adapted = json.loads((cwd / "rec.json").read_text())["adapted"]
    assert adapted["test_ppl_cache"] == {
        "ppl": pytest.approx(metrics["test_ppl"], rel=1e-6),
        "settings": "window=500 theta=1.0 lambd=0.0 batch_size=1",
    }
    # switched on, a grid on the valid split: each job logs its score and says so
    grid = run_module(
        "lmexp.adapt",
        "-m",
        f"source={short}",
        "split=valid",
        "method=dynamic",
        "dynamic.lr=2e-5,1e-4",
        "dynamic.stats_segments=20",
        "hydra.sweep.dir=grid",
        cwd=cwd,
    )
    assert grid.returncode == 0, grid.stderr[-3000:]
    lines = [line for line in grid.stdout.splitlines() if "perplexity" in line]
    assert len(lines) == 2 and all("with dynamic evaluation (kind=rms lr=" in x for x in lines)
    history = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}").get_metric_history(
        run_id, "valid_ppl_dynamic"
    )
    scores = [float(x.split("perplexity ")[1].split(" ")[0]) for x in lines]
    assert [round(m.value, 2) for m in history] == scores
    plain = [float(re.search(r"([0-9.]+) without", x).group(1)) for x in lines]
    assert all(s < p for s, p in zip(scores, plain, strict=True)), lines


@pytest.mark.slow
def test_adapt_refuses_bad_settings_in_one_sentence_before_loading(tmp_path):
    cwd, run_id = tmp_path, "0123abcd"  # no store, no run: the refusal comes first
    for args, sentence in [
        ((), "Invalid config: source is not set; pass source=<MLflow run id>"),
        (
            (f"source={run_id}", "cache.lambd=1"),
            "Invalid config: cache.lambd=1.0 must be in [0, 1)",
        ),
        ((f"source={run_id}", "dynamic.kind=adam"), "dynamic.kind='adam' is not one of rms, sgd"),
        ((f"source={run_id}", "dynamic.epsilon=0"), "dynamic.epsilon=0.0 must be > 0"),
        ((f"source={run_id}", "cache.window=ten"), "cache.window"),
    ]:
        proc = run_module("lmexp.adapt", *args, cwd=cwd)
        assert proc.returncode == 2, proc.stderr[-2000:]
        out = proc.stdout + proc.stderr
        assert sentence in out and "Traceback" not in out, out[-2000:]


@pytest.mark.slow
def test_adapt_help_names_its_own_keys_not_trainings_groups(tmp_path):
    proc = run_module("lmexp.adapt", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "python -m lmexp.adapt source=<run id | model.pt | checkpoint>" in proc.stdout
    assert "cache:\n  window: 500" in proc.stdout and "hparams_search" not in proc.stdout


@pytest.mark.slow
def test_sigterm_mid_dynamic_evaluation_checkpoints_and_the_advised_command_finishes_it(tmp_path):
    """A real SIGTERM to lmexp.adapt mid-way: a checkpoint, one line saying where, exit 143; the
    command it advises goes on from there and logs the uninterrupted evaluation's score, equal
    (==). The same folder with another setting is refused in one sentence, its file untouched."""
    cwd = tmp_path
    train = ("trainer.max_epochs=1", "data.tiny_eval_tokens=5000", "hydra.run.dir=run")
    proc = run_module("lmexp.train", *TINY, *train, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = mlflow_runs(cwd / "mlflow.db")
    args = [f"source={run.info.run_id}", "method=dynamic", "dynamic.stats_segments=20"]
    args += ["dynamic.ckpt_every_n_segments=100", "dynamic.lr=1e-4"]
    whole = run_module("lmexp.adapt", *args, "hydra.run.dir=whole", cwd=cwd)
    assert whole.returncode == 0, whole.stderr[-3000:]

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    stopped = subprocess.Popen(
        [sys.executable, "-m", "lmexp.adapt", *args, "hydra.run.dir=stopped"],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    saved = cwd / "stopped" / "dynamic.pt"
    deadline = time.monotonic() + 120
    while not (saved.exists() and checkpoint.load(saved)["position"] is not None):
        assert stopped.poll() is None and time.monotonic() < deadline, stopped.stdout.read()
        time.sleep(0.05)
    stopped.send_signal(signal.SIGTERM)
    out = stopped.communicate(timeout=60)[0]
    assert stopped.returncode == 128 + signal.SIGTERM, out[-3000:]
    at = checkpoint.load(saved)["position"]["segments"]
    assert 100 <= at < 1000, at  # 5000 tokens: 1000 segments of 5
    assert f"SIGTERM received: dynamic evaluation checkpointed after {at} segments in" in out
    assert "Traceback" not in out and "Logged to MLflow" not in out
    (advice,) = re.findall(r"To resume: run (python -m lmexp.adapt .*)\.$", out, re.M)
    before = saved.read_bytes()
    refused = run_module(
        "lmexp.adapt", *args[:-1], "dynamic.lr=2e-4", "hydra.run.dir=stopped", cwd=cwd
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "holds a dynamic evaluation of other settings than this one" in refused.stdout
    assert saved.read_bytes() == before
    (cwd / "cut").mkdir()
    (cwd / "cut" / "dynamic.pt").write_bytes(before[: len(before) // 2])  # a copy cut short
    cut = run_module("lmexp.adapt", *args, "hydra.run.dir=cut", cwd=cwd)
    assert cut.returncode == 2 and "Traceback" not in cut.stdout + cut.stderr, cut.stdout[-3000:]
    assert "dynamic.pt cannot be read (" in cut.stdout and "delete it to start" in cut.stdout

    resumed = run_module(*shlex.split(advice)[2:], cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from {saved} after {at} segments." in resumed.stdout
    scores = [
        m.value
        for m in MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}").get_metric_history(
            run.info.run_id, "test_ppl_dynamic"
        )
    ]
    assert len(scores) == 2 and scores[0] == scores[1], scores
