"""Models whose parameters live in one flat tensor.

In Triton's interpreter every tensor an optimizer steps costs at least one Triton program
(tens of milliseconds on a CPU, whatever its size), so a model with ten small tensors
steps ten times slower than the same numbers in one tensor. Adam, AdaMax and the
baselines here are all elementwise, so flattening changes no result, only the cost; on a
GPU the step is one launch either way.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


class Flat:
    """Calls ``module`` with its parameters taken as views of one flat ``param``.

    ``param`` (an ``nn.Parameter``) is what the optimizer steps; its gradient collects
    every parameter's gradient. ``module`` keeps its buffers and its train/eval mode.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        named = dict(module.named_parameters())
        self.names = list(named)
        self.shapes = [p.shape for p in named.values()]
        self.param = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in named.values()]))

    def views(self) -> dict[str, torch.Tensor]:
        """The module's parameters, by name, as views of ``param``."""
        chunks = self.param.split([s.numel() for s in self.shapes])
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def __call__(self, *args):
        return functional_call(self.module, self.views(), args)

    def train(self, mode: bool = True) -> Flat:
        self.module.train(mode)
        return self
