"""Typed config schemas: what each key is, means and defaults to, and the errors lmexp raises.

The dataclasses here are the schema Hydra composes into: a key that is not declared here, or a
value of the wrong type, fails at start-up with the key's name. `lmexp.validation.validate` then
checks ranges and choices, so every user-caused config error is one sentence before any time is
spent. This module imports nothing from lmexp (an import-linter contract), so that corpora,
models and optimizers can import their schema without an import circle. The YAML
files in conf/ mirror these defaults; the recipes (model presets) override them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any


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
ROLES = (SHAPE, RECIPE, EXECUTION, BOOKKEEPING)


def _key(default: Any, help: str, allowed: str = "", role: str = RECIPE) -> Any:
    """A schema key: its default, what it means (`help`, one or two sentences), the values
    `validate` accepts (`allowed`, for the reference; empty: any value of its type) and its role.
    docs/reference/configuration.md is generated from these (scripts/config_reference.py)."""
    return _field(default, {"role": role, "help": help, "allowed": allowed})


def _one_of(default: str, help: str, choices: tuple[str, ...], role: str = RECIPE) -> Any:
    """A key with a fixed set of values, stated here once: validation reads them (`choices_of`)
    and the reference shows them. Choices that come from a registry (model.arch, model.cell,
    data.name, optimizer.kind, lr_policy.kind) are the registry's; a test keeps `allowed` equal."""
    return _field(
        default, {"role": role, "help": help, "allowed": " | ".join(choices), "choices": choices}
    )


def _field(default: Any, metadata: dict[str, Any]) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def choices_of(schema: type, name: str) -> tuple[str, ...]:
    """The values a `_one_of` key of `schema` accepts."""
    return next(f for f in dataclasses.fields(schema) if f.name == name).metadata["choices"]


_KEEP = "(0, 1]; 1.0 keeps every unit"


@dataclass
class ModelConfig:
    name: str = _key("small", "The preset's name, as the report and run names show it.", "", SHAPE)
    arch: str = _key(
        "rnn",
        "The architecture (lmexp.models.MODELS): rnn, the recurrent network of TF's recipes and "
        "AWD-LSTM, its cell chosen by model.cell; transformer, a causal Transformer.",
        "rnn | transformer",
        SHAPE,
    )
    hidden_size: int = _key(
        200,
        "Units per recurrent layer, also the embedding size; a Transformer's width.",
        ">= 1; transformer: divisible by num_heads",
        SHAPE,
    )
    num_layers: int = _key(2, "Stacked recurrent layers or Transformer blocks.", ">= 1", SHAPE)
    embedding_size: int | None = _key(
        None,
        "Units of the embedding; null: hidden_size. Where it differs (AWD-LSTM: 400 against "
        "1150), the first layer takes it and, with tie_weights, the last layer gives it.",
        "null or >= 1; other than hidden_size needs dropout.kind=variational",
        SHAPE,
    )
    init_scale: float = _key(
        0.1,
        "Weights start uniform in [-init_scale, init_scale] (TF's recipes); transformer: the "
        "embedding and softmax only, the blocks as torch initialises them.",
        "> 0",
        SHAPE,
    )
    tie_weights: bool = _key(
        False, "Share the embedding matrix with the softmax (Press & Wolf; Inan et al.).", "", SHAPE
    )
    cell: str = _key(
        "lstm",
        "rnn: the recurrent cell (lmexp.models.rnn.CELLS); TF's recipes are LSTMs.",
        "lstm | gru | rnn_tanh",
        SHAPE,
    )
    num_heads: int = _key(
        2,
        "transformer: attention heads per block (pytorch/examples: 2, which divides every "
        "size preset).",
        ">= 1",
        SHAPE,
    )
    ffn_size: int | None = _key(
        None,
        "transformer: units of each block's feed-forward layer; null: 4 * hidden_size.",
        "null or >= 1",
        SHAPE,
    )
    context: int = _key(
        64,
        "transformer: how many earlier tokens each window also attends to (its state, carried "
        "like an LSTM's across windows); 0 scores each window alone, as pytorch/examples does.",
        ">= 0",
    )


