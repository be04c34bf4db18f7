"""What the bench steps: dtype setups, the bytes other providers move, and tensor-shape profiles.

Everything here is plain Python (no torch import) so ``--list``, the roofline table and the
tests can use it cheaply.

Byte formulas
-------------
An Adam step is elementwise, so its memory traffic per parameter is the sum, over the tensors
the step touches, of the bytes it reads plus the bytes it writes: a list of
``(tensor, bytes read, bytes written)``, summed by :attr:`Traffic.bytes_per_param`.

tritonadam's rows (and a setup's floor: the roofline, ``--list``) take that list from the
library's own bytes model, ``tritonadam.state.variant(...).traffic()``, called with the
constructor options the bench gives the optimizer (``providers.tritonadam_modes``,
``providers.tritonadam_traffic``): one formula for tritonadam, the library's, covering its
dense and its blockwise-quantized state (``state_dtype="8bit"``/``"4bit"``: codes plus a bf16
scale per 64 elements, 1.03125 and 0.53125 B per moment). docs/performance.md lists the
bytes of every setup.

:func:`traffic` here states what the *other* providers move, from a :class:`Layout` of the
tensors they really keep: torch keeps Adam state in the param dtype (bf16 params: 14 B per
parameter, not our 22), emulates master weights with fp32 params and two copies, apex and
TransformerEngine keep their own masters, and the peers' quantized moments are ``int8`` /
``int4`` with their scales as ``extra`` passes. Where a dense tritonadam setup and this
function both apply they agree item for item (``tests/test_bench_workloads.py``).

Adam (L2 weight decay) and AdamW (decoupled) move the same bytes: weight decay reads the
parameter the step reads anyway; AdaMax's ``exp_inf`` replaces ``exp_avg_sq``; amsgrad adds
``max_exp_avg_sq`` in the state's format, read and written. The bench reports GB/s from the
bytes of what a provider actually does, and says so in the table.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------------- dtypes

#: bytes per element of the dtypes the bench uses, by short name ("int8"/"int4": the peers'
#: quantized moments, without their scales)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8, "int8": 1, "int4": 0.5}
#: the dtypes a float64 reference can round to
FLOAT_DTYPES = ("fp32", "bf16", "fp16", "fp64")
#: tritonadam's blockwise-quantized state formats (``state_dtype=``), by bits per code: the
#: check emulates them with ``tritonadam.quantize``; their bytes come from the library
QUANT_STATES = {"8bit": 8, "4bit": 4}
#: bytes per element of the int16 low half that stands in for an fp32 master
REMAINDER_BYTES = 2


def torch_dtype(name: str):
    """The torch dtype for a short dtype name ("fp32", "bf16", "fp16", "fp64")."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
            "fp64": torch.float64}[name]


# ----------------------------------------------------------------------------------- setups

@dataclass(frozen=True)
class Setup:
    """A dtype setup: what the model holds and what the optimizer is asked to keep.

    ``param``/``grad``: dtype of the model's parameters and gradients. ``state``: dtype of
    Adam's moments, or a quantized format of tritonadam's (``"8bit"``, ``"4bit"``). ``master``: dtype of a master copy of the weights the optimizer steps
    (then writes back, rounded, to the model's parameters), or None. ``remainder``: the fp32
    master is kept as its low 16 bits beside the bf16 param, which holds the high half.
    ``stochastic``: values kept in 16 bits without a master copy are rounded stochastically.
    ``core``: named by ``--setups core``, what the GPU check's core step times: the setups
    where a provider of torch moves the same bytes as ours (fp32; bf16 state against
    torch's fused bf16), the plain bf16 setup, and the key quantized-state setups (8-bit
    moments with an exact master in 2 bytes: the issue's headline; 8-bit with fp32 params,
    against torch's fp32 step; 4-bit with stochastic rounding, the least memory).
    """

    name: str
    param: str
    grad: str
    state: str
    master: str | None
    description: str
    remainder: bool = False
    stochastic: bool = False
    core: bool = False

    @property
    def layout(self) -> "Layout":
        return Layout(param=self.param, grad=self.grad, state=self.state, master=self.master,
                      remainder=self.remainder, stochastic=self.stochastic)


