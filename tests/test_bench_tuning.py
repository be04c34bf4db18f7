"""Launch-config sweeps and ``--tuning``: the flags, the no-GPU path, the pure logic, the
rendering, and the runner's loop on CPU in Triton's interpreter with an injected tuner
(a fake timer posing as a GPU), so the whole code path runs end to end.

The measurements themselves need a GPU (tritonadam/bench/gpu_check.sh runs them).
"""
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tritonadam.autotune import DeviceInfo, LaunchConfig, Tuner, candidate_configs, get_tuner
from tritonadam.bench import report as report_mod
from tritonadam.bench import tuning
from tritonadam.bench.__main__ import _exit_code, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
FAKE_H100 = DeviceInfo(backend="cuda", name="Fake H100", arch="sm_90", capability="9.0", num_sms=132)
D = LaunchConfig(1024, 8)  # the GPU default
DP = LaunchConfig(1024, 8, True)
interpreter_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "") in ("", "0"),
                                      reason="runs the kernels in Triton's interpreter")


# ------------------------------------------------------------------------------ CLI

def test_flags_parse_and_are_in_help(capsys):
    p = build_parser()
    assert p.parse_args(["--tuning"]).tuning is True
    assert p.parse_args([]).tuning is False and p.parse_args([]).sweep is False
    args = p.parse_args(["--sweep", "--sweep-max", "6", "--profiles", "gpt2-124m,one-huge@10M"])
    assert args.sweep and args.sweep_max == 6 and args.profiles == ["gpt2-124m", "one-huge@10M"]
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--tuning" in out and "--sweep" in out


def test_tuning_without_gpu_exits_0_with_message(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["--tuning", "--device", "cpu", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == tuning.NO_GPU_MESSAGE
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine-level no-GPU default")
def test_tuning_without_gpu_subprocess_default_device():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    env.pop("_TRITONADAM_BENCH_REEXEC", None)
    r = subprocess.run([sys.executable, "-m", "tritonadam.bench", "--tuning"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tuning benchmarks need a GPU" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--providers", "torch-fused"], "--providers does not apply to --tuning"),
    (["--autotune", "off"], "--autotune does not apply to --tuning"),
    (["--plot", "x.png"], "--plot does not apply to --tuning"),
    (["--clip", "bf16"], "--clip does not apply to --tuning"),
])
def test_conflicting_flags_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--tuning", "--device", "cpu", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------- pure logic

def test_fixed_configs_are_the_tuners_candidates():
    n = 124_439_808  # gpt2-124m: bucket 2**27
    cfgs = tuning.fixed_configs("cuda", n, num_sms=132, default=D)
    assert cfgs == candidate_configs("cuda", 2**27, num_sms=132, first=D)
    assert cfgs[0] == D and cfgs[1:3] != [DP] * 2 and len(cfgs) == len(set(cfgs)) == 18
    small = tuning.fixed_configs("cuda", 5000, num_sms=132, default=D)
    assert small[-1] == D and all(c.block_size == 512 for c in small[:-1])  # D pruned, kept last
    assert {c.num_warps for c in tuning.fixed_configs("hip", n, default=LaunchConfig(4096, 4))} <= {1, 2, 4, 8}


def test_config_key_and_text_keep_persistent():
    assert tuning.config_key(D) != tuning.config_key(DP)
    assert tuning.config_key(DP.to_json()) == tuning.config_key(DP) == (1024, 8, True)
    assert tuning.config_key({"block_size": 1024, "num_warps": 8}) == tuning.config_key(D)
    assert tuning.config_text(D) == "1024/8" and tuning.config_text(DP.to_json()) == "1024/8 persistent"
    assert tuning.config_text(None) == "n/a"


def _fixed(*items):
    return [{"config": cfg.to_json() if i % 2 else cfg, "ms": ms} for i, (cfg, ms) in enumerate(items)]


