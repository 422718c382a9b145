from __future__ import annotations

import io
import re
import shutil
import socket
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import text_folder
from services import free_port, serving

from lmexp.config import DataConfig
from lmexp.data import (
    PTB_MD5,
    DataError,
    batchify,
    build_vocab,
    download_ptb,
    encode,
    load_corpus,
    md5sum,
    num_windows,
    ptb_root,
    tiny_corpus,
    tokenize,
    windows,
)

# Fast, in-process tests of the library: the unit lane (pytest -m unit).
pytestmark = pytest.mark.unit


def test_tokenize_puts_eos_at_each_line_end():
    assert tokenize(" a b \n c\n") == ["a", "b", "<eos>", "c", "<eos>"]


def test_vocab_sorted_by_count_then_word_and_has_unk():
    vocab = build_vocab(["b", "a", "c", "b", "a", "b"])
    assert vocab == ["b", "a", "c", "<unk>"]
    assert encode(["a", "zzz", "b"], vocab).tolist() == [1, 3, 0]


def test_batchify_is_ptb_producer_time_major():
    data = torch.arange(11)
    batched = batchify(data, 2)  # rows [0..4], [5..9]; the 11th token is dropped
    assert batched.shape == (5, 2)
    assert batched[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert batched[:, 1].tolist() == [5, 6, 7, 8, 9]


def test_windows_shift_targets_by_one_and_drop_or_keep_the_tail():
    batched = batchify(torch.arange(20), 2)  # (10, 2): rows 0..9 and 10..19
    train = list(windows(batched, 4, drop_last=True))
    assert num_windows(batched, 4, True) == 2 == len(train)  # TF: (10 - 1) // 4
    x, y = train[1]
    assert x[:, 0].tolist() == [4, 5, 6, 7] and y[:, 0].tolist() == [5, 6, 7, 8]
    assert x[:, 1].tolist() == [14, 15, 16, 17] and y[:, 1].tolist() == [15, 16, 17, 18]
    evals = list(windows(batched, 4, drop_last=False))
    assert len(evals) == 3
    assert evals[-1][1][:, 0].tolist() == [9]  # every target scored exactly once
    assert sum(t.numel() for _, t in evals) == 2 * 9


def test_ptb_token_counts_and_vocabulary(ptb_dir):
    corpus = load_corpus(DataConfig(root=str(ptb_dir)))
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == (
        929589,
        73760,
        82430,
    )
    assert corpus.vocab_size == 10000
    assert corpus.vocab[:3] == ["the", "<unk>", "<eos>"]  # the most frequent words, by count
    assert int(corpus.train.max()) < 10000


def test_tiny_corpus_is_deterministic_and_learnable_size():
    a, b = tiny_corpus(50, 2000, 200, 7), tiny_corpus(50, 2000, 200, 7)
    assert torch.equal(a.train, b.train) and a.vocab == b.vocab
    assert a.train.numel() == 2000 and a.valid.numel() == 200
    assert not torch.equal(a.train, tiny_corpus(50, 2000, 200, 8).train)


def _copy_ptb(ptb_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for split in ("train", "valid", "test"):
        shutil.copy(ptb_dir / f"ptb.{split}.txt", dest)
    return dest


def test_missing_empty_and_corrupt_files_are_named(ptb_dir, tmp_path):
    root = _copy_ptb(ptb_dir, tmp_path / "ptb")
    (root / "ptb.valid.txt").write_text(" a b\n")
    with pytest.raises(DataError, match=r"ptb\.valid\.txt has MD5 .* not PTB's"):
        ptb_root(DataConfig(root=str(root)))
    (root / "ptb.valid.txt").write_text("")
    with pytest.raises(DataError, match=r"ptb\.valid\.txt is empty"):
        ptb_root(DataConfig(root=str(root)))
    (root / "ptb.valid.txt").unlink()
    with pytest.raises(DataError, match=r"ptb\.valid\.txt is missing"):
        ptb_root(DataConfig(root=str(root)))


def _archive(ptb_dir: Path, path: Path, corrupt: bool = False) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "valid", "test"):
            data = (ptb_dir / f"ptb.{split}.txt").read_bytes()
            if corrupt and split == "test":
                data = data[:-10]
            info = tarfile.TarInfo(f"./simple-examples/data/ptb.{split}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_download_verifies_and_caches(ptb_dir, tmp_path):
    url = _archive(ptb_dir, tmp_path / "simple-examples.tgz").as_uri()
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), url=url)
    root = ptb_root(cfg)
    assert root == tmp_path / "cache" / "ptb"
    assert all(md5sum(root / f"ptb.{s}.txt") == PTB_MD5[s] for s in PTB_MD5)
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
    # A second call uses the verified cache, even with the source gone.
    (tmp_path / "simple-examples.tgz").unlink()
    assert ptb_root(cfg) == root