@dataclass
class DropoutConfig:
    kind: str = _one_of(
        "standard",
        "standard: a fresh mask per step on the non-recurrent connections (Zaremba et al.); "
        "variational: one mask per sequence, shared across steps (Gal & Ghahramani), one "
        "nn.LSTM per layer; none: no dropout.",
        ("standard", "variational", "none"),
        SHAPE,
    )
    dp_keep_prob: float = _key(
        1.0,
        "Probability of keeping a unit, after the embedding, between layers and before "
        "the softmax (TF's keep_prob; dropout = 1 - dp_keep_prob).",
        _KEEP,
    )
    keep_prob_embedding: float | None = _key(
        None,
        "variational only: keep probability on the embedding output; null: dp_keep_prob.",
        f"null or {_KEEP}",
    )
    keep_prob_between: float | None = _key(
        None,
        "variational only: keep probability between layers; null: dp_keep_prob.",
        f"null or {_KEEP}",
    )
    keep_prob_output: float | None = _key(
        None,
        "variational only: keep probability on the last layer's output; null: dp_keep_prob.",
        f"null or {_KEEP}",
    )
    weight_drop: float = _key(
        0.0,
        "DropConnect on the hidden-to-hidden weights (AWD-LSTM's weight drop): the "
        "probability of dropping each recurrent weight, a fresh mask per training batch.",
        "[0, 1); needs kind standard or variational",
    )
    embedding: float = _key(
        0.0,
        "Embedding dropout (AWD-LSTM's dropoute): the probability of dropping each word's whole "
        "embedding row for a training batch, the kept rows scaled by 1/(1 - p), so every use of "
        "a dropped word in the batch sees zeros.",
        "[0, 1); needs kind standard or variational",
    )


@dataclass
class LrPolicyConfig:
    kind: str = _key(
        "zaremba",
        "zaremba: lr * lr_decay ** max(epoch + 1 - max_epoch, 0), 0-based epoch (TF); port: "
        "lr *= lr_decay ** max(epoch - max_epoch, 0) each epoch (the 2017 port); plateau: "
        "lr /= plateau_factor when validation stops improving; constant: lr.",
        "zaremba | port | plateau | constant",
    )
    lr: float = _key(1.0, "The starting learning rate (every optimizer's lr).", "> 0, finite")
    lr_decay: float = _key(0.5, "zaremba, port: the decay factor per epoch.", "(0, 1]")
    max_epoch: int = _key(4, "zaremba, port: epochs at the starting lr before decay.", ">= 0")
    plateau_factor: float = _key(
        4.0, "plateau: the lr is divided by this when validation stops improving.", "> 1"
    )
    plateau_patience: int = _key(
        0, "plateau: epochs without improvement tolerated before dividing.", ">= 0"
    )
    min_lr: float = _key(0.0, "plateau: the lr never goes below this.", ">= 0")


@dataclass
class OptimizerConfig:
    kind: str = _key(
        "fused_sgd",
        "fused_sgd: lmexp's clip + plain SGD in one pass (TF's and the 2017 port's update); the "
        "others are torch.optim's own after clip_grad_norm_ (lmexp.optim.optimizers.OPTIMIZERS). "
        "The lr is lr_policy.lr, the clip norm trainer.max_grad_norm.",
        "fused_sgd | sgd | asgd | nt_asgd | adam | adamw",
    )
    weight_decay: float = _key(
        0.0,
        "sgd, asgd, nt_asgd, adam: L2 penalty added to the gradient; adamw: decoupled decay.",
        ">= 0; only the optimizers named",
    )
    momentum: float = _key(0.0, "sgd: momentum.", ">= 0; sgd only")
    t0: float = _key(
        0.0,
        "asgd: the step averaging starts at (AWD-LSTM: 0, from the switch on).",
        ">= 0; asgd only",
    )
    lambd: float = _key(0.0, "asgd: lr decay term (AWD-LSTM: 0, a constant lr).", ">= 0; asgd only")
    nonmono: int = _key(
        5,
        "nt_asgd: switch to averaging when validation is worse than the best of the checks "
        "made more than nonmono checks before (AWD-LSTM: 5).",
        ">= 1; nt_asgd only",
    )
    beta1: float = _key(0.9, "adam, adamw: first-moment decay.", "[0, 1); adam, adamw only")
    beta2: float = _key(0.999, "adam, adamw: second-moment decay.", "[0, 1); adam, adamw only")
    eps: float = _key(1e-8, "adam, adamw: denominator term.", ">= 0; adam, adamw only")


