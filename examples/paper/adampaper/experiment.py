"""One training run of a classifier, from a fresh initialisation to its results record."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import optimizers
from .data import Dataset
from .flat import Flat
from .training import LossFn, Trainer, accuracy, evaluate


@dataclass(frozen=True)
class Run:
    """One curve of a figure: an optimizer, with or without dropout, and whether its step
    size decays as α/√t."""

    optimizer: str
    dropout: bool = True
    decay: bool = False

    def label(self, show_dropout: bool) -> str:
        return optimizers.LABELS[self.optimizer] + ("+dropout" if show_dropout and self.dropout else "")


def run_classifier(run: Run, make_model: Callable[[bool], nn.Module], loss_fn: LossFn,
                   train: Dataset, test: Dataset, *, lr: float, impl: str, epochs: int,
                   seed: int, points_per_epoch: int) -> dict:
    """Trains ``make_model(run.dropout)`` from the same seed as every other run and returns
    its curve, training cost before and after (full set, no dropout), test accuracy and
    time."""
    torch.manual_seed(seed)
    model = Flat(make_model(run.dropout).to(train.labels.device))
    opt = optimizers.build(run.optimizer, [model.param], lr, impl)
    schedule = optimizers.inverse_sqrt_decay(opt) if run.decay else None
    initial_loss = evaluate(model, loss_fn, train)
    trainer = Trainer(model, loss_fn, train, opt, seed=seed, schedule=schedule).run(epochs)
    return {
        "optimizer": run.optimizer, "dropout": run.dropout, "lr": lr, "lr_decay": "1/sqrt(t)" if run.decay else None,
        "implementation": impl if run.optimizer in ("adam", "adamax") else "torch",
        "curve": trainer.curve(points_per_epoch), "diverged": trainer.diverged,
        "initial_train_loss": initial_loss, "final_train_loss": evaluate(model, loss_fn, train),
        "test_accuracy": accuracy(model, test),
        "seconds": round(trainer.seconds, 2),
    }
