"""``python -m tritonadam.bench --tuning``: the flag, the no-GPU path, and the pure logic.

The measurements themselves need a GPU (bench/gpu_check.sh runs them). Here: the CLI flag
and its conflicts, the plain no-GPU exit, the fixed-config list, best/ratio arithmetic from
fake timings, rendering in every format, and the whole loop on CPU in Triton's interpreter
with an injected tuner (fake timer posing as a GPU), so the code path runs end to end.
"""
import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tritonadam.autotune import DeviceInfo, LaunchConfig, Tuner, candidate_configs, get_tuner
from tritonadam.bench import report as report_mod
from tritonadam.bench import tuning
from tritonadam.bench.__main__ import _exit_code, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
FAKE_H100 = DeviceInfo(backend="cuda", name="Fake H100", arch="sm_90", capability="9.0", num_sms=132)
D = LaunchConfig(4096, 8)


# ------------------------------------------------------------------------------ CLI

def test_flag_parses_and_is_in_help(capsys):
    p = build_parser()
    assert p.parse_args(["--tuning"]).tuning is True
    assert p.parse_args([]).tuning is False
    args = p.parse_args(["--tuning", "--profiles", "gpt2-124m,one-huge@10M", "--setups", "bf16",
                         "--time-budget", "45", "--out", "t.json", "--out", "t.md"])
    assert args.tuning and args.profiles == ["gpt2-124m", "one-huge@10M"] and args.setups == ["bf16"]
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--tuning" in capsys.readouterr().out


def test_no_gpu_exits_0_with_message(tmp_path, capsys):
    t0 = time.monotonic()
    out = tmp_path / "t.json"
    assert main(["--tuning", "--device", "cpu", "--out", str(out)]) == 0
    assert time.monotonic() - t0 < 10
    text = capsys.readouterr().out
    assert text.strip() == tuning.NO_GPU_MESSAGE
    assert "need a GPU" in text and "interpreter" in text
    assert not out.exists()
    assert get_tuner() is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine-level no-GPU default")
def test_no_gpu_subprocess_default_device():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)
    env.pop("_TRITONADAM_BENCH_REEXEC", None)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "tritonadam.bench", "--tuning"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.monotonic() - t0 < 60
    assert "tuning benchmarks need a GPU" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--providers", "torch-fused"], "--providers does not apply to --tuning"),
    (["--autotune", "off"], "--autotune does not apply to --tuning"),
    (["--plot", "x.png"], "--plot does not apply to --tuning"),
])
def test_conflicting_flags_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--tuning", "--device", "cpu", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_providers_tritonadam_is_accepted(capsys):
    assert main(["--tuning", "--device", "cpu", "--providers", "tritonadam"]) == 0


# ----------------------------------------------------------------------- pure logic

def test_fixed_configs_are_the_tuners_candidates():
    n = 124_439_808  # gpt2-124m: bucket 2**27
    # The optimizer lets its tuner consider persistent grids, so the bench times them too.
    cfgs = tuning.fixed_configs("cuda", n, num_sms=132, default=D)
    assert cfgs == candidate_configs("cuda", 2**27, num_sms=132, first=D, allow_persistent=True)
    assert cfgs[0] == D and len(cfgs) == len(set(cfgs))
    assert 21 < len(cfgs) and any(c.persistent for c in cfgs)
    # the scratch size the tuner really timed decides the list
    assert tuning.fixed_configs("cuda", n, num_sms=132, default=D, rep=2**13) == \
        candidate_configs("cuda", 2**13, num_sms=132, first=D, allow_persistent=True) + [D]
    small = tuning.fixed_configs("cuda", 5000, num_sms=132, default=D)
    assert small[-1] == D and all(c.block_size == 512 for c in small[:-1])  # D pruned, kept last
    assert {c.num_warps for c in tuning.fixed_configs("hip", n, default=LaunchConfig(4096, 4))} <= {1, 2, 4, 8}


def _fixed(*pairs):
    return [{"config": LaunchConfig(b, w).to_json() if i % 2 else LaunchConfig(b, w), "ms": ms}
            for i, (b, w, ms) in enumerate(pairs)]


def test_summarize_best_default_ratio_rank():
    fixed = _fixed((4096, 8, 1.10), (2048, 4, 1.00), (8192, 8, 1.30), (1024, 2, None),
                   (16384, 16, float("nan")))
    s = tuning.summarize(1.02, fixed, default=D, tuned=LaunchConfig(2048, 4))
    assert s["best_fixed"] == {"block_size": 2048, "num_warps": 4, "persistent": False}
    assert s["best_fixed_ms"] == 1.00 and s["worst_fixed_ms"] == 1.30
    assert s["default_ms"] == 1.10 and s["default_over_best"] == pytest.approx(1.10)
    assert s["tuned_over_best"] == pytest.approx(1.02)
    assert s["tuned_fixed_ms"] == 1.00 and s["tuned_rank"] == 1
    assert s["fixed_timed"] == 3 and s["fixed_failed"] == 2
    # a tuner that picked a slower config ranks it where it lands
    s = tuning.summarize(1.3, fixed, default=D, tuned=LaunchConfig(8192, 8))
    assert s["tuned_rank"] == 3 and s["tuned_over_best"] == pytest.approx(1.3)
    # ties: the first in the tuner's order wins
    s = tuning.summarize(None, _fixed((4096, 8, 2.0), (2048, 4, 2.0)), default=D)
    assert s["best_fixed"]["block_size"] == 4096 and s["tuned_over_best"] is None


