"""Host (Python) time per optimizer step for many tensors, without a GPU.

    python bench/host_time.py --tensors 10000 --numel 16

tritonadam's step with the kernel launch itself stubbed out: what remains is the per-step
host work (finding grads, checking them, refreshing the grad-pointer table). A GPU run of
`python -m tritonadam.bench` measures the real host time, launch included; this script
tracks the Python side on any machine. torch's CPU for-loop and foreach steps run for real
(their host work and their math), for scale only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import tritonadam  # noqa: E402
import tritonadam.functional as functional  # noqa: E402


def timed(step, reps):
    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=10000)
    parser.add_argument("--numel", type=int, default=16)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = [torch.nn.Parameter(torch.randn(args.numel)) for _ in range(args.tensors)]
    for p in params:
        p.grad = torch.randn_like(p)

    functional.launch = lambda *a, **k: None  # host work only
    ours = tritonadam.AdamW(params, block_size=4096, num_warps=4)
    rows = [("tritonadam.AdamW (launch stubbed)", timed(ours.step, args.reps))]

    def new_grads():  # set_to_none=True training: fresh grad tensors every step
        for p in params:
            p.grad = torch.randn_like(p)

    new_grads()
    t = []
    for _ in range(args.reps):
        new_grads()
        t0 = time.perf_counter()
        ours.step()
        t.append((time.perf_counter() - t0) * 1e3)
    rows.append(("tritonadam.AdamW, fresh grads each step (launch stubbed)", statistics.median(t)))
    for name, kw in (("torch.optim.AdamW foreach=True", {"foreach": True}),
                     ("torch.optim.AdamW foreach=False", {"foreach": False})):
        theirs = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], **kw)
        for q, p in zip(theirs.param_groups[0]["params"], params):
            q.grad = p.grad.clone()
        rows.append((name + " (CPU, math included)", timed(theirs.step, max(3, args.reps // 4))))
    print(f"{args.tensors} tensors x {args.numel} elements, median ms per step "
          f"({os.cpu_count()} CPUs, torch {torch.__version__})")
    for name, ms in rows:
        print(f"  {name:60s} {ms:8.3f}")


if __name__ == "__main__":
    main()
