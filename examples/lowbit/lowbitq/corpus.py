"""A byte-level text corpus every machine has offline: the Python standard library's own
source files.

Files: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]``, outside
``site-packages`` and outside directories named ``test``, ``tests`` or ``idle_test``
(test data holds deliberately odd bytes). A file is held out when the first byte of the
SHA-256 of its path relative to the stdlib root is below 26 (about 10% of files), so the
split depends on the path alone, not on which other files exist. Each split is its files'
bytes in sorted path order, each file followed by a NUL byte. The corpus is the same on
every machine with the same Python version (patch releases edit a few files: the
recorded SHA-256 says whether two runs saw the same bytes).
"""
from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
HELD_OUT_BELOW = 26  # of 256: the held-out share of files, by the first byte of the path's hash
SEPARATOR = b"\0"


@dataclass
class Corpus:
    train: Tensor  # uint8, the training files' bytes
    held_out: Tensor  # uint8, the held-out files' bytes
    info: dict


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path) -> list[str]:
    """The corpus's files, as sorted POSIX paths relative to ``root``."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.isdisjoint(rel.parts[:-1]) and path.is_file():
            files.append(rel.as_posix())
    return sorted(files)


def held_out(rel: str) -> bool:
    return hashlib.sha256(rel.encode()).digest()[0] < HELD_OUT_BELOW


def load(max_train_bytes: int | None = None, max_held_out_bytes: int | None = None) -> Corpus:
    """The two splits (optionally each cut to its first ``max_*`` bytes, for tiny runs)."""
    root = stdlib_root()
    files = source_files(root)
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    for rel in files:
        blob = (root / rel).read_bytes() + SEPARATOR
        parts[held_out(rel)].append(blob)
    splits = {}
    for key, cap in ((False, max_train_bytes), (True, max_held_out_bytes)):
        blob = b"".join(parts[key])
        digest_full = hashlib.sha256(blob).hexdigest()
        used = blob if cap is None else blob[:cap]
        splits[key] = (torch.frombuffer(bytearray(used), dtype=torch.uint8),
                       {"files": len(parts[key]), "bytes": len(blob), "sha256": digest_full,
                        "bytes_used": len(used)})
    info = {
        "source": "Python standard library sources (*.py under sysconfig stdlib, no test dirs, "
                  "no site-packages); held out: sha256(relative path)[0] < 26",
        "python": sys.version.split()[0],
        "stdlib": str(root),
        "train": splits[False][1],
        "held_out": splits[True][1],
    }
    return Corpus(splits[False][0], splits[True][0], info)
