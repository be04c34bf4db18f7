"""Measure candidate quantization maps for blockwise 8-bit and 4-bit Adam state.

Produces the numbers in docs/quantization.md:

1. moments: real ``exp_avg`` / ``exp_avg_sq`` from torch.optim.AdamW training a small MLP
   and a small character-level transformer on the CPU, snapshotted at several steps;
2. for every candidate (map of m, map of v, block size, scale format, 8 or 4 bits), the
   relative error of the *Adam update* m / (sqrt(v / bc2) + eps) computed from the
   round-tripped moments, against the update from the exact moments;
3. short training runs whose optimizer keeps its moments quantized between steps (every
   step decodes, steps in fp32, re-encodes), against fp32 AdamW on the same data.

Everything runs in plain torch on the CPU: ``python examples/quant_maps.py [--quick]``.
Writes a JSON report to ``--out`` (default: none) and prints markdown tables.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

F32 = torch.float32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- candidate codecs ------------------------------------------------------------------


@dataclass(frozen=True)
class Map:
    """Normalized magnitude of code k: g(k). ``signed``: codes -K..K with sign; else
    codes 0..N-1 with no zero (v maps)."""

    name: str
    signed: bool

    def levels(self, bits: int) -> int:
        return (2 ** (bits - 1) - 1) if self.signed else 2 ** bits


def _g(name: str, k: torch.Tensor, n: int) -> torch.Tensor:
    """Normalized magnitude in [0, 1] of integer codes k (float32 math)."""
    k = k.to(F32)
    if name == "linear":
        return k / n
    if name == "sqrt":  # companded by sqrt: value = (k/K)^2
        z = k / n
        return z * z
    if name == "softsign":  # companded by 2y/(1+y): value = z / (2 - z)
        z = k / n
        return z / (2.0 - z)
    if name == "lin1":  # (c+1)/N
        return (k + 1) / n
    if name == "sqrt1":
        z = (k + 1) / n
        return z * z
    if name == "root4":
        z = (k + 1) / n
        z = z * z
        return z * z
    if name == "sqrth":  # ((c+0.5)/(N-0.5))^2: the max code is 1
        z = (k + 0.5) / (n - 0.5)
        return z * z
    raise ValueError(name)


def _f(name: str, y: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of _g on [0, 1], as a real code position (before rounding)."""
    if name == "linear":
        return y * n
    if name == "sqrt":
        return y.sqrt() * n
    if name == "softsign":
        return 2 * y / (1 + y) * n
    if name == "lin1":
        return y * n - 1
    if name == "sqrt1":
        return y.sqrt() * n - 1
    if name == "root4":
        return y.sqrt().sqrt() * n - 1
    if name == "sqrth":
        return y.sqrt() * (n - 0.5) - 0.5
    raise ValueError(name)


def round_scale(absmax: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "fp32":
        return absmax
    bits = absmax.view(torch.int32).to(torch.int64)
    if fmt == "bf16":
        up = (bits + 0xFFFF) & ~0xFFFF
    elif fmt == "e8m0":
        up = (bits + 0x7FFFFF) & ~0x7FFFFF
    else:
        raise ValueError(fmt)
    return up.to(torch.int32).view(F32)


@dataclass(frozen=True)
class Codec:
    m_map: str
    v_map: str
    qb: int
    scale: str
    bits: int

    @property
    def label(self):
        return f"{self.bits}b m={self.m_map} v={self.v_map} qb={self.qb} {self.scale}"

    def scale_bytes(self):
        return {"fp32": 4, "bf16": 2, "e8m0": 1}[self.scale] / self.qb

    def roundtrip(self, x: torch.Tensor, which: str, gen=None) -> torch.Tensor:
        """Quantize and dequantize x (flat float32), blocks of qb from element 0."""
        signed = which == "m"
        name = self.m_map if signed else self.v_map
        n = (2 ** (self.bits - 1) - 1) if signed else 2 ** self.bits
        numel = x.numel()
        pad = (-numel) % self.qb
        xb = torch.nn.functional.pad(x.reshape(-1), (0, pad)).reshape(-1, self.qb)
        mag = xb.abs()
        absmax = mag.amax(dim=1, keepdim=True)
        s = round_scale(absmax, self.scale)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        y = (mag / safe).clamp(max=1.0)
        lo_code, hi_code = (0, n) if signed else (0, n - 1)
        t = _f(name, y, n)
        fl = t.floor().clamp(lo_code, hi_code - 1)
        lo, hi = _g(name, fl, n), _g(name, fl + 1, n)
        if gen is None:
            thr = 0.5
        else:
            thr = torch.rand(y.shape, generator=gen)
        code = fl + ((y - lo) > thr * (hi - lo)).to(F32)
        out = _g(name, code, n) * s
        if signed:
            out = torch.where(xb < 0, -out, out)
        out = torch.where(s > 0, out, torch.zeros_like(out))
        return out.reshape(-1)[:numel].reshape(x.shape)


class KernelCodec:
    """The codec the kernel runs (tritonadam.quantize): sqrt companding for m, (c+1)^2/N^2
    for v, bf16 scales per 64 elements; stochastic rounding with the given generator."""

    qb = 64
    scale = "bf16"
    m_map, v_map = "sqrt", "sqrt1"

    def __init__(self, bits):
        import sys
        sys.path.insert(0, ROOT)
        from tritonadam import quantize
        self.q = quantize
        self.bits = bits
        self.label = f"{bits}b tritonadam (m=sqrt v=sqrt1 qb=64 bf16)"

    def scale_bytes(self):
        return 2 / self.qb

    def roundtrip(self, x, which, gen=None):
        signed = which == "m"
        random = None if gen is None else torch.randint(0, 1 << 16, (x.numel(),), generator=gen)
        codes, scales = self.q.quantize(x, self.bits, signed, random=random)
        return self.q.dequantize(codes, scales, x.numel(), self.bits, signed).reshape(x.shape)


# ---- models and data -------------------------------------------------------------------


def text_corpus() -> torch.Tensor:
    root = os.path.dirname(torch.__file__)
    files = sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "nn", "modules", "*.py")))
    text = "".join(open(f, encoding="utf-8", errors="ignore").read() for f in files)
    data = torch.tensor(list(text.encode("ascii", errors="ignore")), dtype=torch.long)
    return data.clamp(max=127)


