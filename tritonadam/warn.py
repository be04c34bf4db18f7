"""Warnings that point at the user's line, not at ours or at torch's step decorators."""
from __future__ import annotations

import os
import sys
import warnings

import torch

__all__ = ["warn"]

_PACKAGES = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
             os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside this package and torch: the
    user's call (a constructor, however many of our classes' __init__ lie between; a step,
    under torch's decorators)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGES):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
