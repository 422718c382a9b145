"""data=wikitext2 against a real HTTP server on a loopback port serving a small zip of
WikiText-2's layout: mirrors tried in order, the cache filled in one rename, checksums, and the
one-sentence refusals (offline, a truncated zip, missing files), then a real training run."""

from __future__ import annotations

import hashlib
import io
import os
import random
import zipfile
from pathlib import Path

import pytest
from conftest import TINY, mlflow_runs, run_module
from services import free_port, serving

from lmexp.config import DataConfig
from lmexp.data import DataError, load_corpus, wikitext2
from lmexp.data.corpus import EOS, UNK

WORDS = [f"w{i}" for i in range(40)] + ["@-@", "@,@", ",", ".", UNK, "the"]


def wt2_text(lines: int, seed: int) -> str:
    """Text in WikiText's format: a leading blank line, ` = Heading = ` lines, blank lines
    between paragraphs, tokens separated by single spaces, each line starting with a space."""
    rng = random.Random(seed)
    out = [" "]
    for i in range(lines):
        if i % 10 == 0:
            out += [f" = Heading {i} = ", " "]
        out.append(" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + " ")
        out.append(" ")
    return "\n".join(out) + "\n"


FILES = {split: wt2_text(n, seed) for split, n, seed in (("train", 300, 1), ("valid", 60, 2), ("test", 60, 3))}  # fmt: skip


def wt2_zip(files: dict[str, str] = FILES) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("wikitext-2/", "")
        for split, text in files.items():
            archive.writestr(f"wikitext-2/wiki.{split}.tokens", text)
    return buffer.getvalue()


def config(tmp_path: Path, url, **kw) -> DataConfig:
    return DataConfig(name="wikitext2", url=url, cache_dir=str(tmp_path / "cache"), **kw)


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


@pytest.mark.unit
def test_tokens_are_counted_as_the_published_sizes_count_them(tmp_path):
    """The published sizes count one <eos> per line end, blank lines included (pytorch/examples'
    reader: line.split() + ['<eos>'] for every line); lmexp counts the same."""
    for split, text in FILES.items():
        (tmp_path / f"wiki.{split}.tokens").write_text(text)
    corpus = load_corpus(DataConfig(name="wikitext2", root=str(tmp_path), verify_md5=False))
    for split, text in FILES.items():
        expected = sum(len(line.split()) + 1 for line in text.splitlines())
        assert corpus.split(split).numel() == expected
        assert text.count("\n") == len(text.splitlines())  # every line ends in a line break
    train_words = {w for line in FILES["train"].splitlines() for w in line.split()}
    assert sorted(corpus.vocab) == sorted(train_words | {EOS})  # its own <unk>, no second one
    assert corpus.vocab.count(UNK) == 1


def test_the_first_mirror_that_serves_the_zip_fills_the_cache_in_one_step(tmp_path):
    payload = wt2_zip()
    routes = {
        "/portal/wikitext-2-v1.zip": b"<html>Please log in to the network</html>",  # a proxy
        "/broken/wikitext-2-v1.zip": (len(payload), payload[:1000]),  # breaks off
        "/mirror-b/wikitext-2-v1.zip": payload,
    }
    closed = f"http://127.0.0.1:{free_port()}/wikitext-2-v1.zip"  # nothing listens there
    with serving(routes) as base:
        paths = ["mirror-a", "portal", "broken", "mirror-b"]  # mirror-a: 404
        urls = [closed, *(f"{base}/{p}/wikitext-2-v1.zip" for p in paths)]
        corpus = load_corpus(config(tmp_path, urls, verify_md5=False))
    assert routes["_hits"] == [f"/{p}/wikitext-2-v1.zip" for p in paths]
    cache = tmp_path / "cache"
    assert leftovers(cache) == ["wikitext-2"]  # no staging folder left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (cache / "wikitext-2").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert sorted(p.name for p in (cache / "wikitext-2").iterdir()) == sorted(
        f"wiki.{s}.tokens" for s in FILES
    )
    assert (cache / "wikitext-2" / "wiki.valid.tokens").read_text() == FILES["valid"]
    # Offline now: the cache is enough.
    again = load_corpus(config(tmp_path, [closed], verify_md5=False))
    assert again.vocab == corpus.vocab and again.test.equal(corpus.test)


