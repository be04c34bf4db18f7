"""Host (Python) time per optimizer step, against the cost of touching every grad once.

    python bench/host_time.py                      # 10,000 and 300 tensors
    python bench/host_time.py --tensors 2000 --numel 64

tritonadam's step with its kernel launches stubbed out: what remains is the per-step host
work (finding grads, checking what the launches rely on, refreshing the pointer tables).
It is reported next to the *floor*: one plain Python pass reading every grad's
``data_ptr()``, the least any optimizer that launches on raw pointers must do. Both are
timed in the same loop, interleaved, with fresh grads every step as
``zero_grad(set_to_none=True)`` training gives, so machine noise hits both alike. A GPU
run of ``python -m tritonadam.bench`` measures the real host time, launches included.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import tritonadam  # noqa: E402
import tritonadam.step_cache as step_cache  # noqa: E402


def floor_pass(params) -> None:
    for p in params:
        p.grad.data_ptr()


def measure(tensors: int, numel: int, reps: int) -> dict:
    params = [torch.nn.Parameter(torch.randn(numel)) for _ in range(tensors)]

    def fresh(i):  # set_to_none=True training: new grad tensors every step
        for p in params:
            p.grad = None
            p.grad = torch.empty_like(p)

    opt = tritonadam.AdamW(params, block_size=4096, num_warps=4)
    launches = step_cache.launch_prepare, step_cache.launch_update
    step_cache.launch_prepare = step_cache.launch_update = lambda *a, **k: None
    try:
        fresh(0)
        opt.step()  # builds the cache (and state) once
        floor, step = [], []
        for i in range(reps):
            fresh(i)
            t0 = time.perf_counter()
            floor_pass(params)
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            floor.append((t1 - t0) * 1e3)
            step.append((t2 - t1) * 1e3)
    finally:
        step_cache.launch_prepare, step_cache.launch_update = launches
    floor_ms, step_ms = statistics.median(floor), statistics.median(step)
    return {"tensors": tensors, "numel": numel, "floor_ms": floor_ms, "step_ms": step_ms,
            "ratio": step_ms / floor_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[10000, 300])
    parser.add_argument("--numel", type=int, default=16)
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"host time per step, launches stubbed, fresh grads each step; median of {args.reps} "
          f"({os.cpu_count()} CPUs, torch {torch.__version__})")
    print(f"  {'tensors':>8} {'floor ms':>10} {'step ms':>10} {'step/floor':>11}")
    for n in args.tensors:
        r = measure(n, args.numel, args.reps)
        print(f"  {r['tensors']:>8} {r['floor_ms']:>10.3f} {r['step_ms']:>10.3f} {r['ratio']:>11.2f}")


if __name__ == "__main__":
    main()