@dataclass
class DataConfig:
    name: str = _key(
        "ptb",
        "The corpus (lmexp.data.SOURCES): ptb, WikiText-2, any folder of plain text, or a "
        "seeded Markov chain generated in code for tests.",
        "ptb | text | tiny | wikitext2",
        SHAPE,
    )
    root: str | None = _key(
        None,
        "ptb: the folder holding ptb.{train,valid,test}.txt; wikitext2: the folder holding "
        "wiki.{train,valid,test}.tokens, or wikitext-2-v1.zip; null: download into cache_dir and "
        "verify. text: the folder holding a train, a valid and a test file (required).",
        "null, a folder or (wikitext2) a zip",
        BOOKKEEPING,
    )
    cache_dir: str = _key(
        "~/.cache/lmexp", "Where a downloaded corpus is kept.", "a folder", BOOKKEEPING
    )
    url: Any = _key(
        "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",
        "ptb, wikitext2: the archive downloaded when root is null; a list is mirrors tried in "
        "order (data=wikitext2 lists two).",
        "a URL or a list of URLs",
        BOOKKEEPING,
    )
    verify_md5: bool = _key(
        True,
        "ptb, wikitext2: check each file against its published checksum (PTB's MD5, "
        "WikiText-2's SHA-1).",
        "",
        BOOKKEEPING,
    )
    tiny_vocab_size: int = _key(50, "tiny: words in the vocabulary.", ">= 4")
    tiny_train_tokens: int = _key(20000, "tiny: tokens in the train split.", ">= 100")
    tiny_eval_tokens: int = _key(2000, "tiny: tokens in the valid and test splits.", ">= 10")
    tiny_seed: int = _key(1234, "tiny: the seed the corpus is generated from.")


@dataclass
class TrainerConfig:
    max_epochs: int = _key(
        13, "Epochs to train; may be raised when a run resumes.", ">= 1", EXECUTION
    )
    batch_size: int = _key(20, "Sequences per training batch.", ">= 1", SHAPE)
    num_steps: int = _key(20, "Unrolled steps (BPTT length) per training batch.", ">= 1", SHAPE)
    max_grad_norm: float = _key(5.0, "Gradients are clipped to this global norm.", "> 0")
    loss_reduction: str = _one_of(
        "sum_steps",
        "sum_steps: loss summed over steps and averaged over the batch (TF; lr 1.0, clip 5); "
        "mean: per-token mean (the 2017 port and pytorch/examples; lr 20, clip 0.25).",
        ("sum_steps", "mean"),
    )
    bptt_jitter: bool = _key(
        False,
        "AWD-LSTM's random BPTT lengths: each training window's length drawn around num_steps "
        "(N(num_steps, 5) with probability 0.95, else N(num_steps / 2, 5); at least 5) and its "
        "lr scaled by length / num_steps; the same lengths for the same seed and epoch.",
        "needs loss_reduction=mean",
    )
    eval_batch_size: int = _key(20, "Sequences per validation batch.", ">= 1")
    test_batch_size: int = _key(1, "Sequences per test batch (TF: 1).", ">= 1")
    eval_num_steps: int = _key(35, "Unrolled steps per validation and test batch.", ">= 1")
    device: str = _key(
        "auto",
        "auto: the GPU when there is one, else the CPU.",
        "auto | cpu | cuda | cuda:N",
        EXECUTION,
    )
    seed: int = _key(0, "Seeds the weights, the dropout masks and the data order.")
    seeds_per_job: int = _key(
        1,
        "Each job (an Optuna trial, say) trains seeds seed .. seed+k-1, each a run of its own, "
        "and returns the mean of their best validation perplexities.",
        ">= 1",
    )
    threads: int = _key(
        0,
        "CPU threads for torch; 0: one per physical core (a sweep divides them).",
        ">= 0",
        EXECUTION,
    )
    limit_train_batches: int | None = _key(
        None, "Train on only the first N batches of each epoch (for smoke tests).", "null or >= 1"
    )
    limit_eval_batches: int | None = _key(
        None, "Evaluate on only the first N batches (for smoke tests).", "null or >= 1"
    )
    log_every_n_batches: int = _key(
        50, "Progress lines and step metrics every N batches.", ">= 1", BOOKKEEPING
    )
    progress: bool = _key(True, "Print progress lines.", "", BOOKKEEPING)
    precision: str = _one_of(
        "fp32",
        "Autocast precision of the step: bf16 on AVX-512 BF16 CPUs and recent GPUs; fp16 on GPU.",
        ("fp32", "bf16", "fp16"),
        EXECUTION,
    )
    compile: bool = _key(False, "torch.compile the step.", "", EXECUTION)
    cuda_graphs: bool = _key(
        False,
        "Capture the step in CUDA graphs (torch.compile reduce-overhead); GPU only.",
        "",
        EXECUTION,
    )
    ckpt_every_n_batches: int = _key(
        0,
        "Also checkpoint every N batches inside an epoch; 0: at epoch ends only.",
        ">= 0",
        BOOKKEEPING,
    )
    resume: bool = _key(
        True, "Continue from <run dir>/checkpoints/last.pt when it exists.", "", BOOKKEEPING
    )
    ckpt_path: str | None = _key(
        None,
        "A checkpoint to resume from instead, or an exported model.pt to start from.",
        "null or a file",
        BOOKKEEPING,
    )