class CharTransformer(nn.Module):
    def __init__(self, vocab=128, d=64, heads=4, layers=2, ctx=48):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(ctx, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx))

    def forward(self, x):
        h = self.emb(x) + self.pos[: x.shape[1]]
        h = self.body(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        return self.head(self.norm(h))


class Task:
    def __init__(self, kind: str, seed: int):
        self.kind = kind
        g = torch.Generator().manual_seed(1000 + seed)
        if kind == "mlp":
            teacher = nn.Sequential(nn.Linear(128, 256), nn.Tanh(), nn.Linear(256, 10))
            torch.manual_seed(77)
            for p in teacher.parameters():
                nn.init.normal_(p, std=0.5)
            self.x = torch.randn(8192, 128, generator=torch.Generator().manual_seed(5))
            with torch.no_grad():
                self.y = teacher(self.x).argmax(1)
            self.gen = g
        else:
            self.data = text_corpus()
            self.gen = g
        torch.manual_seed(seed)
        if kind == "mlp":
            self.model = nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(),
                                       nn.Linear(512, 10))
        else:
            self.model = CharTransformer()

    def loss(self):
        if self.kind == "mlp":
            idx = torch.randint(0, len(self.x), (128,), generator=self.gen)
            return nn.functional.cross_entropy(self.model(self.x[idx]), self.y[idx])
        starts = torch.randint(0, len(self.data) - 49, (16,), generator=self.gen)
        batch = torch.stack([self.data[s: s + 49] for s in starts.tolist()])
        logits = self.model(batch[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, 128), batch[:, 1:].reshape(-1))


HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def collect_moments(kind: str, steps: int, snaps: list[int]):
    task = Task(kind, seed=0)
    opt = torch.optim.AdamW(task.model.parameters(), **HYPER)
    out = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        task.loss().backward()
        opt.step()
        if step in snaps:
            for p in task.model.parameters():
                st = opt.state[p]
                out.append((kind, step, p.numel(), st["exp_avg"].clone(), st["exp_avg_sq"].clone()))
    return out


# ---- the update's error -----------------------------------------------------------------


def update(m, v, step, beta1=0.9, beta2=0.999, eps=1e-8):
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    return (m / bc1) / ((v / bc2).sqrt() + eps)


def update_error(codec: Codec, snaps) -> dict:
    """Per tensor: ||u_hat - u|| / ||u||; aggregated over tensors weighted by size, and the
    fraction of elements whose update grows beyond 2x the exact one plus 0.1 (blow-ups)."""
    num = den = 0.0
    worst = 0.0
    blow = total = 0
    m_err = v_err = 0.0
    for _, step, _, m, v in snaps:
        u = update(m, v, step)
        mh, vh = codec.roundtrip(m, "m"), codec.roundtrip(v, "v")
        uh = update(mh, vh, step)
        e = (uh - u).norm().item()
        n = u.norm().item()
        num += e * e
        den += n * n
        worst = max(worst, e / max(n, 1e-30))
        blow += int(((uh.abs() > 2 * u.abs() + 0.1)).sum())
        total += u.numel()
        m_err += ((mh - m).norm() / m.norm().clamp(min=1e-30)).item() ** 2 * m.numel()
        v_err += ((vh - v).norm() / v.norm().clamp(min=1e-30)).item() ** 2 * v.numel()
    return {"update_rel": math.sqrt(num / den), "worst_tensor": worst, "blowups": blow / total,
            "m_rel": math.sqrt(m_err / total), "v_rel": math.sqrt(v_err / total)}


