"""``python -m tritonadam.bench`` end to end: the no-GPU path, formats, files, errors.

Runs the CLI in subprocesses on the CPU (``--device cpu``, so a GPU machine runs the same
thing) with small sizes; argument errors, ``--list`` and ``--load`` run in-process. One
test, marked ``gpu``, runs a small bench on a CUDA device.
"""
import csv
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tritonadam.bench import report as report_mod
from tritonadam.bench.__main__ import main
from tritonadam.bench.workloads import SETUPS

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--device", "cpu", "--profiles", "one-huge@20K,many-small@40K", "--setups",
         "fp32,bf16-master", "--rep-ms", "5", "--warmup-ms", "1", "--min-reps", "3"]


def _env(interpret: str | None = "1") -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "0")
    env.pop("_TRITONADAM_BENCH_REEXEC", None)
    if interpret is None:
        env.pop("TRITON_INTERPRET", None)
    else:
        env["TRITON_INTERPRET"] = interpret
    return env


def _bench(args, interpret="1", timeout=300):
    return subprocess.run([sys.executable, "-m", "tritonadam.bench", *args], cwd=ROOT,
                          env=_env(interpret), capture_output=True, text=True, timeout=timeout)


def _tritonadam_importable() -> bool:
    try:
        import tritonadam  # noqa: F401

        return all(hasattr(tritonadam, c) for c in ("Adam", "AdamW", "Adamax"))
    except Exception:  # noqa: BLE001
        return False


# ------------------------------------------------------------------------ no-GPU path

@pytest.mark.skipif(os.environ.get("TRITONADAM_TEST_DEVICE", "cpu") != "cpu",
                    reason="the no-GPU default run is checked in CPU test runs")
def test_default_cpu_run_is_quick_and_plain():
    """The default run with no GPU: plain statement, roofline, torch CPU timings,
    tritonadam checked in the interpreter, exit 0, in about 45 s of CPU. TRITON_INTERPRET
    is left unset: the CLI sets it (re-executing itself if kernels were already loaded)."""
    # The child's CPU time, not wall time: a busy machine (xdist workers, other jobs)
    # stretches the wall clock. CPU time stretches too, less: 44 s alone on the 2-core
    # CI machine, 63 s beside another xdist worker. The bound catches a default run
    # that grows severalfold, not noise.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = _bench(["--device", "cpu"], interpret=None)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert cpu_s < 120, cpu_s
    out = r.stdout
    assert "Triton kernels run only in Triton's interpreter" in out
    assert "none of these numbers say anything about GPU performance" in out
    assert "Analytic roofline" in out and "H100 SXM" in out and "3.35" in out
    assert "llama2-7b" in out  # the roofline covers the GPU default workloads
    # what was measured comes first; the analytic part is last and short (one workload)
    assert out.index("Results") < out.index("Correctness checks") < out.index("Analytic roofline")
    roof = out[out.index("Analytic roofline"):]
    assert len([ln for ln in roof.splitlines() if ln.startswith("llama2-7b")]) == len(SETUPS)
    assert "many-small" not in roof and "--roofline shows every workload" in roof
    assert "device ms" in out and "steady ms" in out and "wall time" in out
    # torch's own fp16 numerics (fp16 state, eps 0 in fp16) are said to be torch's, not a failure
    fp16 = [ln for ln in out.splitlines() if ln.startswith(("torch-foreach ", "torch-forloop "))
            and " fp16 " in ln and "check-small" in ln]
    assert fp16 and all("not counted" in ln and "FAIL" not in ln for ln in fp16), fp16
    assert "not a tritonadam result" in out and "does not fail the run" in out
    for p in ("torch-fused", "torch-foreach", "torch-forloop"):
        assert p in out
    assert "Correctness checks" in out
    if _tritonadam_importable():
        lines = [ln for ln in out.splitlines()
                 if ln.startswith("tritonadam ") and "check-small" in ln]
        assert len(lines) == len(SETUPS) + 2, out  # every setup, and clip + step in fp32 and bf16
        assert all(" ok " in ln for ln in lines), lines
        by = {tuple(ln.split()[:2]): ln for ln in lines if "clip" not in ln}
        assert "bit for bit as master_weights=True" in by["tritonadam", "bf16-remainder"]
        assert all("off nearest" in by["tritonadam", s] for s in ("bf16-sr", "bf16-sr-bf16state"))
        assert sum("tritonadam clip + step" in ln and "norm" in ln for ln in lines) == 2
    for p in ("torch-fused", "torch-foreach", "torch-forloop"):  # timed with clipping too
        assert f"{p} clip + step" in out
    assert "[1/" in r.stderr  # progress


