"""Fig 1 of Kingma & Ba (2015): L2-regularised logistic regression, minibatches of 128.

(a) MNIST digits, 10 classes: Adam and AdaMax against SGD with Nesterov momentum and
    AdaGrad. The paper: Adam converges like SGD with momentum, both faster than AdaGrad.
(b) Sparse bag-of-words features (Rotten Tomatoes snippets for the paper's IMDB reviews),
    50% dropout noise on the features: the paper finds AdaGrad far ahead of SGD with
    Nesterov momentum and Adam as fast as AdaGrad.

Adam's and AdaMax's step size decays as α/√t (the paper's schedule for these runs); the
baselines keep theirs.

    python examples/paper/fig1_logreg.py --preset quick [--impl torch] [--out DIR | --regenerate-docs]
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
import adampaper
import matplotlib.pyplot as plt  # noqa: E402  (after adampaper: it says what is missing)
from adampaper import DEVICE, data, presets, report
from adampaper.experiment import Run, run_classifier
from torch import nn

FIGURE = "fig1_logreg"
MNIST_RUNS = [Run("adam", dropout=False, decay=True), Run("adamax", dropout=False, decay=True),
              Run("sgd_nesterov", dropout=False), Run("adagrad", dropout=False)]
BOW_RUNS = [Run("adagrad", dropout=False), Run("adagrad"), Run("rmsprop"), Run("sgd_nesterov"),
            Run("adam", decay=True), Run("adamax", decay=True)]
FEATURE_DROPOUT = 0.5  # the paper's, after Wang & Manning (2013)


class LogisticRegression(nn.Module):
    """Multi-class logistic regression on dense features, starting from zero."""

    def __init__(self, features: int, classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(classes, features))
        self.bias = nn.Parameter(torch.zeros(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class BagOfWordsRegression(nn.Module):
    """Binary logistic regression on word ids, starting from zero.

    Summing the weights of a document's words is the linear layer on its binary
    bag-of-words without the 10,000 zeros. Dropout on the features needs to drop only
    the words present (a dropped zero is still zero), with the kept ones scaled by 2 as
    ``nn.Dropout`` scales them; ``vocab_size`` pads and never counts.
    """

    def __init__(self, vocab_size: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout
        self.words = nn.EmbeddingBag(vocab_size + 1, 1, mode="sum", padding_idx=vocab_size)
        nn.init.zeros_(self.words.weight)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        kept = F.dropout(torch.ones(words.shape, device=words.device), self.dropout, self.training)
        return self.words(words, per_sample_weights=kept) + self.bias


def regularised(loss, l2: float):
    """``loss`` plus (l2 / 2)·‖W‖² on the weights (not the bias)."""
    def loss_fn(model, x, y):
        weights = [p for name, p in model.views().items() if name.endswith("weight")]
        return loss(model(x), y) + 0.5 * l2 * sum(w.square().sum() for w in weights)
    return loss_fn


def binary_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits[:, 0], labels.float())


def main(argv: list[str] | None = None) -> dict:
    args = presets.parse_args("fig1", __doc__, argv)
    s = args.settings
    start = time.perf_counter()
    common = dict(impl=args.impl, seed=s.seed, points_per_epoch=s.points_per_epoch)

    mnist_train, mnist_test = (d.to(DEVICE) for d in data.mnist())
    mnist_train = mnist_train.head(s.mnist_train)
    mnist = {}
    for run in MNIST_RUNS:
        mnist[run.label(False)] = run_classifier(
            run, lambda _: LogisticRegression(784, 10), regularised(F.cross_entropy, s.l2),
            mnist_train, mnist_test, lr=s.lr["mnist_" + run.optimizer], epochs=s.mnist_epochs, **common)
        print(f"fig 1a  {run.label(False):24s} {mnist[run.label(False)]['final_train_loss']:.4f}", flush=True)

    bow_train, bow_test = (d.to(DEVICE) for d in data.rotten_tomatoes(s.vocab_size))
    bow_train = bow_train.head(s.bow_train)
    bow = {}
    for run in BOW_RUNS:
        bow[run.label(True)] = run_classifier(
            run, lambda dropout: BagOfWordsRegression(bow_train.vocab_size, FEATURE_DROPOUT if dropout else 0.0),
            regularised(binary_cross_entropy, s.l2), bow_train, bow_test,
            lr=s.lr["bow_" + run.optimizer], epochs=s.bow_epochs, **common)
        print(f"fig 1b  {run.label(True):24s} {bow[run.label(True)]['final_train_loss']:.4f}", flush=True)

    name = report.stem(FIGURE, args.preset, args.impl) + args.suffix
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(11, 4.3))
    report.plot_curves(ax_a, mnist, title=f"(a) MNIST logistic regression\n({len(mnist_train)} digits)")
    report.plot_curves(ax_b, bow, title=f"(b) bag-of-words logistic regression\n"
                                        f"({len(bow_train)} Rotten Tomatoes snippets, {bow_train.vocab_size} words)")
    report.save_figure(fig, args.out / f"{name}.png", args.preset, args.impl)
    results = {
        "figure": "Fig 1: logistic regression", "preset": args.preset, "impl": args.impl, **report.environment(),
        "settings": vars(s), "seconds": round(time.perf_counter() - start, 1),
        "data": {"mnist": data.describe("mnist", mnist_train, mnist_test),
                 "bag_of_words": data.describe("rotten_tomatoes", bow_train, bow_test)},
        "mnist": mnist, "bag_of_words": bow,
    }
    report.save_json(args.out / f"{name}.json", results)
    return results


if __name__ == "__main__":
    adampaper.run_script(main, "mnist", "rotten_tomatoes")