SETUPS: dict[str, Setup] = {
    s.name: s
    for s in (
        Setup("fp32", "fp32", "fp32", "fp32", None, "fp32 params, grads and state", core=True),
        Setup("bf16", "bf16", "bf16", "fp32", None, "bf16 params and grads, fp32 state", core=True),
        Setup("fp16", "fp16", "fp16", "fp32", None, "fp16 params and grads, fp32 state"),
        Setup("bf16-master", "bf16", "bf16", "fp32", "fp32",
              "bf16 params and grads, fp32 master weights and state"),
        Setup("bf16-remainder", "bf16", "bf16", "fp32", "fp32",
              "bf16 params and grads, the fp32 master kept as an int16 remainder, fp32 state",
              remainder=True),
        Setup("bf16-sr", "bf16", "bf16", "fp32", None,
              "bf16 params and grads, fp32 state, params rounded stochastically", stochastic=True),
        Setup("bf16-bf16state", "bf16", "bf16", "bf16", None,
              "bf16 params, grads and state, rounded to nearest", core=True),
        Setup("bf16-sr-bf16state", "bf16", "bf16", "bf16", None,
              "bf16 params, grads and state, rounded stochastically", stochastic=True),
        # tritonadam's blockwise-quantized moments: codes + a bf16 scale per 64 elements
        Setup("bf16-8bit-remainder", "bf16", "bf16", "8bit", "fp32",
              "bf16 params and grads, the fp32 master as an int16 remainder, 8-bit moments",
              remainder=True, core=True),
        Setup("bf16-8bit-sr", "bf16", "bf16", "8bit", None,
              "bf16 params and grads, 8-bit moments, params and moments rounded stochastically",
              stochastic=True),
        Setup("bf16-4bit-remainder", "bf16", "bf16", "4bit", "fp32",
              "bf16 params and grads, the fp32 master as an int16 remainder, 4-bit moments",
              remainder=True),
        Setup("bf16-4bit-sr", "bf16", "bf16", "4bit", None,
              "bf16 params and grads, 4-bit moments, params and moments rounded stochastically",
              stochastic=True, core=True),
        Setup("fp32-8bit", "fp32", "fp32", "8bit", None, "fp32 params and grads, 8-bit moments",
              core=True),
        Setup("fp32-4bit", "fp32", "fp32", "4bit", None, "fp32 params and grads, 4-bit moments"),
    )
}


def core_setups() -> list[str]:
    """The setups ``--setups core`` names, in SETUPS order."""
    return [s.name for s in SETUPS.values() if s.core]


def dense_twin(setup: Setup) -> Setup | None:
    """For a quantized-state setup, the setup that is the same with fp32 state (what a
    provider without quantized state does in its place), else None."""
    if setup.state not in QUANT_STATES:
        return None
    want = (setup.param, setup.grad, "fp32", setup.master, setup.remainder, setup.stochastic)
    return next((s for s in SETUPS.values()
                 if (s.param, s.grad, s.state, s.master, s.remainder, s.stochastic) == want), None)


# ------------------------------------------------------------------------------- traffic

@dataclass(frozen=True)
class Layout:
    """The tensors one step touches, by dtype; ``extra`` lists additional per-parameter
    passes a provider makes around the step: ``(name, bytes read, bytes written)``.

    Without a master copy the step reads and writes the param. With one it reads and writes
    the master and only writes the param (rounded); with the master kept as a remainder it
    reads and writes the param and the remainder (2 bytes) instead.
    """

    param: str
    grad: str
    state: str
    master: str | None = None
    extra: tuple[tuple[str, float, float], ...] = ()
    remainder: bool = False
    stochastic: bool = False


@dataclass(frozen=True)
class Traffic:
    """Per-parameter memory traffic of one step: ``items`` is ``(tensor, read, written)``
    (bytes per element; fractional for quantized moments, whose scales are shared)."""

    items: tuple[tuple[str, float, float], ...]

    @property
    def read(self) -> float:
        return sum(r for _, r, _ in self.items)

    @property
    def written(self) -> float:
        return sum(w for _, _, w in self.items)

    @property
    def bytes_per_param(self) -> float:
        return self.read + self.written

    def describe(self) -> str:
        parts = []
        for name, r, w in self.items:
            parts.append(f"{name} {r:g}+{w:g}" if r and w else
                         f"{name} {'r' if r else 'w'}{r or w:g}")
        return ", ".join(parts) + f" = {self.bytes_per_param:g} B"


