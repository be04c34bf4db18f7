"""Results files and plots: ``<figure>_<preset>[_torch].json`` and ``.png`` in the output folder."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import tritonadam  # noqa: E402

from . import DEVICE  # noqa: E402

COLORS = {"adam": "tab:red", "adamax": "tab:purple", "sgd_nesterov": "tab:blue",
          "adagrad": "tab:green", "rmsprop": "tab:orange", "adadelta": "tab:brown"}


def stem(figure: str, preset: str, impl: str) -> str:
    """The results' file name without extension."""
    return f"{figure}_{preset}" + ("_torch" if impl == "torch" else "")


def commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes to tracked files outside
    ``docs/``, where results are written), or ``TRITONADAM_COMMIT`` where there is no git
    (an exported tree), else "unknown"."""
    root = Path(__file__).resolve().parents[3]
    try:
        run = dict(cwd=root, capture_output=True, text=True, timeout=30, check=True)
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no",
                                "--", ".", ":(exclude)docs"], **run).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("TRITONADAM_COMMIT", "unknown")


def environment() -> dict[str, str]:
    """Where the results came from, for the results file."""
    if DEVICE.type == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({platform.processor() or platform.machine()}), Triton interpreter"
    return {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "tritonadam": tritonadam.__version__, "commit": commit()}


def caption(preset: str, impl: str) -> str:
    """What every plot states: the preset and who stepped Adam/AdaMax."""
    where = "GPU" if DEVICE.type == "cuda" else "CPU, Triton interpreter"
    adam = "tritonadam" if impl == "tritonadam" else "torch.optim"
    return f"preset: {preset} | Adam/AdaMax: {adam} ({where}) | baselines: torch.optim"


def save_json(path: Path, results: dict[str, Any]) -> None:
    """Writes ``results``; non-finite numbers become null (JSON has no NaN)."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(results), indent=1) + "\n")


def plot_curves(ax: plt.Axes, runs: dict[str, dict[str, Any]], *, title: str, xmax: float | None = None) -> None:
    """Training-cost curves on a log scale, from the cost before training at epoch 0.
    A run's ``optimizer`` picks its colour; runs without dropout are dashed when the
    panel has runs with dropout too."""
    mixed = len({run["dropout"] for run in runs.values()}) > 1
    for label, run in runs.items():
        x = [0.0] + run["curve"]["epoch"]
        y = [run["initial_train_loss"]] + run["curve"]["loss"]
        if xmax is not None:
            x, y = zip(*[(e, v) for e, v in zip(x, y) if e <= xmax + 1e-9])
        ax.plot(x, y, color=COLORS[run["optimizer"]], linestyle="--" if mixed and not run["dropout"] else "-",
                label=label, linewidth=1.4)
    log_scale(ax)
    ax.set_xlabel("iterations over the training set (epochs)")
    ax.set_ylabel("training cost")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def log_scale(ax: plt.Axes) -> None:
    """A log y axis (call after plotting) labelled in plain text, with 2, 3 and 5 times
    the powers of ten labelled too when it spans less than two decades. (matplotlib's
    default labels are mathtext, whose parsing takes most of a small figure's drawing
    time.)"""
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    narrow = high / low < 100

    def minor(value: float, _pos) -> str:
        mantissa = round(value / 10 ** math.floor(math.log10(value)))
        return f"{value:g}" if narrow and mantissa in (2, 3, 5) else ""

    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _pos: f"{value:g}"))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(minor))


def save_figure(fig: plt.Figure, path: Path, preset: str, impl: str) -> None:
    fig.text(0.5, 0.005, caption(preset, impl), ha="center", va="bottom", fontsize=8, color="0.3")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
