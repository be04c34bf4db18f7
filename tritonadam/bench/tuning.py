"""``python -m tritonadam.bench --tuning``: what tritonadam's autotuner costs and what it buys.

For each workload and dtype setup of the bench (tritonadam only, one launch per case):

1. **First-use cost.** With an empty autotune cache (a fresh temporary
   ``TRITONADAM_CACHE_DIR`` and a fresh ``tritonadam.autotune.Tuner`` installed with
   ``set_tuner``, so neither the disk nor the process memo knows the entry), the wall time of
   the first ``step()`` (which tunes) against the median of later steps, with the tuning
   budget in force and what the tuner itself reports (seconds spent, configs timed of
   considered).
2. **Tuned vs fixed.** The step with the tuned config against every fixed config the tuner
   considered for that launch size (``candidate_configs`` over the scratch size it timed, the
   architecture default first), each as an optimizer built with ``block_size=``/
   ``num_warps=``/``persistent=``, all timed with the bench's timer (CUDA events, L2 flushed before each step).

Needs a GPU: the CPU and Triton's interpreter are never tuned, so the CLI says so and exits
0 there. The pure parts (the fixed-config list, best/ratio arithmetic, rendering) are tested
on CPU with fake numbers.
"""
from __future__ import annotations

import csv
import gc
import io
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field

from .report import _clean, _csv_value, _json_default, header_lines

NO_GPU_MESSAGE = (
    "tritonadam bench --tuning: tuning benchmarks need a GPU. First-use tuning only runs on a "
    "CUDA or ROCm device (the CPU and Triton's interpreter are never tuned), so there is "
    "nothing to measure here; nothing was run."
)

#: timing defaults of a --tuning run (shorter than the comparison's: ~20 configs per case)
DEFAULT_TIMING = {"warmup_ms": 20.0, "rep_ms": 100.0, "min_reps": 10, "max_reps": 100}
#: later steps timed (wall, synchronised) to compare with the first
LATER_STEPS = 5


# ------------------------------------------------------------------------ pure logic

def fixed_configs(backend: str, numel: int, *, num_sms: int | None = None, default=None,
                  rep: int | None = None) -> list:
    """The fixed configs to time for a launch of ``numel`` elements: exactly the candidates
    the tuner considers (``candidate_configs`` over its scratch size ``rep``, by default the
    bucket's upper edge, ordered from ``default`` outwards), plus ``default`` at the end if
    the pruning dropped it (so the default's time is always known)."""
    from ..autotune.configs import bucket_numel, candidate_configs, size_bucket

    if rep is None:
        rep = bucket_numel(size_bucket(numel))
    # The optimizer lets the tuner consider persistent grids (tritonadam.kernels.ALLOW_PERSISTENT).
    out = candidate_configs(backend, rep, num_sms=num_sms, first=default, allow_persistent=True)
    if default is not None and default not in out:
        out.append(default)
    return out


def _cfg_key(cfg) -> tuple:
    """A config as a hashable (block_size, num_warps), from a LaunchConfig or its JSON."""
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        return (cfg.get("block_size"), cfg.get("num_warps"))
    return (cfg.block_size, cfg.num_warps)


def config_text(cfg) -> str:
    k = _cfg_key(cfg)
    return "n/a" if k is None else f"{k[0]}/{k[1]}"


