"""What every corpus source shares: the Corpus value, TF's reader (tokenize, vocabulary,
encoding) and one-sentence data errors.

Reading follows `ptb_word_lm`'s reader: words split on white space, `<eos>` at each line end,
vocabulary from the train split sorted by count (descending) then word.
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from lmexp.config import LmexpError

log = logging.getLogger("lmexp.data")
T = TypeVar("T")

SPLITS = ("train", "valid", "test")
EOS = "<eos>"
UNK = "<unk>"


class DataError(LmexpError):
    """A corpus file or folder is missing, empty, corrupt or unreachable."""


@dataclass
class Corpus:
    """A vocabulary and the three splits as 1-D int64 token-id tensors."""

    vocab: list[str]
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    # the share of the valid and test words that the train split never has (read as <unk>)
    unseen: dict[str, float] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def trains_unk(self) -> bool:
        """Whether the train split holds <unk> itself, so the model learns its probability."""
        return bool((self.train == self.vocab.index(UNK)).any())

    def split(self, name: str) -> torch.Tensor:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]


def tokenize(text: str) -> list[str]:
    """Split on white space with `<eos>` at each line end, as TF's `_read_words` does; a line
    ends at \\n, \\r\\n or an old Mac's lone \\r."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", f" {EOS} ").split()


def read_text(path: Path) -> str:
    """The file decoded as UTF-8; raise DataError naming it and the first invalid byte."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8: the byte at offset {err.start} (0x{raw[err.start]:02x}) is "
            "invalid; re-save it as UTF-8."
        ) from err


def read_words(path: Path) -> list[str]:
    return tokenize(read_text(path))


def build_vocab(words: Sequence[str]) -> list[str]:
    """Words sorted by count (descending) then alphabetically; `<unk>` is always present."""
    counts = collections.Counter(words)
    vocab = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    if UNK not in counts:
        vocab.append(UNK)
    return vocab


def encode(words: Sequence[str], vocab: Sequence[str]) -> torch.Tensor:
    """Map words to ids; words outside the vocabulary become `<unk>`."""
    index = {w: i for i, w in enumerate(vocab)}
    unk = index[UNK]
    return torch.tensor([index.get(w, unk) for w in words], dtype=torch.long)


def mirrors(url: str | list[str]) -> list[str]:
    """data.url as the list of URLs to try, in order (one URL, or a list of mirrors)."""
    return [url] if isinstance(url, str) else list(url)


def download(
    urls: list[str],
    read: Callable[[bytes, str], T],
    what: str,
    get_it: str,
    timeout: float = 60.0,
) -> T:
    """What `read(payload, url)` makes of the first mirror's download it accepts, each mirror
    said as it is tried. A mirror that does not answer within timeout, breaks off, or serves
    what `read` refuses (a proxy's page, a truncated archive) is passed over for the next; none
    serving is one DataError naming each failure and how to get the corpus (get_it). With one
    URL, read's own refusal is the sentence."""
    failures = []
    for url in urls:
        log.info("Downloading %s from %s", what, url)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                payload = response.read()
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            failures.append(f"{url}: {_download_failure(err, timeout)}")
            continue
        try:
            return read(payload, url)
        except DataError as err:
            if len(urls) == 1:
                raise
            failures.append(str(err).rstrip("."))  # it names the URL itself
    raise DataError(f"Could not download {what} from data.url ({'; '.join(failures)}); {get_it}.")


def _download_failure(err: BaseException, timeout: float) -> str:
    reason = getattr(err, "reason", None) or err
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g} s"
    return str(reason) if isinstance(reason, str) else repr(reason)


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def corpus_from_words(words: dict[str, list[str]]) -> Corpus:
    """The corpus of three tokenized splits, its vocabulary built from the train split."""
    vocab = build_vocab(words["train"])
    known = set(vocab)
    unseen = {
        s: sum(w not in known for w in words[s]) / max(len(words[s]), 1) for s in ("valid", "test")
    }
    return Corpus(vocab, *(encode(words[s], vocab) for s in SPLITS), unseen=unseen)
