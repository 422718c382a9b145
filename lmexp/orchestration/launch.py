"""The Hydra side of the entry points: logging, a first check of the output folder, the config
store and resolvers, then `hydra.main`. Only entry points import this module."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmexp.config import LmexpError
from lmexp.files import check_writable, lock_folder

log = logging.getLogger("lmexp.launch")


def claim_output_dirs(argv: list[str], launch_dir: Path) -> None:
    """Check, and lock for this process, the run or sweep folder named on the command line,
    before Hydra writes its .hydra/ and log there; fail in one sentence when it is not writable
    or another live run or sweep holds it. Without one, check the launch folder (where outputs/
    and multirun/ go by default; unique_dir keeps those apart)."""
    targets = [
        tuple(a.split("=", 1)) for a in argv if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))
    ]
    try:
        for key, target in targets or [("", ".")]:
            path = Path(target.split("$", 1)[0] or ".")
            path = path if path.is_absolute() else launch_dir / path
            check_writable(path)  # creates what Hydra would create next anyway
            if key and "$" not in target:
                lock_folder(path, "sweep" if key == "hydra.sweep.dir" else "run")
    except LmexpError as err:
        log.error("%s", err)
        sys.exit(2)


# What a command line asks for that only an optional extra installs: (override prefix, module
# that must import, what it is).
EXTRAS = (
    ("hparams_search=", "optuna", "The Optuna search"),
    ("hydra/sweeper=lmexp_optuna", "optuna", "The Optuna search"),
    ("hydra/launcher=joblib", "hydra_plugins.hydra_joblib_launcher", "The joblib launcher"),
    ("hydra/launcher=submitit", "hydra_plugins.hydra_submitit_launcher", "The SLURM launcher"),
)


def check_extras(argv: list[str]) -> None:
    """A search or launcher whose package is missing, in one sentence naming the extra, before
    Hydra composes anything (else: a ModuleNotFoundError traceback, or Hydra's 'Could not find
    hydra/launcher/joblib')."""
    import importlib

    for prefix, module, what in EXTRAS:
        if not any(a.lstrip("+~").startswith(prefix) for a in argv):
            continue
        try:
            importlib.import_module(module)
        except ImportError:
            raise LmexpError(
                f"{what} needs lmexp's sweep extra ({module.split('.')[-1]} is not installed); "
                "pip install 'lmexp[sweep]'."
            ) from None


def check_group_choices(argv: list[str], conf: Path) -> None:
    """A base config chosen as if it were a recipe (experiment=_pytorch_base: what the PyTorch
    recipes share, `_`-named, not a recipe by itself) in one sentence naming the recipes."""
    import re

    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if not (conf / key).is_dir() or key.startswith("hydra"):
            continue
        recipes = sorted(f.stem for f in (conf / key).glob("*.yaml") if f.stem[0] != "_")
        for choice in re.split(r"[,()\s]+", value):  # a sweep's a,b and choice(a,b) too
            if choice.startswith("_") and (conf / key / f"{choice}.yaml").is_file():
                raise LmexpError(
                    f"{key}={choice} is a base the {key} configs build on, not one to choose; "
                    f"choose one of {key}={', '.join(recipes)}."
                )
        if re.fullmatch(r"[\w.-]+(,[\w.-]+)*", value):  # plain choices, not a sweep function
            for choice in value.split(","):
                if choice != "null" and not (conf / key / f"{choice}.yaml").is_file():
                    raise LmexpError(
                        f"{key}={choice} is not one of {key}={', '.join(recipes)}; "
                        f"python -m lmexp.train --help lists each group's choices."
                    )


def check_value_types(argv: list[str], schema: type) -> None:
    """A value of the wrong type for its key (regularizer.tar=abc, optimizer.nonmono=1.5) in one
    sentence naming the key and the type it takes, as any other bad value is; Hydra's own error
    for it is five lines. Checked as Hydra would merge it, each value of a sweep's list too."""

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith(("-", "hydra", "~")) or "=" not in arg:
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except Exception:  # noqa: BLE001 - Hydra's own message says what it cannot parse
            continue
        key = override.key_or_group
        annotation = _annotation(schema, key)
        if annotation is None:  # a config group, or a key the key check already named
            continue
        value = override.value()
        values = value.list if isinstance(value, ChoiceSweep) else [value]
        if override.is_sweep_override() and not isinstance(value, ChoiceSweep):
            continue  # range(), interval(): their own grammar checks the numbers
        for one in values:
            try:
                OmegaConf.update(OmegaConf.structured(schema), key, one, merge=True)
            except OmegaConfBaseException:
                raise LmexpError(
                    f"Invalid config: {key}={one!r} is not {_type_words(annotation)}; see "
                    "docs/reference/configuration.md for its allowed values."
                ) from None


def _annotation(schema: type, key: str) -> Any:
    """The type a dotted key has in the schema's dataclasses; None where it is not a leaf."""
    import dataclasses
    import typing

    cls: Any = schema
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        cls = hints[part]
    return None if dataclasses.is_dataclass(cls) else cls


def _type_words(annotation: Any) -> str:
    import typing

    kinds = set(typing.get_args(annotation)) or {annotation}
    for kind, words in ((bool, "true or false"), (int, "an integer"), (float, "a number")):
        if kind in kinds:
            return words
    return f"a value of type {getattr(annotation, '__name__', annotation)}"


def check_sweeper_settings(argv: list[str]) -> None:
    """A misspelt pruner or sampler setting (hydra.sweeper.pruner.n_warmup_step=2) in one
    sentence with the nearest settings Optuna's pruners (samplers) take, instead of Hydra's
    six-line 'not in struct'. A setting of some other pruner passes on to be checked there."""
    import difflib
    import inspect

    for arg in argv:
        key = arg.split("=", 1)[0]
        parts = key.split(".")
        if arg.startswith(("+", "~")) or len(parts) != 4 or parts[:2] != ["hydra", "sweeper"]:
            continue
        what, setting = parts[2], parts[3]
        if what not in ("pruner", "sampler") or setting == "name":
            continue
        try:
            import optuna

            from lmexp.orchestration.search import PRUNERS, SAMPLERS
        except ImportError:
            return  # check_extras says what is missing
        module, names = (
            (optuna.pruners, PRUNERS.values())
            if what == "pruner"
            else (optuna.samplers, SAMPLERS.values())
        )
        known = {p for n in names for p in inspect.signature(getattr(module, n)).parameters}
        if setting in known:
            continue
        close = difflib.get_close_matches(setting, sorted(known), n=3, cutoff=0.7)
        hint = (
            f"did you mean {' or '.join(close)}?"
            if close
            else f"they are {', '.join(sorted(known))}."
        )
        raise LmexpError(
            f"hydra.sweeper.{what}.{setting} is a setting none of lmexp's {what}s takes; {hint}"
        )


def unique_dir(root: str) -> str:
    """`root/<date>/<time>`, made here and now, that no other launch can get: the folder is
    created with an exclusive mkdir, and a launch in the same second takes `<time>_1`, `_2`, ...

    Hydra's `${now:...}` folders collide when two launches start in the same second, and two
    runs then overwrite each other's checkpoints and logs. Registered with use_cache, so like
    `now` it is resolved once, in the launching process, and each job of a sweep gets that value.
    """
    from datetime import datetime

    stamp = datetime.now()
    base = Path(root) / stamp.strftime("%Y-%m-%d") / stamp.strftime("%H-%M-%S")
    for n in range(10_000):
        candidate = base if n == 0 else base.with_name(f"{base.name}_{n}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            continue
        return str(candidate)
    raise LmexpError(f"No free folder under {base.parent}; set hydra.run.dir or hydra.sweep.dir.")


def config_choices() -> str:
    """The config groups and the choices of each, one `group: a, b, c` line per group, for
    --help (conf/train.yaml's hydra.help.template). Unlike Hydra's own list, it leaves out the
    bases (`_`-named, which check_group_choices refuses) and shows hydra/launcher's presets."""
    import importlib.util

    from lmexp.config import conf_dir

    conf = conf_dir()
    lines = []
    for folder in sorted(p for p in conf.rglob("*") if p.is_dir() and p.name[0] != "_"):
        choices = sorted(f.stem for f in folder.glob("*.yaml") if not f.stem.startswith("_"))
        group = folder.relative_to(conf).as_posix()
        if group == "hydra/launcher":  # Hydra's own launchers too, those installed
            plugins = {"basic": "hydra", **PLUGIN_LAUNCHERS}
            choices += [c for c, m in plugins.items() if importlib.util.find_spec(m) is not None]
        if choices:
            lines.append(f"{group}: {', '.join(sorted(choices))}")
    return "\n".join(lines)


# Hydra's launcher plugins lmexp's sweep extra installs, by the choice that selects each.
PLUGIN_LAUNCHERS = {
    "joblib": "hydra_plugins.hydra_joblib_launcher",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher",
    "submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
}


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("lmexp.unique_dir"):
        OmegaConf.register_new_resolver("lmexp.unique_dir", unique_dir, use_cache=True)
    if not OmegaConf.has_resolver("lmexp.config_choices"):
        OmegaConf.register_new_resolver("lmexp.config_choices", config_choices)
    if not OmegaConf.has_resolver("lmexp.bench_keys"):
        OmegaConf.register_new_resolver("lmexp.bench_keys", bench_keys)


def bench_keys() -> str:
    """The bench section's keys with their defaults, from the schema, for lmexp.bench --help."""
    import dataclasses

    from lmexp.config import BenchSettings

    def shown(value: Any) -> str:  # as it is typed on the command line
        if isinstance(value, list):
            return f"[{','.join(value)}]"
        if isinstance(value, bool) or value is None:
            return {True: "true", False: "false", None: "null"}[value]
        return str(value)

    pairs = [f"bench.{k}={shown(v)}" for k, v in dataclasses.asdict(BenchSettings()).items()]
    return "\n".join("  " + "  ".join(pairs[i : i + 3]) for i in range(0, len(pairs), 3))


def register_sweeper() -> None:
    """Make lmexp's Optuna sweeper known to Hydra. A wheel install puts it where Hydra's plugin
    scan looks (the hydra_plugins namespace); an editable one (pip install -e) reaches it only
    through setuptools' import hook, which that scan cannot list, so it is registered here."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.lmexp_optuna_sweeper.optuna_sweeper import LmexpOptunaSweeper

    Plugins.instance().register(LmexpOptunaSweeper)


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (entry points call this before composing)."""
    from hydra.core.config_store import ConfigStore

    from lmexp.config import AdaptConfig, BenchConfig, TrainConfig

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="bench_schema", node=BenchConfig)
    cs.store(name="adapt_schema", node=AdaptConfig)


def launch(task: Callable[[Any], Any], config_name: str, argv: list[str], schema: type) -> None:
    """Run `task` under Hydra with lmexp's configs (`python -m lmexp.<entry> [overrides]`)."""
    logging.basicConfig(
        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s", level=logging.INFO
    )
    from lmexp.config import check_override_keys, conf_dir

    conf = conf_dir()
    groups = {p.name for p in conf.iterdir() if p.is_dir()}
    try:
        check_override_keys(argv, schema, groups)
        check_group_choices(argv, conf)
        check_value_types(argv, schema)
        check_extras(argv)
        check_sweeper_settings(argv)
    except LmexpError as err:
        log.error("%s", err)
        sys.exit(2)
    claim_output_dirs(argv, Path.cwd())
    import hydra

    register_configs()
    register_resolvers()
    register_sweeper()
    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=config_name)(task)()
    from lmexp.orchestration.search import OUTCOME

    if OUTCOME["exit_code"]:
        sys.exit(OUTCOME["exit_code"])  # an Optuna search none of whose trials finished
