"""examples/fsdp_train.py runs with 2 CPU processes, learns, resumes, and refuses a bad
resume in one line.

Run A (``python examples/fsdp_train.py``: the script launches its own workers) trains 8
steps, checkpointing at step 4 and 8; run B (under ``torchrun``) resumes from A's step-4
checkpoint and must print the same losses for steps 5-8 (data depend only on the step,
and the restored optimizer, scheduler and model state are exact). A resume that cannot go
ahead (no checkpoint, an unfinished one, another ``--steps``) ends with one line and exit
status 2 before any worker starts; under torchrun, rank 0 alone prints it. About a minute on 2
cores, nearly all of it process start-up and Triton's interpreter.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fsdp_train.py"
LINE = re.compile(r"^step\s+(\d+)/(\d+) \| loss ([0-9.]+) \| lr \S+ \| grad-norm [0-9.]+ \|\s+[0-9.]+ ms/step")

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="needs torch.distributed with the gloo backend"),
]

FLAGS = ["--steps", "8", "--log-every", "1", "--lr", "1e-2", "--warmup", "2"]


def example(cwd: Path, *args: str, torchrun: bool = False) -> subprocess.CompletedProcess:
    """The example with 2 CPU workers, started by itself or by torchrun."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TRITON_INTERPRET"] = "1"  # the example sets it without CUDA; force it for GPU hosts too
    env["CUDA_VISIBLE_DEVICES"] = ""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] if torchrun else []
    cmd = [sys.executable, *launcher, str(EXAMPLE), "--nproc-per-node=2", *FLAGS, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def losses(proc: subprocess.CompletedProcess) -> dict[int, float]:
    assert proc.returncode == 0, f"{proc.args}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-6000:]}"
    found = {int(m[1]): float(m[3]) for m in map(LINE.match, proc.stdout.splitlines()) if m}
    assert found, proc.stdout
    return found


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """(folder, losses): 8 steps, checkpoints at steps 4 and 8 in folder/ckpt_a."""
    cwd = tmp_path_factory.mktemp("fsdp_example")
    return cwd, losses(example(cwd, "--ckpt-dir", "ckpt_a", "--ckpt-every", "4"))


def test_example_trains_and_resumes_exactly(run_a):
    cwd, full = run_a
    assert sorted(full) == list(range(1, 9))
    assert full[8] < full[1] - 1.0, f"loss did not fall: {full}"
    for step in (4, 8):
        assert (cwd / "ckpt_a" / f"step_{step:06d}" / ".metadata").exists()

    resumed = losses(example(cwd, "--ckpt-dir", "ckpt_b", "--resume", "ckpt_a/step_000004", torchrun=True))
    assert sorted(resumed) == [5, 6, 7, 8]
    assert {s: full[s] for s in resumed} == resumed, (full, resumed)
    assert (cwd / "ckpt_b" / "step_000008" / ".metadata").exists()


def test_refused_resume_is_one_line(run_a, monkeypatch, capsys):
    """Checked in this process (the launcher's check comes before any worker), then once
    as a command."""
    cwd, _ = run_a
    (cwd / "ckpt_a" / "step_000099").mkdir()  # an interrupted save: no .metadata
    spec = importlib.util.spec_from_file_location("fsdp_train", EXAMPLE)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.chdir(cwd)
    refusals = {
        ("--ckpt-dir", "empty", "--resume"): "--resume: no checkpoint in empty",
        ("--resume", "ckpt_a/step_000099"): "--resume: ckpt_a/step_000099 is not a finished checkpoint",
        ("--ckpt-dir", "ckpt_a", "--resume", "--steps", "9"):
            "--resume: ckpt_a/step_000008 belongs to a run with --steps 8: resume with the same --steps",
    }
    for args, reason in refusals.items():
        with pytest.raises(SystemExit) as exit_:
            script.main([*FLAGS, *args])
        out, err = capsys.readouterr()
        assert exit_.value.code == 2 and out == "", (args, out)
        assert err.count("\n") == 1 and err.startswith(reason), (args, err)

    proc = example(cwd, "--ckpt-dir", "empty", "--resume")
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr == "--resume: no checkpoint in empty\n"
    assert not (cwd / "empty").exists()


def test_refused_resume_under_torchrun_is_said_once(run_a):
    """torchrun adds its own summary of the failed workers; the reason comes once, from rank 0."""
    cwd, _ = run_a
    proc = example(cwd, "--ckpt-dir", "ckpt_a", "--resume", "--steps", "9", torchrun=True)
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("belongs to a run with --steps 8") == 1, proc.stderr
