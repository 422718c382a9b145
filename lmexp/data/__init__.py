"""Corpora and batching: tensors out, no Hydra, no MLflow.

A corpus source is one module here with `load(cfg: DataConfig) -> Corpus` and one YAML in
conf/data/; SOURCES maps `data.name` to it (and `lmexp.validation.validate` reads the names from
it). What sources share is in corpus.py, batching for training and evaluation in batching.py.
"""

from __future__ import annotations

from collections.abc import Callable

from lmexp.config import DataConfig
from lmexp.data import ptb, text, tiny, wikitext2
from lmexp.data.batching import (
    batch_splits,
    batchify,
    jittered_lengths,
    jittered_windows,
    num_windows,
    windows,
)
from lmexp.data.corpus import (
    EOS,
    SPLITS,
    UNK,
    Corpus,
    DataError,
    build_vocab,
    corpus_from_words,
    encode,
    md5sum,
    read_text,
    read_words,
    tokenize,
)
from lmexp.data.ptb import PTB_MD5, check_ptb_folder, download_ptb, load_ptb, ptb_root
from lmexp.data.tiny import tiny_corpus

SOURCES: dict[str, Callable[[DataConfig], Corpus]] = {
    "ptb": ptb.load,
    "text": text.load,
    "tiny": tiny.load,
    "wikitext2": wikitext2.load,
}


def load_corpus(cfg: DataConfig) -> Corpus:
    """The corpus the config names; raises DataError before any training if it cannot be had."""
    return SOURCES[cfg.name](cfg)


__all__ = [
    "EOS",
    "PTB_MD5",
    "SOURCES",
    "SPLITS",
    "UNK",
    "Corpus",
    "DataError",
    "batch_splits",
    "batchify",
    "build_vocab",
    "check_ptb_folder",
    "corpus_from_words",
    "download_ptb",
    "encode",
    "jittered_lengths",
    "jittered_windows",
    "load_corpus",
    "load_ptb",
    "md5sum",
    "num_windows",
    "ptb_root",
    "read_text",
    "read_words",
    "tiny_corpus",
    "tokenize",
    "windows",
]
