"""Validation of the typed configs: ranges, choices and cross-section rules, each failure one
sentence naming the key and how to fix it. The choices come from the registries (cells, corpus
sources, optimizers), which is why this lives apart from the schema (lmexp.config), which imports
nothing from lmexp: the registries' modules import the schema.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmexp.config import (
    BENCH_VARIANTS,
    AdaptConfig,
    BenchConfig,
    ConfigError,
    DataConfig,
    DropoutConfig,
    DynamicConfig,
    LoggerConfig,
    LrPolicyConfig,
    ModelConfig,
    OptimizerConfig,
    RegularizerConfig,
    TrainConfig,
    TrainerConfig,
    choices_of,
)
from lmexp.data import SOURCES
from lmexp.models import MODELS
from lmexp.models.rnn import CELLS
from lmexp.optim.optimizers import OPTIMIZERS
from lmexp.optim.schedules import SCHEDULES


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"Invalid config: {key}={value!r} {rule}.")


DROPOUT_KINDS = choices_of(DropoutConfig, "kind")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, value, f"is not one of {', '.join(choices)}")


def _keep_prob(key: str, value: float | None) -> None:
    if value is not None:
        _check(
            0.0 < value <= 1.0,
            key,
            value,
            "must be in (0, 1]: it is the probability of keeping a unit, 1.0 means no dropout",
        )


def _check_cell(cell: str) -> None:
    _choice("model.cell", cell, tuple(CELLS))


def _check_source(name: str) -> None:
    _choice("data.name", name, tuple(SOURCES))


def _check_optimizer(o: OptimizerConfig) -> None:
    """A known optimizer, and no optimizer.* key set that the chosen one would ignore."""
    _choice("optimizer.kind", o.kind, tuple(OPTIMIZERS))
    _check(o.nonmono >= 1, "optimizer.nonmono", o.nonmono, "must be >= 1")  # one rule, not two
    spec, defaults = OPTIMIZERS[o.kind], OptimizerConfig()
    for f in dataclasses.fields(OptimizerConfig):
        value = getattr(o, f.name)
        if f.name == "kind" or value == getattr(defaults, f.name):
            continue
        readers = [n for n, s in OPTIMIZERS.items() if f.name in s.keys]
        _check(
            f.name in spec.keys,
            f"optimizer.{f.name}",
            value,
            f"is not read by optimizer={o.kind}; it is a setting of optimizer="
            f"{' or '.join(readers)} (choose one of those, or leave the key at its default)",
        )
        _check(value >= 0, f"optimizer.{f.name}", value, "must be >= 0")
    _check(o.beta1 < 1 and o.beta2 < 1, "optimizer.beta1/beta2", (o.beta1, o.beta2), "must be < 1")


def _check_finite(section: Any, prefix: str = "") -> None:
    """No number in the config is inf or NaN: no key means anything by them."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            _check(math.isfinite(value), f"{prefix}{f.name}", value, "must be a finite number")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check ranges and choices; raise ConfigError naming the first bad key and how to fix it."""
    _check_finite(cfg)
    _check_model(cfg.model, cfg.dropout)
    _check(
        cfg.model.arch != "transformer" or not (cfg.trainer.compile or cfg.trainer.cuda_graphs),
        "trainer.compile/cuda_graphs",
        (cfg.trainer.compile, cfg.trainer.cuda_graphs),
        "capture one shape of the step, which a Transformer's memory of earlier tokens changes "
        "as it fills; leave them off for model.arch=transformer",
    )
    _check_dropout(cfg.dropout)
    _check_regularizer(cfg.regularizer, cfg.dropout, cfg.trainer)
    _check_lr_policy(cfg.lr_policy)
    _check_optimizer(cfg.optimizer)
    _check_data(cfg.data)
    _check_trainer(cfg.trainer)
    _check_logger(cfg.logger)
    if isinstance(cfg, BenchConfig):
        _check_bench(cfg)
    return cfg