def test_files_that_are_not_wikitext2_are_refused_by_their_published_checksum(tmp_path):
    with serving({"/wt2.zip": wt2_zip()}) as base, pytest.raises(DataError) as refused:
        load_corpus(config(tmp_path, f"{base}/wt2.zip"))
    got = hashlib.sha1(FILES["train"].encode()).hexdigest()
    assert str(refused.value) == (
        f"{base}/wt2.zip:wikitext-2/wiki.train.tokens has SHA-1 {got}, not WikiText-2's "
        f"{wikitext2.WT2_SHA1['train']}: the file is corrupt or another version (the raw one?); "
        "use the word-level wikitext-2-v1.zip, or set data.verify_md5=false if that is intended."
    )
    assert leftovers(tmp_path / "cache") == []  # nothing unverified was written


def test_offline_without_a_copy_is_one_sentence_naming_each_mirror(tmp_path):
    urls = [f"http://127.0.0.1:{free_port()}/a.zip", f"http://127.0.0.1:{free_port()}/b.zip"]
    with pytest.raises(DataError, match=r"^Could not download WikiText-2 from data.url \(") as e:
        load_corpus(config(tmp_path, urls))
    message = str(e.value)
    assert all(url in message for url in urls) and "\n" not in message
    assert message.endswith(
        "download wikitext-2-v1.zip on a machine with internet access and set data.root to the "
        "zip (or to its wikitext-2 folder)."
    )
    assert leftovers(tmp_path / "cache") == []


def test_a_truncated_zip_is_named_and_nothing_is_extracted(tmp_path):
    payload = wt2_zip()
    cut = r"cut\.zip is not a readable zip \(.*\): truncated"
    with (
        serving({"/cut.zip": payload[: len(payload) // 2]}) as base,
        pytest.raises(DataError, match=cut),
    ):
        load_corpus(config(tmp_path, f"{base}/cut.zip", verify_md5=False))
    assert leftovers(tmp_path / "cache") == []
    local = tmp_path / "wikitext-2-v1.zip"
    local.write_bytes(payload[:-100])  # a local copy cut short: its central directory is gone
    with pytest.raises(DataError, match=rf"{local} is not a readable zip"):
        load_corpus(config(tmp_path, "unused", root=str(local), verify_md5=False))
    assert leftovers(tmp_path / "cache") == []


def test_a_local_zip_or_folder_is_read_and_missing_files_are_named(tmp_path):
    local = tmp_path / "wikitext-2-v1.zip"
    local.write_bytes(wt2_zip())
    from_zip = load_corpus(config(tmp_path, "unused", root=str(local), verify_md5=False))
    folder = tmp_path / "wt2"
    folder.mkdir()
    (folder / "wiki.train.tokens").write_text(FILES["train"])
    with pytest.raises(DataError) as refused:
        load_corpus(config(tmp_path, "unused", root=str(folder), verify_md5=False))
    assert str(refused.value) == (
        f"{folder} lacks wiki.valid.tokens and wiki.test.tokens; a WikiText-2 folder holds "
        "wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens (the wikitext-2 folder of "
        "wikitext-2-v1.zip)."
    )
    for split in ("valid", "test"):
        (folder / f"wiki.{split}.tokens").write_text(FILES[split])
    from_folder = load_corpus(config(tmp_path, "unused", root=str(folder), verify_md5=False))
    assert from_folder.vocab == from_zip.vocab and from_folder.train.equal(from_zip.train)


@pytest.mark.slow
def test_data_wikitext2_trains_end_to_end_from_the_loopback_mirror(tmp_path):
    routes = {"/wikitext-2-v1.zip": wt2_zip()}
    with serving(routes) as base:
        dead = f"{base}/gone/wikitext-2-v1.zip"
        proc = run_module(
            "lmexp.train", *TINY, "data=wikitext2", f"data.url=[{dead},{base}/wikitext-2-v1.zip]",
            "data.verify_md5=false", f"data.cache_dir={tmp_path / 'cache'}",
            "trainer.max_epochs=1", "hydra.run.dir=run", cwd=tmp_path,
        )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert routes["_hits"] == ["/gone/wikitext-2-v1.zip", "/wikitext-2-v1.zip"]
    (run,) = mlflow_runs(tmp_path / "mlflow.db")
    assert run.info.status == "FINISHED" and run.data.params["data.name"] == "wikitext2"
    corpus = load_corpus(config(tmp_path, "unused", verify_md5=False))
    assert "test_ppl" in run.data.metrics and run.data.metrics["test_ppl"] < corpus.vocab_size
