"""The committed benchmark records (results/bench_cpu_*.json, written by `python -m lmexp.bench
bench.output=...`) are well-formed, and docs/benchmarks.md shows their numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmexp.config import BENCH_VARIANTS as VARIANTS

# Fast, in-process tests of the library: the unit lane (pytest -m unit).
pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
BENCH = sorted((REPO / "results").glob("bench_cpu_*.json"))
# The run settings a reader needs to reproduce a figure (records made before
# dropout.weight_drop existed lack that key: it was 0).
REQUIRED_CONFIG = {
    "model.name", "model.hidden_size", "model.num_layers", "model.tie_weights",
    "dropout.kind", "dropout.dp_keep_prob", "trainer.batch_size", "trainer.num_steps",
    "trainer.precision", "trainer.compile", "trainer.loss_reduction", "threads",
    "bench.batches", "bench.repeats", "bench.warmup_batches",
}  # fmt: skip
WPS = {"wps_median", "wps_min", "wps_max"}


def load(name: str) -> dict:
    return json.loads((REPO / "results" / name).read_text())


def record_name(model: str, precision: str) -> str:
    """The file a bench run of this model and precision is kept in."""
    return f"bench_cpu_{model}{'' if precision == 'fp32' else '_' + precision}.json"


def words_per_second(value: float) -> str:
    return f"{value:,.0f}"  # the README's format: 11199.6 -> "11,200"


def ratio(value: float) -> str:
    return f"{value:.2f}×"


def test_there_are_bench_records():
    assert [p.name for p in BENCH] == [
        "bench_cpu_medium.json", "bench_cpu_small.json", "bench_cpu_small_bf16.json"
    ]  # fmt: skip


@pytest.mark.parametrize("path", BENCH, ids=lambda p: p.name)
def test_bench_record_is_well_formed(path):
    r = json.loads(path.read_text())
    config = r["config"]
    missing = REQUIRED_CONFIG - set(config)
    assert not missing, f"{path.name} lacks config keys {sorted(missing)}"
    assert path.name == record_name(config["model.name"], config["trainer.precision"])
    device = re.fullmatch(r"cpu \(.+[,;] (\d+) threads\)", r["device"])
    assert device, f"device {r['device']!r} does not name a CPU and its thread count"
    assert int(device[1]) == config["threads"]
    assert re.fullmatch(r"\d+\.\d+\.\d+\+cpu", r["torch_version"]), r["torch_version"]
    variants = r["variants"]
    assert {"lmexp", "port"} <= set(variants) <= set(VARIANTS)
    # every record has the baselines also with lmexp's allocator setting (issue 37)
    assert {"lmexp", "port", "stock", "port_alloc", "stock_alloc"} <= set(variants)
    port, port_alloc = variants["port"]["wps_median"], variants["port_alloc"]["wps_median"]
    for name, v in variants.items():
        fields = WPS | {"ratio_vs_port", "ratio_vs_port_alloc", "keeps_freed_memory"}
        assert set(v) == fields, f"{path.name}: {name}'s fields"
        assert 0 < v["wps_min"] <= v["wps_median"] <= v["wps_max"], f"{path.name}: {name}"
        assert v["ratio_vs_port"] == pytest.approx(v["wps_median"] / port, rel=1e-12), (
            f"{path.name}: {name}'s ratio_vs_port is not its median over port's"
        )
        assert v["ratio_vs_port_alloc"] == pytest.approx(v["wps_median"] / port_alloc)
        assert v["keeps_freed_memory"] is (name == "lmexp" or name.endswith("_alloc")), name
    assert variants["port"]["ratio_vs_port"] == 1.0
    (evaluation,) = r["eval"].values()
    assert set(r["eval"]) == {"lmexp"} and set(evaluation) == WPS
    assert 0 < evaluation["wps_min"] <= evaluation["wps_median"] <= evaluation["wps_max"]


def throughput_section() -> str:
    page = (REPO / "docs" / "benchmarks.md").read_text()
    section = page.split("\n## On this CPU\n", 1)[1]
    return section.split("\n## ", 1)[0]


def test_readme_throughput_table_shows_the_recorded_numbers():
    """Each row of the table is one variant of one record: the model from the header
    (`model=small`), the variant and precision from the row's label; its words/s and ratio are
    the record's median and ratio_vs_port, formatted as the README does."""
    lines = [line for line in throughput_section().splitlines() if line.startswith("|")]
    header, _, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert header[1:] == ["words/s", "vs port", "vs port_alloc"], header
    model = header[0].removeprefix("model=")
    shown = set()
    for label, wps, vs_port, vs_port_alloc in rows:
        variant = re.match(r"\w+", label)[0]
        precision = re.search(r"precision=(\w+)|\((fp32)\)", label)
        name = record_name(model, precision[1] or precision[2])
        v = load(name)["variants"][variant]
        assert wps == words_per_second(v["wps_median"]), f"{label}: {name} has {v['wps_median']}"
        assert vs_port.strip("*") == ratio(v["ratio_vs_port"]), (
            f"{label}: {name} has ratio_vs_port {v['ratio_vs_port']}"
        )
        assert vs_port_alloc.strip("*") == ratio(v["ratio_vs_port_alloc"]), label
        shown.add((name, variant))
    # Every variant of the fp32 record is in the table, and bf16's own step.
    fp32 = record_name(model, "fp32")
    expected = {(fp32, v) for v in load(fp32)["variants"]} | {(record_name(model, "bf16"), "lmexp")}
    assert shown == expected, f"table rows missing: {sorted(expected - shown)}"