def _check_model(m: ModelConfig, d: DropoutConfig) -> None:
    _choice("model.arch", m.arch, tuple(MODELS))
    _check_architecture_keys(m, d)
    _check(m.hidden_size >= 1, "model.hidden_size", m.hidden_size, "must be a positive integer")
    _check(m.num_layers >= 1, "model.num_layers", m.num_layers, "must be a positive integer")
    _check(m.init_scale > 0, "model.init_scale", m.init_scale, "must be positive")
    _check_cell(m.cell)
    _check(m.num_heads >= 1, "model.num_heads", m.num_heads, "must be a positive integer")
    _check(
        "num_heads" not in MODELS[m.arch].keys or m.hidden_size % m.num_heads == 0,
        "model.hidden_size",
        m.hidden_size,
        f"is not divisible by model.num_heads={m.num_heads}: each head takes an equal share of "
        "the width; choose sizes that divide",
    )
    _check(
        m.ffn_size is None or m.ffn_size >= 1,
        "model.ffn_size",
        m.ffn_size,
        "must be null or a positive integer",
    )
    _check(m.context >= 0, "model.context", m.context, "must be an integer >= 0")
    _check(
        m.embedding_size is None or m.embedding_size >= 1,
        "model.embedding_size",
        m.embedding_size,
        "must be null or a positive integer",
    )
    _check(
        m.embedding_size in (None, m.hidden_size) or d.kind == "variational",
        "model.embedding_size",
        m.embedding_size,
        f"differs from model.hidden_size={m.hidden_size}, which needs one recurrent module per "
        "layer: choose dropout=variational or weight_drop, or leave embedding_size null",
    )


def _check_architecture_keys(m: ModelConfig, d: DropoutConfig) -> None:
    """No model.* key set away from its default that model.arch would ignore, and a dropout the
    architecture implements (each registry entry says which keys and kinds it reads)."""
    spec, defaults = MODELS[m.arch], ModelConfig()
    for f in dataclasses.fields(ModelConfig):
        value = getattr(m, f.name)
        if f.name in (*spec.keys, "name", "arch") or value == getattr(defaults, f.name):
            continue
        readers = [name for name, s in MODELS.items() if f.name in s.keys]
        _check(
            False,
            f"model.{f.name}",
            value,
            f"is not read by model.arch={m.arch}; it is a setting of model.arch="
            f"{' or '.join(readers)} (choose that, or leave the key at its default)",
        )
    _check(
        d.kind in spec.dropout_kinds or d.kind not in DROPOUT_KINDS,  # (_check_dropout's to say)
        "dropout.kind",
        d.kind,
        f"is not implemented by model.arch={m.arch}; choose dropout="
        f"{' or '.join(spec.dropout_kinds)}",
    )
    _check(
        d.weight_drop == 0.0 or "cell" in spec.keys,
        "dropout.weight_drop",
        d.weight_drop,
        f"drops recurrent weights, which model.arch={m.arch} does not have; leave it at 0",
    )


def _check_dropout(d: DropoutConfig) -> None:
    _choice("dropout.kind", d.kind, DROPOUT_KINDS)
    for name in ("dp_keep_prob", "keep_prob_embedding", "keep_prob_between", "keep_prob_output"):
        _keep_prob(f"dropout.{name}", getattr(d, name))
    _check(
        0.0 <= d.weight_drop < 1.0,
        "dropout.weight_drop",
        d.weight_drop,
        "must be in [0, 1): the probability of dropping each hidden-to-hidden weight",
    )
    _check(
        d.weight_drop == 0.0 or d.kind != "none",
        "dropout.weight_drop",
        d.weight_drop,
        "needs dropout=standard, variational or weight_drop, not dropout.kind=none",
    )
    _check(
        0.0 <= d.embedding < 1.0,
        "dropout.embedding",
        d.embedding,
        "must be in [0, 1): the probability of dropping each word's embedding row",
    )
    _check(
        d.embedding == 0.0 or d.kind != "none",
        "dropout.embedding",
        d.embedding,
        "needs dropout=standard, variational or weight_drop, not dropout.kind=none",
    )


def _check_regularizer(reg: RegularizerConfig, d: DropoutConfig, t: TrainerConfig) -> None:
    _check(reg.ar >= 0, "regularizer.ar", reg.ar, "must be >= 0")
    _check(reg.tar >= 0, "regularizer.tar", reg.tar, "must be >= 0")
    _check(
        reg.ar == 0.0 or d.kind != "none",
        "regularizer.ar",
        reg.ar,
        "penalises the last layer's dropped output, which dropout.kind=none does not have; "
        "choose dropout=standard or variational, or leave regularizer.ar at 0",
    )
    _check(
        (reg.ar == 0.0 and reg.tar == 0.0) or not (t.compile or t.cuda_graphs),
        "regularizer.ar/tar",
        (reg.ar, reg.tar),
        "are not computed in a compiled step yet; leave trainer.compile and "
        "trainer.cuda_graphs off, or the regularizers at 0",
    )