def test_summarize_best_default_ratio_rank():
    fixed = _fixed((D, 1.10), (LaunchConfig(2048, 4), 1.00), (LaunchConfig(8192, 8), 1.30),
                   (LaunchConfig(1024, 2), None), (LaunchConfig(16384, 16), float("nan")))
    s = tuning.summarize(1.02, fixed, default=D, tuned=LaunchConfig(2048, 4))
    assert s["best_fixed"] == {"block_size": 2048, "num_warps": 4, "persistent": False}
    assert s["best_fixed_ms"] == 1.00 and s["worst_fixed_ms"] == 1.30
    assert s["default_ms"] == 1.10 and s["default_over_best"] == pytest.approx(1.10)
    assert s["tuned_over_best"] == pytest.approx(1.02)
    assert s["tuned_fixed_ms"] == 1.00 and s["tuned_rank"] == 1
    assert s["fixed_timed"] == 3 and s["fixed_failed"] == 2
    s = tuning.summarize(1.3, fixed, default=D, tuned=LaunchConfig(8192, 8))
    assert s["tuned_rank"] == 3 and s["tuned_over_best"] == pytest.approx(1.3)
    # ties: the first in the tuner's order wins
    s = tuning.summarize(None, _fixed((D, 2.0), (LaunchConfig(2048, 4), 2.0)), default=D)
    assert s["best_fixed"]["block_size"] == D.block_size and s["tuned_over_best"] is None


def test_summarize_tells_a_config_from_its_persistent_twin():
    """A config and its persistent twin are two configs: the default's time, the tuned
    rank and the best are each found under the right one."""
    fixed = _fixed((D, 2.0), (DP, 1.0), (LaunchConfig(2048, 8), 1.5))
    s = tuning.summarize(1.0, fixed, default=D, tuned=DP)
    assert s["default_ms"] == 2.0 and s["default_over_best"] == pytest.approx(2.0)
    assert s["best_fixed"] == DP.to_json() and s["tuned_rank"] == 1 and s["tuned_fixed_ms"] == 1.0
    s = tuning.summarize(2.0, fixed, default=DP, tuned=D)
    assert s["default_ms"] == 1.0 and s["tuned_rank"] == 3


def test_summarize_nothing_timed():
    s = tuning.summarize(1.0, _fixed((D, None)), default=D, tuned=D)
    assert s["best_fixed"] is None and s["tuned_over_best"] is None and s["fixed_failed"] == 1
    assert tuning.summarize(1.0, [], default=None)["fixed_timed"] == 0


def test_first_step_overhead():
    o = tuning.first_step_overhead(2503.0, [3.0, 2.0, 4.0, 2.5, 3.5])
    assert o == {"first_step_ms": 2503.0, "later_step_ms": 3.0, "extra_ms": 2500.0}
    assert tuning.first_step_overhead(None, [1.0])["extra_ms"] is None
    assert tuning.first_step_overhead(5.0, [])["later_step_ms"] is None


# ------------------------------------------------------------------------ rendering

def _row(provider, ms, variant="", config=None, **extra):
    r = {"workload": "llama-layers@400M", "profile": "llama-layers", "params": 404_766_720, "tensors": 18,
         "setup": "bf16", "provider": provider, "status": "ok", "device_ms": ms, "device_p20": ms,
         "device_p80": ms, "host_ms": 0.05, "host_p20": 0.05, "host_p80": 0.05, "steady_ms": ms,
         "steady_p20": ms, "steady_p80": ms, "rounds": 7, "reps": 3, "bytes_per_param": 22, "bytes_per_step": 404_766_720 * 22, "gbps": 1.0, "pct_copy": 90.0,
         "launches": 1, "state_bytes": 1, "check": "ok (0 of tol)", "label": ""}
    if variant:
        r["variant"] = variant
    if config is not None:
        r["config"] = config.to_json()
    r.update(extra)
    return r


