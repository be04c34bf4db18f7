"""tritonadam/bench/gpu_check.sh, dry: the same script on the CPU (Triton's interpreter, tiny sizes),
in an environment without the packages the GPU machine's image lacks (expecttest,
platformdirs). A typo in the script or in a command line it runs must fail here, not cost
the GPU run: every step must finish, the GPU command lines must parse (``--plan``), and $OUT
must hold the files a GPU machine hands back, within its limits.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {"header.txt", "results.json", "pytest.txt", "summary.md", "all.tgz", "nvidia-smi.csv",
            "host_time.txt"}
MAX_FILES, MAX_BYTES = 8, 16 * 2**20  # what a GPU machine hands back from $OUT

# Stands in for the image: importing these fails there.
_BLOCK_MISSING = '''
import sys

class _NotOnTheImage:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("expecttest", "platformdirs"):
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU image)", name=name)
        return None

sys.meta_path.insert(0, _NotOnTheImage())
'''


def tgz_text(out: Path, name: str) -> str:
    with tarfile.open(out / "all.tgz") as tgz:
        return tgz.extractfile(name).read().decode()


def _imports_torch_test_internals(path: Path) -> bool:
    """A test file importing torch's internal test helpers at module level (they need expecttest)."""
    return re.search(r"^from torch\.testing\._internal|^import torch\.testing\._internal",
                     path.read_text(), re.M) is not None


@pytest.mark.skipif(os.environ.get("TRITONADAM_TEST_DEVICE", "cpu") != "cpu", reason="the dry run is the CPU run")
def test_gpu_check_dry_run(tmp_path):
    site = tmp_path / "image"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCK_MISSING)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON", "_TRITONADAM"))}
    env.update(DRY_RUN="1", OUT=str(out), PYTHON=sys.executable, TRITONADAM_COMMIT="0123abc",
               PYTHONPATH=str(site), TMPDIR=str(tmp_path), WHEELHOUSE=str(tmp_path / "no-wheels"))
    proc = subprocess.run(["bash", str(ROOT / "tritonadam" / "bench" / "gpu_check.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=400)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]

    # $OUT: the seven files, nothing else, each within the limits
    files = sorted(p for p in out.rglob("*"))
    assert {p.name for p in files} == EXPECTED and all(p.is_file() for p in files), (files, log)
    assert len(files) <= MAX_FILES and all(p.stat().st_size < MAX_BYTES for p in files)
    with tarfile.open(out / "all.tgz") as tgz:
        packed = {Path(m.name).name for m in tgz.getmembers() if m.isfile()}
        steps = tgz.extractfile("./steps.tsv").read().decode()
    assert {"core.log", "core.plan.txt", "tuning.log", "peers.plan.txt", "peers.log", "bench.log",
            "bench.json", "bench.md", "pytest.xml", "steps.tsv"} <= packed, packed
    assert not list(tmp_path.glob("tritonadam-gpu-check.*")), "the work directory is left behind"

    # every step ran and exited 0, except pytest, which may only fail to collect test files
    # that import torch's internal test helpers (they need expecttest, absent on the image)
    rcs = {line.split("\t")[0]: int(line.split("\t")[1]) for line in steps.splitlines()[1:]}
    assert list(rcs) == ["header", "core", "host_time", "pytest", "tuning", "peers", "bench"], steps
    assert all(rc == 0 for name, rc in rcs.items() if name != "pytest"), steps
    pytest_txt = (out / "pytest.txt").read_text()
    uncollected = set(re.findall(r"^ERROR (tests/\S+\.py)", pytest_txt, re.M))
    assert uncollected <= {f for f in uncollected if _imports_torch_test_internals(ROOT / f)}, pytest_txt[-3000:]
    assert rcs["pytest"] == (1 if uncollected else 0), pytest_txt[-3000:]
    assert proc.returncode == (1 if uncollected else 0), log
    assert re.search(r"^=+ .*collected", pytest_txt, re.M) and "not found" not in pytest_txt

    header = (out / "header.txt").read_text()
    command = next(line for line in header.splitlines() if line.startswith("command: "))
    assert "commit:  0123abc" in header and command.endswith(" bash tritonadam/bench/gpu_check.sh")
    assert "TRITONADAM_COMMIT=0123abc " in command and "DRY_RUN=1 " in command
    assert "torch:" in header and "triton:" in header and "expecttest no" in header

    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True and results["header"]["git_commit"] == "0123abc"
    ok = [r for r in results["results"] if r["status"] == "ok"]
    assert {r["provider"] for r in ok if not r.get("variant")} == {"tritonadam", "torch-fused"}
    assert {r["provider"] for r in ok if r.get("clip")} == {"tritonadam", "torch-fused"}
    assert any(r.get("variant") == "fixed" for r in ok) and results["sweeps"]
    for r in ok:  # the three figures on every row
        assert r["device_ms"] > 0 and r["host_ms"] > 0 and r["steady_ms"] > 0, r
    # quantized state in the dry core too: tritonadam's row checked against the emulated
    # format; torch has none (its row is the dense twin setup's)
    quant = [r for r in ok if r["setup"] == "bf16-8bit-remainder" and not r.get("variant")]
    assert {r["provider"] for r in quant} == {"tritonadam"} and quant[0]["bytes_per_param"] == 14.125
    assert "8bit moments emulated" in quant[0]["check"] and quant[0]["state_bytes"] > 0
    # the GPU core line: the dense core setups (the same-bytes pairs) on every workload, the
    # quantized core setups and bf16-remainder on the Llama layers, the captured steps
    core_plan = tgz_text(out, "./core.plan.txt")
    assert "fp32, bf16, bf16-bf16state" in core_plan and "tritonadam-graph" in core_plan
    llama = next(ln for ln in core_plan.splitlines() if ln.strip().startswith("llama-layers@400M"))
    assert llama.endswith("setups fp32, bf16, bf16-bf16state, bf16-8bit-remainder, bf16-4bit-sr, "
                          "fp32-8bit, bf16-remainder"), llama
    peers_plan = tgz_text(out, "./peers.plan.txt")  # parsed, though no wheels here
    assert "torchao-8bit" in peers_plan and "bf16-8bit-remainder, bf16-4bit-sr" in peers_plan
    host = (out / "host_time.txt").read_text()
    assert "floor ms" in host and "whole step" in host

    summary = (out / "summary.md").read_text()
    for section in ("# tritonadam on cpu", "## Results", "## Launch configs", "## Steps", "## GPU tests",
                    "## Host time against the floor"):
        assert section in summary, summary
    for step in rcs:
        assert f"| {step} | {rcs[step]} |" in summary
    assert "issue" not in summary.lower()