def _check_lr_policy(lr: LrPolicyConfig) -> None:
    _choice("lr_policy.kind", lr.kind, tuple(SCHEDULES))
    _check(math.isfinite(lr.lr) and lr.lr > 0, "lr_policy.lr", lr.lr, "must be a positive number")
    _check(0 < lr.lr_decay <= 1, "lr_policy.lr_decay", lr.lr_decay, "must be in (0, 1]")
    _check(lr.max_epoch >= 0, "lr_policy.max_epoch", lr.max_epoch, "must be >= 0")
    _check(lr.plateau_factor > 1, "lr_policy.plateau_factor", lr.plateau_factor, "must be > 1")
    _check(
        lr.plateau_patience >= 0, "lr_policy.plateau_patience", lr.plateau_patience, "must be >= 0"
    )
    _check(lr.min_lr >= 0, "lr_policy.min_lr", lr.min_lr, "must be >= 0")


def _check_data(data: DataConfig) -> None:
    _check_source(data.name)
    urls = [data.url] if isinstance(data.url, str) else data.url
    _check(
        isinstance(urls, list) and bool(urls) and all(isinstance(u, str) and u for u in urls),
        "data.url",
        data.url,
        "must be a URL or a non-empty list of URLs (mirrors, tried in order)",
    )
    _check(data.tiny_vocab_size >= 4, "data.tiny_vocab_size", data.tiny_vocab_size, "must be >= 4")
    _check(
        data.tiny_train_tokens >= 100,
        "data.tiny_train_tokens",
        data.tiny_train_tokens,
        "must be >= 100",
    )
    _check(
        data.tiny_eval_tokens >= 10, "data.tiny_eval_tokens", data.tiny_eval_tokens, "must be >= 10"
    )


def _check_trainer(t: TrainerConfig) -> None:
    _check(t.max_epochs >= 1, "trainer.max_epochs", t.max_epochs, "must be >= 1")
    for name in ("batch_size", "num_steps", "eval_batch_size", "test_batch_size", "eval_num_steps"):
        value = getattr(t, name)
        _check(value >= 1, f"trainer.{name}", value, "must be a positive integer")
    _check(t.max_grad_norm > 0, "trainer.max_grad_norm", t.max_grad_norm, "must be positive")
    _choice("trainer.loss_reduction", t.loss_reduction, choices_of(TrainerConfig, "loss_reduction"))
    _check(
        not t.bptt_jitter or t.loss_reduction == "mean",
        "trainer.bptt_jitter",
        t.bptt_jitter,
        "follows AWD-LSTM, whose loss is the per-token mean (TF's sum_steps loss already grows "
        "with the window's length); set trainer.loss_reduction=mean",
    )
    _check(
        not (t.bptt_jitter and (t.compile or t.cuda_graphs)),
        "trainer.bptt_jitter",
        t.bptt_jitter,
        "gives every window its own length, which a compiled step (or its CUDA graphs) would "
        "recompile for; leave trainer.compile and trainer.cuda_graphs off with it",
    )
    _check(
        t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"),
        "trainer.device",
        t.device,
        "is not one of auto, cpu, cuda, cuda:N",
    )
    _check(t.seeds_per_job >= 1, "trainer.seeds_per_job", t.seeds_per_job, "must be >= 1")
    _check(t.threads >= 0, "trainer.threads", t.threads, "must be >= 0 (0 picks one per core)")
    for name in ("limit_train_batches", "limit_eval_batches"):
        value = getattr(t, name)
        _check(value is None or value >= 1, f"trainer.{name}", value, "must be null or >= 1")
    _check(
        t.log_every_n_batches >= 1,
        "trainer.log_every_n_batches",
        t.log_every_n_batches,
        "must be >= 1",
    )
    _choice("trainer.precision", t.precision, choices_of(TrainerConfig, "precision"))
    _check(
        t.ckpt_every_n_batches >= 0,
        "trainer.ckpt_every_n_batches",
        t.ckpt_every_n_batches,
        "must be >= 0",
    )