# ---- training with quantized state ------------------------------------------------------


def train(kind: str, codec: Codec | None, steps: int, seed: int, sr: bool = False) -> float:
    """Mean training loss of the last 10% of steps; the optimizer keeps m and v quantized."""
    task = Task(kind, seed)
    params = list(task.model.parameters())
    lr, (b1, b2), eps, wd = HYPER["lr"], HYPER["betas"], HYPER["eps"], HYPER["weight_decay"]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(seed + 99) if sr else None
    losses = []
    for step in range(1, steps + 1):
        for p in params:
            p.grad = None
        loss = task.loss()
        loss.backward()
        losses.append(loss.item())
        bc1 = 1 - b1 ** step
        bc2 = 1 - b2 ** step
        with torch.no_grad():
            for i, p in enumerate(params):
                g = p.grad
                p.mul_(1 - lr * wd)
                m[i] = m[i].lerp(g, 1 - b1)
                v[i] = v[i] * b2 + (1 - b2) * g * g
                p.sub_(lr / bc1 * m[i] / ((v[i] / bc2).sqrt() + eps))
                if codec is not None:
                    m[i] = codec.roundtrip(m[i], "m", gen)
                    v[i] = codec.roundtrip(v[i], "v", gen)
    tail = losses[-max(steps // 10, 1):]
    return sum(tail) / len(tail)


def candidates(quick: bool):
    out = []
    for bits in (8, 4):
        for m_map in ("linear", "sqrt", "softsign"):
            for v_map in ("lin1", "sqrt1", "root4") + (("sqrth",) if bits == 4 else ()):
                out.append(Codec(m_map, v_map, 64, "bf16", bits))
    for bits in (8, 4):
        for qb, scale in ((32, "e8m0"), (64, "e8m0"), (128, "bf16"), (128, "fp32"), (256, "fp32")):
            out.append(Codec("sqrt", "sqrt1", qb, scale, bits))
        out.append(KernelCodec(bits))
    return out


TRAIN = [
    "8b tritonadam (m=sqrt v=sqrt1 qb=64 bf16)", "8b tritonadam (m=sqrt v=sqrt1 qb=64 bf16) sr",
    "8b m=softsign v=sqrt1 qb=64 bf16", "8b m=sqrt v=root4 qb=64 bf16", "8b m=sqrt v=lin1 qb=64 bf16",
    "4b tritonadam (m=sqrt v=sqrt1 qb=64 bf16)", "4b tritonadam (m=sqrt v=sqrt1 qb=64 bf16) sr",
    "4b m=softsign v=sqrt1 qb=64 bf16", "4b m=sqrt v=root4 qb=64 bf16", "4b m=linear v=lin1 qb=64 bf16",
    "4b m=sqrt v=sqrt1 qb=128 fp32",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--train", default="", help="';'-separated codec labels to train (' sr' suffix: "
                    "stochastic rounding), or 'auto' for the documented list")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--no-update-error", action="store_true", help="skip the moments and their table")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.time()
    snaps = []
    report = {"snapshots": 0, "update_error": {}, "training": {}}
    for kind in ("mlp", "transformer") if not args.no_update_error else ():
        snaps += collect_moments(kind, 300 if not args.quick else 60, [10, 100, 300] if not args.quick else [10, 60])
    report["snapshots"] = len(snaps)
    if snaps:
        print(f"# update error ({len(snaps)} tensors, {time.time() - t0:.0f}s to collect)\n")
        print("| codec | scale B/param (m+v) | update rel. err | worst tensor | blow-ups | m rel | v rel |")
        print("|---|---|---|---|---|---|---|")
    for c in candidates(args.quick) if snaps else ():
        r = update_error(c, snaps)
        report["update_error"][c.label] = r
        print(f"| {c.label} | {2 * c.scale_bytes():.4f} | {r['update_rel']:.4f} | {r['worst_tensor']:.3f} | "
              f"{r['blowups']:.2e} | {r['m_rel']:.4f} | {r['v_rel']:.4f} |", flush=True)
    if args.train:
        labels = TRAIN if args.train == "auto" else args.train.split(";")
        codecs = {c.label: c for c in candidates(False)}
        runs = [("fp32", None, False)] + [(lab, codecs[lab[:-3] if lab.endswith(" sr") else lab], lab.endswith(" sr")) for lab in labels]
        print("\n# training: mean loss of the last 10% of steps\n")
        print("| codec | " + " | ".join(f"{k} seed {s}" for k in ("mlp", "transformer") for s in range(args.seeds)) + " |")
        print("|---|" + "---|" * (2 * args.seeds))
        for label, codec, sr in runs:
            row = []
            for kind in ("mlp", "transformer"):
                for seed in range(args.seeds):
                    row.append(train(kind, codec, args.steps, seed, sr))
            report["training"][label] = row
            print(f"| {label} | " + " | ".join(f"{x:.4f}" for x in row) + " |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
