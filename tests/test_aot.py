"""Every kernel variant compiles for sm_80 and sm_90 with no GPU present; the aligned
path's global loads and stores are 16 bytes wide; nothing spills.

Compilation runs in a subprocess: this test session runs kernels in the interpreter,
which cannot compile for a GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "aot_compile_variants.py")
SIZES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # as users compile it
    out = subprocess.run([sys.executable, SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _expected_vector_accesses(row):
    """16-byte accesses the aligned, unmasked path must make, array by array."""
    f = row["flags"]
    p = f["P_DTYPE"]
    g = f.get("G_DTYPE") or p
    c = "fp64" if p == "fp64" else "fp32"
    per_thread = row["block"] // (32 * row["num_warps"])
    vec = lambda dtype: per_thread * SIZES[dtype] // 16  # noqa: E731
    master, amsgrad = f.get("MASTER", False), f.get("AMSGRAD", False) and row["kind"] == "adam"
    loads = vec(g) + vec(c) * (2 + amsgrad + master) + (0 if master else vec(p))
    stores = vec(c) * (2 + amsgrad + master) + vec(p)
    return loads, stores


def test_every_variant_compiles_for_sm80_and_sm90(compiled):
    assert len(compiled) >= 2 * 19
    assert any(r["flags"].get("PERSISTENT") for r in compiled)
    assert {r["arch"] for r in compiled} == {80, 90}
    for row in compiled:
        assert row["cubin_bytes"] > 0, row


def test_aligned_path_uses_16_byte_accesses(compiled):
    for row in compiled:
        loads, stores = _expected_vector_accesses(row)
        got = row["widths"]
        assert got["ld"].get("16", 0) == loads, (row["kind"], row["flags"], row["arch"], got)
        assert got["st"].get("16", 0) == stores, (row["kind"], row["flags"], row["arch"], got)


def test_no_register_spills(compiled):
    for row in compiled:
        assert (row["spill_stores"], row["spill_loads"]) == (0, 0), (row["kind"], row["flags"], row["arch"])
