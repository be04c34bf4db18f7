"""Per-GPU launch configs for the optimizer kernels: config space, tuner, on-disk cache.

The optimizer asks ``select_config`` once per launch; the first call for a kernel variant
and size bucket decides (built-in default, disk cache, or compiling candidates and timing
them against the default on scratch buffers, each within its budget), later calls are a
dictionary lookup. Tuning keeps the architecture's default unless a challenger beats it,
in interleaved pairs and a confirmation round, by more than ``MIN_MARGIN`` plus the
measured spread (docs/autotune.md). Modes (``TRITONADAM_AUTOTUNE`` or the ``mode``
keyword): ``on`` (default: tune on first use), ``cache-only``, ``off``. CPU and Triton's
interpreter never tune. In a distributed job one rank decides each entry and every rank
uses its choice (see ``select_config``).
"""
from __future__ import annotations

import sys
from typing import Callable

import torch

from .cache import AutotuneCacheWarning, CacheIdentity, DiskCache, entry_key
from .configs import (
    DEFAULTS,
    GPU_DEFAULT,
    INTERPRETER_DEFAULT,
    DefaultRow,
    DeviceInfo,
    LaunchConfig,
    Provenance,
    arch_default,
    candidate_configs,
    config_space,
    size_bucket,
)
from .device import default_config
from .tuner import MIN_MARGIN, MODES, Choice, Measurement, Tuner, TuneResult, ratio_text, resolve_mode

__all__ = [
    "LaunchConfig",
    "DeviceInfo",
    "Provenance",
    "DefaultRow",
    "DEFAULTS",
    "INTERPRETER_DEFAULT",
    "GPU_DEFAULT",
    "MODES",
    "MIN_MARGIN",
    "Measurement",
    "AutotuneCacheWarning",
    "CacheIdentity",
    "DiskCache",
    "Choice",
    "Tuner",
    "TuneResult",
    "default_config",
    "arch_default",
    "config_space",
    "candidate_configs",
    "size_bucket",
    "entry_key",
    "resolve_mode",
    "select_config",
    "choices",
    "format_choices",
    "print_choices",
    "get_tuner",
    "set_tuner",
]

_tuner = Tuner()


def get_tuner() -> Tuner:
    """The process-wide tuner that ``select_config`` uses."""
    return _tuner


def set_tuner(tuner: Tuner) -> Tuner:
    """Replace the process-wide tuner (tests, custom timers); returns the previous one."""
    global _tuner
    old, _tuner = _tuner, tuner
    return old


def select_config(
    key: tuple,
    numel: int,
    device: torch.device,
    make_runner: Callable[[LaunchConfig, int], Callable[[], None]],
    *,
    mode: str | None = None,
    bytes_per_elem: float | None = None,
) -> LaunchConfig:
    """The launch config for one kernel variant and launch size on ``device``.

    ``key`` names the kernel variant and dtypes (a hashable tuple, built by the kernels
    package; stored as strings); ``numel`` is the element count of the launch (bucketed in
    powers of two); ``make_runner(config, numel)`` returns a zero-argument callable that
    launches the kernel once on scratch buffers of ``numel`` elements in all (never the
    user's tensors; ``tritonadam.kernels.scratch.scaled_mix`` spreads them over tensors
    sized like the launch's), for timing, and may offer ``.compile()`` returning the
    compiler's report. It is called only when tuning, with the bucket's representative
    size, possibly capped by the scratch-memory budget.

    Keyword-only:
    ``mode``: "on" | "cache-only" | "off"; None = ``TRITONADAM_AUTOTUNE``, else "on".
    ``bytes_per_elem``: bytes one step moves per element, for GB/s in the cache, the
    scratch-memory cap and how many launches one timing repeats. Persistent grids are
    candidates only past two waves of blocks, with the SM count known
    (``configs.candidate_configs``).

    After the first call for a (key, bucket, device, mode) this is a dictionary lookup.

    Distributed (``torch.distributed`` initialized, more than one rank, GPU devices): the
    first rank to need an entry decides it (cache or timing) and publishes it in the process
    group's key-value store; other ranks wait for it and use it, so every rank launches the
    same config for the same entry. Nothing is paired by call order, so ranks whose launches
    differ (uneven shards, a rank with nothing to step) neither deadlock nor mix up entries,
    and no collective or GPU sync is added. Where the store is unavailable the fallback is a
    broadcast from rank 0, and then every rank must call ``select_config`` for the same
    entries in the same order. CPU devices never tune, so they never communicate.
    """
    return _tuner.select(key, numel, device, make_runner, mode=mode, bytes_per_elem=bytes_per_elem)


def choices() -> list[Choice]:
    """Every decision ``select_config`` made in this process, in order."""
    return _tuner.choices()


def format_choices(items: list[Choice] | None = None, *, tablefmt: str = "simple") -> str:
    """The decisions as a table: the choice and its ms, the default's ms from the same
    pairs, the choice's time ratio to the default (median of the pairs, with its
    inter-quartile range; empty when the default was kept) and the closest other config."""
    from tabulate import tabulate

    items = choices() if items is None else items
    rows = []
    for c in items:
        if c.default is None:
            vs = ""
        elif c.config == c.default:
            vs = "default kept" if c.time_ms is not None else ""
        else:
            vs = ratio_text(c.ratio, c.spread, c.pairs)
        rows.append((
            "|".join(str(k) for k in c.key),
            f"2^{c.bucket}",
            c.device,
            c.config.short(),
            c.source,
            f"{c.time_ms:.4g}" if c.time_ms is not None else "",
            f"{c.gbps:.0f}" if c.gbps is not None else "",
            f"{c.default_ms:.4g}" if c.default_ms is not None and c.config != c.default else "",
            vs,
            c.runner_up or "",
            str(c.untimed) if c.untimed else "",
        ))
    return tabulate(
        rows,
        headers=["key", "n <=", "device", "config", "source", "ms", "GB/s", "default ms", "vs default",
                 "runner-up", "untimed"],
        tablefmt=tablefmt,
    )


def print_choices(file=None) -> None:
    """Print the decisions made in this process as a table."""
    print(format_choices(), file=file or sys.stdout)
