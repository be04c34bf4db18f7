"""The on-disk cache of tuned configs: readable JSON, one file per GPU + software identity.

A file is only ever *parsed* (``json``), never executed or unpickled, and everything in it
is checked before use: a corrupt, truncated or stale file, or an entry naming a config
outside the known space, is ignored with one warning per file, and the caller re-tunes.
Writers take a lock around read-merge-write and replace the file atomically, so readers
(who do not lock) always see a whole file and concurrent writers never lose each other's
entries.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import stat
import tempfile
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import _env
from .configs import MAX_BUCKET, MIN_BUCKET, LaunchConfig, is_known_config, space_hash

__all__ = [
    "FORMAT",
    "BUNDLE_FORMAT",
    "FORMAT_VERSION",
    "AutotuneCacheWarning",
    "CacheIdentity",
    "DiskCache",
    "ParsedFile",
    "entry_key",
    "default_cache_dir",
]

FORMAT = "tritonadam-autotune"
BUNDLE_FORMAT = "tritonadam-autotune-bundle"
# 2: entries record the decision against the default (incumbent rule, paired ratios and
# their spread, what went untimed); version-1 entries, picked by a strict minimum, lack them.
FORMAT_VERSION = 2
FILE_PREFIX = "tritonadam-autotune-"
# A cache for every key and bucket is a few hundred KiB; anything far larger is not ours.
MAX_FILE_BYTES = 32 * 1024 * 1024


class AutotuneCacheWarning(UserWarning):
    """A cache file could not be used (corrupt, truncated, stale, unwritable)."""


def default_cache_dir() -> Path:
    explicit = _env.cache_dir()
    if explicit:
        return Path(explicit).expanduser()
    try:
        try:
            import platformdirs
        except ImportError:  # minimal images (a GPU box's stock python): the XDG location
            base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tritonadam"
        else:
            base = Path(platformdirs.user_cache_dir("tritonadam"))
    except (RuntimeError, KeyError, OSError) as e:
        # No home directory (a container run as a uid without one, HOME unset): a per-user
        # folder in the temp dir, so tuning still persists across processes.
        user = os.getuid() if hasattr(os, "getuid") else "user"
        base = Path(tempfile.gettempdir()) / f"tritonadam-{user}"
        _warn_once(("no-home",), f"tritonadam autotune: no home directory to cache tuned configs in "
                                 f"({type(e).__name__}: {e}); using {base}. Set TRITONADAM_CACHE_DIR "
                                 "to choose where they go.")
    return base / "autotune"


def entry_key(key: tuple, bucket: int) -> str:
    """The JSON key of one entry: the kernel key's parts joined by '|' plus the bucket."""
    return "|".join(str(k) for k in key) + f"|n<=2^{int(bucket)}"


@dataclass(frozen=True)
class CacheIdentity:
    """What a cache file belongs to. Any field differing makes a file stale."""

    backend: str
    gpu: str
    capability: str
    triton: str
    kernel_source_hash: str
    config_space_hash: str

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(obj) -> "CacheIdentity | None":
        if not isinstance(obj, dict):
            return None
        fields = CacheIdentity.__dataclass_fields__
        if set(obj) != set(fields) or not all(isinstance(obj[f], str) for f in fields):
            return None
        return CacheIdentity(**obj)

    def filename(self) -> str:
        import hashlib

        slug = re.sub(r"[^A-Za-z0-9.]+", "-", self.gpu).strip("-").lower() or "gpu"
        cap = re.sub(r"[^A-Za-z0-9.]+", "-", self.capability)
        ver = re.sub(r"[^A-Za-z0-9.+]+", "-", self.triton)
        digest = hashlib.sha256(
            json.dumps(self.to_json(), sort_keys=True).encode()
        ).hexdigest()[:12]
        return f"{FILE_PREFIX}{slug}-{self.backend}{cap}-triton{ver}-{digest}.json"

    def describe(self) -> str:
        return (
            f"{self.gpu} ({self.backend} {self.capability}), triton {self.triton}, "
            f"kernels {self.kernel_source_hash}, configs {self.config_space_hash}"
        )


