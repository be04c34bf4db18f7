"""Every environment switch the optimizer and the autotuner read, in one place (the
bench's own, ``TRITONADAM_COMMIT`` and ``TRITONADAM_BENCH_NO_SMI``, are read where it uses them).

Values are read when asked for (not cached at import) so tests and launch scripts can
change them between runs.
"""
from __future__ import annotations

import os


def _flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def _triton_bool(name: str, default: bool) -> bool:
    """``name`` read as Triton's ``getenv_bool`` reads it: ``1``, ``true``, ``on``, ``yes``,
    ``y`` in any case are on, anything else set (``2``, a padded ``" 1"``, empty) off."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value.lower() in ("1", "true", "on", "yes", "y")


def interpret() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``), read
    as Triton reads it, so both agree on it (with ``2`` Triton compiles for the GPU).

    Triton decides this when a kernel is decorated, so it must be set before
    ``tritonadam`` is imported.
    """
    return _triton_bool("TRITON_INTERPRET", False)


def fp_fusion() -> bool:
    """FMA contraction for tritonadam's launches: on, unless ``TRITON_FORCE_DISABLE_FP_FUSION``
    or ``TRITON_DEFAULT_FP_FUSION`` (Triton's own switches) turn it off, read as Triton
    reads them so both agree on what is set."""
    return not _triton_bool("TRITON_FORCE_DISABLE_FP_FUSION", False) and _triton_bool(
        "TRITON_DEFAULT_FP_FUSION", True)


def autotune_mode() -> str | None:
    """``TRITONADAM_AUTOTUNE``: ``off`` | ``on`` (tune on first use) | ``cache-only``; None = unset."""
    value = os.environ.get("TRITONADAM_AUTOTUNE")
    if value is None or value.strip() == "":
        return None
    return value.strip().lower()


def _seconds(name: str) -> float | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected a number of seconds") from None
    if not 0 <= seconds < float("inf"):  # also refuses NaN
        raise ValueError(f"{name}={value!r}: expected a finite number of seconds >= 0")
    return seconds


def autotune_budget_s() -> float | None:
    """``TRITONADAM_AUTOTUNE_BUDGET``: seconds first-use tuning may spend timing configs per
    key (compiling them is not counted); None = default."""
    return _seconds("TRITONADAM_AUTOTUNE_BUDGET")


def autotune_compile_budget_s() -> float | None:
    """``TRITONADAM_AUTOTUNE_COMPILE_BUDGET``: seconds first-use tuning may spend compiling
    candidate configs per key, before timing starts; None = default."""
    return _seconds("TRITONADAM_AUTOTUNE_COMPILE_BUDGET")


def autotune_verbose() -> bool:
    """``TRITONADAM_AUTOTUNE_VERBOSE=1``: print what the tuner does and chooses."""
    return _flag("TRITONADAM_AUTOTUNE_VERBOSE")


def cache_dir() -> str | None:
    """``TRITONADAM_CACHE_DIR``: where tuned configs live; None = the user's cache directory."""
    value = os.environ.get("TRITONADAM_CACHE_DIR")
    return value or None
