"""data=ptb: Penn Treebank (Mikolov's copy), read from data.root or downloaded into
data.cache_dir, each split MD5-verified."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zlib
from pathlib import Path

from lmexp.config import DataConfig
from lmexp.data.corpus import (
    SPLITS,
    Corpus,
    DataError,
    corpus_from_words,
    download,
    mirrors,
    read_words,
)
from lmexp.files import atomic_write_bytes

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


GET_IT = (
    "download simple-examples.tgz on a machine with internet access, extract it, and set "
    "data.root to its simple-examples/data folder (which holds ptb.train.txt, ptb.valid.txt and "
    "ptb.test.txt), or to the .tgz itself"
)


def read_archive(payload: bytes, source: str) -> dict[str, bytes]:
    """The three PTB files of Mikolov's archive, each MD5-verified; DataError for anything else
    (not a tar archive, a file missing, a corrupt file)."""
    try:
        archive = tarfile.open(fileobj=io.BytesIO(payload), mode="r:*")  # noqa: SIM115 (closed below)
    except tarfile.TarError:
        raise DataError(
            f"{source} is not a tar archive (truncated, or not simple-examples.tgz: a proxy's "
            "page?)."
        ) from None
    files = {}
    with archive:
        # Read the three files by name; nothing else in the archive is extracted.
        members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
        for split in SPLITS:
            name = f"ptb.{split}.txt"
            if name not in members:
                raise DataError(f"The archive {source} has no {name}.")
            try:
                data = archive.extractfile(members[name]).read()  # type: ignore[union-attr]
            except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
                raise DataError(f"{source} is truncated or corrupt ({err}).") from None
            got = hashlib.md5(data).hexdigest()
            if got != PTB_MD5[split]:
                raise DataError(
                    f"{name} from {source} has MD5 {got}, not {PTB_MD5[split]}; the archive is "
                    "corrupt or another corpus: use Mikolov's simple-examples.tgz, or set "
                    "data.root to a verified copy."
                )
            files[name] = data
    return files


def download_ptb(urls: list[str], dest: Path, timeout: float = 60.0) -> Path:
    """Fetch Mikolov's archive from the first mirror that serves it, verify each split's MD5
    and write the files atomically into dest."""
    return keep(download(urls, read_archive, "PTB", GET_IT, timeout), dest)


def keep(files: dict[str, bytes], dest: Path) -> Path:
    """The verified files written into dest, each atomically."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic_write_bytes(dest / name, data)
    return dest


def ptb_root(cfg: DataConfig) -> Path:
    """The verified PTB folder: data.root if given, else the cache (downloading once)."""
    cache = Path(cfg.cache_dir).expanduser() / "ptb"
    if cfg.root:
        root = Path(cfg.root).expanduser().resolve()
        if root.is_file():  # simple-examples.tgz itself: its three files, verified, into the cache
            return keep(read_archive(root.read_bytes(), str(root)), cache)
        check_ptb_folder(root, cfg.verify_md5)
        return root
    try:
        check_ptb_folder(cache, verify_md5=True)
        return cache
    except DataError:
        pass
    return download_ptb(mirrors(cfg.url), cache)


def load_ptb(root: Path) -> Corpus:
    return corpus_from_words({split: read_words(root / f"ptb.{split}.txt") for split in SPLITS})


def load(cfg: DataConfig) -> Corpus:
    return load_ptb(ptb_root(cfg))