def traffic(layout: Layout, algo: str = "adamw", amsgrad: bool = False) -> Traffic:
    """Bytes read and written per parameter by one step of ``algo`` over ``layout``: what a
    provider other than tritonadam moves (tritonadam's come from its bytes model).

    The moments (``exp_avg`` and ``exp_avg_sq``, or AdaMax's ``exp_inf``)
    are each read and written; amsgrad adds ``max_exp_avg_sq`` (read and written, in the
    state dtype); the gradient is only read.
    """
    if algo not in ALGOS:
        raise ValueError(f"unknown algorithm {algo!r}; expected one of {sorted(ALGOS)}")
    if layout.state in QUANT_STATES:
        raise ValueError(f"{layout.state} state is tritonadam's format: its bytes come from "
                         "tritonadam.state.variant (providers.tritonadam_traffic)")
    b = DTYPE_BYTES
    items: list[tuple[str, float, float]] = list(layout.extra)
    if layout.remainder:
        items.append(("param", b[layout.param], b[layout.param]))
        items.append(("remainder", REMAINDER_BYTES, REMAINDER_BYTES))
        items.append(("grad", b[layout.grad], 0))
    elif layout.master:
        items.append(("master", b[layout.master], b[layout.master]))
        items.append(("grad", b[layout.grad], 0))
        items.append(("param", 0, b[layout.param]))
    else:
        items.append(("param", b[layout.param], b[layout.param]))
        items.append(("grad", b[layout.grad], 0))
    second = "exp_inf" if algo == "adamax" else "exp_avg_sq"
    items.append(("exp_avg", b[layout.state], b[layout.state]))
    items.append((second, b[layout.state], b[layout.state]))
    if amsgrad:
        if algo == "adamax":
            raise ValueError("AdaMax has no amsgrad variant")
        items.append(("max_exp_avg_sq", b[layout.state], b[layout.state]))
    return Traffic(tuple(items))


ALGOS = ("adam", "adamw", "adamax")


# ------------------------------------------------------------------------------- profiles

Shape = tuple[int, ...]


def numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class Profile:
    """A list of parameter shapes. ``sized`` profiles take a total parameter count."""

    name: str
    description: str
    source: str
    build: object  # callable(size: int | None) -> list[(name, shape)]
    published: int | None = None  # published parameter count, for fixed profiles
    sized: bool = False
    default_sizes: tuple[int, ...] = ()
    cpu_default_sizes: tuple[int, ...] = ()


def gpt2_shapes(n_layer: int = 12, n_embd: int = 768, vocab: int = 50257, n_ctx: int = 1024):
    """GPT-2 parameter shapes as in the released checkpoints (Conv1D weights are (in, out)).

    The output projection is tied to ``wte`` so it is not a separate parameter.
    """
    shapes: list[tuple[str, Shape]] = [("wte", (vocab, n_embd)), ("wpe", (n_ctx, n_embd))]
    for i in range(n_layer):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (n_embd,)), (h + "ln_1.bias", (n_embd,)),
            (h + "attn.c_attn.weight", (n_embd, 3 * n_embd)), (h + "attn.c_attn.bias", (3 * n_embd,)),
            (h + "attn.c_proj.weight", (n_embd, n_embd)), (h + "attn.c_proj.bias", (n_embd,)),
            (h + "ln_2.weight", (n_embd,)), (h + "ln_2.bias", (n_embd,)),
            (h + "mlp.c_fc.weight", (n_embd, 4 * n_embd)), (h + "mlp.c_fc.bias", (4 * n_embd,)),
            (h + "mlp.c_proj.weight", (4 * n_embd, n_embd)), (h + "mlp.c_proj.bias", (n_embd,)),
        ]
    shapes += [("ln_f.weight", (n_embd,)), ("ln_f.bias", (n_embd,))]
    return shapes


