"""Swap torch.optim.AdamW for tritonadam.AdamW in a bf16 training loop.

    python examples/mixed_precision.py            # on a GPU
    python examples/mixed_precision.py --steps 20 # on CPU: runs the kernels in Triton's
                                                  # interpreter (slow, for a check only)

Trains a small MLP on a synthetic regression task twice, with torch.optim.AdamW on fp32
params and with tritonadam.AdamW on bf16 params + fp32 master weights, and prints both
losses: they track each other. The bf16 params take half the memory of fp32 ones; with
the fp32 master and moments, params, grads and state together take the same 16 B per
param as fp32 AdamW (`master_weights="remainder"` makes it 14 B, `state_dtype="8bit"` less: README).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    # Triton decides interpreter mode when kernels are defined: before importing tritonadam.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tritonadam  # noqa: E402


def make_model(dtype, device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(),
        torch.nn.Linear(256, 1),
    ).to(device=device, dtype=dtype)


def train(model, opt, data, steps, dtype):
    x_all, y_all = data
    losses = []
    for step in range(steps):
        idx = torch.randint(0, x_all.shape[0], (64,), generator=torch.Generator().manual_seed(step))
        x, y = x_all[idx].to(dtype), y_all[idx]
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 32, generator=gen)
    y = (x[:, :4].sin().sum(1, keepdim=True) + 0.1 * x[:, 4:5]).float()
    data = (x.to(device), y.to(device))

    ref = make_model(torch.float32, device)
    t0 = time.perf_counter()
    ref_losses = train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-3), data, args.steps, torch.float32)
    t_ref = time.perf_counter() - t0

    model = make_model(torch.bfloat16, device)
    opt = tritonadam.AdamW(model.parameters(), lr=1e-3, master_weights=True)
    t0 = time.perf_counter()
    losses = train(model, opt, data, args.steps, torch.bfloat16)
    t_ours = time.perf_counter() - t0

    for step in sorted({0, args.steps // 4, args.steps // 2, args.steps - 1}):
        print(f"step {step:4d}  torch fp32 AdamW loss {ref_losses[step]:.4f}   "
              f"tritonadam bf16+master loss {losses[step]:.4f}")
    print(f"wall time: torch {t_ref:.2f} s, tritonadam {t_ours:.2f} s"
          + ("  (CPU: Triton interpreter, not a speed figure)" if device == "cpu" else ""))


if __name__ == "__main__":
    main()