def test_readme_throughput_text_shows_the_recorded_numbers():
    """The prose around the table: the medium figures and the small runs' method."""
    text = " ".join(throughput_section().split())  # the prose wraps lines anywhere
    medium = load("bench_cpu_medium.json")["variants"]
    expected = (
        f"At medium the gain is {ratio(medium['lmexp']['ratio_vs_port'])} "
        f"({words_per_second(medium['lmexp']['wps_median'])} vs "
        f"{words_per_second(medium['port']['wps_median'])} words/s)"
    )
    assert expected in text, re.search(r"At medium[^:]*", text)[0]
    small = load("bench_cpu_small.json")
    config = small["config"]
    method = f"medians of {config['bench.repeats']} repeats of {config['bench.batches']} batches"
    assert method in text, f"the README's method; bench_cpu_small.json: {method}"
    cores = re.search(r"One machine here \((\d+) [^)]*cores", text)
    assert cores and int(cores[1]) == config["threads"], "the README's core count"
    torch = ".".join(small["torch_version"].split(".")[:2])
    assert f"torch {torch} CPU" in text, f"the README's torch version (records: {torch})"


def test_readme_throughput_line_shows_the_recorded_ratios():
    """The landing page's one line on throughput quotes the records' lmexp-vs-port ratios."""
    readme = " ".join((REPO / "README.md").read_text().split())
    line = readme.split("Throughput (`python -m lmexp.bench`", 1)[1].split(". No GPU", 1)[0]
    small = ratio(load(record_name("small", "fp32"))["variants"]["lmexp"]["ratio_vs_port"])
    bf16 = ratio(load(record_name("small", "bf16"))["variants"]["lmexp"]["ratio_vs_port"])
    medium = ratio(load("bench_cpu_medium.json")["variants"]["lmexp"]["ratio_vs_port"])
    expected = f"{small} the port at the small size in fp32, {bf16} with bf16, {medium} at medium"
    assert expected in line, line
    alone = [
        ratio(load(record_name(model, precision))["variants"]["lmexp"]["ratio_vs_port_alloc"])
        for model, precision in (("small", "fp32"), ("small", "bf16"), ("medium", "fp32"))
    ]
    expected = f"the step alone is {alone[0]}, {alone[1]} and {alone[2]}"
    assert expected in line, line