def test_corrupt_download_is_refused_and_nothing_cached(ptb_dir, tmp_path):
    url = _archive(ptb_dir, tmp_path / "bad.tgz", corrupt=True).as_uri()
    with pytest.raises(DataError, match=r"ptb\.test\.txt from .* has MD5"):
        ptb_root(DataConfig(cache_dir=str(tmp_path / "cache"), url=url))
    assert not (tmp_path / "cache" / "ptb" / "ptb.test.txt").exists()


def test_offline_download_says_how_to_point_data_root(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), url="http://127.0.0.1:9/simple-examples.tgz")
    with pytest.raises(DataError, match=r"Could not download PTB .* set data\.root"):
        ptb_root(cfg)


def test_a_ptb_mirror_that_breaks_off_or_serves_a_page_is_passed_over_for_the_next(
    ptb_dir, tmp_path, caplog
):
    """The same download path as WikiText-2's, against a real HTTP server: nothing listening,
    a 404, a proxy's page, an archive cut off mid-download (IncompleteRead), then the archive."""
    payload = _archive(ptb_dir, tmp_path / "simple-examples.tgz").read_bytes()
    routes = {
        "/portal/simple-examples.tgz": b"<html>Please log in</html>",
        "/broken/simple-examples.tgz": (len(payload), payload[:5000]),
        "/good/simple-examples.tgz": payload,
    }
    closed = f"http://127.0.0.1:{free_port()}/simple-examples.tgz"
    with serving(routes) as base, caplog.at_level("INFO", logger="lmexp.data"):
        urls = [
            closed,
            *(f"{base}/{p}/simple-examples.tgz" for p in ("gone", "portal", "broken", "good")),
        ]
        root = ptb_root(DataConfig(cache_dir=str(tmp_path / "cache"), url=urls))
    assert [r.getMessage() for r in caplog.records] == [f"Downloading PTB from {u}" for u in urls]
    assert all(md5sum(root / f"ptb.{s}.txt") == PTB_MD5[s] for s in PTB_MD5)


def test_no_ptb_mirror_serving_is_one_sentence_naming_each_once(ptb_dir, tmp_path):
    routes = {"/portal/simple-examples.tgz": b"<html>Please log in</html>"}
    closed = f"http://127.0.0.1:{free_port()}/simple-examples.tgz"
    with serving(routes) as base, pytest.raises(DataError) as err:
        portal = f"{base}/portal/simple-examples.tgz"
        ptb_root(DataConfig(cache_dir=str(tmp_path / "cache"), url=[closed, portal]))
    message = str(err.value)
    assert message.startswith(f"Could not download PTB from data.url ({closed}: ")
    assert f"; {portal} is not a tar archive (truncated, or not simple-examples.tgz: a " in message
    assert message.endswith(
        "set data.root to its simple-examples/data folder (which holds ptb.train.txt, "
        "ptb.valid.txt and ptb.test.txt), or to the .tgz itself."
    )
    assert message.count(portal) == 1 and ".;" not in message and "\n" not in message
    assert not (tmp_path / "cache" / "ptb").exists()


def test_a_mirror_that_never_answers_is_named_with_the_time_it_was_given(tmp_path):
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/simple-examples.tgz"
        with pytest.raises(DataError, match=rf"\({re.escape(url)}: no answer within 1 s\)"):
            download_ptb([url], tmp_path / "ptb", timeout=1)


