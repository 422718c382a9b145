"""data=ptb: Penn Treebank (Mikolov's copy), read from data.root or downloaded into
data.cache_dir, each split MD5-verified."""

from __future__ import annotations

import hashlib
import io
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from lmexp.config import DataConfig
from lmexp.data.corpus import (
    SPLITS,
    Corpus,
    DataError,
    atomic_write_bytes,
    corpus_from_words,
    mirrors,
    read_words,
)

PTB_MD5 = {
    "train": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
    "test": "8b80168b89c18661a38ef683c0dc3721",
}


def check_ptb_folder(root: Path, verify_md5: bool = True) -> None:
    """Raise DataError naming the first missing, empty or corrupt PTB file under root."""
    if not root.is_dir():
        raise DataError(
            f"data.root={str(root)!r} is not a folder; point data.root at the folder holding "
            "ptb.train.txt, ptb.valid.txt and ptb.test.txt (or leave it unset to download PTB)."
        )
    for split in SPLITS:
        path = root / f"ptb.{split}.txt"
        if not path.is_file():
            raise DataError(
                f"{path} is missing; data.root must hold ptb.train.txt, ptb.valid.txt and "
                "ptb.test.txt (or leave data.root unset to download PTB)."
            )
        # Bytes only: a corrupt file must get the MD5 sentence, not fail in a decoder; an
        # unverified one is decoded (and a bad byte named) when it is read.
        raw = path.read_bytes()
        if not raw.split():
            raise DataError(f"{path} is empty; restore it from the PTB archive.")
        if verify_md5:
            got = hashlib.md5(raw).hexdigest()
            if got != PTB_MD5[split]:
                raise DataError(
                    f"{path} has MD5 {got}, not PTB's {PTB_MD5[split]}: the file is corrupt or "
                    "another corpus; restore it, or set data.verify_md5=false if that is intended."
                )


def download_ptb(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Fetch Mikolov's archive, verify each split's MD5 and write the files atomically into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise DataError(
            f"Could not download PTB from {url} ({reason}); download simple-examples.tgz on a "
            "machine with internet access and set data.root to the folder holding its "
            "ptb.train.txt, ptb.valid.txt and ptb.test.txt."
        ) from err
    try:
        archive = tarfile.open(fileobj=io.BytesIO(payload), mode="r:*")  # noqa: SIM115 (closed below)
    except tarfile.TarError as err:
        raise DataError(f"The download from {url} is not a tar archive ({err}).") from err
    with archive:
        # Read the three files by name; nothing else in the archive is extracted.
        members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
        for split in SPLITS:
            name = f"ptb.{split}.txt"
            if name not in members:
                raise DataError(f"The archive from {url} has no {name}.")
            data = archive.extractfile(members[name]).read()  # type: ignore[union-attr]
            got = hashlib.md5(data).hexdigest()
            if got != PTB_MD5[split]:
                raise DataError(
                    f"{name} from {url} has MD5 {got}, not {PTB_MD5[split]}; the download is "
                    "corrupt: delete it and try again, or set data.root to a verified copy."
                )
            atomic_write_bytes(dest / name, data)
    return dest


def ptb_root(cfg: DataConfig) -> Path:
    """The verified PTB folder: data.root if given, else the cache (downloading once)."""
    if cfg.root:
        root = Path(cfg.root).expanduser().resolve()
        check_ptb_folder(root, cfg.verify_md5)
        return root
    cache = Path(cfg.cache_dir).expanduser() / "ptb"
    try:
        check_ptb_folder(cache, verify_md5=True)
        return cache
    except DataError:
        pass
    urls = mirrors(cfg.url)
    for url in urls[:-1]:  # mirrors tried in order; the last one's failure is the sentence
        try:
            return download_ptb(url, cache)
        except DataError:
            continue
    return download_ptb(urls[-1], cache)


def load_ptb(root: Path) -> Corpus:
    return corpus_from_words({split: read_words(root / f"ptb.{split}.txt") for split in SPLITS})


def load(cfg: DataConfig) -> Corpus:
    return load_ptb(ptb_root(cfg))
