"""Typed config schemas and their validation.

The dataclasses here are the schema Hydra composes into: a key that is not declared here, or a
value of the wrong type, fails at start-up with the key's name. `validate` then checks ranges and
choices, so every user-caused config error is one sentence before any time is spent. The YAML
files in conf/ mirror these defaults; the recipes (model presets) override them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


class LmexpError(Exception):
    """An error the user caused and can fix; its message is one sentence saying how."""


def first_line(err: BaseException) -> str:
    """The first non-blank line of an exception's message, or its type's name: what goes into
    a one-sentence error, in place of a library's multi-line text."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


class RunStopped(Exception):
    """A run stopped on purpose before its end: by a preemption signal, a pruner, a study that
    stopped answering. Raised by the epoch loop or a callback orchestration gave it; the run
    closes its tracking run as `status` with `reason` (and `tags`), calls after_close, and lets
    it propagate to whoever launched it (the CLI exits with exit_code)."""

    status = "KILLED"
    exit_code = 1

    def __init__(self, reason: str, tags: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.reason, self.tags = reason, tags or {}

    def after_close(self) -> None:
        """What must happen once the tracking run is closed (nothing, unless overridden)."""


class Preempted(RunStopped):
    """A preemption signal stopped the run after its checkpoint: resumable. After the run is
    closed, the handler installed before lmexp's runs (submitit requeues the job there)."""

    def __init__(self, reason: str, preemption: Any) -> None:  # a runtime.Preemption
        super().__init__(reason)
        assert preemption.signum is not None
        self.preemption, self.exit_code = preemption, 128 + preemption.signum

    def after_close(self) -> None:
        self.preemption.hand_over()


class ConfigError(LmexpError):
    """A config key holds a value lmexp cannot use."""


# What each key means for "the same experiment", declared once here, on the schema; resume
# checks and the report derive their key lists from it (`keys_with_role`).
#   shape:       the weights' or batches' shapes; any checkpoint must agree on it
#   recipe:      what is computed (the default); a run continues in its folder only with the same
#   execution:   how fast or for how long it runs, not what a step computes; free on resume,
#                shown by the report when runs differ (max_epochs may be extended)
#   bookkeeping: where it reads and writes and what it prints; free, hidden by the report
SHAPE, RECIPE, EXECUTION, BOOKKEEPING = "shape", "recipe", "execution", "bookkeeping"


def _role(role: str, default: Any) -> Any:
    return field(default=default, metadata={"role": role})


@dataclass
class ModelConfig:
    name: str = _role(SHAPE, "small")
    hidden_size: int = _role(SHAPE, 200)
    num_layers: int = _role(SHAPE, 2)
    init_scale: float = _role(SHAPE, 0.1)
    tie_weights: bool = _role(SHAPE, False)
    cell: str = _role(
        SHAPE, "lstm"
    )  # lstm | gru | rnn_tanh (lmexp.models.rnn.CELLS); TF's recipes are LSTMs


@dataclass
class DropoutConfig:
    # standard: dropout on the non-recurrent connections (Zaremba et al.), fresh mask per step.
    # variational: one mask per sequence, shared across time steps (Gal & Ghahramani).
    # none: no dropout.
    kind: str = _role(SHAPE, "standard")  # variational runs one nn.LSTM per layer
    dp_keep_prob: float = 1.0
    # variational only; None means "use dp_keep_prob".
    keep_prob_embedding: float | None = None
    keep_prob_between: float | None = None
    keep_prob_output: float | None = None
    # DropConnect on the hidden-to-hidden weights (AWD-LSTM's weight drop), with either kind:
    # the probability of dropping each recurrent weight, a fresh mask per training batch.
    weight_drop: float = 0.0


@dataclass
class LrPolicyConfig:
    # zaremba: lr * lr_decay ** max(epoch + 1 - max_epoch, 0)       (TF tutorial, 0-based epoch)
    # port:    lr *= lr_decay ** max(epoch - max_epoch, 0) each epoch (2017 PyTorch port)
    # plateau: lr /= plateau_factor when valid ppl stops improving for > plateau_patience epochs
    # constant: lr
    kind: str = "zaremba"
    lr: float = 1.0
    lr_decay: float = 0.5
    max_epoch: int = 4
    plateau_factor: float = 4.0
    plateau_patience: int = 0
    min_lr: float = 0.0


@dataclass
class OptimizerConfig:
    # fused_sgd: lmexp's clip + plain SGD in one pass (TF's and the 2017 port's update)
    # sgd | asgd | adam | adamw: torch.optim's own, after clip_grad_norm_ (lmexp.optim.optimizers.OPTIMIZERS)
    # The learning rate is lr_policy.lr (the policy sets it each epoch); the clip norm is
    # trainer.max_grad_norm. Each key below is read only by the optimizers named beside it.
    kind: str = "fused_sgd"
    weight_decay: float = 0.0  # sgd, asgd, adam: L2 penalty added to the gradient; adamw: decoupled
    momentum: float = 0.0  # sgd
    t0: float = 0.0  # asgd: the step averaging starts at (AWD-LSTM: 0, from the switch on)
    lambd: float = 0.0  # asgd: lr decay term (AWD-LSTM: 0, a constant lr)
    beta1: float = 0.9  # adam, adamw
    beta2: float = 0.999  # adam, adamw
    eps: float = 1e-8  # adam, adamw


@dataclass
class DataConfig:
    name: str = _role(SHAPE, "ptb")  # ptb | text | tiny (lmexp.data.SOURCES)
    # ptb: the folder holding ptb.{train,valid,test}.txt; None: download into cache_dir, verify.
    # text: the folder holding a train, a valid and a test file (required).
    root: str | None = _role(BOOKKEEPING, None)
    cache_dir: str = _role(BOOKKEEPING, "~/.cache/lmexp")
    url: str = _role(BOOKKEEPING, "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz")
    verify_md5: bool = _role(BOOKKEEPING, True)
    # The tiny corpus: a seeded Markov chain, generated in code (no files, no network).
    tiny_vocab_size: int = 50
    tiny_train_tokens: int = 20000
    tiny_eval_tokens: int = 2000
    tiny_seed: int = 1234


@dataclass
class TrainerConfig:
    max_epochs: int = _role(EXECUTION, 13)
    batch_size: int = _role(SHAPE, 20)
    num_steps: int = _role(SHAPE, 20)
    max_grad_norm: float = 5.0
    # sum_steps: loss summed over time steps, averaged over the batch (TF; lr 1.0, clip 5).
    # mean: per-token mean cross-entropy (the 2017 port and pytorch/examples; lr 20, clip 0.25).
    loss_reduction: str = "sum_steps"
    eval_batch_size: int = 20
    test_batch_size: int = 1
    eval_num_steps: int = 35
    device: str = _role(EXECUTION, "auto")  # auto | cpu | cuda | cuda:N
    seed: int = 0
    # Each job (an Optuna trial, say) trains this many seeds, seed .. seed+k-1, each a run of its
    # own, and returns the mean of their best validation perplexities.
    seeds_per_job: int = 1
    threads: int = _role(EXECUTION, 0)  # CPU threads for torch; 0 = one per physical core
    limit_train_batches: int | None = None
    limit_eval_batches: int | None = None
    log_every_n_batches: int = _role(BOOKKEEPING, 50)
    progress: bool = _role(BOOKKEEPING, True)
    precision: str = _role(EXECUTION, "fp32")  # fp32 | bf16 | fp16
    compile: bool = _role(EXECUTION, False)
    # capture the step in CUDA graphs (torch.compile "reduce-overhead")
    cuda_graphs: bool = _role(EXECUTION, False)
    ckpt_every_n_batches: int = _role(BOOKKEEPING, 0)  # 0: checkpoint at epoch ends only
    # continue from <run dir>/checkpoints/last.pt when it exists
    resume: bool = _role(BOOKKEEPING, True)
    # a checkpoint to resume from instead, or an exported model.pt to start from
    ckpt_path: str | None = _role(BOOKKEEPING, None)


@dataclass
class LoggerConfig:
    kind: str = _role(BOOKKEEPING, "mlflow")  # mlflow | none
    # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the folder the command ran from.
    tracking_uri: str | None = _role(BOOKKEEPING, None)
    # Used (with a warning) when tracking_uri cannot be reached; None: fail at start-up.
    fallback_uri: str | None = _role(BOOKKEEPING, None)
    experiment_name: str = _role(BOOKKEEPING, "lmexp")
    run_name: str | None = _role(BOOKKEEPING, None)
    log_model: bool = _role(BOOKKEEPING, True)
    connect_timeout_s: float = _role(BOOKKEEPING, 5.0)
    # MLflow system metrics (CPU, memory; GPU with nvidia-ml-py): null = on for PTB runs (which
    # take minutes or more) and off for the tiny corpus; sampled every system_metrics_every_s.
    system_metrics: bool | None = _role(BOOKKEEPING, None)
    system_metrics_every_s: float = _role(BOOKKEEPING, 10.0)
    # Where the MLflow UI is, for the links lmexp prints; None: the tracking server itself, or
    # for a database store `mlflow ui`'s own address, http://127.0.0.1:5000.
    ui_url: str | None = _role(BOOKKEEPING, None)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    lr_policy: LrPolicyConfig = field(default_factory=LrPolicyConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class BenchSettings:
    variants: list[str] = field(default_factory=lambda: ["lmexp", "stock", "port", "cell_loop"])
    repeats: int = 3
    warmup_batches: int = 3
    batches: int = 20
    eval_batches: int = 20
    output: str | None = None
    log_mlflow: bool = False


@dataclass
class BenchConfig(TrainConfig):
    bench: BenchSettings = field(default_factory=BenchSettings)


def schema_roles(schema: type = TrainConfig, prefix: str = "") -> dict[str, str]:
    """Every dotted key of `schema` with its role (field metadata; RECIPE when unset)."""
    roles = {}
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not MISSING else None
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            roles.update(schema_roles(type(default), f"{prefix}{f.name}."))
        else:
            roles[f"{prefix}{f.name}"] = f.metadata.get("role", RECIPE)
    return roles


def keys_with_role(role: str, schema: type = TrainConfig) -> set[str]:
    """The dotted keys of `schema` whose role is `role`."""
    return {key for key, r in schema_roles(schema).items() if r == role}


def check_override_keys(overrides: list[str], schema: type, groups: set[str]) -> None:
    """Refuse a command-line key the schema does not have, with the nearest ones it does
    (Hydra's own error names the key but not what was meant: trainer.max_epoch -> max_epochs)."""
    import difflib

    keys = set(schema_roles(schema))
    known = keys | groups | {k.rsplit(".", 1)[0] for k in keys}
    for override in overrides:
        # `+key=` and `++key=` add a key: the schema has no room for one it does not declare,
        # so an added key would be accepted and ignored (+trainer.max_epoch=5 trained 1 epoch).
        key = override.split("=", 1)[0].lstrip("~+")
        if "=" not in override or key.startswith(("hydra.", "hydra/")) or key in known:
            continue
        if override.startswith("-"):
            continue
        close = difflib.get_close_matches(key, sorted(keys | groups), n=3, cutoff=0.75)
        hint = (
            f"; did you mean {' or '.join(close)}?"
            if close
            else ("; see the configuration reference in the README for the keys.")
        )
        raise ConfigError(f"Unknown config key {key!r}{hint}")


def conf_dir() -> Path:
    """The conf/ folder: inside the installed package, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise LmexpError(f"lmexp's conf/ folder was not found beside {here}; reinstall lmexp.")


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"Invalid config: {key}={value!r} {rule}.")


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
    from lmexp.models.rnn import CELLS

    _choice("model.cell", cell, tuple(CELLS))


def _check_source(name: str) -> None:
    from lmexp.data import SOURCES

    _choice("data.name", name, tuple(SOURCES))


def _check_optimizer(o: OptimizerConfig) -> None:
    """A known optimizer, and no optimizer.* key set that the chosen one would ignore."""
    from lmexp.optim.optimizers import OPTIMIZERS

    _choice("optimizer.kind", o.kind, tuple(OPTIMIZERS))
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


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check ranges and choices; raise ConfigError naming the first bad key and how to fix it."""
    m, d, lr, data, t, lg = cfg.model, cfg.dropout, cfg.lr_policy, cfg.data, cfg.trainer, cfg.logger
    _check(m.hidden_size >= 1, "model.hidden_size", m.hidden_size, "must be a positive integer")
    _check(m.num_layers >= 1, "model.num_layers", m.num_layers, "must be a positive integer")
    _check(m.init_scale > 0, "model.init_scale", m.init_scale, "must be positive")
    _check_cell(m.cell)
    _choice("dropout.kind", d.kind, ("standard", "variational", "none"))
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
    _choice("lr_policy.kind", lr.kind, ("zaremba", "port", "plateau", "constant"))
    _check(math.isfinite(lr.lr) and lr.lr > 0, "lr_policy.lr", lr.lr, "must be a positive number")
    _check(0 < lr.lr_decay <= 1, "lr_policy.lr_decay", lr.lr_decay, "must be in (0, 1]")
    _check(lr.max_epoch >= 0, "lr_policy.max_epoch", lr.max_epoch, "must be >= 0")
    _check(lr.plateau_factor > 1, "lr_policy.plateau_factor", lr.plateau_factor, "must be > 1")
    _check(
        lr.plateau_patience >= 0, "lr_policy.plateau_patience", lr.plateau_patience, "must be >= 0"
    )
    _check(lr.min_lr >= 0, "lr_policy.min_lr", lr.min_lr, "must be >= 0")
    _check_optimizer(cfg.optimizer)
    _check_source(data.name)
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
    _check(t.max_epochs >= 1, "trainer.max_epochs", t.max_epochs, "must be >= 1")
    for name in ("batch_size", "num_steps", "eval_batch_size", "test_batch_size", "eval_num_steps"):
        value = getattr(t, name)
        _check(value >= 1, f"trainer.{name}", value, "must be a positive integer")
    _check(t.max_grad_norm > 0, "trainer.max_grad_norm", t.max_grad_norm, "must be positive")
    _choice("trainer.loss_reduction", t.loss_reduction, ("sum_steps", "mean"))
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
    _choice("trainer.precision", t.precision, ("fp32", "bf16", "fp16"))
    _check(
        t.ckpt_every_n_batches >= 0,
        "trainer.ckpt_every_n_batches",
        t.ckpt_every_n_batches,
        "must be >= 0",
    )
    _choice("logger.kind", lg.kind, ("mlflow", "none"))
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
    return cfg


def to_typed(cfg: DictConfig) -> TrainConfig:
    """Turn Hydra's composed DictConfig into the validated dataclass tree."""
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, TrainConfig):  # composed without the schema (e.g. a bare test dict)
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg))
    return validate(obj)  # type: ignore[arg-type]


def flatten(container: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'hidden_size': 200}} -> {'model.hidden_size': 200}."""
    flat: dict[str, Any] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
