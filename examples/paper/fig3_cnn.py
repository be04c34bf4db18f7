"""Fig 3 of Kingma & Ba (2015): a convolutional network, with and without dropout.

The paper's c64-c64-c128-1000 network (three stages of 5x5 convolutions, ReLU and 3x3 max
pooling with stride 2, then 1000 ReLU units; dropout on the input and the fully connected
layer; whitened input) trains on CIFAR-10, which no package ships: here it trains on the
MNIST digits (standardised), with narrower layers in the quick preset. The paper: Adam and
AdaGrad lower the cost fastest at first, then Adam and SGD with Nesterov momentum overtake
AdaGrad; Adam is marginally better than SGD with momentum.

    python examples/paper/fig3_cnn.py --preset quick [--impl torch] [--out DIR | --regenerate-docs]
"""
from __future__ import annotations

import time
from dataclasses import replace

import adampaper
import matplotlib.pyplot as plt  # noqa: E402  (after adampaper: it says what is missing)
from adampaper import DEVICE, data, presets, report
from adampaper.experiment import Run, run_classifier
from adampaper.training import cross_entropy
from torch import nn

FIGURE = "fig3_cnn"
RUNS = [Run(name, dropout) for name in ("adagrad", "sgd_nesterov", "adam", "adamax") for dropout in (False, True)]
# The paper does not give its dropout rates; these are the usual ones.
INPUT_DROPOUT, HIDDEN_DROPOUT = 0.2, 0.5


def cnn(channels: tuple[int, int, int], hidden: int, dropout: bool) -> nn.Sequential:
    p_in, p_hidden = (INPUT_DROPOUT, HIDDEN_DROPOUT) if dropout else (0.0, 0.0)
    layers: list[nn.Module] = [nn.Unflatten(1, (1, 28, 28)), nn.Dropout(p_in)]
    width = 1
    for c in channels:  # 28x28 -> 14x14 -> 7x7 -> 4x4
        layers += [nn.Conv2d(width, c, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1)]
        width = c
    layers += [nn.Flatten(), nn.Linear(width * 4 * 4, hidden), nn.ReLU(), nn.Dropout(p_hidden),
               nn.Linear(hidden, 10)]
    return nn.Sequential(*layers)


def standardised(train: data.Dataset, test: data.Dataset) -> tuple[data.Dataset, data.Dataset]:
    """Pixels shifted and scaled by the training set's mean and deviation (the paper
    whitens CIFAR-10's colour images; for grey digits this is the simple analogue)."""
    mean, std = train.inputs.mean(), train.inputs.std()
    return tuple(replace(d, inputs=(d.inputs - mean) / std) for d in (train, test))


def main(argv: list[str] | None = None) -> dict:
    args = presets.parse_args("fig3", __doc__, argv)
    s = args.settings
    start = time.perf_counter()
    train, test = standardised(*(d.to(DEVICE) for d in data.mnist()))
    train = train.head(s.n_train)
    runs = {}
    for run in RUNS:
        runs[run.label(True)] = run_classifier(
            run, lambda dropout: cnn(tuple(s.channels), s.hidden, dropout), cross_entropy, train, test,
            lr=s.lr[run.optimizer], impl=args.impl, epochs=s.epochs, seed=s.seed,
            points_per_epoch=s.points_per_epoch)
        print(f"fig 3  {run.label(True):20s} {runs[run.label(True)]['final_train_loss']:.4f}", flush=True)

    name = report.stem(FIGURE, args.preset, args.impl) + args.suffix
    fig, (ax_early, ax_all) = plt.subplots(1, 2, figsize=(11, 4.3))
    net = "c{}-c{}-c{}-{}".format(*s.channels, s.hidden)
    report.plot_curves(ax_early, runs, title=f"CNN {net}, first {s.early_epochs} epochs", xmax=s.early_epochs)
    report.plot_curves(ax_all, runs, title=f"CNN {net} on {len(train)} MNIST digits (CIFAR-10 in the paper)")
    report.save_figure(fig, args.out / f"{name}.png", args.preset, args.impl)
    results = {
        "figure": "Fig 3: convolutional network", "preset": args.preset, "impl": args.impl,
        **report.environment(), "settings": vars(s), "seconds": round(time.perf_counter() - start, 1),
        "data": data.describe("mnist", train, test, stands_in_for="CIFAR-10 (50,000 colour images in the paper)"),
        "runs": runs,
    }
    report.save_json(args.out / f"{name}.json", results)
    return results


if __name__ == "__main__":
    adampaper.run_script(main, "mnist")