def _fake_report():
    rows = [_row("tritonadam", 3.3), _row("torch-fused", 4.0, speedup=1.0),
            _row("tritonadam", 3.12, "first-use", LaunchConfig(8192, 16), first_step_ms=2600.0,
                 later_step_ms=3.2, extra_ms=2596.8, tuner_budget_s=2.0, compile_budget_s=60.0, tune_s=2.1,
                 compile_s=30.5, configs_timed=9, configs_pruned=4, configs_considered=42,
                 tune_complete=False, tuned_source="tuned"),
            _row("tritonadam", 3.3, "fixed", D), _row("tritonadam", 3.0, "fixed", DP),
            _row("tritonadam", 3.1, "fixed", LaunchConfig(8192, 16)),
            dict(_row("tritonadam", None, "fixed", LaunchConfig(1024, 2)), status="error",
                 reason="RuntimeError: x")]
    sweeps = [{"workload": "llama-layers@400M", "setup": "bf16", "default": D.to_json(), "bucket": 27,
               "considered": 42, "swept": 4}]
    return {"schema": report_mod.SCHEMA, "mode": "gpu",
            "header": {"date": "2026-01-01T00:00:00Z", "command": "python -m tritonadam.bench --tuning",
                       "device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6",
                       "driver": "550", "cuda": "12.8", "git_commit": "abc1234"},
            "config": {"algo": "adamw", "baseline": "torch-fused"}, "copy_bandwidth": None,
            "results": rows, "checks": [], "sweeps": sweeps, "roofline": None, "goals": [],
            "notes": ["a note"], "interrupted": False, "elapsed_s": 42.0}


def test_render_all_formats(tmp_path, capsys):
    rep = _fake_report()
    md = report_mod.render(rep, "md")
    for text in ("First use", "tritonadam tuned 8192/16", "30.5 / 2.1", "9 of 42, 4 pruned (budget)",
                 "2597", "Launch configs", "1024/8 persistent", "RuntimeError: x", "a note",
                 "| 2 of 3 ", "| 3 of 42", "1.100"):  # tuned 8192/16 ranks 2nd; the default 1024/8
        # (3.3 ms) over the best, its persistent twin (3.0 ms)
        assert text in md, text
    detail = {cells[2]: cells[-1] for cells in (
        [c.strip() for c in ln.strip("|").split("|")] for ln in md.split("Every fixed config")[1].splitlines()
        if ln.startswith("| llama"))}
    assert detail["1024/8"] == "default" and detail["1024/8 persistent"] == "best" and detail["8192/16"] == "tuned"
    rows = list(csv.DictReader(io.StringIO(report_mod.render(rep, "csv"))))
    assert len(rows) == 7 and rows[2]["variant"] == "first-use" and rows[4]["config"] == "1024/8 persistent"
    assert rows[2]["compile_s"] == "30.5" and rows[0]["device"].startswith("NVIDIA")
    summary = report_mod.render(rep, "summary")
    assert summary.startswith("# tritonadam on NVIDIA H100") and "abc1234" in summary
    assert "1024/8 persistent: 3" in summary and "1 case(s) not timed" in summary
    j = tmp_path / "t.json"
    j.write_text(report_mod.render(rep, "json"))
    assert json.loads(j.read_text())["schema"] == report_mod.SCHEMA
    assert main(["--load", str(j), "--format", "md"]) == 1  # re-renders; the erroring config fails it
    assert "Every fixed config" in capsys.readouterr().out


def test_exit_code_from_rows():
    rep = _fake_report()
    assert _exit_code(rep) == 1  # a tritonadam case that errors fails the run
    rep["results"] = rep["results"][:-1]
    assert _exit_code(rep) == 0


# -------------------------------------------------------- the runner, on CPU with a fake tuner

def _options(**kw):
    from tritonadam.bench.providers import HyperParams
    from tritonadam.bench.runner import Options
    from tritonadam.bench.timing import TimingConfig
    from tritonadam.bench.workloads import make_workload

    base = dict(device=torch.device("cpu"), providers=[], setups=["fp32", "bf16"],
                workloads=[make_workload("one-huge", 5000)], hp=HyperParams(),
                timing=TimingConfig(warmup_ms=0, rep_ms=0, min_reps=1, max_reps=1, rounds=1, flush=False),
                check_workload=None, profile_launches=False, device_info=lambda d: FAKE_H100)
    base.update(kw)
    return Options(**base)


