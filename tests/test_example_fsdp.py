"""examples/fsdp_train.py runs under torchrun with 2 CPU processes, learns, and resumes.

Run A trains 8 steps, checkpointing at step 4 and 8; run B resumes from A's step-4
checkpoint and must print the same losses for steps 5-8 (data depend only on the step,
and the restored optimizer, scheduler and model state are exact). About 25 s on 2 cores,
nearly all of it process start-up and Triton's interpreter.
"""
from __future__ import annotations

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


def torchrun(tmp_path: Path, *args: str) -> dict[int, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TRITON_INTERPRET"] = "1"  # the example sets it without CUDA; force it for GPU hosts too
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(EXAMPLE), *FLAGS, *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-6000:]}"
    losses = {int(m[1]): float(m[3]) for m in map(LINE.match, proc.stdout.splitlines()) if m}
    assert losses, proc.stdout
    return losses


def test_example_trains_and_resumes_exactly(tmp_path):
    full = torchrun(tmp_path, "--ckpt-dir", "ckpt_a", "--ckpt-every", "4")
    assert sorted(full) == list(range(1, 9))
    assert full[8] < full[1] - 1.0, f"loss did not fall: {full}"
    for step in (4, 8):
        assert (tmp_path / "ckpt_a" / f"step_{step:06d}" / ".metadata").exists()

    resumed = torchrun(tmp_path, "--ckpt-dir", "ckpt_b", "--resume", "ckpt_a/step_000004")
    assert sorted(resumed) == [5, 6, 7, 8]
    assert {s: full[s] for s in resumed} == resumed, (full, resumed)
    assert (tmp_path / "ckpt_b" / "step_000008" / ".metadata").exists()