def test_json_md_csv_outputs(tmp_path):
    j, m, c = tmp_path / "r.json", tmp_path / "sub" / "r.md", tmp_path / "r.csv"
    r = _bench(SMALL + ["--providers", "torch-fused,torch-foreach", "--out", str(j), "--out",
                        str(m), "--out", str(c), "--format", "csv", "-q"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.strip() == "" or "[1/" not in r.stderr  # --quiet: no progress
    rep = json.loads(j.read_text())
    assert rep["schema"] == report_mod.SCHEMA and rep["mode"] == "cpu"
    for key in ("date", "command", "torch", "triton", "device", "python"):
        assert rep["header"][key]
    assert "--providers" in rep["header"]["command"]
    rows = rep["results"]
    assert {(x["workload"], x["setup"], x["provider"], x.get("clip")) for x in rows} == {
        (w, s, p, c) for w in ("one-huge@20K", "many-small@40K") for s in ("fp32", "bf16-master")
        for p in ("torch-fused", "torch-foreach")
        for c in ((None, 1.0) if s == "fp32" else (None,))}  # clip + step in fp32 by default
    assert len(rows) == 12
    assert rep["config"]["clip_setups"] == ["fp32"] and rep["config"]["max_norm"] == 1.0
    for x in rows:
        assert x["status"] == "ok", x
        assert x["bytes_per_step"] == x["params"] * x["bytes_per_param"]
        for fig in ("device", "host", "steady"):
            assert x[f"{fig}_p20"] <= x[f"{fig}_ms"] <= x[f"{fig}_p80"] and x[f"{fig}_ms"] > 0
        assert x["reps"] >= 3 and x["rounds"] == 3 and x.get("launches") is None
        assert x["timer"] == "cpu-wall" and x["grads"] == "fresh"
        assert x["gbps"] == pytest.approx(x["bytes_per_step"] / (x["device_ms"] * 1e-3) / 1e9)
        assert x["check"].startswith("ok")
        if x["provider"] == "torch-fused":
            assert x["speedup"] == pytest.approx(1.0)
    master = [x for x in rows if x["setup"] == "bf16-master"]
    assert all("torch has no master weights" in x["label"] for x in master)
    assert all(x["bytes_per_param"] == 40 for x in master)
    clipped = [x for x in rows if x.get("clip")]
    # clip_grad_norm_ reads the fp32 grads, then reads and writes them: 28 + 12
    assert all(x["bytes_per_param"] == 40 and "norm" in x["check"] for x in clipped)
    assert [x["speedup"] for x in clipped if x["provider"] == "torch-fused"] == [1.0, 1.0]
    assert rep["roofline"]["gpus"][0]["tb_per_s"] == 3.35
    assert rep["goals"] == []  # goals are judged on GPU runs only

    md = m.read_text()
    assert md.startswith("# tritonadam bench") and "| workload" in md and "## Results" in md
    assert "| torch-foreach clip + step" in md
    assert "clip + step: the grads' total norm clipped to 1.0" in md
    table = list(csv.DictReader(io.StringIO(c.read_text())))
    assert len(table) == len(rows) and {"device_ms", "host_ms", "steady_ms", "gbps", "device",
                                        "torch", "clip"} <= set(table[0])
    assert "Results" in r.stdout  # with --out, stdout shows the table


# bytes per param by (setup, provider, clip + step): the precision modes natively for
# tritonadam, torch's stand-ins otherwise; the clip adds a grad read for tritonadam (2 B in
# bf16), a read and a read + write for torch's clip_grad_norm_ (6 B)
MODES_BYTES = {
    ("bf16-remainder", "tritonadam", False): 26, ("bf16-remainder", "torch-fused", False): 40,
    ("bf16-remainder", "tritonadam", True): 28, ("bf16-remainder", "torch-fused", True): 46,
    ("bf16-sr", "tritonadam", False): 22, ("bf16-sr", "torch-fused", False): 14,
    ("bf16-bf16state", "tritonadam", False): 14, ("bf16-bf16state", "torch-fused", False): 14,
    ("bf16-bf16state", "tritonadam", True): 16, ("bf16-bf16state", "torch-fused", True): 20,
    ("bf16-sr-bf16state", "tritonadam", False): 14, ("bf16-sr-bf16state", "torch-fused", False): 14,
}


@pytest.mark.skipif(not _tritonadam_importable(), reason="needs tritonadam's kernels")
def test_precision_modes_and_clip_rows(tmp_path):
    """The precision-mode setups and clip + step rows through the CLI, tritonadam timed in
    Triton's interpreter on a tiny workload: checked, with the bytes, state memory, labels
    and speedups each row must have."""
    j = tmp_path / "r.json"
    r = _bench(["--device", "cpu", "--profiles", "one-huge@4K", "--providers", "tritonadam,torch-fused",
                "--setups", "bf16-remainder,bf16-sr,bf16-bf16state,bf16-sr-bf16state",
                "--clip", "bf16-remainder,bf16-bf16state", "--max-norm", "0.5", "--rep-ms", "1",
                "--warmup-ms", "0", "--min-reps", "1", "--max-reps", "2", "--out", str(j)],
               timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(j.read_text())
    # tritonadam asked for on a CPU is timed (in the interpreter): the statement says so
    assert "not timed" not in rep["statement"] and "measure the interpreter" in rep["statement"]
    assert "not timed" not in r.stdout
    rows = {(x["setup"], x["provider"], bool(x.get("clip"))): x for x in rep["results"]}
    assert set(rows) == set(MODES_BYTES)
    for key, x in rows.items():
        assert x["status"] == "ok" and x["check"].startswith("ok"), x
        assert x["bytes_per_param"] == MODES_BYTES[key], (key, x["traffic"])
        assert x.get("clip") in (None, 0.5) and ("norm" in x["check"]) == key[2]
    ours = {k[0]: x for k, x in rows.items() if k[1] == "tritonadam" and not k[2]}
    assert {s: x["state_bytes"] for s, x in ours.items()} == {  # + a step count (and seed)
        "bf16-remainder": 4000 * 10 + 4, "bf16-sr": 4000 * 8 + 4 + 8,
        "bf16-bf16state": 4000 * 4 + 4, "bf16-sr-bf16state": 4000 * 4 + 4 + 8}
    assert "off nearest" in ours["bf16-sr"]["check"]
    torch_rows = {k[0]: x for k, x in rows.items() if k[1] == "torch-fused" and not k[2]}
    assert "torch has no master weights" in torch_rows["bf16-remainder"]["label"]
    assert "rounded to nearest" in torch_rows["bf16-sr"]["label"]
    assert torch_rows["bf16-bf16state"]["label"] == ""  # the same setup: a fair comparison
    assert rows["bf16-bf16state", "torch-fused", True]["speedup"] == 1.0  # against its clip row
    checks = {(c["provider"], c["setup"], c.get("clip")): c for c in rep["checks"]}
    assert "bit for bit as master_weights=True" in checks["tritonadam", "bf16-remainder", None]["result"]
    assert all(c["ok"] for c in checks.values())
    assert ("tritonadam", "bf16-remainder", 0.5) in checks and len(checks) == 12
    assert "tritonadam clip + step" in r.stdout and "torch-fused clip + step" in r.stdout
    assert "clipped to 0.5" in r.stdout


def test_plan_shows_clip_rows(capsys):
    assert main(["--plan", "--profiles", "many-small", "--setups", "bf16,fp16", "--clip", "all",
                 "--max-norm", "2"]) == 0
    assert "clip + step (max_norm 2) for each provider: bf16, fp16" in capsys.readouterr().out
    assert main(["--plan", "--profiles", "many-small", "--setups", "bf16-sr"]) == 0
    assert "clip + step" not in capsys.readouterr().out  # fp32 and bf16 by default, where run


def test_setups_for_one_workload(capsys):
    """--setups-for gives one workload its own setups ('core' expands there too); the
    others keep --setups, and every setup named anywhere is checked."""
    from tritonadam.bench.runner import Options, Runner
    from tritonadam.bench.workloads import core_setups, make_workload

    assert main(["--plan", "--profiles", "llama-layers@400M,many-small", "--setups", "fp32",
                 "--setups-for", "llama-layers@400M=core,bf16-remainder"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("llama-layers@400M"))
    assert line.endswith("setups " + ", ".join(core_setups() + ["bf16-remainder"]))
    assert "bf16-8bit-remainder" in line and "fp32-8bit" in line
    small = next(ln for ln in out.splitlines() if ln.strip().startswith("many-small"))
    assert "setups" not in small
    a, b = make_workload("one-huge", 1000), make_workload("one-huge", 2000)
    runner = Runner(Options(device=torch.device("cpu"), providers=["torch-fused"], setups=["fp32"],
                            setups_for={a.name: ["bf16", "fp32-8bit"]}, workloads=[a, b]))
    assert [(c.workload.name, c.setup.name) for c in runner.cases()] == [
        (a.name, "bf16"), (a.name, "fp32-8bit"), (b.name, "fp32")]


@pytest.mark.skipif(not _tritonadam_importable(), reason="needs tritonadam's kernels")
def test_quantized_setups_through_the_cli(tmp_path):
    """tritonadam's quantized setups end to end (Triton's interpreter, a tiny workload): the
    bytes from the library's model, the state per param counted from the codes and scales
    the optimizer allocated, the check emulating the format, clip + step; torch, which has
    no quantized state, skipped in favour of its row in the dense twin setup."""
    j = tmp_path / "r.json"
    r = _bench(["--device", "cpu", "--profiles", "one-huge@4K", "--providers", "tritonadam,torch-fused",
                "--setups", "bf16-8bit-remainder,fp32-4bit", "--clip", "bf16-8bit-remainder",
                "--rep-ms", "1", "--warmup-ms", "0", "--min-reps", "1", "--max-reps", "1",
                "--rounds", "1", "--out", str(j)], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(j.read_text())
    rows = {(x["setup"], x["provider"], bool(x.get("clip"))): x for x in rep["results"]}
    ours = {k: x for k, x in rows.items() if k[1] == "tritonadam"}
    assert {k: x["bytes_per_param"] for k, x in ours.items()} == {
        ("bf16-8bit-remainder", "tritonadam", False): 14.125,
        ("bf16-8bit-remainder", "tritonadam", True): 16.125,  # + tritonadam's norm read of bf16 grads
        ("fp32-4bit", "tritonadam", False): 14.125}
    for x in ours.values():
        assert x["status"] == "ok" and x["check"].startswith("ok") and "moments emulated" in x["check"], x
    # 4000 elements: 63 bf16 scales per moment (the last block partial), + a step count
    assert ours["fp32-4bit", "tritonadam", False]["state_bytes"] == 2 * (2000 + 63 * 2) + 4
    assert ours["bf16-8bit-remainder", "tritonadam", False]["state_bytes"] == 2 * (4000 + 63 * 2) + 8000 + 4
    skipped = {k[0]: x for k, x in rows.items() if k[1] == "torch-fused"}
    assert skipped["bf16-8bit-remainder"]["status"] == "skipped"
    assert "the bf16-remainder setup's row" in skipped["bf16-8bit-remainder"]["reason"]
    assert "the fp32 setup's row" in skipped["fp32-4bit"]["reason"]
    assert "state B/param" in r.stdout and "8bit moments emulated" in r.stdout


def test_stdout_formats_and_load(tmp_path, capsys):
    """Render a saved run in every format (in-process, nothing re-run)."""
    j = tmp_path / "r.json"
    r = _bench(SMALL + ["--providers", "torch-fused", "--setups", "bf16", "--clip", "none",
                        "--format", "json", "-q"])
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)  # stdout is pure JSON
    j.write_text(r.stdout)
    assert rep["results"][0]["label"].startswith("bf16 state")

    assert main(["--load", str(j), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [x["provider"] for x in rows] == ["torch-fused", "torch-fused"]
    assert main(["--load", str(j), "--format", "md"]) == 0
    out = capsys.readouterr().out
    assert "| torch-fused [1]" in out and "[1] bf16 state" in out
    assert main(["--load", str(j)]) == 0
    assert "Results\n-------" in capsys.readouterr().out
    # annotate a saved run (why a goal was missed) and write it back
    j2 = tmp_path / "annotated.json"
    assert main(["--load", str(j), "--note", "why: a reason", "--out", str(j2)]) == 0
    assert json.loads(j2.read_text())["notes"][-1] == "why: a reason"
    assert "- why: a reason" in capsys.readouterr().out


def test_sigterm_writes_partial_results(tmp_path):
    # The run is given far more reps than it can finish before the signal (50 reps of a
    # 2M-element step once finished within the half second below), so SIGTERM always lands
    # mid-timing and the test does not race the bench.
    j = tmp_path / "r.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tritonadam.bench", "--device", "cpu", "--profiles",
         "one-huge@2M", "--sizes", "2M", "--providers", "torch-forloop", "--rep-ms", "2000",
         "--min-reps", "100000", "--max-reps", "100000", "--no-check", "--out", str(j)],
        cwd=ROOT, env=_env("1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "[1/" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    rep = json.loads(j.read_text())
    assert rep["interrupted"] is True
    assert "interrupted" in out


def test_a_signal_whose_exception_is_swallowed_still_ends_the_run(tmp_path, capsys, monkeypatch):
    """SIGTERM can land in code that swallows its exception (a bare ``except:`` in a lazily
    imported library): the run still stops before the next case and the next timed rep,
    instead of timing on (it once kept timing a minute after the signal)."""
    from tritonadam.bench.providers import TorchForLoop

    build = TorchForLoop.build
    builds = []

    def build_and_swallow(self, *args, **kwargs):
        builds.append(1)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler runs here, between bytecodes
        except BaseException:  # noqa: BLE001 - what the library in the way does
            pass
        return build(self, *args, **kwargs)

    monkeypatch.setattr(TorchForLoop, "build", build_and_swallow)
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    before = signal.getsignal(signal.SIGTERM)
    j = tmp_path / "r.json"
    rc = main(["--device", "cpu", "--profiles", "one-huge@4K", "--providers", "torch-forloop",
               "--setups", "fp32,bf16", "--clip", "none", "--no-check", "--min-reps", "2",
               "--max-reps", "2", "-q", "--out", str(j)])
    assert rc == 0
    rep = json.loads(j.read_text())
    assert rep["interrupted"] is True and "interrupted" in capsys.readouterr().out
    assert len(builds) == 1  # the second setup's case never started
    assert all(r.get("device_ms") is None for r in rep["results"])
    assert signal.getsignal(signal.SIGTERM) is before
    # The next run in this process starts afresh.
    monkeypatch.setattr(TorchForLoop, "build", build)
    rc = main(["--device", "cpu", "--profiles", "one-huge@4K", "--providers", "torch-forloop",
               "--setups", "fp32", "--clip", "none", "--no-check", "--min-reps", "2",
               "--max-reps", "2", "-q", "--out", str(j)])
    rep = json.loads(j.read_text())
    assert rc == 0 and rep["interrupted"] is False
    assert [r["status"] for r in rep["results"]] == ["ok"]


# ----------------------------------------------------------------- in-process CLI parts

@pytest.mark.parametrize("args,message", [
    (["--providers", "nope"], "unknown provider nope"),
    (["--setups", "fp8"], "unknown setup fp8"),
    (["--profiles", "gpt3"], "unknown profile"),
    (["--profiles", "gpt2-124m@1M"], "fixed shapes"),
    (["--sizes", "lots"], "not a parameter count"),
    (["--format", "xml"], "invalid choice"),
    (["--optimizer", "sgd"], "invalid choice"),
    (["--optimizer", "adamax", "--amsgrad"], "amsgrad"),
    (["--min-reps", "0"], "--min-reps"),
    (["--min-reps", "9", "--max-reps", "3"], "--min-reps"),
    (["--baseline", "nope"], "--baseline"),
    (["--clip", "fp8"], "unknown --clip setup fp8"),
    (["--setups", "bf16", "--clip", "fp32"], "unknown --clip setup fp32; choose from bf16"),
    (["--max-norm", "0"], "--max-norm must be > 0"),
    (["--sweep-from", "x.json"], "--sweep-from applies to --tuning"),
    (["--setups", "bf16", "--first-use", "fp32"], "unknown --first-use setup fp32"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--load", "/nonexistent/run.json"], "No such file"),
    (["--setups-for", "one-huge@1K"], "expected WORKLOAD=LIST"),
    (["--profiles", "one-huge@1K", "--setups-for", "one-huge@2K=fp32"], "not a workload of this run"),
    (["--profiles", "one-huge@1K", "--setups-for", "one-huge@1K=fp8"], "unknown setup fp8"),
    (["--profiles", "one-huge@1K", "--setups-for", "gpt3=fp32"], "unknown profile"),
    (["--lr", "-1"], "--lr must be a finite number >= 0"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["--time-budget", "-1"], "--time-budget must be a finite number >= 0"),
    # checked before the run, not by tritonadam's constructor (exit 1) or at the first file
    (["--seed", "-1"], "--seed -1: must be in [0, 2**63)"),
    (["--seed", str(2 ** 63)], "must be in [0, 2**63)"),
    (["--out", "/"], "a directory; give a file name"),
    (["--summary", "/dev/null/summary.md"], "/dev/null is not a directory"),
    (["--plot", "bars.txt"], "give a file name ending in .png"),
])
def test_invalid_options_exit_2(args, message, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    with pytest.raises(SystemExit) as e:
        main(["--device", "cpu", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("text,message", [('{"hello": 1}', "not a tritonadam bench JSON"),
                                          ("[1]", "its top level is a list"),
                                          ("xx", "x.json: not a JSON file")])
def test_load_rejects_other_json(text, message, tmp_path, capsys):
    p = tmp_path / "x.json"
    p.write_text(text)
    with pytest.raises(SystemExit) as e:
        main(["--load", str(p)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_list(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("gpt2-124m", "llama2-7b", "many-small", "bf16-master", "torch-compile", "te", *SETUPS):
        assert name in out
    assert "remainder 2+2" in out  # the traffic of each setup
    remainder = next(ln for ln in out.splitlines() if ln.startswith("bf16-remainder "))
    assert remainder.split()[1:3] == ["26", "14"]  # bytes moved per step, bytes held
    assert "124439808" in out.replace(",", "") or "124.44M" in out


def test_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--providers", "--setups", "--profiles", "--sizes", "--format", "--out",
                 "--plot", "--time-budget", "--load"):
        assert flag in out


@pytest.mark.parametrize("budget", ["0.000001", "0"])
def test_time_budget_zero_skips_everything(budget, capsys, monkeypatch):
    """0 is a budget (nothing timed), not "no budget"."""
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    rc = main(["--device", "cpu", "--profiles", "one-huge@1K", "--providers", "torch-fused",
               "--time-budget", budget, "--no-check", "--format", "json", "-q"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["results"] and all("time budget" in x["reason"] for x in rep["results"])


def test_plot_needs_matplotlib_or_draws(tmp_path, capsys):
    j = tmp_path / "r.json"
    j.write_text(report_mod.render_json(_fake_report()))
    png = tmp_path / "r.png"
    if report_mod.have_matplotlib():
        assert main(["--load", str(j), "--plot", str(png)]) == 0
        assert png.stat().st_size > 1000
    else:
        with pytest.raises(SystemExit) as e:
            main(["--load", str(j), "--plot", str(png)])
        assert e.value.code == 2
        assert "pip install matplotlib" in capsys.readouterr().err


def test_goals_from_rows():
    g = report_mod.goals(_fake_report()["results"])
    by = {x["goal"].split(":")[0]: x for x in g}
    llama = by["bf16 + fp32 state, llama-layers@400M"]
    assert llama["status"] == "MISSED" and llama["shortfall"] == "short by 2.0 points"
    assert "(device time)" in llama["goal"]
    small = [x for x in g if x["goal"].startswith("many-small@40.96M fp32: >= 3x")][0]
    assert small["status"] == "met" and "steady-state" in small["goal"]
    host = [x for x in g if "host time of step()" in x["goal"]][0]
    assert host["status"] == "met"
    # speed against torch is judged only on rows that move the same bytes: bf16-bf16state
    faster = {x["goal"]: x for x in g if x["goal"].startswith("faster than")}
    dev = faster["faster than torch-fused where both move the same bytes (device time)"]
    assert dev["status"] == "MISSED" and "llama-layers@400M bf16-bf16state (0.95x)" in dev["shortfall"]
    assert "1 of 2 faster" in dev["measured"]
    graph = [x for x in g if "captured step" in x["goal"]][0]
    assert graph["status"] == "met" and graph["measured"] == "0.010 ms"
    text = report_mod.render_text(dict(_fake_report(), goals=g))
    assert "Goals\n-----" in text and "MISSED" in text and "issue" not in text
    assert "1.20x*" in text  # bf16 against torch's bf16-state step: different bytes, marked


def test_quantized_goals():
    """The quantized-state goals, from device time, like with like: each quantized setup at
    >= 85% of copy for its own bytes; bf16-8bit-remainder against torch fused fp32 (>= 1.6x)
    and against our bf16-remainder (the same exact master with fp32 state, >= 1.5x), each on
    the same workload."""
    rows = [r for r in _fake_report()["results"] if r["setup"] != "bf16"]
    L = ("llama-layers@400M", "llama-layers", 404_766_720, 18)

    def row(setup, provider, ms, pct, bpp):
        return {"workload": L[0], "profile": L[1], "params": L[2], "tensors": L[3], "setup": setup,
                "provider": provider, "status": "ok", "device_ms": ms, "pct_copy": pct,
                "bytes_per_param": bpp, "host_ms": 0.1}

    base = [row("fp32", "torch-fused", 2.8, 95.0, 28), row("bf16-remainder", "tritonadam", 2.5, 99.0, 26),
            row("fp32-8bit", "tritonadam", 1.9, 80.0, 16.125)]
    g = {x["goal"]: x for x in report_mod.goals(rows + base + [
        row("bf16-8bit-remainder", "tritonadam", 1.5, 90.0, 14.125)])}
    pct = g["bf16-8bit-remainder (14.125 B/param), llama-layers@400M: >= 85% of copy bandwidth for "
            "the bytes it moves (device time)"]
    assert pct["status"] == "met" and pct["measured"] == "90.0%"
    miss = g["fp32-8bit (16.125 B/param), llama-layers@400M: >= 85% of copy bandwidth for the bytes "
             "it moves (device time)"]
    assert miss["status"] == "MISSED" and miss["shortfall"] == "short by 5.0 points"
    torch_goal = next(x for k, x in g.items() if ">= 1.6x torch-fused fp32" in k)
    assert torch_goal["status"] == "met" and torch_goal["measured"].startswith("1.87x")
    assert "(28 B/param; device time)" in next(k for k in g if ">= 1.6x" in k)
    ours = next(x for k, x in g.items() if ">= 1.5x our bf16-remainder" in k)
    assert ours["status"] == "met" and ours["measured"].startswith("1.67x")
    slow = {x["goal"]: x for x in report_mod.goals(rows + base + [
        row("bf16-8bit-remainder", "tritonadam", 2.0, 67.0, 14.125)])}
    assert next(x for k, x in slow.items() if ">= 1.6x" in k)["shortfall"] == "short by 0.20x"
    assert next(x for k, x in slow.items() if ">= 1.5x" in k)["status"] == "MISSED"
    none = [x for x in report_mod.goals(rows) if "8bit" in x["goal"] or "quantized" in x["goal"]]
    assert len(none) == 3 and all(x["status"] == "n/a" for x in none)


def _fake_report():
    def row(workload, profile, params, tensors, provider, ms, pct, speedup, host=0.05, setup="bf16",
            bpp=22, same=None):
        return {"workload": workload, "profile": profile, "params": params, "tensors": tensors,
                "setup": setup, "provider": provider, "status": "ok", "device_ms": ms,
                "device_p20": ms, "device_p80": ms, "host_ms": host, "host_p20": host,
                "host_p80": host, "steady_ms": max(ms, host), "steady_p20": max(ms, host),
                "steady_p80": max(ms, host), "rounds": 7, "reps": 3, "bytes_per_param": bpp,
                "bytes_per_step": params * bpp, "gbps": params * bpp / ms / 1e6, "pct_copy": pct,
                "launches": 1, "state_bytes": params * 8, "speedup": speedup,
                "speedup_steady": speedup, "same_bytes": (provider == "torch-fused") if same is None else same,
                "check": "ok (0 of tol)", "label": ""}
    L, S = ("llama-layers@400M", "llama-layers", 404_766_720, 18), ("many-small@40.96M", "many-small", 40_960_000, 10_000)
    rows = [row(*L, "tritonadam", 3.2, 90.0, 1.2, same=False),
            row(*L, "torch-fused", 3.84, 75.0, 1.0, bpp=14),
            row(*L, "tritonadam", 2.2, 70.0, 0.95, setup="bf16-bf16state", bpp=14, same=True),
            row(*L, "torch-fused", 2.1, 75.0, 1.0, setup="bf16-bf16state", bpp=14),
            row(*S, "tritonadam", 0.4, 85.0, 4.0, host=0.5, setup="fp32", bpp=28, same=True),
            row(*S, "torch-fused", 1.6, 20.0, 1.0, setup="fp32", bpp=28),
            row(*S, "tritonadam-graph", 0.4, 85.0, None, host=0.01, setup="fp32", bpp=28)]
    return {"schema": report_mod.SCHEMA, "mode": "gpu",
            "header": {"date": "2026-01-01T00:00:00Z", "command": "python -m tritonadam.bench",
                       "device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6"},
            "config": {"baseline": "torch-fused"}, "copy_bandwidth": None, "results": rows,
            "checks": [], "roofline": None, "goals": [], "notes": [], "elapsed_s": 1.0}


def test_startup_only_touches_cpu_runs(monkeypatch):
    from tritonadam.bench import _startup
    from tritonadam.bench.timing import count_kernel_launches

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _startup.prepare_interpreter([], want_cpu=True) == "preset"  # the user's choice stands
    monkeypatch.delenv("TRITON_INTERPRET")
    assert _startup.prepare_interpreter([], want_cpu=False) == "gpu"
    assert "TRITON_INTERPRET" not in os.environ
    assert count_kernel_launches(lambda: None, torch.device("cpu")) is None


@pytest.mark.parametrize("extra,said,unsaid", [
    (["--no-check"], "tritonadam is not timed (nor checked: --no-check)", "is checked for correctness"),
    (["--first-use", "fp32"], "tritonadam's timings below measure the interpreter",
     "is checked for correctness"),
])
def test_cpu_report_says_what_ran_and_explains_only_its_columns(extra, said, unsaid, capsys, monkeypatch):
    """A CPU run's opening statement follows the options (it said tritonadam was checked
    and not timed under --no-check and --first-use), a first use there tunes nothing (it
    read "tuned", "None of None" configs), and the legend explains only the columns shown
    (no copy bandwidth, launches or peak memory on a CPU)."""
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    rc = main(["--device", "cpu", "--profiles", "one-huge@1K", "--setups", "fp32", "--clip", "none",
               "-q", *extra])
    assert rc == 0
    out = capsys.readouterr().out
    assert said in out and unsaid not in out
    legend = next(ln for ln in out.splitlines() if ln.startswith("B/param:"))
    for column in ("% copy", "launches:", "peak MiB:"):
        assert column not in legend
    assert "None of None" not in out and "tritonadam tuned" not in out


def test_the_legend_explains_a_speedup_column_shown_alone():
    """A saved run whose rows have a speedup and no steady speedup (schema 2) shows the
    column, and the legend explains it (it was said only with both)."""
    text = report_mod.columns_text(["B/param", "speedup", "check"], "torch-fused")
    assert "speedup: torch-fused's time over the row's" in text
    both = report_mod.columns_text(["speedup", "steady speedup"], "torch-fused")
    assert both.count("speedup") == 2 and both.startswith("speedup, steady speedup:")  # said once


def test_a_baseline_the_run_does_not_time_is_said(capsys, monkeypatch):
    """Speedup columns need the baseline's rows: without them the report says why they are
    missing (they were dropped without a word)."""
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    assert main(["--device", "cpu", "--profiles", "one-huge@1K", "--setups", "fp32", "--clip", "none",
                 "-q", "--no-check", "--providers", "torch-fused", "--baseline", "torch-foreach"]) == 0
    out = capsys.readouterr().out
    assert "no speedups: the baseline torch-foreach is not among this run's providers (torch-fused)" in out
    assert "speedup" not in out.split("Results")[1].splitlines()[2]


@pytest.mark.parametrize("args", [["--tensors", "0"], ["--tensors", "300", "-5"], ["--numel", "-1"],
                                  ["--reps", "0"]])
def test_host_time_refuses_counts_below_one(args, capsys):
    from tritonadam.bench import host_time

    with pytest.raises(SystemExit) as e:
        host_time.main(args)
    assert e.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_host_time_stubs_every_launch():
    """``python -m tritonadam.bench.host_time`` times the step and clip + step with all four
    launchers stubbed: no kernel is launched (the real launchers count every launch), and
    they are restored."""
    from tritonadam.bench import host_time
    from tritonadam.kernels import launch_counts

    before = dict(launch_counts)
    real = {name: getattr(module, name) for module, name in host_time.STUBBED}
    r = host_time.measure(tensors=30, numel=8, reps=3)
    assert launch_counts == before
    assert {name: getattr(module, name) for module, name in host_time.STUBBED} == real
    assert min(r["floor_ms"], r["step_ms"], r["clip_step_ms"]) > 0
    assert r["clip_ratio"] == pytest.approx(r["clip_step_ms"] / r["floor_ms"])
    # --breakdown reaches into the step cache's fields: it must keep up with them.
    passes = host_time.breakdown(tensors=30, numel=8, reps=2)
    assert launch_counts == before
    assert {"tensor guards", "param pointers", "exp_avg pointers", "state dict versions",
            "whole step"} <= set(passes)
    assert passes["whole step"] > 0


# ------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_small_bench(tmp_path):
    j = tmp_path / "r.json"
    r = _bench(["--device", "cuda", "--profiles", "one-huge@1M,many-small@400K", "--setups",
                "fp32,bf16,bf16-master", "--providers", "tritonadam,torch-fused",
                "--rep-ms", "20", "--autotune", "cache-only", "--out", str(j)],
               interpret=None, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(j.read_text())
    assert rep["mode"] == "gpu" and rep["copy_bandwidth"]["gbps"] > 0
    assert rep["header"]["driver"] and rep["header"]["cuda"]
    ok = [x for x in rep["results"] if x["status"] == "ok"]
    assert len(ok) == 12 + 8, rep["results"]  # and clip + step in fp32 and bf16
    for x in ok:
        assert x["pct_copy"] > 0 and x["launches"] is not None and x["launches"] >= 1
        assert x["device_ms"] > 0 and x["host_ms"] > 0 and x["steady_ms"] > 0
        assert x["timer"] == "cuda-events"
    plain = {(x["workload"], x["setup"], x["provider"]): x["launches"] for x in ok if not x.get("clip")}
    for x in ok:  # the clip launches its norm kernels besides the step's
        if x.get("clip"):
            assert x["launches"] > plain[x["workload"], x["setup"], x["provider"]], x
    ours = [x for x in ok if x["provider"] == "tritonadam"]
    assert all(x["check"].startswith("ok") for x in ours)
    assert rep["goals"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_captured_step_host_time(tmp_path):
    """The CUDA-graph providers: a replay's host time does not grow with the tensor count."""
    from tritonadam.bench.workloads import make_workload

    j = tmp_path / "r.json"
    r = _bench(["--device", "cuda", "--profiles", "many-small@400K,many-small@4M", "--setups", "bf16",
                "--providers", "tritonadam-graph,torch-fused-graph,tritonadam", "--clip", "none",
                "--rounds", "3", "--rep-ms", "20", "--autotune", "off", "--out", str(j)],
               interpret=None, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {(x["workload"], x["provider"]): x for x in json.loads(j.read_text())["results"]}
    assert all(x["status"] == "ok" and x["check"].startswith("ok") for x in rows.values()), rows
    big, small = rows["many-small@4M", "tritonadam-graph"], rows["many-small@400K", "tritonadam-graph"]
    # round(size / 4096) tensors of 4096: 98 and 977, ten times as many to 0.3%
    assert (small["tensors"], big["tensors"]) == (98, 977)
    assert (small["tensors"], big["tensors"]) == tuple(
        make_workload("many-small", n).tensors for n in (400_000, 4_000_000))
    assert big["tensors"] >= 9.9 * small["tensors"] and big["grads"].startswith("static")
    assert big["host_ms"] < 0.2 and big["host_ms"] < 3 * small["host_ms"] + 0.05


def test_each_clip_row_is_checked_from_the_seeds_grads(tmp_path, monkeypatch):
    """The cases of one workload share a grad feed: torch's in-place clip in an earlier
    case's untimed first steps scaled it, so every later case's check saw grads already
    clipped and passed whether or not it clipped. A clip that never scales the grads fails
    its check after torch's clip rows as it does alone."""
    from tritonadam.bench import providers

    class NormOnly(providers.TorchFused):
        name = "norm-only"

        def clip(self, built, max_norm, grad_bytes):
            params = built.params

            def call():  # measures the norm, never scales the grads
                return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
            return call, (("norm", grad_bytes, 0),)

    monkeypatch.setitem(providers.PROVIDERS, "norm-only", NormOnly())
    for order in ("norm-only", "torch-fused,norm-only"):
        out = tmp_path / f"{order.replace(',', '_')}.json"
        main(["--device", "cpu", "--providers", order, "--setups", "fp32", "--profiles", "one-huge@4K",
              "--clip", "fp32", "--max-norm", "0.01", "--rounds", "1", "--quiet", "--out", str(out)])
        rows = [r for r in json.loads(out.read_text())["results"] if r["provider"] == "norm-only" and r.get("clip")]
        assert len(rows) == 1 and rows[0]["status"] == "failed" and "FAIL" in str(rows[0].get("check")), (order, rows)


def test_host_time_in_process_leaves_the_random_stream_and_threads(capsys):
    """host_time's params come from a generator of its own, and its main() restores torch's
    thread count: called in-process (as these tests do) it drew from torch's global stream
    and left one thread."""
    from tritonadam.bench import host_time

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rng = torch.get_rng_state()
        host_time.main(["--tensors", "20", "--reps", "2", "--numel", "8"])
        assert torch.equal(torch.get_rng_state(), rng)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert "clip+step" in capsys.readouterr().out


def test_in_process_cpu_run_without_the_interpreter_says_what_to_do():
    """In-process, tritonadam's kernels are defined for a GPU at its import when
    TRITON_INTERPRET is unset: setting it later changed nothing, and every tritonadam case
    failed inside (rc 1). A usage error now says to set it first (python -m re-executes)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from tritonadam.bench.__main__ import main\n"
            "main(['--device', 'cpu', '--providers', 'tritonadam', '--setups', 'fp32', "
            "'--profiles', 'one-huge@4K', '--rounds', '1', '--quiet'])\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "set TRITON_INTERPRET=1 before importing tritonadam" in r.stderr, r.stderr[-2000:]
