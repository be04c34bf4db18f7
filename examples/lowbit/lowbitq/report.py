"""Summaries across seeds, the results file, the plot and the Markdown tables."""
from __future__ import annotations

import json
import os
import math
import platform
import statistics
from pathlib import Path

import torch

from . import DEVICE
from .optimizers import BF16_BASELINE, REFERENCE, REGISTRY

BYTES_NOTE = "optimizer state bytes per stepped element, counted from the allocated state tensors"


def environment() -> dict:
    import triton
    import tritonadam

    versions = {"torch": torch.__version__, "triton": triton.__version__, "tritonadam": tritonadam.__version__,
                "python": platform.python_version()}
    for name in ("bitsandbytes", "torchao", "flashoptim"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as e:  # not installed, or fails to import: say so
            versions[name] = f"not available ({type(e).__name__})"
    device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)), Triton interpreter"
    return {"device": device, **versions, "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_gaps(runs: list[dict], baseline: dict[int, dict]) -> list[float]:
    """Each finite run's held-out loss relative to the baseline run of the same seed."""
    return [(r["final_held_out_loss"] - baseline[r["seed"]]["final_held_out_loss"])
            / baseline[r["seed"]]["final_held_out_loss"] for r in runs if r["seed"] in baseline]


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per optimizer: status, mean and std over seeds, and the held-out gap to fp32 AdamW
    (paired by seed: each seed's loss against the reference's of the same seed). Rows
    with bf16 params also get their gap to the bf16 run with fp32 state and the exact
    master (``BF16_BASELINE``): what the state's precision costs, apart from bf16 params."""
    def ok_by_seed(name):
        return {r["seed"]: r for r in runs if r["optimizer"] == name and r["status"] == "ok" and not r["diverged"]}

    ref, bf16_ref = ok_by_seed(REFERENCE), ok_by_seed(BF16_BASELINE)
    out = {}
    for name in dict.fromkeys(r["optimizer"] for r in runs):
        spec, mine = REGISTRY[name], [r for r in runs if r["optimizer"] == name]
        ok = [r for r in mine if r["status"] == "ok"]
        row = {"label": spec.label, "library": spec.library, "param_dtype": str(spec.param_dtype).replace("torch.", ""),
               "state": spec.state, "target": spec.target, "seeds": [r["seed"] for r in mine], "ok_runs": len(ok)}
        if not ok:
            row["status"] = mine[0]["status"]
            row["reason"] = mine[0].get("reason", "")
            out[name] = row
            continue
        row["status"] = "ok" if len(ok) == len(mine) else "partly failed"
        if len(ok) < len(mine):
            row["reason"] = next(r.get("reason", "") for r in mine if r["status"] != "ok")
        finite = [r for r in ok if not r["diverged"]]
        for key in ("final_train_loss", "final_held_out_loss", "state_bytes_per_param", "seconds",
                    "step_ms_median", "first_steps_seconds"):
            row[key] = mean_std([r[key] for r in (finite if "loss" in key else ok)])
        row["param_bytes_per_param"] = ok[0]["param_bytes_per_param"]
        row["diverged"] = sum(r["diverged"] for r in ok)
        gaps = paired_gaps(finite, ref)
        row["held_out_gap"] = mean_std(gaps)
        row["held_out_gap_per_seed"] = gaps
        if spec.param_dtype == torch.bfloat16 and bf16_ref:
            row["held_out_gap_vs_bf16_baseline"] = mean_std(paired_gaps(finite, bf16_ref))
        if spec.target is not None and gaps:
            row["within_target"] = row["held_out_gap"][0] <= spec.target and row["diverged"] == 0
        out[name] = row
    return out


def clean(value):
    """JSON has no NaN or inf: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def save_json(path: Path, results: dict) -> None:
    path.write_text(json.dumps(clean(results), indent=1) + "\n")


# ---------------------------------------------------------------------------- table


def _pm(pair, fmt: str, scale: float = 1.0) -> str:
    m, s = pair
    if m is None or not math.isfinite(m):
        return "–"
    return f"{m * scale:{fmt}} ± {s * scale:{fmt.lstrip('+')}}"


def table(summary: dict[str, dict]) -> str:
    head = ("| optimizer | params | state | state B/param | train loss | held-out loss | held-out vs fp32 AdamW "
            f"| target | bf16 params: vs `{BF16_BASELINE}` | diverged | s per run | ms per step |")
    lines = [head, "|" + "---|" * 12]
    for name, r in summary.items():
        first = f"`{name}`: {r['label']}"
        if r["status"] in ("unavailable", "error"):
            why = r["reason"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {first} | {r['param_dtype']} | {r['state']} | {r['status']}: {why} |" + " |" * 8)
            continue
        target = "–" if r["target"] is None else f"≤ {100 * r['target']:.1f}%"
        if "within_target" in r:
            target += " yes" if r["within_target"] else " **no**"
        gap = "(reference)" if name == REFERENCE else _pm(r["held_out_gap"], "+.2f", 100) + "%"
        if r["status"] != "ok":
            first += f" ({r['ok_runs']} of {len(r['seeds'])} runs; {r['reason']})"
        if name == BF16_BASELINE:
            bf16 = "(bf16 baseline)"
        elif "held_out_gap_vs_bf16_baseline" in r:
            bf16 = _pm(r["held_out_gap_vs_bf16_baseline"], "+.2f", 100) + "%"
        else:
            bf16 = ""
        lines.append(
            f"| {first} | {r['param_dtype']} | {r['state']} | {r['state_bytes_per_param'][0]:.2f} "
            f"| {_pm(r['final_train_loss'], '.4f')} | {_pm(r['final_held_out_loss'], '.4f')} | {gap} | {target} | {bf16} "
            f"| {r['diverged']} of {r['ok_runs']} | {r['seconds'][0]:.1f} | {r['step_ms_median'][0]:.1f} |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The results section of docs/lowbit.md: the command, the setting and a table per task."""
    env = results["environment"]
    out = [f"Command: `{results['command']}` (preset `{results['preset']}`, seeds {results['seeds']}, "
           f"layout `{results['layout']}`); whole sweep {results['wall_seconds'] / 60:.1f} min.",
           "",
           f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, tritonadam {env['tritonadam']}, "
           f"bitsandbytes {env['bitsandbytes']}, torchao {env['torchao']}, flashoptim {env['flashoptim']}; "
           f"Python {env['python']}.", ""]
    for task in results["tasks"].values():
        s = task["settings"]
        out += [f"### {task['title']}", "",
                f"{task['params']:,} parameters ({task['stepped_elements']:,} stepped, padding included); "
                f"{s['steps']} steps of {s['batch']}; AdamW lr {s['lr']:g} (warm-up {s['warmup']:.0%}, cosine to "
                f"{s['final_lr_ratio']:.0%}), betas {tuple(s['betas'])}, eps {s['eps']:g}, weight decay "
                f"{s['weight_decay']:g}. Losses are mean ± std over seeds (nats per "
                f"{'example' if task['name'] == 'mlp' else 'byte'}); the gap is paired by seed.", "",
                table(task["summary"]), ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------- plot

COLORS = {"torch": "black", "ta-fp32": "tab:gray", "ta-bf16state": "tab:olive", "ta-8bit": "tab:red",
          "ta-4bit": "tab:orange", "bnb-8bit": "tab:blue", "ao-8bit": "tab:purple", "ao-4bit": "tab:pink",
          "flash-8bit": "tab:cyan", "ta-bf16-remainder": "tab:brown", "ta-bf16-remainder-8bit": "darkred",
          "ta-bf16-remainder-4bit": "darkorange", "ao-8bit-bf16-sr": "indigo", "flash-bf16-8bit": "teal"}


def _mean_curves(runs: list[dict], key: str, field: str) -> tuple[list[float], list[float]]:
    steps = runs[0][key]["step"] if key == "curve" else [e["step"] for e in runs[0][key]]
    values = []
    for i in range(len(steps)):
        vs = [(r[key]["loss"][i] if key == "curve" else r[key][i][field]) for r in runs
              if (len(r[key]["loss"]) if key == "curve" else len(r[key])) > i]
        values.append(statistics.fmean(vs) if vs else math.nan)
    return steps, values


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from adampaper.report import log_scale  # plain-text labels on a log axis

    tasks = list(results["tasks"].values())
    fig, axes = plt.subplots(2, len(tasks), figsize=(6.2 * len(tasks), 8.2), squeeze=False)
    handles = {}
    for col, task in enumerate(tasks):
        ok = [r for r in task["runs"] if r["status"] == "ok" and not r["diverged"]]
        names = list(dict.fromkeys(r["optimizer"] for r in ok))
        ref_steps, ref_eval = _mean_curves([r for r in ok if r["optimizer"] == REFERENCE], "evals", "held_out") \
            if REFERENCE in names else (None, None)
        for name in names:
            mine = [r for r in ok if r["optimizer"] == name]
            style = dict(color=COLORS.get(name), linestyle="--" if REGISTRY[name].param_dtype == torch.bfloat16 else "-",
                         linewidth=1.3)
            x, y = _mean_curves(mine, "curve", "loss")
            (line,) = axes[0][col].plot(x, y, label=name, **style)
            handles.setdefault(name, line)
            if ref_eval is not None:
                x, y = _mean_curves(mine, "evals", "held_out")
                gap = [100 * (v - r) / r for v, r in zip(y, ref_eval)]
                axes[1][col].plot(x, gap, marker="o", markersize=3, **style)
        axes[0][col].set_title(task["title"], fontsize=9)
        seeds = len(results["seeds"])
        axes[0][col].set_ylabel(f"training loss (minibatch, mean of {seeds} seed{'s' * (seeds > 1)})")
        log_scale(axes[0][col])
        axes[0][col].grid(alpha=0.3, which="both")
        axes[1][col].axhline(0, color="black", linewidth=0.8)
        axes[1][col].set_ylabel("held-out loss vs torch AdamW fp32 (%)")
        axes[1][col].set_xlabel("step")
        axes[1][col].grid(alpha=0.3)
        axes[1][col].set_title("held-out loss gap (mean over seeds; dashed: bf16 params)", fontsize=9)
    fig.legend([handles[n] for n in handles], [handles[n].get_label() for n in handles], loc="lower center",
               ncol=4, fontsize=7.5, frameon=False)
    fig.suptitle(f"8-bit / 4-bit optimizer state, preset {results['preset']}, seeds {results['seeds']} "
                 f"({results['environment']['device']})", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)
