"""``python -m tritonadam.autotune`` on a temporary cache directory (subprocesses)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tritonadam.autotune import DeviceInfo, DiskCache, LaunchConfig, Tuner, entry_key

ROOT = Path(__file__).resolve().parents[1]
FAKE_GPU = DeviceInfo(backend="cuda", name="Fake H100 80GB HBM3", arch="sm_90", capability="9.0", num_sms=132)
KEYS = [
    ("adam", "decoupled=1", "amsgrad=0", "master=0", "p=float32", "g=float32", "s=float32"),
    ("adamax", "decoupled=0", "amsgrad=0", "master=1", "p=bfloat16", "g=bfloat16", "s=float32"),
]
BEST = LaunchConfig(2048, 4)


def cli(*args, cache_dir, check=True):
    env = dict(os.environ, TRITONADAM_CACHE_DIR=str(cache_dir))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tritonadam.autotune", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def populate(cache_dir) -> Path:
    def timer(fn):  # ms of one timed unit of fn.n launches
        return (1.0 if fn.config == BEST else 1.5 + fn.config.num_warps / 100) * fn.n

    def make_runner(config, numel):
        run = lambda: None  # noqa: E731
        run.config = config
        return run

    tuner = Tuner(
        timer=timer, cache=DiskCache(cache_dir), device_info=lambda d: FAKE_GPU,
        free_bytes=lambda d: None, time_any_device=True, stream=io.StringIO(),
    )
    for key in KEYS:
        tuner.select(key, 2**22, torch.device("cpu"), make_runner, bytes_per_elem=28)
    tuner.select(KEYS[0], 2**14, torch.device("cpu"), make_runner, bytes_per_elem=28)
    return tuner.cache.path(tuner.identity(FAKE_GPU))


def run_main(capsys, *args) -> tuple[int, str, str]:
    """The CLI in this process (each subprocess costs seconds of imports)."""
    from tritonadam.autotune.__main__ import main

    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_show_as_a_subprocess(tmp_path):
    cache_dir = tmp_path / "cache"
    populate(cache_dir)
    shown = cli("show", cache_dir=cache_dir).stdout
    assert FAKE_GPU.name in shown
    for key in KEYS:
        assert "|".join(key) in shown
    assert "block=2048 warps=4" in shown  # chosen config
    assert "2^22" in shown and "2^14" in shown
    assert f"{28 * 2**22 / 1e-3 / 1e9:.0f}" in shown  # GB/s
    # Against the default, from the same pairs: its ms, and the choice's time ratio to it.
    d_ms = 1.5 + 8 / 100
    assert f"block=1024 warps=8 {d_ms:.4g} ms" in shown
    assert f"{1 / d_ms:.3f} (IQR 0.000, 8 pairs)" in shown
    assert "margin 2%" in shown and "noise 0.000" in shown
    assert "faster than the default" not in shown  # the reasons only with --details
    details = cli("show", "--details", cache_dir=cache_dir).stdout
    assert "faster than the default" in details


def test_export_clear_import_roundtrip(tmp_path, monkeypatch, capsys):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("TRITONADAM_CACHE_DIR", str(cache_dir))
    path = populate(cache_dir)
    original = json.loads(path.read_text())["entries"]
    assert len(original) == 3

    bundle = tmp_path / "bundle.json"
    rc, out, _ = run_main(capsys, "export", str(bundle))
    assert rc == 0 and "exported 3 entries" in out
    assert json.loads(bundle.read_text())["files"][0]["entries"] == original

    rc, out, _ = run_main(capsys, "clear")
    assert rc == 0 and "removed 1 cache file" in out
    assert not path.exists()
    assert "no tuned configs" in run_main(capsys, "show")[1]

    # A tampered entry in the bundle is skipped and reported; the rest comes back as it was.
    obj = json.loads(bundle.read_text())
    bad_name = entry_key(KEYS[1], 22)
    obj["files"][0]["entries"][bad_name]["config"] = {"block_size": 12345, "num_warps": 8}
    bundle.write_text(json.dumps(obj))
    rc, out, _ = run_main(capsys, "import", str(bundle))
    assert rc == 0 and "imported 2 entries" in out and "invalid entr" in out and "12345" in out
    back = json.loads(path.read_text())["entries"]
    assert back == {k: v for k, v in original.items() if k != bad_name}
    assert "block=2048 warps=4" in run_main(capsys, "show")[1]


def test_import_refuses_what_is_not_a_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITONADAM_CACHE_DIR", str(tmp_path / "cache"))
    junk = tmp_path / "junk.json"
    junk.write_text('{"hello": "world"}')
    rc, _, err = run_main(capsys, "import", str(junk))
    assert rc == 1 and "not a tritonadam autotune cache" in err
    junk.write_text('{"format": "tritonadam-autotune-bund')  # truncated
    rc, _, err = run_main(capsys, "import", str(junk))
    assert rc == 1 and "corrupt or truncated" in err
    assert not (tmp_path / "cache").exists()


def test_import_a_single_cache_file(tmp_path, capsys):
    path = populate(tmp_path / "a")
    assert run_main(capsys, "--cache-dir", str(tmp_path / "b"), "import", str(path))[0] == 0
    assert (tmp_path / "b" / path.name).read_text() != ""
    assert json.loads((tmp_path / "b" / path.name).read_text())["entries"] == json.loads(path.read_text())["entries"]


def test_path_and_help(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITONADAM_CACHE_DIR", str(tmp_path))
    assert run_main(capsys, "path")[1].splitlines()[0] == str(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_main(capsys, "--help")
    assert exc.value.code == 0
    helptext = capsys.readouterr().out
    for cmd in ("tune", "show", "export", "import", "clear", "path"):
        assert cmd in helptext
    with pytest.raises(SystemExit):
        run_main(capsys, "tune", "--help")
    tunehelp = capsys.readouterr().out
    for opt in ("--optimizer", "--param-dtype", "--model-size", "--world-size", "--budget", "--force"):
        assert opt in tunehelp


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message; a GPU would really tune")
def test_tune_on_cpu_explains_and_exits_nonzero(tmp_path):
    proc = cli("tune", "--model-size", "125M", cache_dir=tmp_path, check=False)
    assert proc.returncode == 1
    assert "GPU" in proc.stderr and "nothing tuned" in proc.stderr
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("argv,reason", [
    (["--param-dtype", "fp16", "--master-weights", "remainder"], "remainder"),
    (["--master-weights", "--stochastic-rounding"], "stochastic"),
])
def test_tune_refuses_what_the_optimizer_refuses_before_looking_for_a_gpu(argv, reason, tmp_path):
    """docs/autotune.md: a combination the optimizer would refuse is refused (exit 2, its
    reason), on any machine; it was reported as "no GPU" where there is none."""
    proc = cli("tune", "--numel", "1000", *argv, cache_dir=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "nothing tuned" in proc.stderr and reason in proc.stderr and "GPU" not in proc.stderr


def test_tune_loop_with_a_fake_gpu_and_fake_kernels(tmp_path, capsys):
    """The body of `tune` (the GPU check aside) against the kernels-package contract."""
    import types

    from tritonadam.autotune.__main__ import build_parser, run_tune

    calls = []

    def variant_of(*, optimizer, param_dtype, grad_dtype, amsgrad, master_weights, **state_options):
        key = (optimizer, f"amsgrad={int(amsgrad)}", f"master={int(master_weights)}",
               f"p={str(param_dtype).split('.')[-1]}", f"g={str(grad_dtype).split('.')[-1]}")
        return types.SimpleNamespace(autotune_key=lambda: key, optimizer=optimizer, param_dtype=param_dtype,
                                     bytes_per_elem=lambda: 16 if param_dtype == torch.float32 else 12)

    def make_scratch_runner(variant, *, config, numels, device):
        calls.append((variant.optimizer, variant.param_dtype, sum(numels), config))
        run = lambda: None  # noqa: E731
        run.config = config
        return run

    kernels = dict(variant_of=variant_of, make_scratch_runner=make_scratch_runner)
    budget_clock = {"t": 0.0}

    def timer(fn):
        budget_clock["t"] += 1.0
        return (1.0 if fn.config == BEST else 2.0) * fn.n

    def tuner(budget):
        return Tuner(
            timer=timer, clock=lambda: budget_clock["t"], budget_s=budget, cache=DiskCache(tmp_path),
            device_info=lambda d: FAKE_GPU, free_bytes=lambda d: None, time_any_device=True, stream=io.StringIO(),
        )

    argv = ["tune", "--optimizer", "adamw", "adamax", "--param-dtype", "fp32", "bf16",
            "--model-size", "64M", "--world-size", "4", "--min-numel", "2^22"]
    args = build_parser().parse_args(argv)
    # First pass with a budget too small to finish (1 s per timing: the default's warm-up
    # alone): entries are stored as partial, with the default kept.
    assert run_tune(args, tuner=tuner(budget=2), device=torch.device("cpu"), **kernels) == 0
    out = capsys.readouterr().out
    assert out.count("tuned 1/") == 12 and out.count("(budget ran out)") == 12  # 2 x 2 x buckets 2^22..2^24
    assert out.count("default kept") == 12
    assert {c[2] for c in calls} == {2**22, 2**23, 2**24}
    # Second pass: partial entries are finished without --force.
    calls.clear()
    assert run_tune(args, tuner=tuner(budget=1000), device=torch.device("cpu"), **kernels) == 0
    out = capsys.readouterr().out
    assert "cached" not in out and "block=2048 warps=4" in out and "0.500 (IQR 0.000, 8 pairs)" in out
    # Third pass: complete entries are kept unless --force.
    calls.clear()
    assert run_tune(args, tuner=tuner(budget=1000), device=torch.device("cpu"), **kernels) == 0
    assert capsys.readouterr().out.count("cached") == 12 and calls == []
    args = build_parser().parse_args(argv + ["--force"])
    assert run_tune(args, tuner=tuner(budget=1000), device=torch.device("cpu"), **kernels) == 0
    assert calls
    # What the tuner stored is what the optimizer would find for the same key.
    entries = json.loads(next(tmp_path.glob("*.json")).read_text())["entries"]
    assert len(entries) == 12
    e = entries[entry_key(("adamw", "amsgrad=0", "master=0", "p=bfloat16", "g=bfloat16"), 23)]
    assert e["config"] == BEST.to_json() and e["measured"]["how"] == "cli tune" and e["bytes_per_elem"] == 12


def test_tune_times_scratch_launches_with_the_models_tensor_sizes(tmp_path, capsys):
    """--tensor-numel 4096: each scratch launch is made of 4096-element tensors, like the
    10,000 x 4,096 workload, rather than one tensor as large as the bucket."""

    from tritonadam.autotune.__main__ import build_parser, run_tune
    from tritonadam.state import variant

    mixes = []

    def make_scratch_runner(variant, *, config, numels, device):
        mixes.append(numels)
        run = lambda: None  # noqa: E731
        run.config = config
        return run

    kernels = dict(variant_of=variant, make_scratch_runner=make_scratch_runner)
    tuner = Tuner(timer=lambda fn: 1.0 * fn.n, cache=DiskCache(tmp_path), device_info=lambda d: FAKE_GPU,
                  free_bytes=lambda d: None, time_any_device=True, stream=io.StringIO())
    args = build_parser().parse_args(["tune", "--param-dtype", "bf16", "--numel", "2^16", "--tensor-numel", "4096"])
    assert run_tune(args, tuner=tuner, device=torch.device("cpu"), **kernels) == 0
    assert mixes and all(m == [4096] * 16 for m in mixes)
    capsys.readouterr()


def test_tune_takes_every_state_mode_and_refuses_what_the_optimizer_refuses(tmp_path, capsys):
    """--master-weights remainder, --state-dtype and --stochastic-rounding tune the entries
    the optimizer with those options looks up; a combination the optimizer refuses stops
    the command before anything is timed, with the optimizer's reason."""
    from tritonadam.autotune.__main__ import build_parser, run_tune
    from tritonadam.autotune.cache import entry_key
    from tritonadam.state import variant

    timed = []

    def make_scratch_runner(variant, *, config, numels, device):
        timed.append(variant.key)
        run = lambda: None  # noqa: E731
        run.config = config
        return run

    def run(*options):
        tuner = Tuner(timer=lambda fn: 1.0 * fn.n, cache=DiskCache(tmp_path), device_info=lambda d: FAKE_GPU,
                      free_bytes=lambda d: None, time_any_device=True, stream=io.StringIO())
        args = build_parser().parse_args(["tune", "--param-dtype", "bf16", "--numel", "2^20", *options])
        return run_tune(args, tuner=tuner, device=torch.device("cpu"), variant_of=variant,
                        make_scratch_runner=make_scratch_runner)

    modes = {
        ("--master-weights", "remainder", "--state-dtype", "8bit"): dict(master_weights="remainder", state_dtype="8bit"),
        ("--state-dtype", "4bit", "--stochastic-rounding"): dict(state_dtype="4bit", stochastic_rounding=True),
        ("--state-dtype", "bf16", "--stochastic-rounding"): dict(state_dtype=torch.bfloat16, stochastic_rounding=True),
        ("--master-weights",): dict(master_weights=True),
    }
    for argv, options in modes.items():
        assert run(*argv) == 0
        capsys.readouterr()
    entries = json.loads(next(tmp_path.glob("*.json")).read_text())["entries"]
    wanted = {entry_key(tuple(variant("adamw", torch.bfloat16, **o).autotune_key()), 20) for o in modes.values()}
    assert wanted <= set(entries) and len(wanted) == len(modes)

    timed.clear()
    for argv, reason in ((["--param-dtype", "fp16", "bf16", "--master-weights", "remainder"], "remainder"),
                         (["--master-weights", "--stochastic-rounding"], "stochastic")):
        assert run(*argv) == 2
        err = capsys.readouterr().err
        assert "nothing tuned" in err and reason in err
    assert timed == []


