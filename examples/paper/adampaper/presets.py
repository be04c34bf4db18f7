"""Command line and sizes of every figure's presets.

``smoke`` checks the code paths in seconds (CI); ``quick`` shows each figure's result on
a 2-core CPU in Triton's interpreter in a few minutes (the committed plots); ``full`` is
the paper's sizes, for a GPU. As the paper takes the best step size of a grid, each
optimizer's was picked from powers of ten and three times them by the training cost at
the end of a quick run (full-preset runs use the same; ``--lr NAME=VALUE`` overrides one).

Output: ``--out DIR``, by default a new temporary folder whose path the script prints;
only ``--regenerate-docs`` writes the committed copies in ``docs/paper/`` (the quick
preset's, with tritonadam).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from types import SimpleNamespace

from .optimizers import IMPLS

DOCS = Path(__file__).resolve().parents[3] / "docs" / "paper"
PRESETS: dict[str, dict[str, dict]] = {
    "fig1": {
        "smoke": dict(seed=0, points_per_epoch=1, l2=1e-4, vocab_size=10_000, mnist_train=256, mnist_epochs=2,
                      bow_train=512, bow_epochs=2),
        "quick": dict(seed=0, points_per_epoch=2, l2=1e-4, vocab_size=10_000, mnist_train=None, mnist_epochs=15,
                      bow_train=None, bow_epochs=10),
        # The paper's lengths; it used all of MNIST's and IMDB's training sets.
        "full": dict(seed=0, points_per_epoch=2, l2=1e-4, vocab_size=10_000, mnist_train=None, mnist_epochs=45,
                     bow_train=None, bow_epochs=160),
    },
    "fig2": {
        "smoke": dict(seed=0, points_per_epoch=1, n_train=512, hidden=16, epochs=3, early_epochs=1),
        "quick": dict(seed=0, points_per_epoch=4, n_train=None, hidden=256, epochs=10, early_epochs=3),
        "full": dict(seed=0, points_per_epoch=1, n_train=None, hidden=1000, epochs=200, early_epochs=10),
    },
    "fig3": {
        "smoke": dict(seed=0, points_per_epoch=1, n_train=384, channels=(4, 4, 8), hidden=16, epochs=2,
                      early_epochs=1),
        "quick": dict(seed=0, points_per_epoch=4, n_train=None, channels=(16, 16, 32), hidden=64, epochs=5,
                      early_epochs=2),
        "full": dict(seed=0, points_per_epoch=4, n_train=None, channels=(64, 64, 128), hidden=1000, epochs=45,
                     early_epochs=3),
    },
    "fig4": {
        "smoke": dict(seed=0, n_train=256, hidden=8, latent=2, beta1=(0.9,), beta2=(0.9999,),
                      log10_lr=(-3.0, -1.0), budgets=(1, 2)),
        # One epoch is 32 steps here, ~470 in the paper: budgets are far shorter than its 10 and
        # 100 epochs, and the net far smaller (500 hidden units, 50 latent in the paper).
        "quick": dict(seed=0, n_train=None, hidden=40, latent=10, beta1=(0.0, 0.9), beta2=(0.99, 0.999, 0.9999),
                      log10_lr=(-5.0, -4.0, -3.0, -2.0, -1.0), budgets=(1, 3)),
        "full": dict(seed=0, n_train=None, hidden=500, latent=50, beta1=(0.0, 0.9), beta2=(0.99, 0.999, 0.9999),
                     log10_lr=(-5.0, -4.5, -4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0), budgets=(10, 100)),
    },
}
# Step sizes per optimizer (fig 1: per panel), the same in every preset of a figure.
LR = {
    "fig1": dict(mnist_adam=0.3, mnist_adamax=0.1, mnist_sgd_nesterov=0.3, mnist_adagrad=0.3,
                 bow_adam=0.3, bow_adamax=3.0, bow_sgd_nesterov=0.3, bow_adagrad=0.3, bow_rmsprop=0.01),
    "fig2": dict(adam=3e-3, adamax=1e-2, sgd_nesterov=0.1, adagrad=0.03, rmsprop=3e-3, adadelta=3.0),
    "fig3": dict(adam=3e-3, adamax=3e-3, sgd_nesterov=0.03, adagrad=0.01),
}


def parse_args(figure: str, doc: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The scripts' shared options; ``args.settings`` holds the chosen preset's sizes
    (with ``--lr`` overrides applied to ``settings.lr``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS[figure]), default="quick")
    parser.add_argument("--impl", choices=IMPLS, default="tritonadam",
                        help="who steps Adam and AdaMax (the baselines are always torch.optim)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="folder for the .png and .json (default: a new temporary folder)")
    where.add_argument("--regenerate-docs", action="store_true",
                       help=f"write the committed copies in {DOCS} (they are the quick preset's, with tritonadam)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the initial weights, the minibatch order and the dropout masks "
                             "(default: the preset's, 0; the data split stays); another one names its "
                             "files <figure>_<preset>_seed<N>")
    lr = dict(LR.get(figure, {}))
    if lr:
        parser.add_argument("--lr", action="append", default=[], metavar="NAME=VALUE",
                            help=f"step size of one optimizer ({', '.join(lr)})")
    args = parser.parse_args(argv)
    for item in getattr(args, "lr", []):
        name, _, value = item.partition("=")
        if name not in lr:
            parser.error(f"--lr {item}: this figure's optimizers are {', '.join(lr)}")
        try:
            lr[name] = float(value)
        except ValueError:
            parser.error(f"--lr {item}: {value!r} is not a number")
    settings = dict(PRESETS[figure][args.preset], **({"lr": lr} if lr else {}))
    # One seed per run: the figures' curves are one run each, and ReLU networks' curves move
    # with any change of the low bits (a seed, an ulp of one step); README's table gives the
    # spread over seeds where a conclusion depends on it.
    args.suffix = "" if args.seed in (None, settings["seed"]) else f"_seed{args.seed}"
    if args.seed is not None:
        settings["seed"] = args.seed
    args.settings = SimpleNamespace(**settings)
    if args.regenerate_docs:
        args.out = DOCS
    elif args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix=f"adampaper-{figure}-"))
    print(f"writing the .png and .json to {args.out}", flush=True)
    return args