@interpreter_only
def test_first_use_and_sweep_on_cpu_with_a_fake_tuner(monkeypatch, tmp_path):
    """First use with an empty cache per case, then every candidate as a fixed config; the
    tuner poses as a GPU with a fake timer, the kernels run in the interpreter."""
    from tritonadam.bench.runner import run

    monkeypatch.setenv("TRITONADAM_CACHE_DIR", str(tmp_path / "user-cache"))
    seen_dirs = []
    expect = candidate_configs("cuda", 2**13, num_sms=132, first=D)

    def factory():  # the last candidate is clearly faster than the default
        seen_dirs.append(os.environ["TRITONADAM_CACHE_DIR"])
        return Tuner(timer=lambda fn: (1.0 if fn.config == expect[-1] else 2.0) * fn.n, time_any_device=True,
                     budget_s=30, device_info=lambda d: FAKE_H100, free_bytes=lambda d: None,
                     stream=io.StringIO())

    before = get_tuner()
    written = []
    runner = run(_options(first_use=True, sweep=True, tuner_factory=factory,
                          on_row=lambda r: written.append(len(r.rows))))
    assert get_tuner() is before
    assert os.environ["TRITONADAM_CACHE_DIR"] == str(tmp_path / "user-cache")
    assert not (tmp_path / "user-cache").exists()  # never written: each case had its own dir
    assert len(set(seen_dirs)) == 2 and not any(os.path.exists(d) for d in seen_dirs)
    first = [r for r in runner.rows if r.get("variant") == "first-use"]
    fixed = [r for r in runner.rows if r.get("variant") == "fixed"]
    assert [r["status"] for r in first + fixed] == ["ok"] * len(first + fixed), runner.rows
    for r in first:
        assert r["tuned_source"] == "tuned" and r["configs_considered"] == len(expect) + 1
        assert r["config"] == expect[-1].to_json() and r["check"].startswith("ok")
        assert r["first_step_ms"] > 0 and r["later_step_ms"] > 0 and r["device_ms"] > 0
        assert r["host_ms"] > 0 and r["steady_ms"] > 0
    # the sweep: the tuner's candidates, then the default (pruned at this size, timed anyway),
    # the nearest-to-default configs of every workload and setup first
    assert [r["config"] for r in fixed[::2]] == [c.to_json() for c in expect + [D]]
    # reported after every group of cases (one workload and setup, one phase)
    assert written == sorted(written) and written[-1] == len(runner.rows) and len(written) >= 4
    sums = report_mod.config_summaries({"results": runner.rows, "sweeps": runner.sweeps})
    assert len(sums) == 2 and all(s["tuned_rank"] is not None and s["default_ms"] for s in sums)


@interpreter_only
def test_sweep_max_keeps_the_default():
    from tritonadam.bench.runner import run

    runner = run(_options(setups=["fp32"], sweep=True, sweep_max=2))
    fixed = [LaunchConfig.from_json(r["config"]) for r in runner.rows if r.get("variant") == "fixed"]
    assert len(fixed) == 2 and D in fixed  # pruned at this size, swapped in for the last
    assert runner.sweeps[0]["swept"] == 2 and runner.sweeps[0]["considered"] > 2


def test_a_signal_during_first_use_tuning_ends_the_run():
    """The tuner turns errors while tuning into "use the default"; the signal's exception
    is not an error, so it ends the run, and the process-wide tuner is restored."""
    from tritonadam.bench.runner import Interrupted, run

    def interrupted_timer(fn):
        raise Interrupted()

    before = get_tuner()
    runner = run(_options(setups=["fp32"], first_use=True, tuner_factory=lambda: Tuner(
        timer=interrupted_timer, time_any_device=True, device_info=lambda d: FAKE_H100,
        free_bytes=lambda d: None, stream=io.StringIO())))
    assert runner.interrupted and "interrupted" in runner.notes[0]
    assert get_tuner() is before


def test_time_budget_skips_cases():
    from tritonadam.bench.runner import run

    runner = run(_options(setups=["fp32"], sweep=True, time_budget_s=1e-9))
    assert runner.rows and all(r["status"] == "skipped" and "time budget" in r["reason"] for r in runner.rows)
