"""``python -m tritonadam.bench``: optimizer-step throughput against torch and the copy roofline.

Examples::

    python -m tritonadam.bench                                  # the default matrix (GPU or CPU)
    python -m tritonadam.bench --profiles gpt2-124m,many-small --setups bf16 --format md
    python -m tritonadam.bench --providers tritonadam,torch-fused --profiles one-huge@1B \\
        --out run.json --out run.md --plot run.png
    python -m tritonadam.bench --load run.json --format md      # re-render a saved run
    python -m tritonadam.bench --plan --profiles many-small     # check arguments, show the cases
    python -m tritonadam.bench --list                           # profiles, setups, providers
    python -m tritonadam.bench --sweep --profiles many-small    # also every candidate launch config
    python -m tritonadam.bench --setups all --clip all --max-norm 0.5  # clip + step for every setup
    python -m tritonadam.bench --tuning --profiles gpt2-124m --setups bf16 \
        --out tuning.json --out tuning.md                       # autotuner cost and benefit (GPU)

Exit status: 0 when every result checked is right; 1 when a provider's result disagrees with
the float64 reference (or tritonadam raises); 2 for a usage error.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from dataclasses import dataclass

from .. import _env
from ._startup import prepare_interpreter

_DEFAULT_GPU_PROFILES = ["gpt2-124m", "llama-layers", "tinyllama-1.1b", "llama2-7b", "many-small",
                         "one-huge"]
_DEFAULT_CPU_PROFILES = ["one-huge", "many-small"]
_GPU_PROVIDERS = ["tritonadam", "torch-fused", "torch-foreach", "torch-forloop", "torch-compile",
                  "tritonadam-graph", "torch-fused-graph", "apex", "te", "torchao-8bit",
                  "torchao-4bit", "flashoptim", "bnb-8bit"]
#: run by default only where installed
_OPTIONAL_PROVIDERS = ("apex", "te", "torchao-8bit", "torchao-4bit", "flashoptim", "bnb-8bit")
_CPU_PROVIDERS = ["torch-fused", "torch-foreach", "torch-forloop"]
_CPU_TIME_BUDGET_S = 15.0  # of timed cases, after the checks
_CPU_TIMED_SETUPS = ["fp32", "bf16"]  # all setups are checked and in the roofline
_DEFAULT_CLIP_SETUPS = ["fp32", "bf16"]  # clip + step adds the same passes to any setup


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    from .providers import PROVIDERS
    from .report import FORMATS
    from .workloads import ALGOS, PROFILES, SETUPS, core_setups

    p = argparse.ArgumentParser(
        prog="python -m tritonadam.bench",
        description="Time Adam/AdamW/AdaMax steps of tritonadam and PyTorch side by side, in "
                    "bytes moved per second against this device's measured copy bandwidth.",
        epilog="Without a GPU it runs torch's CPU optimizers on small sizes, checks tritonadam "
               "in Triton's interpreter, and shows the analytic GPU roofline.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sel = p.add_argument_group("what to run")
    sel.add_argument("--providers", type=_csv_list, metavar="LIST",
                     help=f"comma list of {', '.join(PROVIDERS)} or 'all' (default on a GPU: "
                          "tritonadam, the torch ones and apex/te when installed; on CPU: the "
                          "torch ones, tritonadam is checked only)")
    sel.add_argument("--setups", "--dtypes", dest="setups", type=_csv_list, metavar="LIST",
                     help=f"dtype setups: {', '.join(SETUPS)}, 'core' (the GPU check's: "
                          f"{','.join(core_setups())}: the pairs that move the same bytes as "
                          f"torch, and the key quantized ones) or 'all' (default all; on CPU "
                          f"{','.join(_CPU_TIMED_SETUPS)} are timed and all are checked)")
    sel.add_argument("--setups-for", action="append", default=[], metavar="WORKLOAD=LIST",
                     help="the setups of one workload instead of --setups' (repeatable; WORKLOAD "
                          "as in --profiles, LIST as in --setups), e.g. "
                          "llama-layers@400M=core,bf16-remainder: the GPU check times the "
                          "quantized setups on one workload only")
    sel.add_argument("--profiles", type=_csv_list, metavar="LIST",
                     help=f"shape profiles, NAME or NAME@SIZE: {', '.join(PROFILES)} "
                          f"(default on a GPU: {','.join(_DEFAULT_GPU_PROFILES)}; on CPU: "
                          f"{','.join(_DEFAULT_CPU_PROFILES)} at 1M)")
    sel.add_argument("--sizes", type=_csv_list, metavar="LIST",
                     help="parameter counts (e.g. 10M,100M,1B) for sized profiles given "
                          "without @SIZE (default: each profile's own)")
    sel.add_argument("--clip", type=_csv_list, metavar="LIST",
                     help="setups that also get a 'clip + step' case per provider: the grads' "
                          "total norm clipped to --max-norm before each step (torch's "
                          "clip_grad_norm_(foreach=True) for all but tritonadam, whose "
                          "clip_grad_norm_ is applied in the step), or 'all' or 'none' "
                          f"(default {','.join(_DEFAULT_CLIP_SETUPS)} where run)")
    sel.add_argument("--max-norm", type=float, default=1.0, metavar="X",
                     help="max_norm of the clip + step cases (default 1.0)")
    sel.add_argument("--optimizer", choices=ALGOS, default="adamw")
    sel.add_argument("--amsgrad", action="store_true")
    sel.add_argument("--lr", type=float, default=1e-3)
    sel.add_argument("--weight-decay", type=float, default=1e-2)
    sel.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    sel.add_argument("--threads", type=int, metavar="N",
                     help="torch CPU threads for a CPU run (default 1: with 2+ OpenMP threads "
                          "on a busy machine, CPU steps stall for tens of ms at random)")
    sel.add_argument("--baseline", default="torch-fused",
                     help="provider the speedup column divides by (default torch-fused)")
    sel.add_argument("--compile-max-tensors", type=int, default=200, metavar="N",
                     help="skip torch-compile on workloads with more tensors, as its compile "
                          "time grows with them (default 200: GPT-2's 148 tensors are compiled, "
                          "TinyLlama's 201 are not)")
    sel.add_argument("--autotune", choices=["on", "off", "cache-only"],
                     help="tritonadam's launch-config tuning for this run (sets "
                          "TRITONADAM_AUTOTUNE; default: as set in the environment). First-use "
                          "tuning happens in the untimed first steps")
    sel.add_argument("--sweep", action="store_true",
                     help="also time tritonadam at every launch config the tuner considers for "
                          "each workload (block_size/num_warps/persistent), nearest the default "
                          "first, after the providers")
    sel.add_argument("--sweep-max", type=int, metavar="N",
                     help="with --sweep, at most N configs per workload and setup")
    sel.add_argument("--first-use", type=_csv_list, metavar="SETUPS",
                     help="also time tritonadam's first use (the first step with an empty "
                          "autotune cache, then the tuned step) for these setups ('all')")
    sel.add_argument("--sweep-from", metavar="FILE.json",
                     help="with --tuning: rank the tuned configs among the fixed configs another "
                          "run swept (its rows are copied into this report, marked) instead of "
                          "sweeping again")
    sel.add_argument("--tuning", action="store_true",
                     help="measure tritonadam's autotuner instead of comparing providers: the "
                          "first step's extra time with an empty autotune cache (budgets: "
                          "TRITONADAM_AUTOTUNE_COMPILE_BUDGET, TRITONADAM_AUTOTUNE_BUDGET), and "
                          "the tuned step against the sweep's fixed configs (implies --sweep and "
                          "--providers tritonadam). Needs a GPU: without one it says so and exits 0")
    tim = p.add_argument_group("timing")
    tim.add_argument("--warmup-ms", type=float)
    tim.add_argument("--rep-ms", type=float,
                     help="time spent on each figure of a case, over all rounds (sets the reps "
                          "per round)")
    tim.add_argument("--rounds", type=int,
                     help="interleaved rounds: each round times every case of a workload and "
                          "setup once, in turn (default 7 on a GPU, 3 on CPU)")
    tim.add_argument("--min-reps", type=int, help="reps per round and figure, at least")
    tim.add_argument("--max-reps", type=int, help="reps per round and figure, at most")
    tim.add_argument("--no-flush", action="store_true", help="do not flush L2 between reps")
    tim.add_argument("--no-check", action="store_true", help="skip correctness checks")
    tim.add_argument("--check-steps", type=int, default=2, metavar="N",
                     help="steps before the correctness check (default 2)")
    tim.add_argument("--no-launch-count", action="store_true",
                     help="skip the torch.profiler kernel-launch count")
    tim.add_argument("--time-budget", type=float, metavar="S",
                     help=f"start no new case after S seconds (default: none on a GPU, "
                          f"{_CPU_TIME_BUDGET_S:g} on CPU, counted after the correctness checks)")
    tim.add_argument("--seed", type=int, default=0,
                     help="of the params' and grads' values and of stochastic rounding (default 0)")
    out = p.add_argument_group("output")
    out.add_argument("--format", choices=FORMATS,
                     help="stdout format (default table); also for --out files whose "
                          "extension is not .json/.md/.csv/.txt")
    out.add_argument("--out", action="append", default=[], metavar="FILE",
                     help="write the report to FILE (repeatable; format from the extension); "
                          "stdout then shows the table")
    out.add_argument("--summary", metavar="FILE.md",
                     help="also write the one-page markdown summary (goals, key results, launch "
                          "configs) to FILE, like --out")
    out.add_argument("--plot", metavar="FILE.png", help="bar chart (needs matplotlib)")
    out.add_argument("--roofline", action="store_true",
                     help="show the analytic roofline table (always shown on CPU)")
    out.add_argument("--load", metavar="FILE.json", help="render a saved JSON run; run nothing")
    out.add_argument("--note", action="append", default=[], metavar="TEXT",
                     help="add a note to the report (repeatable); with --load, to annotate a "
                          "saved run, e.g. why a goal was missed, and write it back with --out")
    out.add_argument("--list", action="store_true", help="list profiles, setups and providers")
    out.add_argument("--plan", action="store_true",
                     help="check the arguments, print the cases the run would time (as on a GPU "
                          "unless --device cpu) and exit without running anything")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    return p


def _listing() -> str:
    from tabulate import tabulate

    from .providers import PROVIDERS, tritonadam_held, tritonadam_traffic
    from .workloads import PROFILES, SETUPS, format_count, make_workload

    rows = []
    for name, prof in PROFILES.items():
        if prof.sized:
            sizes = ",".join(format_count(s) for s in prof.default_sizes)
            rows.append([name, f"sized (default {sizes})", "", prof.description])
        else:
            w = make_workload(name)
            rows.append([name, format_count(w.params), w.tensors, prof.description])
    text = "Profiles\n" + tabulate(rows, headers=["name", "params", "tensors", "description"]) + "\n\n"
    text += ("Setups (tritonadam AdamW bytes per parameter, from tritonadam.state.variant: "
             "moved per step, and held: param + grad + state)\n") + tabulate(
        [[s.name, f"{tritonadam_traffic(s).bytes_per_param:g}", f"{tritonadam_held(s):g}",
          tritonadam_traffic(s).describe(), s.description] for s in SETUPS.values()],
        headers=["name", "B/param", "held", "traffic", "description"],
        disable_numparse=True) + "\n\n"
    text += "Providers\n" + tabulate([[p.name, p.description] for p in PROVIDERS.values()],
                                     headers=["name", "description"]) + "\n"
    return text


def _print_plan(args, device: str, providers, setups, workloads, clip_setups, setups_for) -> None:
    from .workloads import format_count

    print(f"on {device}: {len(workloads)} workloads x {len(setups)} setups ({', '.join(setups)})")
    for w in workloads:
        own = setups_for.get(w.name)
        print(f"  {w.name}: {format_count(w.params)} params in {w.tensors} tensors"
              + (f"; setups {', '.join(own)}" if own is not None else ""))
    print("providers: " + (", ".join(providers) or "none"))
    if clip_setups:
        print(f"clip + step (max_norm {args.max_norm:g}) for each provider: {', '.join(clip_setups)}")
    if args.tuning:
        print("tritonadam first use: the first step with an empty autotune cache, then tuned")
    if args.first_use:
        print(f"tritonadam first use for: {', '.join(args.first_use)}")
    if args.sweep_from:
        print(f"tuned configs ranked among the fixed configs swept in {args.sweep_from}")
    elif args.sweep or args.tuning:
        print("tritonadam sweep: every candidate launch config"
              + (f", at most {args.sweep_max}" if args.sweep_max else "") + " per workload and setup")
    print("timer: device, host and steady-state time per case, in interleaved rounds per "
          "workload and setup" + (f" ({args.rounds} rounds)" if args.rounds else ""))


def _expand_core(values):
    """``core`` in a setup list: the core setups (``Setup.core``), in SETUPS order."""
    from .workloads import core_setups

    if not values or "core" not in values:
        return values
    out = []
    for v in values:
        out += core_setups() if v == "core" else [v]
    return list(dict.fromkeys(out))


def _select(values, allowed, what, parser, default):
    if not values:
        return list(default)
    if values == ["all"]:
        return list(allowed)
    bad = [v for v in values if v not in allowed]
    if bad:
        parser.error(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)} or all")
    return list(dict.fromkeys(values))


def _write_files(report: dict, args) -> None:
    from .report import EXTENSIONS, render

    outs = [(path, EXTENSIONS.get(os.path.splitext(path)[1].lower()) or args.format or "table")
            for path in args.out]
    if args.summary:
        outs.append((args.summary, "summary"))
    for path, fmt in outs:
        d = os.path.dirname(path)
        if d:
            os.makedirs(d, exist_ok=True)
        # A whole new file, then a rename: a reader (or a kill) never sees half a report.
        tmp = f"{path}.part"
        with open(tmp, "w") as f:
            f.write(render(report, fmt))
        os.replace(tmp, path)


def _emit(report: dict, args) -> None:
    from .report import plot, render

    _write_files(report, args)
    stdout_fmt = "table" if args.out or args.summary else (args.format or "table")
    sys.stdout.write(render(report, stdout_fmt))
    sys.stdout.flush()
    if args.plot:
        plot(report, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)


def _exit_code(report: dict) -> int:
    for r in report.get("results", []):
        if r.get("status") == "failed" or (r.get("provider") == "tritonadam" and r.get("status") == "error"):
            return 1
    for c in report.get("checks", []):
        if c.get("ok") is False and not c.get("tolerated") and (
                c.get("result") != "error" or c.get("provider") == "tritonadam"):
            return 1
    return 0


def main(argv: list[str] | None = None, allow_reexec: bool = False) -> int:
    """Run the CLI. ``allow_reexec`` is set only for ``python -m``: called in-process
    (tests), the environment variables and torch thread count it changes are restored."""
    if allow_reexec:
        return _main(argv, allow_reexec=True)
    saved_env = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITONADAM_AUTOTUNE")}
    saved_threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    try:
        return _main(argv, allow_reexec=False)
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if saved_threads is not None:
            sys.modules["torch"].set_num_threads(saved_threads)


@dataclass
class _Cases:
    """What a run measures, resolved from the arguments (names checked, defaults applied)."""

    providers: list[str]
    setups: list[str]  # timed
    all_setups: list[str]  # checked and in the roofline
    setups_for: dict[str, list[str]]  # a workload's own setups
    clip_setups: list[str]
    workloads: list
    roof_workloads: list
    first_use_setups: list[str] | None


def _check_modes(args, parser) -> None:
    """Usage errors found before torch is imported."""
    if args.tuning:
        for flag, bad in (("--providers", args.providers and args.providers != ["tritonadam"]),
                          ("--autotune", args.autotune), ("--plot", args.plot),
                          ("--roofline", args.roofline),
                          ("--clip", args.clip and args.clip != ["none"])):
            if bad:
                parser.error(f"{flag} does not apply to --tuning (it measures tritonadam's "
                             "first-use tuning, with an empty cache, against fixed configs)")
    if args.plot:
        from .report import have_matplotlib

        if os.path.splitext(args.plot)[1].lower() != ".png":
            parser.error(f"--plot {args.plot!r}: give a file name ending in .png")
        if not have_matplotlib():
            parser.error("--plot needs matplotlib, an optional extra: pip install matplotlib "
                         "(or pip install 'tritonadam[bench]')")
    if not 0 <= args.seed < 2 ** 63:
        parser.error(f"--seed {args.seed}: must be in [0, 2**63)")
    # Where the files go, before a run that may take minutes ends in a traceback there.
    for flag, path in [("--out", p) for p in args.out] + [("--summary", args.summary), ("--plot", args.plot)]:
        if path is None:
            continue
        problem = _output_problem(path)
        if problem:
            parser.error(f"{flag} {path!r}: {problem}")


def _output_problem(path: str) -> str | None:
    """Why a report cannot be written to ``path``, or None (its folder is made if missing)."""
    if not os.path.basename(path) or os.path.isdir(path):
        return "a directory; give a file name"
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is not a directory"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} is not writable"
    return None


def _resolve_cases(args, parser, cpu: bool) -> _Cases:
    """The run's providers, setups and workloads, with every remaining usage error."""
    import torch

    from .providers import PROVIDERS
    from .workloads import PROFILES, SETUPS, parse_count, parse_workloads

    if args.providers:
        providers = _select(args.providers, list(PROVIDERS), "provider", parser, [])
    elif cpu:
        providers = list(_CPU_PROVIDERS)
    else:
        providers = [p for p in _GPU_PROVIDERS if p not in _OPTIONAL_PROVIDERS
                     or PROVIDERS[p].unavailable(torch.device("cuda")) is None]
    if args.baseline not in PROVIDERS:
        parser.error(f"unknown --baseline {args.baseline}")
    args.setups = _expand_core(args.setups)
    setups = _select(args.setups, list(SETUPS), "setup", parser, list(SETUPS))
    all_setups = list(setups)
    if cpu and not args.setups:
        setups = list(_CPU_TIMED_SETUPS)
    setups_for: dict[str, list[str]] = {}
    for spec in args.setups_for:
        key, eq, listed = spec.partition("=")
        if not eq or not key.strip() or not listed.strip():
            parser.error(f"--setups-for {spec!r}: expected WORKLOAD=LIST, e.g. "
                         "llama-layers@400M=core,bf16-remainder")
        try:
            names = [w.name for w in parse_workloads([key.strip()], None, cpu=cpu)]
        except ValueError as e:
            parser.error(f"--setups-for {spec!r}: {e}")
        chosen = _select(_expand_core(_csv_list(listed)), list(SETUPS), "setup", parser, [])
        for name in names:
            setups_for[name] = chosen
    all_setups = [s for s in SETUPS if s in all_setups or any(s in v for v in setups_for.values())]
    clip_setups = [] if args.clip == ["none"] else _select(
        args.clip, all_setups, "--clip setup", parser,
        [s for s in _DEFAULT_CLIP_SETUPS if s in all_setups])
    if not args.max_norm > 0:
        parser.error("--max-norm must be > 0")
    if args.optimizer == "adamax" and args.amsgrad:
        parser.error("--amsgrad does not apply to --optimizer adamax")
    try:
        sizes = [parse_count(s) for s in args.sizes] if args.sizes else None
        profiles = args.profiles or (_DEFAULT_CPU_PROFILES if cpu else _DEFAULT_GPU_PROFILES)
        if profiles == ["all"]:
            profiles = [p for p in PROFILES if p != "check-small"]
        workloads = parse_workloads(profiles, sizes, cpu=cpu)
        roof_workloads = workloads if (args.profiles or not cpu) else parse_workloads(
            _DEFAULT_GPU_PROFILES, None, cpu=False)
    except ValueError as e:
        parser.error(str(e))
    unknown = [name for name in setups_for if name not in {w.name for w in workloads}]
    if unknown:
        parser.error(f"--setups-for names {', '.join(unknown)}, not a workload of this run "
                     f"({', '.join(w.name for w in workloads)})")
    for name in ("warmup_ms", "rep_ms", "time_budget", "lr", "weight_decay"):
        v = getattr(args, name)
        if v is not None and not 0 <= v < float("inf"):  # also NaN
            parser.error(f"--{name.replace('_', '-')} must be a finite number >= 0")
    first_use_setups = None
    if args.first_use:
        first_use_setups = setups if args.first_use == ["all"] else _select(
            args.first_use, setups, "--first-use setup", parser, setups)
    if args.sweep_from and not args.tuning:
        parser.error("--sweep-from applies to --tuning")
    for name in ("min_reps", "max_reps", "check_steps", "sweep_max", "rounds"):
        v = getattr(args, name)
        if v is not None and v < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return _Cases(providers, setups, all_setups, setups_for, clip_setups, workloads,
                  roof_workloads, first_use_setups)