@pytest.mark.parametrize("args, message", [
    (["--numel", "1e400"], "size too large"),
    (["--numel", "2^20", "--budget", "-1"], "finite number of seconds >= 0"),
    (["--numel", "2^20", "--budget", "nan"], "finite number of seconds >= 0"),
    (["--numel", "2^20", "--compile-budget", "inf"], "finite number of seconds >= 0"),
    (["--model-size", "1B", "--world-size", "0"], "at least 1 rank"),
])
def test_tune_refuses_bad_numbers_as_usage_errors(args, message, capsys):
    from tritonadam.autotune.__main__ import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["tune", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_an_empty_cache_dir_is_a_usage_error_not_the_default_directory(tmp_path, monkeypatch, capsys):
    """``--cache-dir "$UNSET"`` meant the default directory: ``clear`` deleted the user's
    real cache."""
    from tritonadam.autotune.__main__ import main as run

    monkeypatch.setenv("TRITONADAM_CACHE_DIR", str(tmp_path))
    kept = tmp_path / "tritonadam-autotune-kept.json"
    kept.write_text("{}")
    for empty in ("", "  "):
        with pytest.raises(SystemExit) as e:
            run(["--cache-dir", empty, "clear"])
        assert e.value.code == 2 and "empty directory name" in capsys.readouterr().err
    assert kept.exists()


def test_tune_exits_nonzero_when_nothing_could_be_timed_or_nothing_is_asked(tmp_path, capsys):
    """Every entry failed (not even the default could be timed): exit 1, not 0; a model too
    small for --min-numel tunes nothing: a usage error."""
    import types

    from tritonadam.autotune.__main__ import build_parser, run_tune

    def variant_of(*, optimizer, param_dtype, grad_dtype, amsgrad, master_weights, **state_options):
        return types.SimpleNamespace(autotune_key=lambda: ("adamw", "p=float32"), bytes_per_elem=lambda: 16)

    def make_scratch_runner(variant, *, config, numels, device):
        def run():
            raise RuntimeError("no kernel here")
        run.config = config
        return run

    def timer(fn):
        fn()

    tuner = Tuner(timer=timer, clock=lambda: 0.0, cache=DiskCache(tmp_path), device_info=lambda d: FAKE_GPU,
                  free_bytes=lambda d: None, time_any_device=True, stream=io.StringIO())
    args = build_parser().parse_args(["tune", "--param-dtype", "fp32", "--numel", "2^20"])
    assert run_tune(args, tuner=tuner, device=torch.device("cpu"), variant_of=variant_of,
                    make_scratch_runner=make_scratch_runner) == 1
    assert "failed" in capsys.readouterr().out
    args = build_parser().parse_args(["tune", "--param-dtype", "fp32", "--model-size", "1000",
                                      "--min-numel", "1M"])
    assert run_tune(args, tuner=tuner, device=torch.device("cpu"), variant_of=variant_of,
                    make_scratch_runner=make_scratch_runner) == 2
    assert "nothing to tune" in capsys.readouterr().err


def test_export_to_a_directory_says_why_it_cannot(tmp_path, capsys):
    from tritonadam.autotune.__main__ import main

    assert main(["--cache-dir", str(tmp_path / "cache"), "export", str(tmp_path)]) == 1
    assert "cannot export to" in capsys.readouterr().err
