"""data=text: any folder of plain text (data.root) holding one file per split, found by name:
`train.txt`, `ptb.train.txt` and `wiki.train.tokens` are all the train split (a name's parts
between dots, dashes and underscores include `train`, `valid` or `validation`, `test`). Read as
PTB is: words split on white space, `<eos>` at each line end, the vocabulary from the train
split, a valid or test word outside it read as `<unk>`.
"""

from __future__ import annotations

import re
from pathlib import Path

from lmexp.config import DataConfig
from lmexp.data.corpus import EOS, SPLITS, Corpus, DataError, corpus_from_words, read_words

NAMES = {"train": {"train"}, "valid": {"valid", "validation"}, "test": {"test"}}


def split_files(root: Path) -> dict[str, Path]:
    """The file of each split under root; DataError naming what is missing or ambiguous."""
    files = [p for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")]
    found = {}
    for split in SPLITS:
        matches = [p for p in files if NAMES[split] & set(re.split(r"[._-]", p.name.lower()))]
        if not matches:
            raise DataError(
                f"{root} has no file for the {split} split; data=text needs one file per split "
                f"named for it (e.g. {split}.txt or ptb.{split}.txt) beside the others."
            )
        if len(matches) > 1:
            raise DataError(
                f"{root} has several files for the {split} split "
                f"({', '.join(p.name for p in matches)}); keep one per split in that folder."
            )
        found[split] = matches[0]
    return found


def load(cfg: DataConfig) -> Corpus:
    if not cfg.root:
        raise DataError(
            "data=text needs data.root: the folder holding the train, valid and test files "
            "(data.root=/path/to/corpus)."
        )
    root = Path(cfg.root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(
            f"data.root={cfg.root!r} is not a folder; point it at the folder holding the train, "
            "valid and test files."
        )
    files = split_files(root)
    words = {split: read_words(path) for split, path in files.items()}
    for split, path in files.items():
        if all(word == EOS for word in words[split]):
            raise DataError(f"{path} holds no words; data=text needs text in every split.")
    return corpus_from_words(words)