def test_the_ptb_archive_itself_is_a_data_root(ptb_dir, tmp_path):
    archive = _archive(ptb_dir, tmp_path / "simple-examples.tgz")
    cfg = DataConfig(root=str(archive), cache_dir=str(tmp_path / "cache"))
    assert load_corpus(cfg).test.equal(load_corpus(DataConfig(root=str(ptb_dir))).test)
    corrupt = _archive(ptb_dir, tmp_path / "bad.tgz", corrupt=True)
    with pytest.raises(DataError, match=r"ptb\.test\.txt from .*bad\.tgz has MD5"):
        ptb_root(DataConfig(root=str(corrupt), cache_dir=str(tmp_path / "other")))


@pytest.mark.parametrize(
    "names",
    [
        {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"},
        {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"},
        {
            "train": "wiki.train.tokens",
            "valid": "wiki.validation.tokens",
            "test": "wiki.test.tokens",
        },
    ],
)
def test_text_folder_finds_each_split_by_its_name_and_reads_it_as_ptb_is(tmp_path, names):
    root = text_folder(tmp_path / "corpus", names)
    (root / ".train.txt.swp").write_text("editor junk")  # hidden files are not splits
    corpus = load_corpus(DataConfig(name="text", root=str(root)))
    words = {s: tokenize((root / n).read_text()) for s, n in names.items()}
    assert corpus.vocab == build_vocab(words["train"])
    for split in ("train", "valid", "test"):
        assert corpus.split(split).tolist() == encode(words[split], corpus.vocab).tolist()


def test_text_folder_of_ptbs_files_is_ptb_token_for_token(ptb_dir, tmp_path):
    """PTB's three files, renamed, read as data=text: the corpus data=ptb reads."""
    root = tmp_path / "corpus"
    root.mkdir()
    for split in ("train", "valid", "test"):
        shutil.copy(ptb_dir / f"ptb.{split}.txt", root / f"{split}.txt")
    text = load_corpus(DataConfig(name="text", root=str(root)))
    ptb = load_corpus(DataConfig(root=str(ptb_dir)))
    assert text.vocab == ptb.vocab
    assert all(torch.equal(text.split(s), ptb.split(s)) for s in ("train", "valid", "test"))


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            "unset",
            r"data=text needs data\.root: the folder holding the train, valid and test files",
        ),
        ("not_a_folder", r"data\.root='.*notes\.txt' is not a folder"),
        (
            "missing",
            r"has no file for the test split; data=text needs one file per split named for it",
        ),
        (
            "two",
            r"has several files for the train split \(a\.train\.txt, b\.train\.txt\); keep one",
        ),
        ("empty", r"valid\.txt holds no words"),
    ],
)
def test_a_text_folder_that_cannot_serve_is_one_sentence_naming_it(tmp_path, setup, message):
    names = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}
    root = text_folder(tmp_path / "corpus", names)
    if setup == "not_a_folder":
        root = root / "notes.txt"
        root.write_text("a b c\n")
    elif setup == "missing":
        (root / "test.txt").unlink()
    elif setup == "two":
        (root / "train.txt").rename(root / "a.train.txt")
        shutil.copy(root / "a.train.txt", root / "b.train.txt")
    elif setup == "empty":
        (root / "valid.txt").write_text("\n \n")
    cfg = DataConfig(name="text", root=None if setup == "unset" else str(root))
    with pytest.raises(DataError, match=message):
        load_corpus(cfg)


def test_valid_and_test_words_missing_from_train_are_counted_and_old_mac_lines_are_lines(tmp_path):
    """data=text: the share of each evaluation split's words that the train split never has
    (read as <unk>), and a file with old-Mac \\r line ends read as lines."""
    from lmexp.data import load_corpus

    (tmp_path / "train.txt").write_text("the cat sat\rthe dog sat\r")
    (tmp_path / "valid.txt").write_text("the cow sat\nthe cat ran\n")  # cow, ran: 2 of 8 tokens
    (tmp_path / "test.txt").write_text("the cat sat\r\n")
    corpus = load_corpus(DataConfig(name="text", root=str(tmp_path)))
    assert corpus.vocab_size == 6  # the, sat, <eos>, cat, dog and <unk>
    assert corpus.train.numel() == 8  # two lines of three words and their <eos>
    assert corpus.unseen == {"valid": 0.25, "test": 0.0}
    assert not corpus.trains_unk