@dataclass
class LoggerConfig:
    kind: str = _one_of(
        "mlflow", "Track runs in MLflow, or not at all.", ("mlflow", "none"), BOOKKEEPING
    )
    tracking_uri: str | None = _key(
        None,
        "The MLflow store or server; null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in "
        "the folder the command ran from.",
        "null, a database URI or http(s)://",
        BOOKKEEPING,
    )
    fallback_uri: str | None = _key(
        None,
        "Used, with a warning, when tracking_uri cannot be reached; null: fail at start-up.",
        "null or a URI",
        BOOKKEEPING,
    )
    experiment_name: str = _key("lmexp", "The MLflow experiment.", "not empty", BOOKKEEPING)
    run_name: str | None = _key(
        None, "The run's name; null: one made from the recipe and what differs.", "", BOOKKEEPING
    )
    log_model: bool = _key(True, "Log the best weights as an MLflow pyfunc model.", "", BOOKKEEPING)
    connect_timeout_s: float = _key(
        5.0, "How long to wait for a tracking server at start-up.", "> 0", BOOKKEEPING
    )
    system_metrics: bool | None = _key(
        None,
        "MLflow system metrics (CPU, memory; GPU with nvidia-ml-py); null: on for PTB runs, "
        "off for the tiny corpus.",
        "",
        BOOKKEEPING,
    )
    system_metrics_every_s: float = _key(
        10.0, "Seconds between system-metric samples.", "> 0", BOOKKEEPING
    )
    ui_url: str | None = _key(
        None,
        "Where the MLflow UI is, for the links lmexp prints; null: the tracking server itself, "
        "or for a database store `mlflow ui`'s own address, http://127.0.0.1:5000.",
        "null or http(s)://host:port",
        BOOKKEEPING,
    )