def llama_layer_shapes(i: int, dim: int, n_heads: int, n_kv_heads: int, ffn: int):
    """One Llama decoder layer (Meta's reference naming): attention, SwiGLU MLP, 2 RMSNorms."""
    head_dim = dim // n_heads
    kv = n_kv_heads * head_dim
    p = f"layers.{i}."
    return [
        (p + "attention.wq.weight", (dim, dim)),
        (p + "attention.wk.weight", (kv, dim)),
        (p + "attention.wv.weight", (kv, dim)),
        (p + "attention.wo.weight", (dim, dim)),
        (p + "feed_forward.w1.weight", (ffn, dim)),
        (p + "feed_forward.w2.weight", (dim, ffn)),
        (p + "feed_forward.w3.weight", (ffn, dim)),
        (p + "attention_norm.weight", (dim,)),
        (p + "ffn_norm.weight", (dim,)),
    ]


def llama_shapes(dim: int, n_layers: int, n_heads: int, ffn: int, vocab: int,
                 n_kv_heads: int | None = None, embeddings: bool = True):
    """A Llama model: token embeddings, ``n_layers`` decoder layers, final RMSNorm and an
    untied output projection (Llama 2 does not tie them)."""
    kvh = n_kv_heads or n_heads
    shapes: list[tuple[str, Shape]] = []
    if embeddings:
        shapes.append(("tok_embeddings.weight", (vocab, dim)))
    for i in range(n_layers):
        shapes += llama_layer_shapes(i, dim, n_heads, kvh, ffn)
    if embeddings:
        shapes += [("norm.weight", (dim,)), ("output.weight", (vocab, dim))]
    return shapes


# Llama-2 7B (Touvron et al. 2023, and params.json of the release): dim 4096, 32 layers,
# 32 heads, vocab 32000; the FFN hidden size 11008 follows from multiple_of=256 and
# int(2 * 4 * 4096 / 3) rounded up.
LLAMA2_7B = dict(dim=4096, n_layers=32, n_heads=32, ffn=11008, vocab=32000)
LLAMA2_7B_LAYER_PARAMS = sum(numel(s) for _, s in llama_layer_shapes(0, 4096, 32, 32, 11008))
# TinyLlama-1.1B (config.json of TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T):
# hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate 5632, vocab 32000, untied.
TINYLLAMA = dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn=5632, vocab=32000)

SMALL_NUMEL = 4096


def _many_small(size: int | None):
    count = max(1, round((size or 10_000 * SMALL_NUMEL) / SMALL_NUMEL))
    return [(f"t{i}", (SMALL_NUMEL,)) for i in range(count)]


def _one_huge(size: int | None):
    return [("w", (int(size or 100_000_000),))]


def _llama_layers(size: int | None):
    layers = max(1, round((size or LLAMA2_7B_LAYER_PARAMS) / LLAMA2_7B_LAYER_PARAMS))
    return llama_layer_shapes_n(layers)


def llama_layer_shapes_n(layers: int):
    d = LLAMA2_7B
    return [s for i in range(layers) for s in llama_layer_shapes(i, d["dim"], d["n_heads"],
                                                                 d["n_heads"], d["ffn"])]


def _check_small(size: int | None):
    # Odd sizes that exercise tails and block edges, plus a 0-dim and an empty tensor.
    sizes = [(), (0,), (1,), (7,), (4097,), (16383,), (16385,), (3, 1000), (20000,)]
    return [(f"c{i}", s) for i, s in enumerate(sizes)]


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("gpt2-124m", "GPT-2 small: 12 layers, n_embd 768, vocab 50257, n_ctx 1024, tied wte",
                "Radford et al. 2019; HF gpt2 config.json", lambda size: gpt2_shapes(),
                published=124_439_808),
        Profile("tinyllama-1.1b", "TinyLlama-1.1B: Llama-2 architecture, dim 2048, 22 layers, GQA 4 KV heads",
                "TinyLlama config.json (Zhang et al. 2024)", lambda size: llama_shapes(**TINYLLAMA),
                published=1_100_048_384),
        Profile("llama2-7b", "Llama-2 7B: dim 4096, 32 layers, FFN 11008, vocab 32000, untied output",
                "Touvron et al. 2023; Llama-2 params.json", lambda size: llama_shapes(**LLAMA2_7B),
                published=6_738_415_616),
        Profile("llama-layers", "whole Llama-2 7B decoder layers (202,383,360 params each), "
                "as many as round(size / layer) (at least 1)",
                "shapes of Llama-2 7B", _llama_layers, sized=True,
                default_sizes=(400_000_000,), cpu_default_sizes=()),
        Profile("many-small", f"many tensors of {SMALL_NUMEL} elements (size / {SMALL_NUMEL} of them)",
                "10,000 x 4,096: a model of many small tensors", _many_small, sized=True,
                default_sizes=(10_000 * SMALL_NUMEL,), cpu_default_sizes=(1_000_000,)),
        Profile("one-huge", "one flat tensor of `size` elements", "-", _one_huge, sized=True,
                default_sizes=(10_000_000, 100_000_000, 1_000_000_000),
                cpu_default_sizes=(1_000_000,)),
        Profile("check-small", "odd sizes for correctness checks: 0-dim, empty, 1, 7, 4097, "
                "16383, 16385, 3x1000, 20000", "-", _check_small),
    )
}


