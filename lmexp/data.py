"""Corpora: read PTB as TensorFlow's reader does, download and verify it, build the tiny corpus, batch.

Reading follows `ptb_word_lm`'s reader: words split on white space, `<eos>` at each line end,
vocabulary from the train split sorted by count (descending) then word. Batching follows
`ptb_producer`: the token stream is cut into `batch_size` rows, read in windows of `num_steps`.
Here the batched stream is stored time-major, shape (length, batch), which is what `nn.LSTM`
consumes, so a window is a contiguous slice.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import random
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmexp.config import DataConfig, LmexpError, TrainerConfig

SPLITS = ("train", "valid", "test")
PTB_MD5 = {
    "train": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
    "test": "8b80168b89c18661a38ef683c0dc3721",
}
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

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split(self, name: str) -> torch.Tensor:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]


def tokenize(text: str) -> list[str]:
    """Split on white space with `<eos>` at each line end, as TF's `_read_words` does."""
    return text.replace("\n", f" {EOS} ").split()


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


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    return download_ptb(cfg.url, cache)


def load_ptb(root: Path) -> Corpus:
    words = {split: read_words(root / f"ptb.{split}.txt") for split in SPLITS}
    vocab = build_vocab(words["train"])
    return Corpus(vocab, *(encode(words[s], vocab) for s in SPLITS))


def tiny_corpus(vocab_size: int, train_tokens: int, eval_tokens: int, seed: int) -> Corpus:
    """A deterministic corpus with learnable structure: a sparse Markov chain over a small vocabulary.

    Each word has three possible successors (probabilities 0.6/0.3/0.1) and sentences end with
    `<eos>`; a model that learns the chain reaches a perplexity near 2.5, far below the vocabulary
    size a model without it gets.
    """
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab_size - 1)] + [EOS]
    successors = [rng.sample(range(vocab_size), 3) for _ in range(vocab_size)]

    def stream(n: int) -> list[str]:
        out, cur = [], rng.randrange(vocab_size)
        for _ in range(n):
            cur = rng.choices(successors[cur], weights=(0.6, 0.3, 0.1))[0]
            out.append(words[cur])
        return out

    train, valid, test = stream(train_tokens), stream(eval_tokens), stream(eval_tokens)
    vocab = build_vocab(train)
    return Corpus(vocab, encode(train, vocab), encode(valid, vocab), encode(test, vocab))


def load_corpus(cfg: DataConfig) -> Corpus:
    """The corpus the config names; raises DataError before any training if it cannot be had."""
    if cfg.name == "tiny":
        return tiny_corpus(
            cfg.tiny_vocab_size, cfg.tiny_train_tokens, cfg.tiny_eval_tokens, cfg.tiny_seed
        )
    return load_ptb(ptb_root(cfg))


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut the stream into batch_size rows (dropping the remainder), time-major: (length, batch)."""
    length = data.numel() // batch_size
    if length < 2:
        raise DataError(
            f"A split of {data.numel()} tokens is too short for batch size {batch_size}; "
            "use a smaller batch size or a larger corpus."
        )
    return data[: length * batch_size].view(batch_size, length).t().contiguous()


def num_windows(batched: torch.Tensor, num_steps: int, drop_last: bool) -> int:
    """Windows per pass: TF's epoch_size = (len - 1) // num_steps when drop_last, else ceil."""
    targets = batched.size(0) - 1
    return targets // num_steps if drop_last else -(-targets // num_steps)


def windows(
    batched: torch.Tensor, num_steps: int, drop_last: bool, start: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) slices of shape (steps, batch); targets are the inputs shifted by one.

    drop_last=True is ptb_producer (training); False also yields the final short window, so that
    evaluation scores every token.
    """
    for i in range(start, num_windows(batched, num_steps, drop_last)):
        lo = i * num_steps
        hi = min(lo + num_steps, batched.size(0) - 1)
        yield batched[lo:hi], batched[lo + 1 : hi + 1]


def batch_splits(corpus: Corpus, trainer: TrainerConfig) -> dict[str, torch.Tensor]:
    """The three splits batched as training and evaluation read them; a split too short for its
    batch size (or, for training, for one window of num_steps) is refused naming the keys."""
    sizes = {
        "train": ("trainer.batch_size", trainer.batch_size),
        "valid": ("trainer.eval_batch_size", trainer.eval_batch_size),
        "test": ("trainer.test_batch_size", trainer.test_batch_size),
    }
    batched = {}
    for split, (key, size) in sizes.items():
        tokens = corpus.split(split).numel()
        if tokens // size < 2:
            raise DataError(
                f"The {split} split has {tokens} tokens, too few for {key}={size} (it needs at "
                f"least {2 * size}); lower {key} or use a larger corpus."
            )
        batched[split] = batchify(corpus.split(split), size)
    needed = trainer.batch_size * (trainer.num_steps + 1)
    if num_windows(batched["train"], trainer.num_steps, drop_last=True) == 0:
        raise DataError(
            f"The train split has {corpus.train.numel()} tokens, too few for one window of "
            f"trainer.batch_size={trainer.batch_size} x trainer.num_steps={trainer.num_steps} "
            f"(it needs at least {needed}); lower trainer.batch_size or trainer.num_steps, or use "
            "a larger corpus."
        )
    return batched