def _check_logger(lg: LoggerConfig) -> None:
    _choice("logger.kind", lg.kind, choices_of(LoggerConfig, "kind"))
    _check(
        lg.connect_timeout_s > 0,
        "logger.connect_timeout_s",
        lg.connect_timeout_s,
        "must be positive",
    )
    _check(
        bool(lg.experiment_name), "logger.experiment_name", lg.experiment_name, "must not be empty"
    )
    _check(
        lg.system_metrics_every_s > 0,
        "logger.system_metrics_every_s",
        lg.system_metrics_every_s,
        "must be positive",
    )
    _check(
        lg.ui_url is None or str(lg.ui_url).startswith(("http://", "https://")),
        "logger.ui_url",
        lg.ui_url,
        "must be the UI's address, http://host:port (or null)",
    )


def _check_bench(cfg: BenchConfig) -> None:
    """The timing settings, and variants that can run this model."""
    b, m = cfg.bench, cfg.model
    for name, low in (("repeats", 1), ("batches", 1), ("warmup_batches", 0), ("eval_batches", 0)):
        value = getattr(b, name)
        _check(value >= low, f"bench.{name}", value, f"must be an integer >= {low}")
    unknown = sorted(set(b.variants) - set(BENCH_VARIANTS))
    _check(
        not unknown,
        "bench.variants",
        b.variants,
        f"has unknown {unknown}; choose from {', '.join(BENCH_VARIANTS)}",
    )
    baselines = [v for v in b.variants if v != "lmexp"]
    _check(
        m.arch == "rnn" or not baselines,
        "bench.variants",
        b.variants,
        f"holds {', '.join(baselines)}: the 2017 ways of training an LSTM, not model.arch="
        f"{m.arch}; use bench.variants=[lmexp]",
    )
    if "cell_loop" not in b.variants:
        return
    _check(
        cfg.dropout.kind != "variational" and m.embedding_size in (None, m.hidden_size),
        "bench.variants",
        b.variants,
        "holds cell_loop, which steps one fused multi-layer LSTM's weights, while "
        "dropout.kind=variational (or a model.embedding_size of its own) splits them into one "
        "module per layer; leave cell_loop out for this model",
    )
    _check(
        m.cell == "lstm",
        "bench.variants",
        b.variants,
        f"holds cell_loop, TF's LSTMCell loop, not model.cell={m.cell}; leave cell_loop out "
        "for this cell",
    )


def to_typed(cfg: DictConfig) -> TrainConfig:
    """Turn Hydra's composed DictConfig into the validated dataclass tree."""
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, TrainConfig):  # composed without the schema (e.g. a bare test dict)
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg))
    return validate(obj)  # type: ignore[arg-type]


def validate_adapt(cfg: AdaptConfig) -> AdaptConfig:
    """validate's counterpart for lmexp.adapt."""
    c, d = cfg.cache, cfg.dynamic
    _check_finite(cfg)
    if not cfg.source:
        raise ConfigError(
            "Invalid config: source is not set; pass source=<MLflow run id> or "
            "source=<path of a model.pt or checkpoint>."
        )
    _choice("method", cfg.method, choices_of(AdaptConfig, "method"))
    _choice("split", cfg.split, choices_of(AdaptConfig, "split"))
    _check(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be >= 1")
    _check(
        cfg.limit_tokens is None or cfg.limit_tokens >= 2,
        "limit_tokens",
        cfg.limit_tokens,
        "must be null or >= 2",
    )
    _check(c.window >= 1, "cache.window", c.window, "must be >= 1")
    _check(0 <= c.lambd < 1, "cache.lambd", c.lambd, "must be in [0, 1); 0 turns the cache off")
    _choice("dynamic.kind", d.kind, choices_of(DynamicConfig, "kind"))
    for key in ("lr", "decay"):
        _check(getattr(d, key) >= 0, f"dynamic.{key}", getattr(d, key), "must be >= 0")
    _check(
        d.epsilon > 0,
        "dynamic.epsilon",
        d.epsilon,
        "must be > 0 (it keeps a weight whose training gradient was 0 from an infinite step)",
    )
    _check(d.segment >= 1, "dynamic.segment", d.segment, "must be >= 1")
    _check(d.stats_batch_size >= 1, "dynamic.stats_batch_size", d.stats_batch_size, "must be >= 1")
    _check(
        d.stats_segments is None or d.stats_segments >= 1,
        "dynamic.stats_segments",
        d.stats_segments,
        "must be null or >= 1",
    )
    _check(
        d.ckpt_every_n_segments >= 0,
        "dynamic.ckpt_every_n_segments",
        d.ckpt_every_n_segments,
        "must be >= 0 (0: checkpoint only on a stop signal)",
    )
    return cfg
