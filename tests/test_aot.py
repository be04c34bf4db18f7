"""The kernels as a step launches them, compiled for sm_80 and sm_90 with no GPU present:
what the compiler reports must fit a memory-bound kernel.

- every variant and every candidate launch config compiles without spills;
- the full-block path moves 4-byte (and 8-byte) data in 16-byte accesses;
- the update kernel has no ordered atomics, fences or barriers across the GPU, and no
  shared-memory staging;
- at 4096/8 (fp64: 2048/8, the same bytes per thread) every variant without a master copy
  fits in 128 registers, and the default config keeps at least 32 warps resident per SM (fp64, which moves twice
  the bytes per element, at least 24);
- the gradient-norm kernels (norm pass and reduction): no spills, the norm pass reads
  full aligned blocks in 16-byte loads, one cross-warp reduction (shared memory) per
  program rather than per block, and no atomics in any kernel: the norm's sums have
  a fixed order, so its bits repeat run to run.

Compilation runs in a subprocess: this test session runs kernels in the interpreter,
which cannot compile for a GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tritonadam.autotune.configs import GPU_DEFAULT
from tritonadam.kernels.launch import SR_ELEMS_PER_THREAD

SCRIPT = os.path.join(os.path.dirname(__file__), "aot_compile_variants.py")
SIZES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # as users compile it
    out = subprocess.run([sys.executable, SCRIPT], env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _updates(rows):
    return [r for r in rows if r["kernel"].startswith("update")]


def _name(row):
    return row["kernel"], row["flags"], row["arch"], f'{row["block"]}/{row["num_warps"]}'


def _expected_16_byte_accesses(row):
    """16-byte loads and stores of the full-block path, array by array.

    Every array moves the same number of elements per access, so all share one register
    layout: 4 (16 bytes of 4- and 8-byte data, 8 of 2-byte data), or 8 when every array
    is 2 bytes wide (then 16 bytes each).
    """
    f = row["flags"]
    p = f["param_dtype"]
    g = f.get("grad_dtype") or p
    c = "fp64" if p == "fp64" else "fp32"
    s = f.get("state_dtype") or c
    master = int(f.get("master", 0))  # 0 none, 1 fp32 copy, 2 int16 remainder
    w = {1: "fp32", 2: "bf16"}.get(master)  # an int16 remainder moves like a 2-byte array
    narrow = all(SIZES[d] == 2 for d in (p, g, s)) and master != 1
    per_thread = row["block"] // (32 * row["num_warps"])
    if f.get("stochastic_rounding"):  # one loop iteration's elements appear in the PTX
        per_thread = min(per_thread, SR_ELEMS_PER_THREAD)
    vec = 8 if narrow else 4

    def wide(dtype):
        return per_thread * SIZES[dtype] // 16 if SIZES[dtype] * vec >= 16 else 0

    amsgrad = f.get("amsgrad", False) and not f.get("adamax", False)
    moments = 2 + amsgrad
    loads = wide(g) + wide(s) * moments + (wide(w) if w else 0) + (0 if master == 1 else wide(p))
    stores = wide(s) * moments + (wide(w) if w else 0) + wide(p)
    return loads, stores


def test_every_variant_compiles_for_sm80_and_sm90(compiled):
    assert {r["arch"] for r in compiled} == {80, 90}
    updates = [r for r in compiled if r["kernel"] == "update"]
    assert len(updates) == 2 * 26 * 2
    assert any(r["flags"].get("persistent") for r in updates)
    assert sum(r["kernel"] == "prepare" for r in compiled) == 4
    assert sum(r["kernel"] == "norm" for r in compiled) == 2 * 12
    assert sum(r["kernel"] == "norm-reduce" for r in compiled) == 2 * 4


def test_no_spills(compiled):
    for row in compiled:
        assert (row["spill_stores"], row["spill_loads"]) == (0, 0), _name(row)


def test_full_block_path_uses_16_byte_accesses(compiled):
    for row in _updates(compiled):
        loads, stores = _expected_16_byte_accesses(row)
        got = row["widths"]
        assert got["ld"].get("16", 0) == loads, (_name(row), got)
        assert got["st"].get("16", 0) == stores, (_name(row), got)


def test_no_ordering_or_shared_memory_in_the_update_kernel(compiled):
    for row in _updates(compiled):
        assert row["ordering"] == [], _name(row)
        assert row["shared_ops"] == 0, _name(row)
        assert row["shared_bytes"] == 0, _name(row)


def test_registers_at_4096_by_8(compiled):
    def bounded(r):
        if r["kernel"] != "update":
            return False
        wide = r["flags"]["param_dtype"] == "fp64"
        return (r["block"], r["num_warps"]) == ((2048 if wide else 4096), 8)

    rows = [r for r in compiled if bounded(r)]
    assert len(rows) == 2 * 26
    for row in rows:
        f = row["flags"]
        if f.get("master"):
            continue
        assert row["registers"] <= 128, (_name(row), row["registers"])


def test_default_config_keeps_32_warps_resident(compiled):
    default = (GPU_DEFAULT.block_size, GPU_DEFAULT.num_warps)
    rows = [r for r in compiled if r["kernel"] == "update" and (r["block"], r["num_warps"]) == default]
    assert rows
    for row in rows:
        floor = 24 if row["flags"]["param_dtype"] == "fp64" else 32
        assert row["resident_warps"] >= floor, (_name(row), row["registers"])


def test_norm_pass_reads_full_blocks_in_16_byte_loads(compiled):
    """Each thread's share of a block (block / (32 * warps) elements) in 16-byte loads,
    whatever the grad dtype; the only other loads are the table lookups and the masked
    path's scalar loads. The norm kernel stores one partial per program."""
    rows = [r for r in compiled if r["kernel"] == "norm"]
    for row in rows:
        per_thread = row["block"] // (32 * row["num_warps"])
        size = SIZES[row["flags"]["grad_dtype"]]
        assert row["widths"]["ld"].get("16", 0) == per_thread * size // 16, (_name(row), row["widths"])
        assert row["widths"]["st"] == {"8": 1}, (_name(row), row["widths"])


def test_norm_kernels_reduce_across_warps_once_and_use_no_atomics(compiled):
    control = [r for r in compiled if r["kernel"] == "control"]
    assert len(control) == 2 and all(r["shared_ops_in_loops"] > 0 for r in control), control
    for row in compiled:
        assert row["atomics"] == [], _name(row)
    for row in compiled:
        if row["kernel"].startswith("norm"):
            assert row["ordering"] == [], _name(row)
            assert row["shared_ops_in_loops"] == 0, (_name(row), row["shared_ops"])