def _timing_config(args, parser, cpu: bool):
    from .timing import TimingConfig

    # A sweep times ~20-40 configs per workload: shorter reps than a provider comparison.
    many = args.sweep or args.tuning
    dflt = {"warmup_ms": 5.0 if cpu else (20.0 if many else 30.0),
            "rep_ms": 30.0 if cpu else (60.0 if many else 150.0),
            "min_reps": 1, "max_reps": 3 if cpu else 5, "rounds": 3 if cpu else (5 if many else 7)}
    tcfg = TimingConfig(
        warmup_ms=args.warmup_ms if args.warmup_ms is not None else dflt["warmup_ms"],
        rep_ms=args.rep_ms if args.rep_ms is not None else dflt["rep_ms"],
        min_reps=args.min_reps or dflt["min_reps"],
        max_reps=args.max_reps or max(dflt["max_reps"], args.min_reps or 0),
        rounds=args.rounds or dflt["rounds"],
        flush=not args.no_flush)
    if tcfg.min_reps > tcfg.max_reps:
        parser.error("--min-reps is larger than --max-reps")
    return tcfg


def _swept_elsewhere(args, parser, cases: _Cases) -> tuple[list, list]:
    """--sweep-from: the fixed-config results and sweeps of this run's cases in that file."""
    if not args.sweep_from:
        return [], []
    from .report import load

    try:
        other = load(args.sweep_from)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    names = {(w.name, s) for w in cases.workloads for s in cases.setups}
    return (
        [dict(r, swept_in=args.sweep_from) for r in other.get("results", [])
         if r.get("variant") == "fixed" and (r["workload"], r["setup"]) in names],
        [dict(sw, swept_in=args.sweep_from) for sw in other.get("sweeps") or []
         if (sw["workload"], sw["setup"]) in names])