def summarize(tuned_ms: float | None, fixed: list[dict], default=None, tuned=None) -> dict:
    """Best fixed config and ratios from a list of fixed timings.

    ``fixed``: ``{"config": LaunchConfig or its JSON, "ms": float | None}`` per config (None:
    it failed or was not timed). ``default``/``tuned``: the architecture default and the
    tuned config, to find their fixed timings. Returns ``best_fixed`` (the config's JSON),
    ``best_fixed_ms``, ``worst_fixed_ms``, ``default_ms``, ``tuned_fixed_ms`` (the tuned
    config timed as a fixed one), ``tuned_over_best`` (tuned ms / best fixed ms: 1.00 = the
    tuner found the best, above 1 = slower than the best fixed config), ``default_over_best``,
    ``tuned_rank`` (1 = the tuned config was the fastest fixed one), ``fixed_timed``,
    ``fixed_failed``.
    """
    ok = [f for f in fixed if _finite(f.get("ms"))]
    out = {"best_fixed": None, "best_fixed_ms": None, "worst_fixed_ms": None, "default_ms": None,
           "tuned_fixed_ms": None, "tuned_over_best": None, "default_over_best": None,
           "tuned_rank": None, "fixed_timed": len(ok), "fixed_failed": len(fixed) - len(ok)}
    if not ok:
        return out
    best = min(ok, key=lambda f: f["ms"])  # first of equal times: the tuner's order
    out["best_fixed"] = _as_json(best["config"])
    out["best_fixed_ms"] = best["ms"]
    out["worst_fixed_ms"] = max(f["ms"] for f in ok)
    by = {_cfg_key(f["config"]): f["ms"] for f in ok}
    if default is not None:
        out["default_ms"] = by.get(_cfg_key(default))
        if out["default_ms"] is not None:
            out["default_over_best"] = out["default_ms"] / best["ms"]
    if tuned is not None:
        t = by.get(_cfg_key(tuned))
        out["tuned_fixed_ms"] = t
        if t is not None:
            out["tuned_rank"] = 1 + sum(1 for f in ok if f["ms"] < t)
    if _finite(tuned_ms):
        out["tuned_over_best"] = tuned_ms / best["ms"]
    return out


def first_step_overhead(first_ms: float | None, later_ms: list[float]) -> dict:
    """The first step's extra time over a later step (the median of ``later_ms``)."""
    later = statistics.median(later_ms) if later_ms else None
    extra = first_ms - later if _finite(first_ms) and later is not None else None
    return {"first_step_ms": first_ms, "later_step_ms": later, "extra_ms": extra}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _as_json(cfg):
    if cfg is None or isinstance(cfg, dict):
        return cfg
    return cfg.to_json()


# ----------------------------------------------------------------------- the GPU run

@dataclass
class TuningOptions:
    device: object  # torch.device
    setups: list[str]
    workloads: list  # list[Workload]
    algo: str = "adamw"
    hp: object = None  # providers.HyperParams
    timing: object = None  # timing.TimingConfig
    time_budget_s: float | None = None
    tuner_budget_s: float | None = None  # None: TRITONADAM_AUTOTUNE_BUDGET, else the default
    seed: int = 0
    later_steps: int = LATER_STEPS
    mem_fraction: float = 0.9
    progress: object = None  # callable(str) or None
    # () -> bool: True once a stop was asked for (SIGTERM). The signal handler also raises,
    # but the tuner turns any exception inside first-use tuning into "use the default", so
    # the loop checks this too.
    stop: object = None
    # Injectable for CPU tests (the GPU path uses the real ones).
    tuner_factory: object = None  # () -> Tuner
    device_info: object = None  # (device) -> DeviceInfo


@dataclass
class TuningRun:
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    interrupted: bool = False
    tuner_budget_s: float | None = None


def _build(params, setup, algo, hp, **extra):
    import tritonadam

    cls = {"adam": tritonadam.Adam, "adamw": tritonadam.AdamW, "adamax": tritonadam.Adamax}[algo]
    kw = dict(lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay,
              master_weights=setup.master is not None, **extra)
    if algo != "adamax":
        kw["amsgrad"] = hp.amsgrad
    return cls(params, **kw)


def _read_entries(tuner) -> dict:
    """Every entry in the tuner's (temporary, per-case) disk cache."""
    out: dict = {}
    try:
        for path in tuner.cache.files():
            out.update(tuner.cache.read(path).entries)
    except Exception:  # noqa: BLE001 - the details are extras; the timings stand without them
        pass
    return out


