"""One training run: a task, an optimizer, a seed; from a fresh model to its record."""
from __future__ import annotations

import math
import statistics
import time

import torch

from . import DEVICE, memory, optimizers
from .optimizers import HyperParams, Spec
from .tasks import Task


def sync() -> None:
    """Waits for the GPU (step times on a GPU would otherwise be launch times)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def lr_at(step: int, steps: int, lr: float, warmup: int, final_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``final_ratio * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def blow_up(losses: list[float], initial: float, window: int) -> str | None:
    """Why a run counts as diverged, or None. A loss that is not finite; or, after the
    first 10% of steps, a mean over ``window`` steps more than 10% above the loss at
    initialisation (a run that trains does not climb back above where it started; one
    that stalls near it is slow, not diverged)."""
    if losses and not math.isfinite(losses[-1]):
        return f"non-finite loss at step {len(losses)}"
    start = max(window, len(losses) // 10)
    for end in range(start, len(losses) + 1, max(1, window // 2)):
        mean = sum(losses[end - window:end]) / window
        if mean > 1.1 * initial:
            return f"mean loss {mean:.4g} over steps {end - window + 1}-{end} > 1.1 x initial {initial:.4g}"
    return None


def binned(values: list[float], bins: int) -> dict[str, list[float]]:
    """Mean of ``values`` over ``bins`` equal spans of steps, at each span's last step."""
    n = len(values)
    width = max(1, math.ceil(n / bins))
    steps, means = [], []
    for start in range(0, n, width):
        chunk = values[start:start + width]
        steps.append(start + len(chunk))
        means.append(sum(chunk) / len(chunk))
    return {"step": steps, "loss": means}


def run(task: Task, spec: Spec, seed: int, settings: dict, layout: str, pad_multiple: int = 1024) -> dict:
    """Trains ``task``'s model from ``seed`` with ``spec`` and returns the run's record
    (``status`` "ok", "unavailable" or "error")."""
    hp = HyperParams(settings["lr"], tuple(settings["betas"]), settings["eps"], settings["weight_decay"])
    steps = settings["steps"]
    record = {"optimizer": spec.name, "seed": seed, "status": "ok"}
    start = time.perf_counter()
    model = task.make_model(seed, spec.param_dtype, layout, pad_multiple)
    torch.manual_seed(seed)  # what draws from the global generator (torchao's stochastic rounding) starts here
    try:
        opt = optimizers.build(spec, model.params, hp, seed)
    except optimizers.Unavailable as e:
        return {**record, "status": "unavailable", "reason": str(e)}
    initial = task.evaluate(model)
    batches, noise = task.batches(seed), task.noise(seed)
    losses, step_seconds, evals = [], [], [{"step": 0, **initial}]
    eval_every = max(1, steps // settings["eval_points"])
    warmup = round(settings["warmup"] * steps)
    try:
        for step in range(steps):
            optimizers.set_lr(opt, lr_at(step, steps, hp.lr, warmup, settings["final_lr_ratio"]))
            x, y = next(batches)
            loss = task.loss(model, x, y, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            step_seconds.append(time.perf_counter() - t0)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                break
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                evals.append({"step": step + 1, **task.evaluate(model)})
    except Exception as e:  # an optimizer that builds but cannot step this model: record it, go on
        return {**record, "status": "error", "reason": f"{type(e).__name__}: {e}", "steps_done": len(losses)}
    final = task.evaluate(model) if math.isfinite(losses[-1]) else {"train": math.nan, "held_out": math.nan}
    reason = blow_up(losses, initial["train"], settings["divergence_window"])
    if reason is None and not all(math.isfinite(v) for v in final.values()):
        reason = "non-finite loss after training"
    state = memory.state_bytes(opt)
    elem = model.params[0].element_size()
    return {
        **record,
        "initial": initial, "final_train_loss": final["train"], "final_held_out_loss": final["held_out"],
        "diverged": reason is not None, "divergence": reason,
        "state_bytes": state["bytes"], "state_bytes_per_param": state["bytes"] / model.stepped_numel,
        "state_layout": state["by_key"], "param_bytes_per_param": elem,
        "params": model.numel, "stepped_elements": model.stepped_numel,
        "seconds": time.perf_counter() - start,
        "first_steps_seconds": sum(step_seconds[:3]),
        "step_ms_median": 1e3 * statistics.median(step_seconds[3:] or step_seconds),
        "curve": binned(losses, settings["curve_bins"]), "evals": evals,
    }
