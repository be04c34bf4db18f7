"""Fig 2 of Kingma & Ba (2015): a multilayer perceptron on MNIST, trained with dropout.

Two fully connected hidden layers of ReLU units (1000 each in the paper and the full
preset), dropout on the input and hidden layers, minibatches of 128: Adam and AdaMax
against AdaGrad, RMSProp, SGD with Nesterov momentum and AdaDelta. The paper finds Adam
converging faster than the others. (Its Fig 2b compares with the sum-of-functions
optimizer SFO, which has no PyTorch implementation; it is left out.)

    python examples/paper/fig2_mlp.py --preset quick [--impl torch] [--out DIR | --regenerate-docs]
"""
from __future__ import annotations

import time

import adampaper
import matplotlib.pyplot as plt  # noqa: E402  (after adampaper: it says what is missing)
from adampaper import DEVICE, data, presets, report
from adampaper.experiment import Run, run_classifier
from adampaper.training import cross_entropy
from torch import nn

FIGURE = "fig2_mlp"
RUNS = [Run(name) for name in ("adagrad", "rmsprop", "sgd_nesterov", "adadelta", "adam", "adamax")]
# The paper does not give its dropout rates; these are the usual ones for MNIST MLPs.
INPUT_DROPOUT, HIDDEN_DROPOUT = 0.2, 0.5


def mlp(hidden: int, dropout: bool) -> nn.Sequential:
    p_in, p_hidden = (INPUT_DROPOUT, HIDDEN_DROPOUT) if dropout else (0.0, 0.0)
    return nn.Sequential(
        nn.Dropout(p_in), nn.Linear(784, hidden), nn.ReLU(),
        nn.Dropout(p_hidden), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Dropout(p_hidden), nn.Linear(hidden, 10),
    )


def main(argv: list[str] | None = None) -> dict:
    args = presets.parse_args("fig2", __doc__, argv)
    s = args.settings
    start = time.perf_counter()
    train, test = (d.to(DEVICE) for d in data.mnist())
    train = train.head(s.n_train)
    runs = {}
    for run in RUNS:
        runs[run.label(False)] = run_classifier(
            run, lambda dropout: mlp(s.hidden, dropout), cross_entropy, train, test, lr=s.lr[run.optimizer],
            impl=args.impl, epochs=s.epochs, seed=s.seed, points_per_epoch=s.points_per_epoch)
        print(f"fig 2  {run.label(False):14s} {runs[run.label(False)]['final_train_loss']:.4f}", flush=True)

    name = report.stem(FIGURE, args.preset, args.impl) + args.suffix
    fig, (ax_all, ax_early) = plt.subplots(1, 2, figsize=(11, 4.3))
    title = f"MNIST MLP 784-{s.hidden}-{s.hidden}-10 + dropout ({len(train)} digits)"
    report.plot_curves(ax_all, runs, title=title)
    report.plot_curves(ax_early, runs, title=f"first {s.early_epochs} epochs", xmax=s.early_epochs)
    report.save_figure(fig, args.out / f"{name}.png", args.preset, args.impl)
    results = {
        "figure": "Fig 2: multilayer perceptron with dropout", "preset": args.preset, "impl": args.impl,
        **report.environment(), "settings": vars(s), "seconds": round(time.perf_counter() - start, 1),
        "data": data.describe("mnist", train, test), "runs": runs,
    }
    report.save_json(args.out / f"{name}.json", results)
    return results


if __name__ == "__main__":
    adampaper.run_script(main, "mnist")