def run_tuning(opts: TuningOptions) -> TuningRun:
    """Measure every (workload, setup) case; see the module doc. Never raises for one case:
    a failing case becomes a row with ``status`` "error"; SIGTERM (``runner.Interrupted``) or
    Ctrl-C stops starting cases and returns what is done."""
    import torch

    from .. import autotune
    from ..autotune import Tuner
    from .runner import Interrupted, free_device_bytes, make_tensors, resident_estimate
    from .timing import FLUSH_BYTES, Timer
    from .workloads import SETUPS

    out = TuningRun()
    dev = opts.device
    cuda = dev.type == "cuda"
    timer = Timer(dev, opts.timing)
    t0 = time.monotonic()
    deadline = t0 + opts.time_budget_s if opts.time_budget_s else None
    make_tuner = opts.tuner_factory or (lambda: Tuner(budget_s=opts.tuner_budget_s))
    if opts.device_info is not None:
        get_info = opts.device_info
    else:
        from ..autotune.device import device_info as get_info

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def cleanup():
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    def stopped():
        return bool(opts.stop and opts.stop())

    def out_of_time():
        return stopped() or (deadline is not None and time.monotonic() > deadline)

    def progress(text):
        if opts.progress:
            opts.progress(text)

    def timed_step(step):
        sync()
        t = time.perf_counter()
        step()
        sync()
        return (time.perf_counter() - t) * 1e3

    cases = [(w, SETUPS[s]) for w in opts.workloads for s in opts.setups]
    tmp_root = tempfile.mkdtemp(prefix="tritonadam-bench-tuning-")
    saved_cache_dir = os.environ.get("TRITONADAM_CACHE_DIR")
    old_tuner = autotune.get_tuner()
    try:
        out.tuner_budget_s = make_tuner().budget_s
        for k, (w, s) in enumerate(cases):
            row = {"workload": w.name, "profile": w.profile, "params": w.params,
                   "tensors": w.tensors, "setup": s.name, "provider": "tritonadam"}
            if stopped():
                raise Interrupted()
            out.rows.append(row)
            if out_of_time():
                row.update(status="skipped", reason="time budget spent (--time-budget)")
                continue
            need = resident_estimate(w, s, opts.hp.amsgrad) + (FLUSH_BYTES if opts.timing.flush else 0)
            free = free_device_bytes(dev)
            if free is not None and need > free * opts.mem_fraction:
                row.update(status="skipped", reason=f"needs about {need / 2**30:.1f} GiB, "
                                                    f"{free / 2**30:.1f} GiB free on the device")
                continue
            tag = f"[{k + 1}/{len(cases)}] {w.name} {s.name}"
            params = opt = None
            try:
                params = make_tensors(w, s, dev, opts.seed)
                # 1. first use with an empty cache: fresh disk directory, fresh process memo
                case_dir = os.path.join(tmp_root, f"case{k}")
                os.environ["TRITONADAM_CACHE_DIR"] = case_dir
                tuner = make_tuner()
                autotune.set_tuner(tuner)
                row["tuner_budget_s"] = tuner.budget_s
                progress(f"{tag}: first step with an empty autotune cache")
                opt = _build(params, s, opts.algo, opts.hp, autotune="on")
                first_ms = timed_step(opt.step)
                for _ in range(2):
                    opt.step()
                later = [timed_step(opt.step) for _ in range(max(1, opts.later_steps))]
                row.update(first_step_overhead(first_ms, later))
                chosen = tuner.choices()
                tuned_choice = next((c for c in chosen if c.source == "tuned"), chosen[0] if chosen else None)
                tuned_cfg = tuned_choice.config if tuned_choice is not None else None
                row["launches_decided"] = len(chosen)
                row["tuned"] = tuned_cfg.to_json() if tuned_cfg is not None else None
                row["tuned_source"] = tuned_choice.source if tuned_choice is not None else None
                entries = _read_entries(tuner)
                entry = next(iter(entries.values()), None) if len(entries) == 1 else None
                measured = (entry or {}).get("measured") or {}
                row.update(tune_s=measured.get("elapsed_s"),
                           configs_timed=measured.get("configs_timed"),
                           configs_considered=measured.get("configs_considered"),
                           tune_complete=measured.get("complete"),
                           numel_timed=(entry or {}).get("numel_timed"))
                if stopped():  # a SIGTERM during tuning was caught by the tuner
                    raise Interrupted()
                # 2. the tuned step (the tuner's memo now holds the choice)
                progress(f"{tag}: tuned {config_text(tuned_cfg)}")
                t = timer.time(opt.step, deadline=deadline)
                row.update(tuned_ms=t.median, tuned_ms_p20=t.p20, tuned_ms_p80=t.p80,
                           tuned_reps=t.reps)
                opt = None
                cleanup()
                # 3. every fixed config the tuner considered for this size
                info = get_info(dev)
                bucket = autotune.size_bucket(w.params)
                default = autotune.arch_default(info.backend, info.arch, bucket).config
                cfgs = fixed_configs(info.backend, w.params, num_sms=info.num_sms,
                                     default=default, rep=row.get("numel_timed"))
                row["default"] = default.to_json()
                row["bucket"] = bucket
                fixed: list[dict] = []
                row["fixed"] = fixed
                for j, cfg in enumerate(cfgs):
                    if out_of_time():
                        if not stopped():
                            row["fixed_partial"] = (f"time budget spent after {j} of {len(cfgs)} "
                                                    "fixed configs")
                        break
                    progress(f"{tag}: fixed {config_text(cfg)} [{j + 1}/{len(cfgs)}]")
                    item = {"config": cfg.to_json(), "ms": None}
                    fixed.append(item)
                    try:
                        opt = _build(params, s, opts.algo, opts.hp, block_size=cfg.block_size,
                                     num_warps=cfg.num_warps, persistent=cfg.persistent)
                        opt.step()  # compiles this config if the tuner did not
                        sync()
                        t = timer.time(opt.step, deadline=deadline)
                        item.update(ms=t.median, ms_p20=t.p20, ms_p80=t.p80, reps=t.reps)
                    except (Interrupted, KeyboardInterrupt):
                        raise
                    except Exception as e:  # noqa: BLE001 - one config failing is a result
                        item["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    finally:
                        opt = None
                        cleanup()
                if stopped():
                    row["fixed_partial"] = f"stopped (signal) after {len(fixed)} of {len(cfgs)} fixed configs"
                row.update(summarize(row["tuned_ms"], fixed, default, tuned_cfg))
                row["fixed_considered"] = len(cfgs)
                row["status"] = "ok"
                if row["best_fixed_ms"] is not None:
                    progress(f"{tag}: tuned {row['tuned_ms']:.4g} ms, best fixed "
                             f"{config_text(row['best_fixed'])} {row['best_fixed_ms']:.4g} ms")
            except (Interrupted, KeyboardInterrupt):
                row.setdefault("status", "skipped")
                row.setdefault("reason", "interrupted")
                raise
            except Exception as e:  # noqa: BLE001 - one broken case must not end the run
                oom = getattr(torch.cuda, "OutOfMemoryError", ())
                if oom and isinstance(e, oom):
                    row.update(status="skipped", reason=f"out of memory: {str(e).splitlines()[0]}")
                else:
                    row.update(status="error", reason=f"{type(e).__name__}: {e}")
            finally:
                params = opt = None
                autotune.set_tuner(old_tuner)
                cleanup()
    except (Interrupted, KeyboardInterrupt):
        out.interrupted = True
        out.notes.append("interrupted: results below are the cases finished before the signal")
    finally:
        autotune.set_tuner(old_tuner)
        if saved_cache_dir is None:
            os.environ.pop("TRITONADAM_CACHE_DIR", None)
        else:
            os.environ["TRITONADAM_CACHE_DIR"] = saved_cache_dir
        timer.release()
        shutil.rmtree(tmp_root, ignore_errors=True)
        cleanup()
    return out


# ------------------------------------------------------------------------ rendering

def _ms(x) -> str:
    return f"{x:.4g}" if _finite(x) else "n/a"


def _ratio(x) -> str:
    return f"{x:.3f}" if _finite(x) else "n/a"


def _count(n) -> str:
    from .workloads import format_count

    return format_count(n) if isinstance(n, int) else "n/a"


FIRST_USE_HEADERS = ["workload", "params", "setup", "tuned config", "source", "budget s",
                     "tuning s", "configs timed", "step 1 ms", "later step ms", "extra ms"]
VERSUS_HEADERS = ["workload", "setup", "tuned config", "tuned ms", "best fixed", "best ms",
                  "default", "default ms", "tuned/best", "default/best", "tuned rank",
                  "fixed timed"]


def first_use_rows(report: dict) -> list[list]:
    rows = []
    for r in report.get("results", []):
        if r.get("status") != "ok":
            continue
        timed = (f"{r['configs_timed']} of {r['configs_considered']}"
                 + ("" if r.get("tune_complete") else " (budget)")
                 if r.get("configs_timed") is not None else "n/a")
        rows.append([r["workload"], _count(r.get("params")), r["setup"], config_text(r.get("tuned")),
                     r.get("tuned_source") or "n/a", _num(r.get("tuner_budget_s")),
                     _num(r.get("tune_s")), timed, _ms(r.get("first_step_ms")),
                     _ms(r.get("later_step_ms")), _ms(r.get("extra_ms"))])
    return rows


def versus_rows(report: dict) -> list[list]:
    rows = []
    for r in report.get("results", []):
        if r.get("status") != "ok":
            continue
        rank = r.get("tuned_rank")
        n = r.get("fixed_timed")
        timed = f"{n} of {r.get('fixed_considered')}" + (" (budget)" if r.get("fixed_partial") else "")
        rows.append([r["workload"], r["setup"], config_text(r.get("tuned")), _ms(r.get("tuned_ms")),
                     config_text(r.get("best_fixed")), _ms(r.get("best_fixed_ms")),
                     config_text(r.get("default")), _ms(r.get("default_ms")),
                     _ratio(r.get("tuned_over_best")), _ratio(r.get("default_over_best")),
                     f"{rank} of {n}" if rank is not None else "n/a", timed])
    return rows


def _num(x) -> str:
    return f"{x:g}" if _finite(x) else "n/a"


def render_tuning(report: dict, fmt: str) -> str:
    if fmt in ("table", "md"):
        return render_tuning_text(report, md=fmt == "md")
    if fmt == "csv":
        return render_tuning_csv(report)
    if fmt == "json":
        import json

        return json.dumps(_clean(report), indent=2, default=_json_default) + "\n"
    raise ValueError(f"unknown format {fmt!r}")


def render_tuning_text(report: dict, md: bool = False) -> str:
    from tabulate import tabulate

    fmt = "github" if md else "simple"
    out: list[str] = header_lines(report["header"], md, title="tritonadam bench: autotuning")

    def title(t):
        out.append("")
        out.append(f"## {t}\n" if md else f"{t}\n{'-' * len(t)}")

    cfg = report.get("config", {})
    out.append("")
    out.append(f"optimizer {cfg.get('algo')} lr={cfg.get('lr')} weight_decay="
               f"{cfg.get('weight_decay')} amsgrad={cfg.get('amsgrad')}; tuning budget "
               f"{_num(cfg.get('tuner_budget_s'))} s per entry "
               "(TRITONADAM_AUTOTUNE_BUDGET); timing: warm-up "
               f"{cfg.get('warmup_ms')} ms, {cfg.get('rep_ms')} ms of reps (min "
               f"{cfg.get('min_reps')}, max {cfg.get('max_reps')}), L2 flush "
               f"{'on' if cfg.get('flush') else 'off'}")

    title("First use: the step that tunes (empty autotune cache)")
    rows = first_use_rows(report)
    if rows:
        out.append(tabulate(rows, headers=FIRST_USE_HEADERS, tablefmt=fmt, disable_numparse=True))
        out.append("")
        out.append("Each case starts from an empty autotune cache (a fresh temporary "
                   "TRITONADAM_CACHE_DIR) and a fresh in-process tuner. step 1 ms: wall time of "
                   "the first step() (synchronised; includes state allocation, tuning on scratch "
                   "buffers and any Triton compilation); later step ms: median wall time of "
                   f"{cfg.get('later_steps', LATER_STEPS)} later synchronised steps; extra ms: "
                   "the difference. tuning s and configs timed: as the tuner recorded them. "
                   "Configs are block_size/num_warps.")
    else:
        out.append("(no case measured)")

    title("Tuned config against every fixed config the tuner considered")
    rows = versus_rows(report)
    if rows:
        out.append(tabulate(rows, headers=VERSUS_HEADERS, tablefmt=fmt, disable_numparse=True))
        out.append("")
        out.append("ms: median per step (CUDA events, each step from a flushed L2 and an idle "
                   "GPU), the tuned optimizer and one optimizer per fixed config "
                   "(block_size=, num_warps=) over the same tensors. tuned/best: tuned ms / the "
                   "fastest fixed config's ms (1.000 = the tuner found the best; above 1 = "
                   "slower). default: the built-in config for this GPU and size. tuned rank: "
                   "where the tuned config, timed as a fixed one, ranks among the fixed configs.")
        title("Every fixed config (ms per step)")
        detail = []
        for r in report.get("results", []):
            if r.get("status") != "ok":
                continue
            best = r.get("best_fixed_ms")
            for f in r.get("fixed", []):
                marks = [m for m, c in (("tuned", r.get("tuned")), ("default", r.get("default")))
                         if _cfg_key(c) == _cfg_key(f["config"])]
                detail.append([r["workload"], r["setup"], config_text(f["config"]), _ms(f.get("ms")),
                               f"{_ms(f.get('ms_p20'))}-{_ms(f.get('ms_p80'))}"
                               if f.get("ms") is not None else f.get("error", "not timed"),
                               _ratio(f["ms"] / best) if _finite(f.get("ms")) and best else "n/a",
                               ", ".join(marks)])
        out.append(tabulate(detail, headers=["workload", "setup", "config", "ms", "p20-p80",
                                             "/ best", ""], tablefmt=fmt, disable_numparse=True))
    else:
        out.append("(no case measured)")

    probs = [r for r in report.get("results", []) if r.get("status") != "ok"]
    if probs:
        title("Not measured")
        out.append(tabulate([[r["workload"], r["setup"], r.get("status"), r.get("reason", "")]
                             for r in probs], headers=["workload", "setup", "status", "why"],
                            tablefmt=fmt, disable_numparse=True))
    partial = [r for r in report.get("results", []) if r.get("fixed_partial")]
    notes = list(report.get("notes") or []) + [
        f"{r['workload']} {r['setup']}: {r['fixed_partial']}" for r in partial]
    if notes:
        title("Notes")
        out += [f"- {n}" for n in notes]
    out.append("")
    out.append(f"elapsed {report.get('elapsed_s', 0):.1f} s"
               + (" (interrupted)" if report.get("interrupted") else ""))
    return "\n".join(out) + "\n"


CSV_FIELDS = ["workload", "profile", "params", "tensors", "setup", "status", "tuner_budget_s",
              "tuned", "tuned_source", "tune_s", "configs_timed", "configs_considered",
              "first_step_ms", "later_step_ms", "extra_ms", "tuned_ms", "best_fixed",
              "best_fixed_ms", "default", "default_ms", "tuned_over_best", "default_over_best",
              "tuned_rank", "fixed_timed", "fixed_considered", "reason"]
CSV_HEADER_FIELDS = ["date", "device", "driver", "cuda", "torch", "triton"]


def render_tuning_csv(report: dict) -> str:
    """One row per case, configs as block_size/num_warps, the run's date, device and
    versions on every row."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS + CSV_HEADER_FIELDS)
    h = report["header"]
    for r in report.get("results", []):
        vals = []
        for k in CSV_FIELDS:
            v = r.get(k)
            vals.append(config_text(v) if k in ("tuned", "best_fixed", "default") and v else _csv_value(v))
        w.writerow(vals + [_csv_value(h.get(k)) for k in CSV_HEADER_FIELDS])
    return buf.getvalue()
