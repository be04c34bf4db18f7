"""Host (Python) time per optimizer step, against the cost of touching every grad once.

    python -m tritonadam.bench.host_time                   # 10,000 and 300 tensors
    python -m tritonadam.bench.host_time --tensors 2000 --numel 64
    python -m tritonadam.bench.host_time --breakdown       # each per-tensor pass of the check alone, too
    python -m tritonadam.bench.host_time --device cuda     # on a GPU: real launches, CUDA tensors

A profiling tool of the library's host path, not a benchmark of the kernels. By default
(``--device cpu``) it times tritonadam's step on CPU tensors with its kernel launchers
stubbed out: ``tritonadam.step_cache.launch_prepare`` and ``launch_update`` (the step) and
``tritonadam.clip.launch_norm`` and ``launch_norm_reduce`` (the fused clip), replaced by
no-ops where those modules call them and restored afterwards, so no kernel runs and what
remains is the per-step host work (finding grads, checking what the launches rely on,
refreshing the pointer tables). Triton's interpreter is only needed so that the optimizer
accepts CPU tensors (set, with a re-exec if the kernels were already imported for a GPU).

It is reported next to the *floor*: one plain Python pass reading every grad's
``data_ptr()``, the least any optimizer that launches on raw pointers must do. Also timed:
``clip_grad_norm_(1.0)`` then the step (the norm's launches stubbed too), as a training
loop that clips calls them. All are timed in the same loop, interleaved, with fresh grads
before each step as ``zero_grad(set_to_none=True)`` training gives, so machine noise hits
them alike. With ``--device cuda`` (on a GPU machine) the tensors are CUDA tensors and
nothing is stubbed: the step's host time with its real launches (and the grad-pointer
upload fresh grads need), against the same floor; the GPU is synchronised outside the timed
calls. ``python -m tritonadam.bench`` reports the same figure per case as ``host ms``;
``tritonadam/bench/gpu_check.sh`` runs both modes in its host_time step.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

import tritonadam
import tritonadam.clip as clip
import tritonadam.step_cache as step_cache

from ._startup import prepare_interpreter

#: the launchers a step and a clip call, as the modules that call them imported them
STUBBED = ((step_cache, "launch_prepare"), (step_cache, "launch_update"),
           (clip, "launch_norm"), (clip, "launch_norm_reduce"))


def floor_pass(params) -> None:
    for p in params:
        p.grad.data_ptr()


@contextlib.contextmanager
def stubbed_optimizer(tensors: int, numel: int):
    """(params, fresh, optimizer) with every launcher stubbed, restored on exit.
    ``fresh()`` gives new grad tensors, as ``zero_grad(set_to_none=True)`` training does."""
    gen = torch.Generator().manual_seed(0)  # not torch's global stream (called in-process too)
    params = [torch.nn.Parameter(torch.randn(numel, generator=gen)) for _ in range(tensors)]

    def fresh():
        for p in params:
            p.grad = None
            p.grad = torch.empty_like(p)

    opt = tritonadam.AdamW(params, block_size=4096, num_warps=4)
    launches = {(module, name): getattr(module, name) for module, name in STUBBED}
    for module, name in STUBBED:
        setattr(module, name, lambda *a, **k: None)
    try:
        yield params, fresh, opt
    finally:
        for (module, name), launch in launches.items():
            setattr(module, name, launch)


def measure(tensors: int, numel: int, reps: int) -> dict:
    with stubbed_optimizer(tensors, numel) as (params, fresh, opt):
        fresh()
        opt.clip_grad_norm_(1.0)
        opt.step()  # builds the cache, the norm's plan and the state once
        runs = {"floor": lambda: floor_pass(params), "step": opt.step,
                "clip_step": lambda: (opt.clip_grad_norm_(1.0), opt.step())}
        return _summary(tensors, numel, _interleaved(runs, fresh, reps))


def _interleaved(runs: dict, fresh, reps: int, sync=lambda: None) -> dict:
    """Median ms of each run, timed in turn, each right after its own fresh grads (so
    none finds the grads warm from another's pass over them)."""
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            fresh()
            sync()
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _summary(tensors: int, numel: int, ms: dict) -> dict:
    return {"tensors": tensors, "numel": numel, "floor_ms": ms["floor"], "step_ms": ms["step"],
            "clip_step_ms": ms["clip_step"], "ratio": ms["step"] / ms["floor"],
            "clip_ratio": ms["clip_step"] / ms["floor"], "clip_over_step": ms["clip_step"] / ms["step"]}


def measure_cuda(tensors: int, numel: int, reps: int) -> dict:
    """On a GPU, nothing stubbed: ``step()``'s host time with real launches and fresh grads
    (new CUDA tensors, allocated while the old ones live, so at new addresses), against the
    floor; the GPU synchronised before each timed call."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(numel, device=dev, generator=gen)) for _ in range(tensors)]
    src = [torch.randn(numel, device=dev, generator=gen) for _ in range(tensors)]

    def fresh():
        for p, g in zip(params, src):
            p.grad = g.clone()  # allocated before the old grad is freed: a new address

    opt = tritonadam.AdamW(params, block_size=4096, num_warps=4, autotune="off")
    fresh()
    opt.clip_grad_norm_(1.0)
    opt.step()
    runs = {"floor": lambda: floor_pass(params), "step": opt.step,
            "clip_step": lambda: (opt.clip_grad_norm_(1.0), opt.step())}
    ms = _interleaved(runs, fresh, reps, sync=torch.cuda.synchronize)
    torch.cuda.synchronize()
    return _summary(tensors, numel, ms)


def breakdown(tensors: int, numel: int, reps: int) -> dict:
    """Each of the step's per-tensor passes timed alone, right after fresh grads (what
    the step's check does, pass by pass; reaches into the step cache's fields)."""
    import operator
    from itertools import chain

    with stubbed_optimizer(tensors, numel) as (params, fresh, opt):
        fresh()
        opt.step()
        cache = opt._cache
        grad = operator.attrgetter("_grad")
        chunks = cache._chunks  # the check's runs of rows, each with its own guards
        passes = {
            "floor (p.grad.data_ptr() loop)": lambda: floor_pass(params),
            "grads (_grad)": lambda: list(map(grad, params)),
            "grad pointers": lambda: list(map(torch.Tensor.data_ptr, map(grad, params))),
            "tensor guards": lambda: [c.grad_meta.same(list(map(grad, c.params))) for c in chunks],
            "param pointers": lambda: list(map(torch.Tensor.data_ptr, params)),
            # every state tensor's (moments, counts), as the check reads them
            "exp_avg pointers": lambda: [list(map(torch.Tensor.data_ptr, c.state)) for c in chunks],
            "param and state layouts": lambda: [c.layouts.same(c.params + c.laid_out) for c in chunks],
            "whole check": lambda: cache.check(opt.param_groups, opt.state, opt._options()),
            "state dict versions": lambda: cache._versions(cache._state_values),
            "group membership": lambda: all(map(operator.is_, chain.from_iterable(
                g["params"] for g in opt.param_groups), cache._all_params)),
            "param versions (bump)": lambda: torch.autograd.graph.increment_version(params),
            "whole step": opt.step,
        }
        times = {name: [] for name in passes}
        for _ in range(reps):
            for name, run in passes.items():
                fresh()
                t0 = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - t0) * 1e3)
    # The grads pass is inside the pointers and guards passes: report them without it.
    out = {name: statistics.median(t) for name, t in times.items()}
    for name in ("grad pointers", "tensor guards"):
        out[name] -= out["grads (_grad)"]
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m tritonadam.bench.host_time",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[10000, 300])
    parser.add_argument("--numel", type=int, default=16)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--breakdown", action="store_true",
                        help="first time each of the step's per-tensor passes alone, then the step")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: CUDA tensors and real launches (a GPU machine); cpu (default): "
                             "CPU tensors, launches stubbed")
    args = parser.parse_args(argv)
    for flag, values in (("--tensors", args.tensors), ("--numel", [args.numel]), ("--reps", [args.reps])):
        if min(values) < 1:
            parser.error(f"{flag} must be at least 1, got {min(values)}")
    # Stubbed launches on CPU tensors: the interpreter lets the optimizer take them.
    prepare_interpreter(argv, want_cpu=args.device == "cpu", module="tritonadam.bench.host_time")
    if args.device == "cuda" and args.breakdown:
        parser.error("--breakdown runs on CPU tensors with the launches stubbed")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _report(args)
    finally:
        torch.set_num_threads(threads)  # as it was, for a caller in the same process


def _report(args) -> None:
    if args.breakdown:
        for n in args.tensors:
            print(f"{n} tensors: each pass alone after fresh grads, median ms of {args.reps}")
            for name, ms in breakdown(n, args.numel, args.reps).items():
                print(f"  {name:<32} {ms:8.3f}")
        print()
    where = ("CUDA tensors, real launches" if args.device == "cuda" else
             "CPU tensors, launches stubbed")
    print(f"host time per step ({where}), fresh grads each step; median of {args.reps} "
          f"({os.cpu_count()} CPUs, torch {torch.__version__})")
    print(f"  {'tensors':>8} {'floor ms':>10} {'step ms':>10} {'step/floor':>11} "
          f"{'clip+step ms':>13} {'clip+step/floor':>16} {'clip+step/step':>16}")
    for n in args.tensors:
        r = (measure_cuda if args.device == "cuda" else measure)(n, args.numel, args.reps)
        print(f"  {r['tensors']:>8} {r['floor_ms']:>10.3f} {r['step_ms']:>10.3f} {r['ratio']:>11.2f} "
              f"{r['clip_step_ms']:>13.3f} {r['clip_ratio']:>16.2f} {r['clip_over_step']:>16.2f}")


if __name__ == "__main__":
    main()