def _report(runner, final: bool, *, args, cpu: bool, cases: _Cases, opts, hp, tcfg, budget,
            header: dict, swept_elsewhere: tuple[list, list], t0: float) -> dict:
    """The report (``SCHEMA``) of what ``runner`` has measured so far."""
    from .report import SCHEMA, cpu_statement, goals, roofline
    from .tuning import LATER_STEPS

    providers = cases.providers
    timed_interpreted = cpu and ("tritonadam" in providers or bool(opts.sweep) or bool(cases.first_use_setups))
    statement = cpu_statement(timed_interpreted, checked=not args.no_check) if cpu else None
    notes = list(runner.notes) + list(args.note)
    if timed_interpreted:
        notes.append("tritonadam was timed in Triton's CPU interpreter: its times measure the "
                     "interpreter, not the kernels")
    if providers and args.baseline not in providers:  # (--tuning times no providers)
        notes.append(f"no speedups: the baseline {args.baseline} is not among this run's providers "
                     f"({', '.join(providers)}); add it to --providers or name one of them with --baseline")
    return {
        "schema": SCHEMA,
        "mode": "cpu" if cpu else "gpu",
        "header": header,
        "statement": statement,
        "config": {
            "providers": providers, "setups": cases.setups, "setups_for": cases.setups_for,
            "workloads": [w.name for w in cases.workloads],
            "clip_setups": opts.clip_setups, "max_norm": args.max_norm,
            "algo": args.optimizer, "lr": hp.lr, "betas": list(hp.betas), "eps": hp.eps,
            "weight_decay": hp.weight_decay, "amsgrad": hp.amsgrad, "baseline": args.baseline,
            "warmup_ms": tcfg.warmup_ms, "rep_ms": tcfg.rep_ms, "min_reps": tcfg.min_reps,
            "max_reps": tcfg.max_reps, "rounds": tcfg.rounds, "flush": tcfg.flush,
            "timer": "cpu-wall" if cpu else "cuda-events", "check": not args.no_check,
            "check_steps": args.check_steps, "time_budget_s": budget, "seed": args.seed,
            "sweep": opts.sweep, "sweep_max": args.sweep_max, "first_use": opts.first_use,
            "later_steps": LATER_STEPS if opts.first_use else None,
        },
        "copy_bandwidth": runner.copy,
        "results": runner.rows + swept_elsewhere[0],
        "checks": runner.checks,
        "sweeps": runner.sweeps + swept_elsewhere[1],
        "roofline": roofline(cases.roof_workloads, cases.all_setups, args.optimizer, args.amsgrad),
        "show_roofline": "full" if args.roofline else cpu,
        "goals": goals(runner.rows, baseline=args.baseline) if not cpu else [],
        "notes": notes,
        "interrupted": runner.interrupted,
        "complete": final,
        "elapsed_s": time.monotonic() - t0,
    }


