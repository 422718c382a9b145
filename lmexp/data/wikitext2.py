"""data=wikitext2: WikiText-2 (Merity et al. 2016), word level, with its own `<unk>`s.

Read from data.root (the folder holding wiki.{train,valid,test}.tokens, or the word-level zip
itself), else downloaded into data.cache_dir from data.url, a URL or a list of mirrors tried in
order. Each file is verified against the SHA-1 sums gluon-nlp publishes for it
(data.verify_md5=false skips that, as for PTB), and a zip is extracted whole into a temporary
folder that replaces the cache folder in one rename: nothing is ever half-extracted.

Counting: the published sizes (33,278 words; 2,088,628 / 217,646 / 245,569 tokens) count one
`<eos>` per line end, blank lines included, as pytorch/examples' reader does; lmexp reads the
files as it reads PTB (`tokenize`: `<eos>` at each line end), so it counts the same.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import zipfile
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

FILES = {split: f"wiki.{split}.tokens" for split in SPLITS}
# gluon-nlp's published SHA-1 of each file of wikitext-2-v1.zip (gluonnlp/data/language_model.py)
WT2_SHA1 = {
    "train": "863f29c46ef9d167fff4940ec821195882fe29d1",
    "valid": "0418625c8b4da6e4b5c7a0b9e78d4ae8f7ee5422",
    "test": "c7b8ce0aa086fb34dab808c5c49224211eb2b172",
}
PUBLISHED = {"vocab": 33_278, "train": 2_088_628, "valid": 217_646, "test": 245_569}
ZIP_NAME = "wikitext-2-v1.zip"
GET_IT = (
    f"download {ZIP_NAME} on a machine with internet access and set data.root to the zip (or to "
    "its wikitext-2 folder)"
)


def _check_files(files: dict[str, bytes], where: str, verify: bool) -> None:
    for split, data in files.items():
        name = f"{where}/{FILES[split]}"
        if not data.split():
            raise DataError(f"{name} is empty; restore it from {ZIP_NAME}.")
        if verify:
            got = hashlib.sha1(data).hexdigest()
            if got != WT2_SHA1[split]:
                raise DataError(
                    f"{name} has SHA-1 {got}, not WikiText-2's {WT2_SHA1[split]}: the file is "
                    "corrupt or another version (the raw one?); use the word-level "
                    f"{ZIP_NAME}, or set data.verify_md5=false if that is intended."
                )


def check_folder(root: Path, verify: bool) -> None:
    """Raise DataError naming every missing WikiText-2 file, or the first empty or corrupt one."""
    if not root.is_dir():
        raise DataError(
            f"data.root={str(root)!r} is neither a folder nor a zip; point it at the folder "
            f"holding {', '.join(FILES.values())}, or at {ZIP_NAME}."
        )
    missing = [name for name in FILES.values() if not (root / name).is_file()]
    if missing:
        raise DataError(
            f"{root} lacks {' and '.join(missing)}; a WikiText-2 folder holds "
            f"{', '.join(FILES.values())} (the wikitext-2 folder of {ZIP_NAME})."
        )
    _check_files({s: (root / n).read_bytes() for s, n in FILES.items()}, str(root), verify)


def read_zip(payload: bytes, source: str) -> dict[str, bytes]:
    """The three files of a WikiText-2 zip, by split; DataError for a corrupt or foreign zip."""
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            members = {Path(n).name: n for n in archive.namelist() if not n.endswith("/")}
            missing = [name for name in FILES.values() if name not in members]
            if missing:
                raise DataError(
                    f"{source} has no {' and '.join(missing)}; it is not WikiText-2's word-level "
                    f"zip ({ZIP_NAME}, whose wikitext-2 folder holds {', '.join(FILES.values())})."
                )
            return {split: archive.read(members[name]) for split, name in FILES.items()}
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        how = "" if "://" in source else f"; delete it and download it again, or {GET_IT}"
        raise DataError(
            f"{source} is not a readable zip ({err}): truncated or corrupt{how}."
        ) from err


def _holds(folder: Path, files: dict[str, bytes]) -> bool:
    return all(
        (folder / FILES[split]).is_file() and (folder / FILES[split]).read_bytes() == data
        for split, data in files.items()
    )


def extract(files: dict[str, bytes], dest: Path) -> Path:
    """The files in dest: written into a new folder beside it, renamed to dest in one step, so
    a reader (another job of a sweep) never sees a half-written or half-replaced folder."""
    if _holds(dest, files):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would shut out a shared cache's users
    try:
        for split, data in files.items():
            (staging / FILES[split]).write_bytes(data)
        try:
            os.replace(staging, dest)  # dest absent (or an empty folder)
        except OSError:
            if _holds(dest, files):  # another process extracted the same files meanwhile
                shutil.rmtree(staging)
                return dest
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)  # an incomplete or other copy: set aside, then replaced
            os.replace(staging, dest)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def download_zip(
    urls: list[str], verify: bool, timeout: float = 60.0
) -> tuple[dict[str, bytes], str]:
    """The three files from the first mirror whose zip reads and verifies: (files, its URL)."""

    def read(payload: bytes, url: str) -> tuple[dict[str, bytes], str]:
        files = read_zip(payload, url)
        _check_files(files, f"{url}:wikitext-2", verify)
        return files, url

    return download(urls, read, "WikiText-2", GET_IT, timeout)


def wikitext2_root(cfg: DataConfig) -> Path:
    """The verified WikiText-2 folder: data.root's (a zip is extracted into the cache first),
    else the cache, downloading once."""
    cache = Path(cfg.cache_dir).expanduser() / "wikitext-2"
    if cfg.root:
        root = Path(cfg.root).expanduser().resolve()
        if root.is_file():
            files = read_zip(root.read_bytes(), str(root))
            _check_files(files, f"{root}:wikitext-2", cfg.verify_md5)
            return extract(files, cache)
        check_folder(root, cfg.verify_md5)
        return root
    try:
        check_folder(cache, verify=cfg.verify_md5)
        return cache
    except DataError:
        pass
    files, _ = download_zip(mirrors(cfg.url), cfg.verify_md5)
    return extract(files, cache)


def load(cfg: DataConfig) -> Corpus:
    root = wikitext2_root(cfg)
    return corpus_from_words({split: read_words(root / FILES[split]) for split in SPLITS})
