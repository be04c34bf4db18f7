"""Ending a bench run on SIGTERM (Ctrl-C is Python's KeyboardInterrupt, handled alike).

The handler raises ``Interrupted`` wherever the main thread is, and also sets a flag that
the runner tests before each case and check and the timer before each rep. The exception alone is not
enough: the signal can land in code that swallows it (a library's bare ``except:`` during a
lazy import, a ``__del__``), and the run then went on timing every rep it was given (the
CLI test that signals a run once saw it still timing a minute after SIGTERM).
"""
from __future__ import annotations

import signal
from contextlib import contextmanager


class Interrupted(BaseException):
    """Raised from the signal handler: stop starting cases, report what is done. Not an
    Exception, so that code which turns errors into fallbacks (the tuner) lets it through."""


_requested = False


def _on_signal(signum, frame):
    global _requested
    _requested = True
    raise Interrupted()


def stop_if_requested() -> None:
    """Raise ``Interrupted`` again if a signal came in and its exception was swallowed."""
    if _requested:
        raise Interrupted()


@contextmanager
def stop_on_sigterm():
    """SIGTERM ends the run inside this block; the previous handler is restored after."""
    global _requested
    _requested = False
    old = signal.signal(signal.SIGTERM, _on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        _requested = False