def _main(argv: list[str] | None, allow_reexec: bool) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.list:
        sys.stdout.write(_listing())
        return 0
    _check_modes(args, parser)
    if args.load:
        from .report import load

        try:
            report = load(args.load)
        except (OSError, ValueError) as e:
            parser.error(str(e))
        report.setdefault("notes", []).extend(args.note)
        _emit(report, args)
        return _exit_code(report)

    if args.autotune:
        os.environ["TRITONADAM_AUTOTUNE"] = args.autotune

    import torch

    cuda_ok = torch.cuda.is_available()
    if args.device == "cuda" and not cuda_ok and not args.plan:
        parser.error("--device cuda: no CUDA device is available")
    # --plan shows a GPU run's cases on any machine unless --device cpu says otherwise.
    cpu = args.device == "cpu" or (not cuda_ok and not args.plan)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    cases = _resolve_cases(args, parser, cpu)

    if args.plan:
        _print_plan(args, "cpu" if cpu else "cuda", cases.providers, cases.setups, cases.workloads,
                    [] if args.tuning else cases.clip_setups, cases.setups_for)
        return 0
    if args.tuning and (cpu or _env.interpret()):
        # Nothing is tuned on the CPU or in Triton's interpreter (set on a GPU machine, the
        # kernels could not step CUDA tensors either).
        from .tuning import NO_GPU_MESSAGE

        print(NO_GPU_MESSAGE, flush=True)
        return 0
    if allow_reexec:
        prepare_interpreter(argv, cpu)
    elif cpu and os.environ.get("TRITON_INTERPRET", "") == "":
        from ._startup import _compiled_kernels_loaded

        if "tritonadam" in cases.providers and _compiled_kernels_loaded():
            # In-process, tritonadam's kernels were defined for a GPU at its import: setting
            # the variable now changes nothing (python -m re-executes instead).
            parser.error("tritonadam's kernels were imported without TRITON_INTERPRET=1, so its "
                         "cases cannot run on the CPU in this process: set TRITON_INTERPRET=1 "
                         "before importing tritonadam, or run `python -m tritonadam.bench`")
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cpu" if cpu else "cuda", None if cpu else torch.cuda.current_device())
    if cpu:
        torch.set_num_threads(args.threads or 1)

    from .providers import HyperParams
    from .report import collect_header
    from .interrupt import stop_on_sigterm
    from .runner import Options, run, stderr_progress
    from .workloads import make_workload

    tcfg = _timing_config(args, parser, cpu)
    hp = HyperParams(lr=args.lr, weight_decay=args.weight_decay, amsgrad=args.amsgrad,
                     seed=args.seed)
    budget = args.time_budget if args.time_budget is not None else (_CPU_TIME_BUDGET_S if cpu else None)
    if args.tuning:
        from ..autotune import Tuner

        try:  # a malformed budget variable is a usage error, not a failed case
            Tuner().budget_s, Tuner().compile_budget_s
        except ValueError as e:
            parser.error(str(e))
        cases.providers = []
    check_only = ()
    if cpu and "tritonadam" not in cases.providers and not args.no_check:
        check_only = ("tritonadam",)
    progress = None if args.quiet else stderr_progress()
    opts = Options(device=device, providers=cases.providers, setups=cases.setups,
                   setups_for=cases.setups_for, workloads=cases.workloads,
                   algo=args.optimizer, hp=hp, timing=tcfg, baseline=args.baseline,
                   check=not args.no_check, check_steps=args.check_steps,
                   profile_launches=not args.no_launch_count, time_budget_s=budget,
                   compile_max_tensors=args.compile_max_tensors, check_only=check_only,
                   check_workload=make_workload("check-small"), check_setups=cases.all_setups,
                   clip_setups=[] if args.tuning else cases.clip_setups, max_norm=args.max_norm,
                   seed=args.seed, progress=progress,
                   sweep=args.sweep or (args.tuning and not args.sweep_from),
                   sweep_max=args.sweep_max, first_use=args.tuning or bool(cases.first_use_setups),
                   first_use_setups=cases.first_use_setups,
                   budget_after_checks=cpu and args.time_budget is None)
    t0 = time.monotonic()
    header = collect_header(device, argv)
    if args.tuning:
        header["tritonadam_autotune"] = "on (first use: each case from an empty temporary cache)"
        header["tritonadam_cache_dir"] = "a temporary directory per first-use case"
    report_of = functools.partial(
        _report, args=args, cpu=cpu, cases=cases, opts=opts, hp=hp, tcfg=tcfg, budget=budget,
        header=header, swept_elsewhere=_swept_elsewhere(args, parser, cases), t0=t0)

    # Every finished case rewrites the --out files: a run killed later keeps what it measured.
    opts.on_row = lambda runner: _write_files(report_of(runner, final=False), args)

    try:
        with stop_on_sigterm():
            runner = run(opts)
    finally:
        if progress is not None:
            progress.done()
    report = report_of(runner, final=True)
    _emit(report, args)
    return _exit_code(report)


if __name__ == "__main__":
    sys.exit(main(allow_reexec=True))