def _finite_pos(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _finite_nonneg(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def _count(x) -> bool:
    return type(x) is int and x >= 0


def _config_problem(obj, backend: str, what: str) -> str | None:
    cfg = LaunchConfig.from_json(obj)
    if cfg is None or not is_known_config(cfg, backend):
        return f"unknown {what} {obj!r}"
    return None


def _comparison_problem(obj, what: str) -> str | None:
    """A ratio to the default with its spread and pair count, as the tuner writes them."""
    if not _finite_pos(obj.get("ratio")):
        return f"bad {what} ratio"
    if "spread" not in obj or obj["spread"] is not None and not _finite_nonneg(obj["spread"]):
        return f"bad {what} spread"  # the tuner always writes it (None: too few pairs)
    if not _count(obj.get("pairs")):
        return f"bad {what} pairs"
    return None


def validate_entry(name: str, entry, backend: str) -> str | None:
    """None if ``entry`` is usable, else why not."""
    if not isinstance(entry, dict):
        return "not an object"
    key, bucket = entry.get("key"), entry.get("bucket")
    if not isinstance(key, list) or not all(isinstance(k, str) for k in key):
        return "bad key"
    if type(bucket) is not int or not MIN_BUCKET <= bucket <= MAX_BUCKET:
        return "bad bucket"
    if entry_key(tuple(key), bucket) != name:
        return "name does not match key and bucket"
    if not isinstance(entry.get("space"), str):
        return "no config-space id"
    why = _config_problem(entry.get("config"), backend, "config")
    if why:
        return why
    if not _finite_pos(entry.get("time_ms")):
        return "bad time_ms"
    gbps = entry.get("gbps")
    if gbps is not None and not _finite_pos(gbps):
        return "bad gbps"
    d = entry.get("default")
    if not isinstance(d, dict):
        return "no default measurement"
    why = _config_problem(d.get("config"), backend, "default config")
    if why:
        return why
    if not _finite_pos(d.get("time_ms")) or not _count(d.get("pairs")):
        return "bad default measurement"
    vs = entry.get("vs_default")
    if vs is not None:
        if not isinstance(vs, dict):
            return "bad vs_default"
        why = _comparison_problem(vs, "vs_default")
        if why:
            return why
    ru = entry.get("runner_up")
    if ru is not None:
        if not isinstance(ru, dict):
            return "bad runner_up"
        why = _config_problem(ru.get("config"), backend, "runner-up config") or _comparison_problem(ru, "runner_up")
        if why:
            return why
        if not _finite_pos(ru.get("time_ms")):
            return "bad runner_up time_ms"
    dec = entry.get("decision")
    if not isinstance(dec, dict) or not isinstance(dec.get("reason"), str) or type(dec.get("kept_default")) is not bool:
        return "no decision"
    if dec.get("noise") is not None and not _finite_nonneg(dec.get("noise")):
        return "bad noise"
    if not _finite_nonneg(dec.get("min_margin")):
        return "bad min_margin"
    if entry.get("measured") is not None and not isinstance(entry.get("measured"), dict):
        return "bad measured"
    untimed = entry.get("untimed")
    if not isinstance(untimed, list) or not all(
        isinstance(u, dict) and isinstance(u.get("why"), str) and LaunchConfig.from_json(u.get("config")) is not None
        for u in untimed
    ):
        return "bad untimed list"
    return None


@dataclass
class ParsedFile:
    """A cache file after checking: its identity (None if unreadable), its usable entries
    and, if anything was wrong, what."""

    path: Path
    identity: CacheIdentity | None
    entries: dict
    problem: str | None = None


def _parse_file_obj(obj, expect: CacheIdentity | None) -> tuple[CacheIdentity | None, dict, str | None]:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        return None, {}, "not a tritonadam autotune cache"
    if obj.get("format_version") != FORMAT_VERSION:
        return None, {}, f"stale: format version {obj.get('format_version')!r}, this tritonadam writes {FORMAT_VERSION}"
    ident = CacheIdentity.from_json(obj.get("identity"))
    if ident is None:
        return None, {}, "malformed identity"
    if expect is not None and ident != expect:
        diff = [
            f"{f} {getattr(ident, f)!r} != {getattr(expect, f)!r}"
            for f in CacheIdentity.__dataclass_fields__
            if getattr(ident, f) != getattr(expect, f)
        ]
        return ident, {}, "stale: " + "; ".join(diff)
    if ident.backend not in ("cuda", "hip"):
        return ident, {}, f"unknown backend {ident.backend!r}"
    if ident.config_space_hash != space_hash(ident.backend):
        return ident, {}, "stale: written for another config space"
    raw = obj.get("entries")
    if not isinstance(raw, dict):
        return ident, {}, "entries missing"
    good, bad = {}, []
    for name, entry in raw.items():
        why = validate_entry(name, entry, ident.backend)
        if why is None:
            good[name] = entry
        else:
            bad.append(f"{name}: {why}")
    problem = None
    if bad:
        shown = "; ".join(bad[:3]) + (f"; ... {len(bad) - 3} more" if len(bad) > 3 else "")
        problem = f"{len(bad)} invalid entr{'y' if len(bad) == 1 else 'ies'} ignored ({shown})"
    return ident, good, problem


def _read_json(path: Path):
    """Parse ``path`` as JSON; raise ValueError (with the reason) for anything unusable."""
    # Opened without blocking and checked before reading: a FIFO (or a link to one) at the
    # path would block the first step forever.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"corrupt or truncated ({type(e).__name__}: {e})") from None


_warned: set = set()
_warned_lock = threading.Lock()


def _warn_once(tag, message: str) -> None:
    with _warned_lock:
        if tag in _warned:
            return
        _warned.add(tag)
    warnings.warn(message, AutotuneCacheWarning, stacklevel=4)


def _stat_sig(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


_umask: int | None = None


def _file_mode() -> int:
    """What ``open()`` gives a new file (0o666 less the umask), read once per process:
    mkstemp's 0o600 would lock other users out of a shared cache directory."""
    global _umask
    if _umask is None:
        try:  # Linux says it without setting it (setting it races other threads' files)
            with open("/proc/self/status", encoding="ascii") as f:
                _umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
        except (OSError, StopIteration, ValueError, IndexError):
            _umask = os.umask(0o022)
            os.umask(_umask)
    return 0o666 & ~_umask


def _atomic_write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_part_prefix(path), suffix=".part")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _part_prefix(path: Path) -> str:
    return ".tmp-" + path.name + "."


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


class DiskCache:
    """Tuned configs on disk under ``directory`` (default: ``$TRITONADAM_CACHE_DIR``, else the
    user's cache directory; resolved on each use so the environment can change)."""

    def __init__(self, directory: str | os.PathLike | None = None, *, lock_timeout_s: float = 60.0):
        self._directory = Path(directory) if directory is not None else None
        self.lock_timeout_s = lock_timeout_s
        self._memo: dict = {}
        self._mutex = threading.Lock()
        # Directories a write failed in (unwritable, full, a lock held by a stopped
        # process): not tried again by this process, so no later entry waits out the
        # lock's timeout again; choices stay in memory, as the warning says.
        self._given_up: set = set()

    @property
    def directory(self) -> Path:
        return self._directory if self._directory is not None else default_cache_dir()

    def path(self, identity: CacheIdentity) -> Path:
        return self.directory / identity.filename()

    def files(self) -> list[Path]:
        d = self.directory
        if not d.is_dir():
            return []
        return sorted(p for p in d.glob(FILE_PREFIX + "*.json") if p.is_file())

    # -- reading ------------------------------------------------------------------------

    def read(self, path: Path, expect: CacheIdentity | None = None) -> ParsedFile:
        """Parse and check one file (no warning; see ``load`` for the warning path)."""
        try:
            obj = _read_json(path)
        except FileNotFoundError:
            return ParsedFile(path, None, {}, None)
        except (OSError, ValueError) as e:
            return ParsedFile(path, None, {}, str(e))
        ident, entries, problem = _parse_file_obj(obj, expect)
        return ParsedFile(path, ident, entries, problem)

    def load(self, identity: CacheIdentity) -> dict:
        """The usable entries of ``identity``'s file ({} if none). Warns once per bad file."""
        path = self.path(identity)
        sig = _stat_sig(path)
        if sig is None:
            return {}
        with self._mutex:
            memo = self._memo.get(path)
            if memo is not None and memo[0] == sig and memo[1] == identity:
                return memo[2]
        parsed = self.read(path, identity)
        if parsed.problem:
            self._warn(path, sig, parsed.problem)
        with self._mutex:
            self._memo[path] = (sig, identity, parsed.entries)
        return parsed.entries

    def lookup(self, identity: CacheIdentity, name: str, space: str) -> dict | None:
        entry = self.load(identity).get(name)
        if entry is None or entry.get("space") != space:
            # Tuned over another list or under other pruning rules.
            return None
        return entry

    def _warn(self, path: Path, sig, problem: str) -> None:
        _warn_once(
            (str(path), sig),
            f"tritonadam autotune cache {path}: {problem}. Ignoring it: affected launch configs "
            "are re-tuned (or built-in defaults used) and the file is rewritten on the next save.",
        )

    # -- writing ------------------------------------------------------------------------

    def _lock(self, path: Path):
        from filelock import FileLock

        return FileLock(str(path) + ".lock", timeout=self.lock_timeout_s)

    def store(self, identity: CacheIdentity, name: str, entry: dict) -> bool:
        """Merge one entry into ``identity``'s file. False (with a warning) if it could not."""
        return self.store_many(identity, {name: entry})

    def store_many(self, identity: CacheIdentity, new_entries: dict) -> bool:
        path = None
        try:
            path = self.path(identity)
            if path.parent in self._given_up:
                return False
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock(path):
                # Writers write under this lock: a part file now is one a killed writer left.
                for part in path.parent.glob(_part_prefix(path) + "*.part"):
                    part.unlink(missing_ok=True)
                # Re-read under the lock: another process may have added entries since we
                # last looked, and we must keep them.
                current = self.read(path, identity)
                if current.problem:
                    self._warn(path, _stat_sig(path), current.problem)
                entries = dict(current.entries)
                entries.update(new_entries)
                _atomic_write_json(
                    path,
                    {
                        "format": FORMAT,
                        "format_version": FORMAT_VERSION,
                        "identity": identity.to_json(),
                        "updated": _now(),
                        "entries": entries,
                    },
                )
        except Exception as e:  # unwritable dir, lock timeout, full disk: tuning still counts
            if path is not None:
                self._given_up.add(path.parent)
            _warn_once(
                ("write", str(path.parent) if path is not None else None),
                f"tritonadam autotune: could not write the cache {path} ({type(e).__name__}: {e}); "
                "tuned configs are kept in memory for this process only.",
            )
            return False
        with self._mutex:
            self._memo.pop(path, None)
        return True

    # -- whole-cache operations (CLI) ---------------------------------------------------

    def clear(self) -> int:
        """Delete every cache file (and its lock) in the directory; return how many files."""
        n = 0
        for p in self.files():
            try:
                p.unlink()
                n += 1
            except OSError:
                pass
        d = self.directory
        if d.is_dir():
            for p in list(d.glob(FILE_PREFIX + "*.json.lock")) + list(d.glob(".tmp-" + FILE_PREFIX + "*")):
                try:
                    p.unlink()
                except OSError:
                    pass
        with self._mutex:
            self._memo.clear()
        return n

    def export_bundle(self, dest: str | os.PathLike) -> tuple[int, list[str]]:
        """Write every usable file of the directory into one JSON bundle at ``dest``.

        Returns (entries exported, notes about files left out)."""
        files, notes, count = [], [], 0
        for p in self.files():
            parsed = self.read(p)
            if parsed.identity is None or (parsed.problem and not parsed.entries):
                notes.append(f"skipped {p.name}: {parsed.problem}")
                continue
            if parsed.problem:
                notes.append(f"{p.name}: {parsed.problem}")
            files.append({"identity": parsed.identity.to_json(), "entries": parsed.entries})
            count += len(parsed.entries)
        _atomic_write_json(
            Path(dest).resolve(),
            {"format": BUNDLE_FORMAT, "format_version": FORMAT_VERSION, "exported": _now(), "files": files},
        )
        return count, notes

    def import_file(self, src: str | os.PathLike) -> tuple[int, list[str]]:
        """Merge a bundle (from ``export``) or a single cache file into the directory.

        Every file and entry is checked as if read from the cache; what fails is skipped and
        named in the returned notes. Imported entries replace local ones with the same key.
        Raises ValueError if ``src`` is not a tritonadam cache or bundle at all.
        """
        obj = _read_json(Path(src))
        if isinstance(obj, dict) and obj.get("format") == BUNDLE_FORMAT:
            if obj.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"bundle format version {obj.get('format_version')!r}; expected {FORMAT_VERSION}")
            parts = obj.get("files")
            if not isinstance(parts, list):
                raise ValueError("bundle has no 'files' list")
            parts = [
                {"format": FORMAT, "format_version": FORMAT_VERSION, **p} if isinstance(p, dict) else p
                for p in parts
            ]
        elif isinstance(obj, dict) and obj.get("format") == FORMAT:
            parts = [obj]
        else:
            raise ValueError("not a tritonadam autotune cache file or export bundle")
        total, notes = 0, []
        for i, part in enumerate(parts):
            ident, entries, problem = _parse_file_obj(part, None)
            label = ident.describe() if ident else f"file #{i + 1}"
            if problem:
                notes.append(f"{label}: {problem}")
            if ident is None or not entries:
                continue
            if self.store_many(ident, entries):
                total += len(entries)
                notes.append(f"{label}: imported {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
            else:
                notes.append(f"{label}: could not write {self.path(ident)}")
        return total, notes