@dataclass
class RegularizerConfig:
    ar: float = _key(
        0.0,
        "Activation regularisation (AWD-LSTM's alpha): ar * mean(o^2) over the last layer's "
        "dropped output o, added to the per-token mean loss of each training batch.",
        ">= 0; needs kind standard or variational dropout",
    )
    tar: float = _key(
        0.0,
        "Temporal activation regularisation (AWD-LSTM's beta): tar * mean((h_t - h_{t-1})^2) "
        "over the last layer's undropped output h, added likewise.",
        ">= 0",
    )


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    lr_policy: LrPolicyConfig = field(default_factory=LrPolicyConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


# lmexp's step, on any model.arch, and the 2017 ways of training the LSTM (lmexp.bench); a
# baseline's "_alloc" twin runs the same loop with lmexp's allocator setting.
BENCH_VARIANTS = ("lmexp", "stock", "port", "cell_loop", "stock_alloc", "port_alloc")


@dataclass
class BenchSettings:
    variants: list[str] = _key(
        list(BENCH_VARIANTS),
        "What to time, each in a process of its own: lmexp's step; stock, the same model with "
        "only public torch APIs; port, the 2017 port's loop; cell_loop, that loop over "
        "nn.LSTMCell per layer and step (TF RNNCell style); stock_alloc and port_alloc, stock "
        "and port with lmexp's allocator setting (glibc malloc keeps freed memory, as "
        "lmexp.train sets it on a CPU), which separates what lmexp's step buys from what the "
        "setting buys. All but lmexp train an LSTM.",
        " | ".join(BENCH_VARIANTS),
        EXECUTION,
    )
    repeats: int = _key(3, "Timed repeats per variant; the record keeps each.", ">= 1", EXECUTION)
    warmup_batches: int = _key(3, "Untimed batches before each repeat.", ">= 0", EXECUTION)
    batches: int = _key(20, "Timed training batches per repeat.", ">= 1", EXECUTION)
    eval_batches: int = _key(20, "Timed evaluation batches per repeat.", ">= 0", EXECUTION)
    output: str | None = _key(
        None, "Write the record (JSON) here; null: print only.", "null or a file", BOOKKEEPING
    )
    log_mlflow: bool = _key(False, "Also log the record as an MLflow run.", "", BOOKKEEPING)


@dataclass
class BenchConfig(TrainConfig):
    bench: BenchSettings = field(default_factory=BenchSettings)


@dataclass
class CacheConfig:
    window: int = _key(500, "Positions the cache keeps (pointer.py's --window).", ">= 1")
    theta: float = _key(
        1.0, "Sharpness of the cache's attention, softmax(theta * h_t . h_i).", "finite"
    )
    lambd: float = _key(
        0.1, "Weight of the cache's distribution in the mix (pointer.py's --lambdasm).", "[0, 1)"
    )


@dataclass
class DynamicConfig:
    kind: str = _one_of(
        "rms",
        "rms: dynamiceval.py's update, scaled by training gradient statistics; sgd: plain steps.",
        ("rms", "sgd"),
    )
    lr: float = _key(5e-5, "Step size eta (dynamiceval.py's --lr).", ">= 0")
    decay: float = _key(
        0.002, "Pull lambda back to the trained weights (dynamiceval.py's --lamb).", ">= 0"
    )
    epsilon: float = _key(2e-5, "Added to MS before dividing (rms; --epsilon).", "> 0")
    segment: int = _key(5, "Tokens scored before each update (--bptt).", ">= 1")
    stats_batch_size: int = _key(
        100, "Batch size over the training split for the gradient statistics (rms).", ">= 1"
    )
    stats_segments: int | None = _key(
        None,
        "Segments of the training split the statistics read; null: all of it.",
        "null or >= 1",
    )
    ckpt_every_n_segments: int = _key(
        1000,
        "Checkpoint the evaluation (dynamic.pt in the run folder) every N segments and on a "
        "stop signal; rerun the command in that folder to go on. 0: only on a signal.",
        ">= 0",
    )


@dataclass
class AdaptConfig:
    """`python -m lmexp.adapt`: a trained model scored with the cache or dynamic evaluation."""

    source: str | None = _key(None, "MLflow run id, model.pt or checkpoint.", "required")
    method: str = _one_of(
        "cache", "How the model adapts to the text it scores.", ("cache", "dynamic")
    )
    split: str = _one_of("test", "Split scored; search settings on valid.", ("valid", "test"))
    batch_size: int = _key(1, "Streams scored side by side (1, as the papers).", ">= 1")
    limit_tokens: int | None = _key(
        None,
        "Score only the split's first N tokens (not logged to the run); null: all.",
        "null or >= 2",
    )
    data_root: str | None = _key(None, "The corpus folder, if not where the model was trained.")
    tracking_uri: str | None = _key(None, "Store holding the run (default: as lmexp.train).")
    device: str = _key("cpu", "cpu, cuda or cuda:N.")
    log_to_run: bool = _key(True, "Log the score to the run the source names.")
    cache: CacheConfig = field(default_factory=CacheConfig)
    dynamic: DynamicConfig = field(default_factory=DynamicConfig)


def schema_fields(schema: type = TrainConfig, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every dotted key of `schema` with its dataclass field (type, default, metadata)."""
    fields = {}
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not MISSING else None
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            fields.update(schema_fields(type(default), f"{prefix}{f.name}."))
        else:
            fields[f"{prefix}{f.name}"] = f
    return fields


def schema_roles(schema: type = TrainConfig) -> dict[str, str]:
    """Every dotted key of `schema` with its role (field metadata; RECIPE when unset)."""
    return {key: f.metadata.get("role", RECIPE) for key, f in schema_fields(schema).items()}


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