@dataclass(frozen=True)
class Workload:
    """A profile instantiated at a size: the shapes the bench allocates."""

    profile: str
    size: int | None
    shapes: tuple[tuple[str, Shape], ...] = field(repr=False)

    @property
    def name(self) -> str:
        return self.profile if self.size is None else f"{self.profile}@{format_count(self.size)}"

    @property
    def params(self) -> int:
        return sum(numel(s) for _, s in self.shapes)

    @property
    def tensors(self) -> int:
        return len(self.shapes)

    def bytes_per_step(self, layout: Layout, algo: str = "adamw", amsgrad: bool = False) -> float:
        """Bytes one step over ``layout`` moves (another provider's; tritonadam's:
        ``params * providers.tritonadam_traffic(...).bytes_per_param``)."""
        return self.params * traffic(layout, algo, amsgrad).bytes_per_param


def make_workload(profile: str, size: int | None = None) -> Workload:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    p = PROFILES[profile]
    if not p.sized:
        size = None
    return Workload(profile, size, tuple(p.build(size)))


# ---------------------------------------------------------------------------- size parsing

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_count(text: str) -> int:
    """"10M" -> 10_000_000, "1.5B" -> 1_500_000_000, "4096" -> 4096, "1_000" -> 1000."""
    m = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([kKmMbBgG]?)\s*", text)
    if not m:
        raise ValueError(f"not a parameter count: {text!r} (examples: 4096, 10M, 1.5B)")
    value = float(m.group(1).replace("_", "")) * _SUFFIX[m.group(2).lower()]
    if value < 1 or value != int(value):
        raise ValueError(f"not a whole positive parameter count: {text!r}")
    return int(value)


def format_count(n: int) -> str:
    """Short exact form: 1_000_000_000 -> "1B", 40_960_000 -> "40.96M", 4097 -> "4097".

    A suffix is used only where two decimals say the count exactly; otherwise all digits.
    """
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if scale <= n < 1000 * scale or (suffix == "B" and n >= scale):
            text = f"{n / scale:.2f}".rstrip("0").rstrip(".")
            if round(float(text) * scale) == n:
                return text + suffix
    return str(n)


def parse_workloads(profiles: list[str], sizes: list[int] | None, cpu: bool) -> list[Workload]:
    """Expand profile specs (``name`` or ``name@SIZE``) into workloads.

    A sized profile without ``@SIZE`` takes ``sizes`` if given, else its (CPU or GPU) defaults.
    """
    out: list[Workload] = []
    for spec in profiles:
        name, _, at = spec.partition("@")
        name = name.strip()
        if name not in PROFILES:
            raise ValueError(f"unknown profile {name!r}; expected one of {', '.join(PROFILES)}")
        p = PROFILES[name]
        if at:
            if not p.sized:
                raise ValueError(f"profile {name!r} has fixed shapes and takes no @SIZE")
            out.append(make_workload(name, parse_count(at)))
        elif p.sized:
            chosen = sizes or (p.cpu_default_sizes if cpu else p.default_sizes) or p.default_sizes
            out += [make_workload(name, s) for s in chosen]
        else:
            out.append(make_workload(name))
    return out