def test_summarize_nothing_timed():
    s = tuning.summarize(1.0, _fixed((4096, 8, None)), default=D, tuned=D)
    assert s["best_fixed"] is None and s["tuned_over_best"] is None and s["fixed_failed"] == 1
    assert tuning.summarize(1.0, [], default=None)["fixed_timed"] == 0


def test_first_step_overhead():
    o = tuning.first_step_overhead(2503.0, [3.0, 2.0, 4.0, 2.5, 3.5])
    assert o == {"first_step_ms": 2503.0, "later_step_ms": 3.0, "extra_ms": 2500.0}
    assert tuning.first_step_overhead(None, [1.0])["extra_ms"] is None
    assert tuning.first_step_overhead(5.0, [])["later_step_ms"] is None


# ------------------------------------------------------------------------ rendering

def _fake_report():
    fixed = [{"config": LaunchConfig(b, w).to_json(), "ms": ms, "ms_p20": ms, "ms_p80": ms, "reps": 10}
             for b, w, ms in ((4096, 8, 3.3), (8192, 16, 3.1), (2048, 4, 3.5))]
    fixed.append({"config": LaunchConfig(1024, 2).to_json(), "ms": None, "error": "RuntimeError: x"})
    row = {"workload": "llama-layers@400M", "profile": "llama-layers", "params": 404_766_720,
           "tensors": 18, "setup": "bf16", "provider": "tritonadam", "status": "ok",
           "tuner_budget_s": 2.0, "first_step_ms": 2600.0, "later_step_ms": 3.2, "extra_ms": 2596.8,
           "tuned": LaunchConfig(8192, 16).to_json(), "tuned_source": "tuned", "tune_s": 2.1,
           "configs_timed": 9, "configs_considered": 21, "tune_complete": False,
           "numel_timed": 2**27, "tuned_ms": 3.12, "default": D.to_json(), "bucket": 27,
           "fixed": fixed, "fixed_considered": 21, "fixed_partial": "time budget spent after 4 of 21 fixed configs"}
    row.update(tuning.summarize(row["tuned_ms"], fixed, D, LaunchConfig(8192, 16)))
    skipped = {"workload": "llama2-7b", "profile": "llama2-7b", "params": 6_738_415_616,
               "tensors": 291, "setup": "bf16", "provider": "tritonadam", "status": "skipped",
               "reason": "needs about 120 GiB"}
    return {"schema": report_mod.TUNING_SCHEMA, "mode": "gpu",
            "header": {"date": "2026-01-01T00:00:00Z", "command": "python -m tritonadam.bench --tuning",
                       "device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6",
                       "driver": "550", "cuda": "12.8"},
            "config": {"algo": "adamw", "tuner_budget_s": 2.0, "warmup_ms": 20, "rep_ms": 100,
                       "min_reps": 10, "max_reps": 100, "flush": True, "later_steps": 5},
            "results": [row, skipped], "notes": ["a note"], "interrupted": False, "elapsed_s": 42.0}


def test_render_all_formats(tmp_path, capsys):
    rep = _fake_report()
    md = report_mod.render(rep, "md")
    assert md.startswith("# tritonadam bench: autotuning")
    assert "NVIDIA H100 80GB HBM3" in md and "| triton " in md and "3.6" in md
    for text in ("First use", "8192/16", "4096/8", "2597", "9 of 21 (budget)", "1.006", "1 of 3",
                 "Every fixed config", "RuntimeError: x", "Not measured", "needs about 120 GiB",
                 "time budget spent after 4 of 21", "a note"):
        assert text in md, text
    table = report_mod.render(rep, "table")
    assert "tritonadam bench: autotuning" in table and "tuned/best" in table
    rows = list(csv.DictReader(io.StringIO(report_mod.render(rep, "csv"))))
    assert len(rows) == 2 and rows[0]["best_fixed"] == "8192/16" and rows[0]["device"].startswith("NVIDIA")
    assert float(rows[0]["tuned_over_best"]) == pytest.approx(3.12 / 3.1, rel=1e-4)
    j = tmp_path / "t.json"
    j.write_text(report_mod.render(rep, "json"))
    assert json.loads(j.read_text())["schema"] == report_mod.TUNING_SCHEMA
    assert main(["--load", str(j), "--format", "md"]) == 0  # a saved --tuning run re-renders
    assert "Tuned config against every fixed config" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--load", str(j), "--plot", str(tmp_path / "x.png")])
    assert e.value.code == 2


def test_exit_code_from_rows():
    rep = _fake_report()
    assert _exit_code(rep) == 0
    rep["results"][0]["status"] = "error"
    assert _exit_code(rep) == 1


