"""Minibatch training with the same data order, initialisation and noise for every optimizer."""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .data import Dataset
from .flat import Flat

LossFn = Callable[[Flat, Tensor, Tensor], Tensor]


def cross_entropy(model: Flat, x: Tensor, y: Tensor) -> Tensor:
    """The classifiers' loss (Figs 2 and 3): softmax cross-entropy of the model's logits."""
    return torch.nn.functional.cross_entropy(model(x), y)


class Trainer:
    """Steps ``optimizer`` on ``loss_fn`` over shuffled minibatches of ``data``.

    Seeding here (batch order from its own generator, dropout and other noise from the
    global one) gives every optimizer of a figure the same minibatches and noise, as long
    as the models make the same random draws. Training stops at the first non-finite loss:
    a diverged run has nothing more to show.
    """

    def __init__(self, model: Flat, loss_fn: LossFn, data: Dataset, optimizer: Optimizer, *,
                 batch_size: int = 128, seed: int = 0,
                 schedule: torch.optim.lr_scheduler.LRScheduler | None = None):
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.optimizer, self.schedule, self.batch_size = optimizer, schedule, batch_size
        self.order = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.step_losses: list[float] = []
        self.seconds = 0.0

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    @property
    def diverged(self) -> bool:
        return bool(self.step_losses) and not math.isfinite(self.step_losses[-1])

    def run(self, epochs: int) -> Trainer:
        start = time.perf_counter()
        self.model.train()
        for _ in range(epochs):
            for index in torch.randperm(len(self.data), generator=self.order).split(self.batch_size):
                if self.diverged:
                    break
                inputs, labels = self.data.batch(index.to(self.data.labels.device))
                loss = self.loss_fn(self.model, inputs, labels)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                if self.schedule is not None:
                    self.schedule.step()
                self.step_losses.append(loss.item())
        self.seconds += time.perf_counter() - start
        return self

    def curve(self, points_per_epoch: int = 1) -> dict[str, list[float]]:
        """Mean training loss over each 1/points_per_epoch of an epoch, at the bin's end
        (in epochs); a diverged run's curve ends at its last finite bin."""
        width = max(1, self.steps_per_epoch // points_per_epoch)
        x, y = [], []
        for start in range(0, len(self.step_losses), width):
            chunk = self.step_losses[start:start + width]
            mean = sum(chunk) / len(chunk)
            if not math.isfinite(mean):
                break
            x.append((start + len(chunk)) / self.steps_per_epoch)
            y.append(mean)
        return {"epoch": x, "loss": y}


@torch.no_grad()
def evaluate(model: Flat, loss_fn: LossFn, data: Dataset, batch_size: int = 1000) -> float:
    """Mean loss over ``data`` in eval mode (no dropout), with fixed noise for models
    that sample (the VAE), so the number depends on the parameters only."""
    model.train(False)
    device = data.labels.device
    total = 0.0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        for index in torch.arange(len(data)).split(batch_size):
            inputs, labels = data.batch(index.to(device))
            total += loss_fn(model, inputs, labels).item() * len(index)
    return total / len(data)


@torch.no_grad()
def accuracy(model: Flat, data: Dataset, batch_size: int = 1000) -> float:
    """Fraction of ``data`` classified right (the largest logit, or logit > 0 for one output)."""
    model.train(False)
    right = 0
    for index in torch.arange(len(data)).split(batch_size):
        inputs, labels = data.batch(index.to(data.labels.device))
        logits = model(inputs)
        guess = logits.argmax(1) if logits.shape[1] > 1 else (logits[:, 0] > 0).long()
        right += (guess == labels).sum().item()
    return right / len(data)