# ---------------------------------------------------- the loop, on CPU with a fake tuner

@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "") in ("", "0"),
                    reason="runs the kernels in Triton's interpreter")
def test_run_tuning_loop_on_cpu_with_fake_tuner(monkeypatch, tmp_path):
    """The whole loop (empty cache per case, first step, tuned and fixed timings) on CPU:
    the tuner poses as a GPU with a fake timer, the fixed configs run in the interpreter."""
    from tritonadam.bench.providers import HyperParams
    from tritonadam.bench.timing import TimingConfig
    from tritonadam.bench.workloads import make_workload

    monkeypatch.setenv("TRITONADAM_CACHE_DIR", str(tmp_path / "user-cache"))
    seen_dirs = []
    times = iter(range(100, 0, -1))  # each config timed faster than the last: the last wins

    def factory():
        seen_dirs.append(os.environ["TRITONADAM_CACHE_DIR"])
        return Tuner(timer=lambda fn: float(next(times)), time_any_device=True,
                     device_info=lambda d: FAKE_H100, free_bytes=lambda d: None,
                     stream=io.StringIO(), budget_s=30)

    before = get_tuner()
    opts = tuning.TuningOptions(
        device=torch.device("cpu"), setups=["fp32", "bf16"], workloads=[make_workload("one-huge", 5000)],
        hp=HyperParams(), timing=TimingConfig(warmup_ms=0, rep_ms=0, min_reps=1, max_reps=1, flush=False),
        later_steps=2, tuner_factory=factory, device_info=lambda d: FAKE_H100)
    res = tuning.run_tuning(opts)
    assert get_tuner() is before
    assert os.environ["TRITONADAM_CACHE_DIR"] == str(tmp_path / "user-cache")
    assert not (tmp_path / "user-cache").exists()  # never written: each case had its own dir
    assert len(set(seen_dirs[1:])) == 2 and not any(os.path.exists(d) for d in seen_dirs[1:])
    assert [r["status"] for r in res.rows] == ["ok", "ok"], res.rows
    expect = candidate_configs("cuda", 2**13, num_sms=132, first=D)
    for r in res.rows:
        assert r["tuned_source"] == "tuned" and r["configs_considered"] == len(expect)
        assert r["tuned"] == expect[-1].to_json()
        assert r["first_step_ms"] > 0 and r["later_step_ms"] > 0 and r["tuned_ms"] > 0
        # the tuner's candidates, then the default (pruned at this size, timed anyway)
        assert [f["config"] for f in r["fixed"]] == [c.to_json() for c in expect + [D]]
        assert r["fixed_timed"] == len(expect) + 1 and r["best_fixed"] is not None
        assert r["tuned_rank"] is not None and r["tuned_over_best"] > 0
        assert r["default"] == D.to_json() and r["default_ms"] is not None
    # and it renders
    rep = {"schema": report_mod.TUNING_SCHEMA, "header": {"command": "x"}, "config": {},
           "results": res.rows}
    assert "one-huge@5K" in report_mod.render(rep, "md")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "") in ("", "0"),
                    reason="runs the kernels in Triton's interpreter")
def test_run_tuning_time_budget_skips(tmp_path):
    from tritonadam.bench.providers import HyperParams
    from tritonadam.bench.timing import TimingConfig
    from tritonadam.bench.workloads import make_workload

    opts = tuning.TuningOptions(
        device=torch.device("cpu"), setups=["fp32"], workloads=[make_workload("one-huge", 5000)],
        hp=HyperParams(), timing=TimingConfig(flush=False), time_budget_s=1e-9,
        tuner_factory=lambda: Tuner(time_any_device=True, timer=lambda fn: 1.0,
                                    device_info=lambda d: FAKE_H100, stream=io.StringIO()),
        device_info=lambda d: FAKE_H100)
    time.sleep(0.01)
    res = tuning.run_tuning(opts)
    assert res.rows[0]["status"] == "skipped" and "time budget" in res.rows[0]["reason"]


def test_run_tuning_stop_flag_ends_the_run():
    """SIGTERM sets the stop flag (the tuner would swallow the exception itself): no new
    case starts and the run says it was interrupted."""
    from tritonadam.bench.providers import HyperParams
    from tritonadam.bench.timing import TimingConfig
    from tritonadam.bench.workloads import make_workload

    before = get_tuner()
    opts = tuning.TuningOptions(
        device=torch.device("cpu"), setups=["fp32"], workloads=[make_workload("one-huge", 5000)],
        hp=HyperParams(), timing=TimingConfig(flush=False), stop=lambda: True,
        tuner_factory=lambda: Tuner(time_any_device=True, timer=lambda fn: 1.0,
                                    device_info=lambda d: FAKE_H100, stream=io.StringIO()),
        device_info=lambda d: FAKE_H100)
    res = tuning.run_tuning(opts)
    assert res.interrupted and res.rows == [] and "interrupted" in res.notes[0]
    assert get_tuner() is before
