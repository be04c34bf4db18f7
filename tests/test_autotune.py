"""The autotuner's logic on CPU: a fake GPU (injected timer, clock, compiler reports and
device info) drives the choice, the budgets, the pruning, the modes and the disk cache.
Nothing here times the interpreter."""
from __future__ import annotations

import inspect
import io
import json
import math
import os
import random
import warnings

import pytest
import torch

from tritonadam import autotune
from tritonadam.autotune import (
    DEFAULTS,
    GPU_DEFAULT,
    INTERPRETER_DEFAULT,
    AutotuneCacheWarning,
    DeviceInfo,
    DiskCache,
    LaunchConfig,
    Tuner,
    arch_default,
    candidate_configs,
    config_space,
    entry_key,
    size_bucket,
)
from tritonadam.autotune.cache import FORMAT, FORMAT_VERSION
from tritonadam.autotune.configs import (
    MIN_RESIDENT_WARPS,
    PERSISTENT_DISTANCE,
    resident_warps,
    space_hash,
    space_id,
)
from tritonadam.autotune.tuner import (
    CONFIRM_PAIRS,
    CONFIRM_TOP,
    MAX_LAUNCHES_PER_TIMING,
    MIN_MARGIN,
    SCREEN_PAIRS,
    WARMUP_S,
)

FAKE_H100 = DeviceInfo(backend="cuda", name="Fake H100 80GB HBM3", arch="sm_90", capability="9.0", num_sms=132)
KEY = ("adam", "decoupled=1", "amsgrad=0", "master=0", "p=float32", "g=float32", "s=float32")
KEY2 = ("adam", "decoupled=1", "amsgrad=0", "master=1", "p=bfloat16", "g=bfloat16", "s=float32")
CPU = torch.device("cpu")
BEST = LaunchConfig(2048, 4)  # in the space, not the default


def prefer(target: LaunchConfig):
    """Fake kernel times: 1 ms at ``target``, slower the further a config is from it."""

    def times(c: LaunchConfig) -> float:
        return (
            1.0
            + 0.1 * abs(math.log2(c.block_size / target.block_size))
            + 0.03 * abs(math.log2(c.num_warps / target.num_warps))
        )

    return times


class FakeGPU:
    """An injected timer and clock. Each timing advances the fake clock by ``cost_s``.

    A timing is ``times(config)``, then ``script(config, k, t)`` if given (k: the config's
    k-th timing, from 1), then ``ramp`` times slower while the fake clock is at most
    ``ramp_s`` (clocks ramping up), then multiplied by ``1 + N(0, noise)`` (seeded).
    With ``reports`` (config -> compiler report), runners offer ``compile()``, which
    advances the clock by ``compile_s`` and records the config in ``compiled``."""

    def __init__(self, times=prefer(BEST), cost_s: float = 0.5, reports=None, compile_s: float = 0.0,
                 noise: float = 0.0, seed: int = 0, ramp_s: float = 0.0, ramp: float = 1.0, script=None):
        self.times = times
        self.cost_s = cost_s
        self.reports = reports
        self.compile_s = compile_s
        self.noise, self.rng = noise, random.Random(seed)
        self.ramp_s, self.ramp = ramp_s, ramp
        self.script = script
        self.now = 0.0
        self.timed: list[LaunchConfig] = []
        self.compiled: list[LaunchConfig] = []
        self.runners: list[tuple[LaunchConfig, int]] = []

    def clock(self) -> float:
        return self.now

    def timer(self, fn) -> float:
        """The time of one timed unit: ``fn.n`` launches of the config."""
        self.now += self.cost_s
        cfg = fn.config
        self.timed.append(cfg)
        t = self.times(cfg)
        if self.script is not None:
            t = self.script(cfg, self.timed.count(cfg), t)
        if self.now <= self.ramp_s:
            t *= self.ramp
        if self.noise:
            t *= 1.0 + self.rng.gauss(0.0, self.noise)
        return t * fn.n

    def order(self) -> list[LaunchConfig]:
        """Configs in the order they were first timed."""
        return list(dict.fromkeys(self.timed))

    def make_runner(self, config: LaunchConfig, numel: int):
        self.runners.append((config, numel))

        def run():
            raise AssertionError("the fake timer never runs kernels")

        run.config = config
        if self.reports is not None:

            def compile():
                self.now += self.compile_s
                self.compiled.append(config)
                return self.reports(config)

            run.compile = compile
        return run


def make_tuner(cache_dir, fake: FakeGPU, **kw) -> Tuner:
    kw.setdefault("budget_s", 100)  # time every candidate unless a test is about the budget
    kw.setdefault("device_info", lambda d: FAKE_H100)
    kw.setdefault("free_bytes", lambda d: None)
    kw.setdefault("stream", io.StringIO())
    return Tuner(timer=fake.timer, clock=fake.clock, cache=DiskCache(cache_dir), time_any_device=True, **kw)


def cache_file(tuner: Tuner):
    return tuner.cache.path(tuner.identity(FAKE_H100))


def entry_of(tuner: Tuner, key=KEY, bucket=20) -> dict:
    return json.loads(cache_file(tuner).read_text())["entries"][entry_key(key, bucket)]


def challengers(numel=2**20, default=GPU_DEFAULT) -> list[LaunchConfig]:
    """The challengers the tuner times for ``numel`` on FAKE_H100, in its order."""
    return [c for c in candidate_configs("cuda", numel, num_sms=132, first=default) if c != default]


def timings_per_tune(numel=2**20, **fake_kw) -> int:
    """How many timings one tune takes on a fresh fake GPU (for counting tunes)."""
    import tempfile

    fake = FakeGPU(**fake_kw)
    with tempfile.TemporaryDirectory() as d:
        make_tuner(d, fake).select(KEY, numel, CPU, fake.make_runner)
    return len(fake.timed)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("TRITONADAM_AUTOTUNE", "TRITONADAM_AUTOTUNE_BUDGET", "TRITONADAM_AUTOTUNE_VERBOSE"):
        monkeypatch.delenv(name, raising=False)


# --- config space, pruning, buckets ---------------------------------------------------


def test_cuda_space_is_deterministic_and_obeys_elements_per_thread():
    space = config_space("cuda")
    assert space == sorted(space) == config_space("cuda")
    assert {c.block_size for c in space} == {2**k for k in range(9, 13)}
    assert {c.num_warps for c in space} == {1, 2, 4, 8}
    for c in space:
        assert 4 <= c.block_size / (32 * c.num_warps) <= 16, c
    assert LaunchConfig(512, 8) not in space  # 2 elements per thread: no 16-byte vectors
    assert LaunchConfig(4096, 4) not in space  # 32 elements per thread: 8-12 warps resident
    assert GPU_DEFAULT in space
    assert len(space) == len(set(space)) == 18


def test_rocm_space_is_kept_apart():
    hip = config_space("hip")
    assert max(c.num_warps for c in hip) == 8
    for c in hip:
        assert 4 <= c.block_size / (64 * c.num_warps) <= 64, c
    assert hip != config_space("cuda")
    assert space_hash("hip") != space_hash("cuda")
    assert space_hash("cuda") == space_hash("cuda")
    assert space_id("hip") != space_id("cuda")
    with pytest.raises(ValueError, match="backend"):
        config_space("metal")


def test_every_config_has_a_persistent_twin():
    space = config_space("cuda")
    plain = {c for c in space if not c.persistent}
    assert {LaunchConfig(c.block_size, c.num_warps, True) for c in plain} == {c for c in space if c.persistent}
    assert len(plain) == 9
    # One wave of blocks or less: a persistent grid is the same launch, so it is pruned.
    assert not any(c.persistent for c in candidate_configs("cuda", 2**16, num_sms=132))
    assert any(c.persistent for c in candidate_configs("cuda", 2**27, num_sms=132))
    # Without the SM count, waves cannot be counted: no persistent candidates.
    assert not any(c.persistent for c in candidate_configs("cuda", 2**27))


def test_pruning_drops_blocks_larger_than_the_launch():
    cands = candidate_configs("cuda", 1500)  # rounds up to 2048
    assert {c.block_size for c in cands} == {512, 1024, 2048}
    assert not any(c.persistent for c in cands)
    assert {c.block_size for c in candidate_configs("cuda", 3)} == {512}


def test_pruning_drops_blocks_that_leave_most_sms_idle():
    # 2**18 elements on 132 SMs: 4096-element blocks give 64 programs (< 66), pruned.
    cands = candidate_configs("cuda", 2**18, num_sms=132)
    assert max(c.block_size for c in cands) == 2048
    # Too small to fill anything: only the smallest block is left.
    assert {c.block_size for c in candidate_configs("cuda", 4096, num_sms=132)} == {512}
    # Large launches keep the whole space, persistent grids included.
    assert set(candidate_configs("cuda", 2**27, num_sms=132)) == set(config_space("cuda"))


def test_candidates_start_at_the_default_then_its_plain_neighbours():
    cands = candidate_configs("cuda", 2**24, num_sms=132, first=GPU_DEFAULT)
    assert cands[0] == GPU_DEFAULT
    d = [abs(math.log2(c.block_size / GPU_DEFAULT.block_size)) + abs(math.log2(c.num_warps / GPU_DEFAULT.num_warps))
         + PERSISTENT_DISTANCE * c.persistent for c in cands]
    assert d == sorted(d)
    assert cands == candidate_configs("cuda", 2**24, num_sms=132, first=GPU_DEFAULT)
    # Persistent grids lost to their plain twins on every large H200 workload: every plain
    # config one step from the default comes before any persistent one.
    first_persistent = next(i for i, c in enumerate(cands) if c.persistent)
    assert {c for c in cands[:first_persistent]} >= {LaunchConfig(1024, 4), LaunchConfig(512, 4), LaunchConfig(2048, 8)}


@pytest.mark.parametrize(
    "numel, bucket",
    [(0, 12), (1, 12), (4096, 12), (4097, 13), (2**20, 20), (2**20 + 1, 21), (10**6, 20), (2**27, 27), (2**40, 27)],
)
def test_size_buckets(numel, bucket):
    assert size_bucket(numel) == bucket


def test_entry_keys_name_key_and_bucket():
    assert entry_key(KEY, 20) == "adam|decoupled=1|amsgrad=0|master=0|p=float32|g=float32|s=float32|n<=2^20"
    assert entry_key(("x", 3), 12) == "x|3|n<=2^12"


def test_launch_config_stays_compatible():
    c = LaunchConfig(4096, 8)
    assert c == LaunchConfig(block_size=4096, num_warps=8, persistent=False)
    assert LaunchConfig.from_json(c.to_json()) == c
    for bad in ({"block_size": 4096.0, "num_warps": 8}, {"block_size": True, "num_warps": 8},
                {"block_size": 4096}, {"block_size": 4096, "num_warps": 8, "evil": 1}, [4096, 8], "4096"):
        assert LaunchConfig.from_json(bad) is None, bad


def test_select_config_signature():
    sig = inspect.signature(autotune.select_config)
    assert list(sig.parameters)[:4] == ["key", "numel", "device", "make_runner"]
    for name in ("mode", "bytes_per_elem"):
        assert sig.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert sig.parameters[name].default is None


# --- defaults table -------------------------------------------------------------------


def test_defaults_are_measured_only_with_provenance():
    for row in DEFAULTS:
        assert row.config in config_space(row.backend), row
        if row.provenance is None:
            assert row.status == "unmeasured default" and "unmeasured" in row.note, row
        else:
            p = row.provenance
            assert row.status == "measured" and p.gpu and p.date and p.command and p.commit and p.results, row
    measured = [r for r in DEFAULTS if r.provenance is not None]
    # The first H200 run (commit ecf1ade) measured launches of 2^27 and more, the second
    # (da36c0e, device time apart) 10,000 x 4,096 in bucket 2^26.
    assert [(r.arch, r.min_bucket, r.config) for r in measured] == [("sm_90", 26, LaunchConfig(1024, 4)),
                                                                    ("sm_90", 27, LaunchConfig(1024, 4))]
    assert [r.provenance.commit for r in measured] == ["da36c0e", "ecf1ade"]
    assert all("H200" in r.provenance.gpu for r in measured)
    assert arch_default("cuda", "sm_90", 27).config == LaunchConfig(1024, 4)
    assert arch_default("cuda", "sm_90", 26).config == LaunchConfig(1024, 4)
    assert arch_default("cuda", "sm_90", 26).provenance.commit == "da36c0e"
    assert arch_default("cuda", "sm_90", 25).config == GPU_DEFAULT  # smaller launches: unmeasured
    assert arch_default("cuda", "sm_90").config == LaunchConfig(1024, 4)  # no bucket: the largest
    assert arch_default("cuda", "sm_80", 27).config == GPU_DEFAULT  # no data for other GPUs
    assert arch_default("cuda", "sm_90").arch == "sm_90"
    assert arch_default("cuda", "sm_75").arch == "*"  # generic fallback
    assert arch_default("hip", "gfx942").arch == "gfx942"
    assert arch_default("hip", "gfx1100").config in config_space("hip")


def test_default_config_on_cpu_and_interpreter():
    assert autotune.default_config(CPU) == INTERPRETER_DEFAULT
    assert autotune.default_config(torch.device("cuda")) in (INTERPRETER_DEFAULT, GPU_DEFAULT)


# --- choosing ---------------------------------------------------------------------------


def test_a_clearly_faster_challenger_wins_and_the_entry_says_by_how_much(tmp_path):
    fake = FakeGPU()
    tuner = make_tuner(tmp_path, fake, budget_s=100)
    cfg = tuner.select(KEY, 1_000_000, CPU, fake.make_runner, bytes_per_elem=28)
    assert cfg == BEST
    assert fake.order() == [GPU_DEFAULT] + challengers()  # every candidate timed, default first
    assert {n for _, n in fake.runners} == {2**20}  # the bucket's representative size
    entry = entry_of(tuner)
    d_ms = prefer(BEST)(GPU_DEFAULT)
    assert LaunchConfig.from_json(entry["config"]) == BEST and entry["time_ms"] == 1.0
    assert entry["gbps"] == pytest.approx(28 * 2**20 / 1e-3 / 1e9)
    assert entry["default"]["config"] == GPU_DEFAULT.to_json() and entry["default"]["time_ms"] == d_ms
    assert entry["vs_default"]["ratio"] == pytest.approx(1.0 / d_ms) and entry["vs_default"]["pairs"] == CONFIRM_PAIRS
    assert entry["vs_default"]["spread"] == 0.0  # a noiseless fake
    assert entry["decision"]["kept_default"] is False and entry["decision"]["min_margin"] == MIN_MARGIN
    assert "faster than the default" in entry["decision"]["reason"]
    # The closest other config, by its ratio to the default.
    ru = entry["runner_up"]
    others = [c for c in challengers() if c != BEST]
    assert ru["ratio"] == pytest.approx(min(prefer(BEST)(c) for c in others) / d_ms)
    # Every challenger has a first-round measurement; the best CONFIRM_TOP a second one.
    rounds = [(LaunchConfig.from_json(m["config"]), m["round"]) for m in entry["measurements"]]
    assert [c for c, r in rounds if r == "screen"] == challengers()
    confirmed = [c for c, r in rounds if r == "confirm"]
    assert len(confirmed) == CONFIRM_TOP and confirmed[0] == BEST
    for m in entry["measurements"]:
        assert m["default_ms"] == d_ms and m["ratio"] == pytest.approx(m["time_ms"] / d_ms)
    assert entry["untimed"] == [] and entry["measured"]["complete"] is True
    assert entry["measured"]["how"] == "first use" and entry["measured"]["configs_timed"] == 1 + len(challengers())
    # choices() carries the same comparison, from the same pairs.
    c = tuner.choices()[-1]
    assert (c.source, c.config, c.default, c.default_ms, c.pairs) == ("tuned", BEST, GPU_DEFAULT, d_ms, CONFIRM_PAIRS)
    assert c.ratio == pytest.approx(1.0 / d_ms) and c.untimed == 0


def test_equal_configs_keep_the_default(tmp_path):
    fake = FakeGPU(times=lambda c: 1.0)
    tuner = make_tuner(tmp_path, fake)
    assert tuner.select(KEY, 2**22, CPU, fake.make_runner) == GPU_DEFAULT
    entry = entry_of(tuner, bucket=22)
    assert entry["decision"]["kept_default"] is True and entry["vs_default"] is None
    assert "no challenger was faster" in entry["decision"]["reason"]
    assert not any(m["round"] == "confirm" for m in entry["measurements"])  # nothing to confirm
    assert tuner.choices()[-1].ratio is None and "default kept" in autotune.format_choices(tuner.choices())


# --- the incumbent rule ------------------------------------------------------------------


@pytest.mark.parametrize("noise", [0.002, 0.01, 0.03])
@pytest.mark.parametrize("edge", [0.0, 0.01], ids=["equal", "1%-faster"])
def test_a_challenger_within_noise_never_replaces_the_default(tmp_path, noise, edge):
    """Every challenger is as fast as the default, or 1% faster (less than the margin);
    each timing carries Gaussian noise. Over 100 seeds the default always stays."""
    kept = []
    for seed in range(100):
        fake = FakeGPU(times=lambda c: 1.0 if c == GPU_DEFAULT else 1.0 - edge, noise=noise, seed=seed, cost_s=0.01)
        res = make_tuner(tmp_path, fake).tune(KEY, 2**20, CPU, fake.make_runner, store=False)
        kept.append(res.config == GPU_DEFAULT)
        assert any(m.round == "confirm" for m in res.measurements)  # the rule had its chance
    assert all(kept), f"the default lost in {kept.count(False)} of 100 seeds"


def test_a_clearly_faster_challenger_wins_through_noise(tmp_path):
    """5% faster with 0.3% noise per timing (the H200's tuner timings of equal configs
    differed by 0.1-0.4%): it wins every time."""
    for seed in range(30):
        fake = FakeGPU(times=lambda c: 0.95 if c == BEST else 1.0, noise=0.003, seed=seed, cost_s=0.01)
        res = make_tuner(tmp_path, fake).tune(KEY, 2**20, CPU, fake.make_runner, store=False)
        assert res.config == BEST, (seed, res.reason)
        assert res.vs_default.ratio == pytest.approx(0.95, abs=0.01) and res.noise > 0


@pytest.mark.parametrize(
    "speedup, margin, wins",
    [(0.015, MIN_MARGIN, False), (0.025, MIN_MARGIN, True), (0.015, 0.01, True), (0.05, 0.06, False)],
)
def test_the_minimum_margin_is_honoured(tmp_path, speedup, margin, wins):
    fake = FakeGPU(times=lambda c: 1.0 - speedup if c == BEST else 1.0, cost_s=0.01)
    res = make_tuner(tmp_path, fake, min_margin=margin).tune(KEY, 2**20, CPU, fake.make_runner, store=False)
    assert (res.config == BEST) is wins
    assert res.entry["decision"]["min_margin"] == margin
    assert f"{100 * margin:g}% margin" in res.reason


def test_the_margin_is_measured_spread_plus_the_minimum(tmp_path):
    """3% faster clears the 2% margin alone, but not once the pairs disagree by 2%: the
    challenger must win at the slow end of its spread."""
    def alternating(c, k, t):  # this challenger's timings alternate 2% apart
        return t * (1.01 if k % 2 else 0.99) if c == BEST else t

    fake = FakeGPU(times=lambda c: 0.97 if c == BEST else 1.0, script=alternating, cost_s=0.01)
    res = make_tuner(tmp_path, fake).tune(KEY, 2**20, CPU, fake.make_runner, store=False)
    confirm = next(m for m in res.measurements if m.config == BEST and m.round == "confirm")
    assert confirm.ratio == pytest.approx(0.97) and confirm.spread == pytest.approx(0.0194, abs=1e-3)
    assert res.config == GPU_DEFAULT and "spread" in res.reason
    fake = FakeGPU(times=lambda c: 0.97 if c == BEST else 1.0, cost_s=0.01)
    assert make_tuner(tmp_path, fake).tune(KEY, 2**20, CPU, fake.make_runner, store=False).config == BEST


def test_the_defaults_own_noise_is_a_floor_for_the_spread(tmp_path):
    """A challenger whose own pairs happen to agree still has to clear the default's noise
    (its successive timings' ratios over the whole run)."""
    from tritonadam.autotune.tuner import Measurement, _pick

    lucky = Measurement(BEST, 0.96, ratio=0.96, spread=0.001, pairs=8, round="confirm")
    assert _pick([lucky], None, MIN_MARGIN)[0] is lucky
    assert _pick([lucky], 0.01, MIN_MARGIN)[0] is lucky  # 4% > 2% + 1%
    winner, why = _pick([lucky], 0.03, MIN_MARGIN)
    assert winner is None and "2% margin + 3.0% spread" in why
    # With a noisy default the run measures that noise and records it.
    fake = FakeGPU(times=lambda c: 1.0, noise=0.02, cost_s=0.01, seed=3)
    res = make_tuner(tmp_path, fake).tune(KEY, 2**20, CPU, fake.make_runner, store=False)
    assert 0.01 < res.noise < 0.06 and res.entry["decision"]["noise"] == res.noise
    assert res.default.spread == res.noise


def test_winners_within_noise_of_each_other_go_to_the_nearest_the_default(tmp_path):
    """The incumbent rule again, among winners: 1024/2 must beat 1024/4 (nearer the
    default) beyond the margin and spread to be chosen over it."""
    from tritonadam.autotune.tuner import Measurement, _pick

    near, far = LaunchConfig(1024, 4), LaunchConfig(1024, 2)
    order = {GPU_DEFAULT: 0, near: 1, far: 2}

    def m(cfg, ratio, spread=0.0):
        return Measurement(cfg, ratio, ratio=ratio, spread=spread, pairs=8, round="confirm")

    w, why = _pick([m(far, 0.94), m(near, 0.95)], 0.003, MIN_MARGIN, order)
    assert w.config == near and "block=1024 warps=2, 6.0% faster, is not faster than it" in why
    assert _pick([m(far, 0.90), m(near, 0.95)], 0.003, MIN_MARGIN, order)[0].config == far  # 5% apart
    assert _pick([m(far, 0.92), m(near, 0.95, spread=0.02)], 0.0, MIN_MARGIN, order)[0].config == near
    assert _pick([], 0.0, MIN_MARGIN) == (None, "")
    # Through the tuner: both 5-6% faster than the default, 1% apart.
    fake = FakeGPU(times=lambda c: {near: 0.95, far: 0.94}.get(c, 1.0), cost_s=0.01)
    res = make_tuner(tmp_path, fake).tune(KEY, 2**20, CPU, fake.make_runner, store=False)
    assert res.config == near and {m.config for m in res.measurements if m.round == "confirm"} >= {near, far}


def test_a_tie_goes_to_the_nearest_the_default_whatever_was_tuned_before(tmp_path):
    """Ties were settled by the order the challengers were timed in, which puts configs
    that won this GPU's other entries first: the same timings chose 2048/4 after another
    variant's entry had picked it, and 1024/4 (nearer the default) on a fresh cache."""
    near, far = LaunchConfig(1024, 4), LaunchConfig(2048, 4)
    chosen = []
    for first in (None, far):
        fake = FakeGPU(times=lambda c: 0.9 if c in (near, far) else 1.0, cost_s=0.01)
        tuner = make_tuner(tmp_path / f"after-{first}", fake)
        if first is not None:  # another variant's entry, in a neighbouring bucket, won by far
            other = FakeGPU(times=lambda c: 0.8 if c == far else 1.0, cost_s=0.01)
            assert make_tuner(tmp_path / f"after-{first}", other).select(KEY2, 2**21, CPU, other.make_runner) == far
        chosen.append(tuner.select(KEY, 2**20, CPU, fake.make_runner))
        if first is not None:
            assert fake.order()[1] == far  # timed first, as the likeliest
    assert chosen == [near, near]


def test_a_lock_held_by_a_stopped_process_is_waited_out_once(tmp_path, monkeypatch):
    """A process holding the cache's lock and stopped (Ctrl-Z, a debugger, a hung NFS
    mount) made every entry this process tuned wait the lock's full timeout (60 s each:
    minutes on a model's first step). After one failed write the choices stay in memory."""
    import fcntl

    fake = FakeGPU()
    tuner = make_tuner(tmp_path, fake)
    tuner.cache.lock_timeout_s = 0.2
    lock = open(str(cache_file(tuner)) + ".lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # another open file: filelock's flock waits on it
    tries = []
    real_lock = DiskCache._lock
    monkeypatch.setattr(DiskCache, "_lock", lambda self, path: tries.append(path) or real_lock(self, path))
    try:
        (cfgs, caught) = _count_warnings(lambda: [tuner.select(k, 2**20, CPU, fake.make_runner)
                                                  for k in (KEY, KEY2, KEY + ("x",))])
    finally:
        lock.close()
    assert cfgs == [BEST] * 3 and len(tries) == 1
    assert len(caught) == 1 and "could not write" in str(caught[0].message)


def test_cache_files_are_readable_as_open_makes_them_and_killed_writes_are_swept(tmp_path, monkeypatch):
    """mkstemp made every cache file 0o600 (another user sharing the directory re-tuned,
    warned "Permission denied"); a writer killed mid-write left its part file forever."""
    fake = FakeGPU()
    tuner = make_tuner(tmp_path, fake)
    left = tmp_path / (".tmp-" + cache_file(tuner).name + ".abc.part")
    left.write_text("{")
    monkeypatch.setattr("tritonadam.autotune.cache._umask", None)  # read again, as set here
    old = os.umask(0o022)
    try:
        tuner.select(KEY, 2**20, CPU, fake.make_runner)
    finally:
        os.umask(old)
    assert cache_file(tuner).stat().st_mode & 0o777 == 0o644
    assert not left.exists()


@pytest.mark.timeout(60)  # an open() of the FIFO would wait forever
def test_a_fifo_at_the_cache_path_is_ignored_not_waited_on(tmp_path):
    fake = FakeGPU()
    tuner = make_tuner(tmp_path, fake)
    os.mkfifo(cache_file(tuner))
    (cfg, caught) = _count_warnings(lambda: tuner.cache.load(tuner.identity(FAKE_H100)))
    assert cfg == {} and len(caught) == 1 and "not a regular file" in str(caught[0].message)


def test_the_default_is_warmed_up_before_anything_counts(tmp_path):
    """Clocks ramp up: every timing in the first 0.15 s is 30% slower. The default, timed
    first, pays for nothing: all configs are equal, so it stays, at its real time."""
    fake = FakeGPU(times=lambda c: 1.0, ramp_s=0.15, ramp=1.3, cost_s=0.05)
    res = make_tuner(tmp_path, fake).tune(KEY, 2**20, CPU, fake.make_runner, store=False)
    first_challenger = next(i for i, c in enumerate(fake.timed) if c != GPU_DEFAULT)
    n_warm = first_challenger - 1  # then the first pair: default, challenger
    assert n_warm * 0.05 >= WARMUP_S - 1e-9 and fake.timed[:first_challenger] == [GPU_DEFAULT] * first_challenger
    assert res.config == GPU_DEFAULT and res.default.time_ms == 1.0
    assert res.default.pairs == fake.timed.count(GPU_DEFAULT) - n_warm  # warm-up timings left out
    assert all(m.ratio == 1.0 for m in res.measurements)


def test_pairs_alternate_default_first_and_challenger_first(tmp_path):
    fake = FakeGPU(times=lambda c: 0.9 if c == BEST else 1.0)
    res = make_tuner(tmp_path, fake).tune(KEY, 2**20, CPU, fake.make_runner, store=False)
    d = GPU_DEFAULT
    seq = fake.timed[1:]  # cost_s 0.5: one warm-up timing
    cs = challengers()
    screen = [x for c in cs for x in [d, c, c, d][: 2 * SCREEN_PAIRS]]
    assert seq[: len(screen)] == screen
    confirm = seq[len(screen):]
    top = [m.config for m in res.measurements if m.round == "confirm"]
    assert confirm == [x for c in top for _ in range(CONFIRM_PAIRS // 2) for x in (d, c, c, d)]


def test_interleaving_cancels_a_drift(tmp_path):
    """Each timing 1% faster than the one before, whatever the config (a GPU's clocks
    still rising): timed one after the other, every config would beat the one before it,
    and the last one timed would win by far. In alternating pairs, no one wins."""
    fake = FakeGPU(times=lambda c: 1.0, cost_s=0.01)
    fake.script = lambda c, k, t: t * 0.99 ** len(fake.timed)
    res = make_tuner(tmp_path, fake).tune(KEY, 2**20, CPU, fake.make_runner, store=False)
    assert res.config == GPU_DEFAULT
    assert all(m.ratio == pytest.approx(1.0, abs=1e-3) for m in res.measurements)


def test_the_confirmation_round_overturns_a_lucky_first_round(tmp_path):
    lucky = LaunchConfig(1024, 4)

    def luck(c, k, t):  # its first round's timings come out 10% fast, then it is as fast as the default
        return t * 0.9 if c == lucky and k <= SCREEN_PAIRS else t

    fake = FakeGPU(times=lambda c: 1.0 if c in (GPU_DEFAULT, lucky) else 1.01, script=luck, cost_s=0.01)
    res = make_tuner(tmp_path, fake).tune(KEY, 2**20, CPU, fake.make_runner, store=False)
    rounds = {m.round: m for m in res.measurements if m.config == lucky}
    assert rounds["screen"].ratio == pytest.approx(0.9) and rounds["confirm"].ratio == pytest.approx(1.0)
    assert res.config == GPU_DEFAULT and res.vs_default is None
    assert res.runner_up.config == lucky and res.runner_up.round == "confirm"  # its latest round counts


def test_untimed_candidates_are_reported_never_dropped(tmp_path):
    """A compile budget, pruning and a timing budget each leave candidates untimed; every
    candidate ends up timed or in ``untimed`` with its reason."""
    spilling = LaunchConfig(2048, 8)

    def reports(c):
        return _report(registers=255, spills=3) if c == spilling else _report()

    fake = FakeGPU(times=prefer(BEST), reports=reports, compile_s=1.0, cost_s=0.1)
    tuner = make_tuner(tmp_path, fake, budget_s=8, compile_budget_s=12)
    res = tuner.tune(KEY, 2**20, CPU, fake.make_runner)
    cands = [GPU_DEFAULT] + challengers()
    why = {c: w for c, w in res.untimed}
    timed = set(fake.timed)
    assert timed | set(why) == set(cands) and not timed & set(why)
    assert why[spilling].startswith("pruned: spills 3")
    assert {c for c, w in why.items() if w == "compile budget"} == set(cands[12:])  # 12 s of 1 s compiles
    budget = [c for c, w in why.items() if w == "timing budget"]
    assert budget and budget == [c for c in cands[:12] if c not in timed and c != spilling]
    assert res.complete is False
    entry = res.entry
    assert [LaunchConfig.from_json(u["config"]) for u in entry["untimed"]] == [c for c, _ in res.untimed]
    assert entry["measured"]["configs_untimed"] == len(res.untimed)
    # The budget kept room for the confirmation round, and stayed within itself.
    assert any(m.round == "confirm" for m in res.measurements)
    assert entry["measured"]["timing_s"] <= 8
    # The estimate of a full tune covers every challenger's two rounds.
    assert entry["measured"]["full_tune_s"] > 8
    # choices() says how many went untimed.
    fake2 = FakeGPU(cost_s=0.1)
    tuner2 = make_tuner(tmp_path / "b", fake2, budget_s=3)
    tuner2.select(KEY, 2**20, CPU, fake2.make_runner)
    assert tuner2.choices()[-1].untimed == len(challengers())  # 3 s leaves no room to confirm anyone


def test_challengers_that_won_elsewhere_on_this_gpu_go_first(tmp_path):
    """Budget is spent on the likeliest winners first: configs that beat the default in
    this GPU's other entries of this or a neighbouring bucket."""
    fake = FakeGPU(times=prefer(BEST))
    tuner = make_tuner(tmp_path, fake)
    tuner.select(KEY, 2**20, CPU, fake.make_runner)  # BEST wins here
    fake2 = FakeGPU(times=prefer(BEST))
    make_tuner(tmp_path, fake2).select(KEY2, 2**21, CPU, fake2.make_runner)
    assert fake2.order()[:2] == [GPU_DEFAULT, BEST]
    assert fake2.order()[2:] == [c for c in challengers(2**21) if c != BEST]
    fake3 = FakeGPU(times=prefer(BEST))
    make_tuner(tmp_path, fake3).select(KEY2, 2**24, CPU, fake3.make_runner)  # too far from 2^20, 2^21
    assert fake3.order()[1:] == challengers(2**24)


def test_the_default_is_the_incumbent_even_where_its_size_is_pruned(tmp_path):
    """At 2^12 on 132 SMs the size rules keep only 512-element blocks, but without tuning
    the default runs, so the default is what they have to beat."""
    fake = FakeGPU(times=lambda c: 1.0 if c == LaunchConfig(512, 4) else 1.5)
    tuner = make_tuner(tmp_path, fake)
    assert GPU_DEFAULT not in candidate_configs("cuda", 2**12, num_sms=132)
    assert tuner.select(KEY, 2**12, CPU, fake.make_runner) == LaunchConfig(512, 4)
    assert fake.timed[0] == GPU_DEFAULT
    assert entry_of(tuner, bucket=12)["default"]["config"] == GPU_DEFAULT.to_json()


def test_a_default_that_fails_hands_the_incumbency_on(tmp_path):
    fake = FakeGPU(times=lambda c: 1.0)

    def broken_default(config, numel):
        if config == GPU_DEFAULT:
            raise RuntimeError("out of resource: registers")
        return fake.make_runner(config, numel)

    res = make_tuner(tmp_path, fake).tune(KEY, 2**20, CPU, broken_default, store=False)
    first = challengers()[0]
    assert res.config == first and res.default.config == first
    assert "the default block=1024 warps=8 failed" in res.reason
    assert any(m.config == GPU_DEFAULT and "out of resource" in m.error for m in res.measurements)


def test_second_call_is_a_memory_hit_and_a_new_process_reads_the_disk(tmp_path):
    fake = FakeGPU()
    tuner = make_tuner(tmp_path, fake)
    assert tuner.select(KEY, 2**20, CPU, fake.make_runner) == BEST
    n = len(fake.timed)
    assert tuner.select(KEY, 900_000, CPU, fake.make_runner) == BEST  # same bucket
    assert len(fake.timed) == n
    fake2 = FakeGPU(times=prefer(LaunchConfig(1024, 2)))
    fresh = make_tuner(tmp_path, fake2)  # "another process": same disk, empty memory
    assert fresh.select(KEY, 2**20, CPU, fake2.make_runner) == BEST
    assert fake2.timed == [] and fake2.runners == []
    assert fresh.choices()[-1].source == "disk cache"
    # Another bucket is another entry.
    assert fresh.select(KEY, 2**24, CPU, fake2.make_runner) == LaunchConfig(1024, 2)
    assert fake2.timed


def test_entries_are_per_key_and_source_hash(tmp_path):
    fake = FakeGPU()
    tuner = make_tuner(tmp_path, fake, source_hash="aaaa")
    tuner.select(KEY, 2**20, CPU, fake.make_runner)
    n = len(fake.timed)
    tuner.select(KEY2, 2**20, CPU, fake.make_runner)
    assert len(fake.timed) == 2 * n
    make_tuner(tmp_path, fake, source_hash="bbbb").select(KEY, 2**20, CPU, fake.make_runner)  # edited kernels
    assert len(fake.timed) == 3 * n
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert len(names) == 2  # one file per kernel source hash
    a = tuner.cache.path(tuner.identity(FAKE_H100))
    assert set(json.loads(a.read_text())["entries"]) == {entry_key(KEY, 20), entry_key(KEY2, 20)}


def test_empty_launch_is_never_tuned(tmp_path):
    fake = FakeGPU()
    make_tuner(tmp_path, fake).select(KEY, 0, CPU, fake.make_runner)
    assert fake.runners == []


# --- budget -----------------------------------------------------------------------------


def test_budget_stops_the_first_round_and_keeps_room_to_confirm(tmp_path):
    fake = FakeGPU(cost_s=0.5)
    tuner = make_tuner(tmp_path, fake, budget_s=40)
    res = tuner.tune(KEY, 2**24, CPU, fake.make_runner)
    # 0.5 s warm-up; 2 s per challenger's first round; 3 confirmations of 8 s kept in reserve.
    screened = [m.config for m in res.measurements if m.round == "screen"]
    assert screened == challengers(2**24)[:7]
    assert [c for c, why in res.untimed] == challengers(2**24)[7:]
    assert {why for _, why in res.untimed} == {"timing budget"}
    assert fake.now <= 40 and res.complete is False
    assert len([m for m in res.measurements if m.round == "confirm"]) == CONFIRM_TOP
    assert res.config == min(screened, key=prefer(BEST))  # here the best screened config also wins
    entry = entry_of(tuner, bucket=24)
    assert entry["measured"]["complete"] is False and entry["measured"]["budget_s"] == 40
    assert entry["measured"]["full_tune_s"] == pytest.approx(0.5 + len(challengers(2**24)) * 2 + 3 * 8)


def test_budget_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONADAM_AUTOTUNE_BUDGET", "30")
    fake = FakeGPU(cost_s=1.0)
    tuner = make_tuner(tmp_path, fake, budget_s=None)
    tuner.select(KEY, 2**24, CPU, fake.make_runner)
    measured = entry_of(tuner, bucket=24)["measured"]
    assert measured["budget_s"] == 30 and measured["timing_s"] <= 30 and not measured["complete"]


@pytest.mark.parametrize("value", ["ten", "-1", "nan", "inf"])  # inf: a cache entry JSON cannot hold
def test_malformed_budget_is_an_error(tmp_path, monkeypatch, value):
    monkeypatch.setenv("TRITONADAM_AUTOTUNE_BUDGET", value)
    fake = FakeGPU()
    with pytest.raises(ValueError, match="TRITONADAM_AUTOTUNE_BUDGET"):
        make_tuner(tmp_path, fake, budget_s=None).select(KEY, 2**24, CPU, fake.make_runner)


def test_zero_budget_still_measures_the_default(tmp_path):
    fake = FakeGPU()
    tuner = make_tuner(tmp_path, fake, budget_s=0)
    assert tuner.select(KEY, 2**24, CPU, fake.make_runner) == GPU_DEFAULT
    assert fake.timed == [GPU_DEFAULT]  # its warm-up
    entry = entry_of(tuner, bucket=24)
    assert entry["default"]["time_ms"] == prefer(BEST)(GPU_DEFAULT) and entry["default"]["pairs"] == 0
    assert len(entry["untimed"]) == len(challengers(2**24)) and "within the budget" in entry["decision"]["reason"]


# --- compiling first, pruning by the compiler's report, small launches --------------------


def _report(registers=64, spills=0, shared=0):
    return {"registers": registers, "spills": spills, "shared": shared}


def test_compiling_is_not_charged_to_the_timing_budget(tmp_path):
    fake = FakeGPU(cost_s=0.5, reports=lambda c: _report(), compile_s=5.0)
    tuner = make_tuner(tmp_path, fake, budget_s=100, compile_budget_s=1000)
    tuner.select(KEY, 2**20, CPU, fake.make_runner)
    cands = [GPU_DEFAULT] + challengers()
    # 5 s per compile adds up to far more than the timing budget; every config is timed.
    assert fake.compiled == cands and fake.order() == cands
    measured = entry_of(tuner)["measured"]
    assert measured["compile_s"] == 5.0 * len(cands) and measured["timing_s"] == 0.5 * len(fake.timed)
    assert measured["complete"] is True


def test_compile_budget_limits_what_is_compiled_and_timed(tmp_path):
    fake = FakeGPU(cost_s=0.1, reports=lambda c: _report(), compile_s=5.0)
    tuner = make_tuner(tmp_path, fake, budget_s=100, compile_budget_s=12)
    tuner.select(KEY, 2**20, CPU, fake.make_runner)
    cands = [GPU_DEFAULT] + challengers()
    assert fake.compiled == cands[:3]  # a 4th compile would start after 15 s > 12 s
    assert fake.order() == cands[:3]
    entry = entry_of(tuner)
    assert entry["measured"]["complete"] is False
    assert [(LaunchConfig.from_json(u["config"]), u["why"]) for u in entry["untimed"]] == [
        (c, "compile budget") for c in cands[3:]]


def test_compiler_report_prunes_spilling_and_low_occupancy_configs(tmp_path):
    spilling = LaunchConfig(4096, 8)
    crowded = LaunchConfig(2048, 8)  # 255 registers: one 8-warp program per SM

    def reports(c):
        if c == spilling:
            return _report(registers=255, spills=12)
        if c == crowded or c == GPU_DEFAULT:
            return _report(registers=255)
        return _report(registers=32)

    fake = FakeGPU(times=prefer(spilling), reports=reports)
    tuner = make_tuner(tmp_path, fake)
    cfg = tuner.select(KEY, 2**20, CPU, fake.make_runner)
    assert spilling not in fake.timed and crowded not in fake.timed
    assert cfg != spilling
    assert fake.timed[0] == GPU_DEFAULT  # the default is timed whatever its report says
    entry = json.loads(cache_file(tuner).read_text())["entries"][entry_key(KEY, 20)]
    why = {json.dumps(c["config"], sort_keys=True): c["pruned"] for c in entry["compiled"]}
    assert "spills 12" in why[json.dumps(spilling.to_json(), sort_keys=True)]
    assert "resident warps" in why[json.dumps(crowded.to_json(), sort_keys=True)]
    assert why[json.dumps(GPU_DEFAULT.to_json(), sort_keys=True)] is None
    assert entry["measured"]["configs_pruned"] == 2


def test_resident_warps_from_registers_and_shared_memory():
    # Compiled for sm_90: 4096/8 at ~200 registers fits one program per SM, 1024/8 at ~60 four.
    assert resident_warps(LaunchConfig(4096, 8), _report(registers=202), FAKE_H100) == 8
    assert resident_warps(LaunchConfig(1024, 8), _report(registers=62), FAKE_H100) == 32
    assert resident_warps(LaunchConfig(512, 1), _report(registers=16), FAKE_H100) == FAKE_H100.max_warps_per_sm
    small_smem = DeviceInfo("cuda", "x", "sm_90", "9.0", num_sms=132, shared_per_sm=64 * 1024)
    assert resident_warps(LaunchConfig(1024, 4), _report(registers=32, shared=32 * 1024), small_smem) == 8
    assert 8 < MIN_RESIDENT_WARPS <= 32


def test_no_compiler_report_prunes_nothing(tmp_path):
    fake = FakeGPU(reports=lambda c: None)
    make_tuner(tmp_path, fake).select(KEY, 2**20, CPU, fake.make_runner)
    assert fake.order() == [GPU_DEFAULT] + challengers()


def test_small_launches_are_timed_many_per_timing(tmp_path):
    """A small launch is repeated inside one timed unit (one event pair, or one CUDA graph
    replay), and the unit's time is divided by the repeats."""
    launches = []

    def make_runner(config, numel):
        def run():
            launches.append(config)

        run.config = config
        return run

    def timer(unit):
        before = len(launches)
        unit()
        n = len(launches) - before
        return n * (1.0 if unit.config == BEST else 2.0)  # ms per launch, times the launches

    timings = []
    tuner = Tuner(timer=lambda unit: timings.append(unit) or timer(unit), cache=DiskCache(tmp_path),
                  time_any_device=True, device_info=lambda d: FAKE_H100, free_bytes=lambda d: None,
                  stream=io.StringIO())
    assert tuner.select(KEY, 4096, CPU, make_runner, bytes_per_elem=28) == GPU_DEFAULT  # all 2.0: kept
    entry = entry_of(tuner, bucket=12)
    assert entry["launches_per_timing"] == MAX_LAUNCHES_PER_TIMING
    assert len(launches) == MAX_LAUNCHES_PER_TIMING * len(timings)
    assert entry["time_ms"] == 2.0  # per launch, not per unit
    launches.clear()
    assert tuner.select(KEY, 2**27, CPU, make_runner, bytes_per_elem=28) == BEST
    entry = entry_of(tuner, bucket=27)
    assert entry["launches_per_timing"] == 1 and entry["time_ms"] == 1.0
    assert entry["default"]["config"] == arch_default("cuda", "sm_90", 27).config.to_json()
    assert entry["default"]["time_ms"] == 2.0


def test_a_persistent_choice_survives_the_disk_round_trip(tmp_path):
    target = LaunchConfig(4096, 8, True)
    fake = FakeGPU(times=lambda c: 1.0 if c == target else 2.0)
    assert make_tuner(tmp_path, fake).select(KEY, 2**27, CPU, fake.make_runner) == target
    fake2 = FakeGPU()
    fresh = make_tuner(tmp_path, fake2)
    assert fresh.select(KEY, 2**27, CPU, fake2.make_runner) == target and fake2.timed == []
    assert fresh.choices()[-1].config.persistent


# --- failures and memory ------------------------------------------------------------------


def test_failing_configs_are_skipped(tmp_path):
    fake = FakeGPU()
    make = fake.make_runner

    def flaky(config, numel):
        if config == BEST:
            raise RuntimeError("out of resource: shared memory")
        return make(config, numel)

    cfg = make_tuner(tmp_path, fake).select(KEY, 2**20, CPU, flaky)
    assert cfg != BEST and cfg == min(fake.timed, key=prefer(BEST))


def test_nothing_timeable_gives_the_default_and_caches_nothing(tmp_path):
    fake = FakeGPU(times=lambda c: float("nan"))
    tuner = make_tuner(tmp_path, fake)
    assert tuner.select(KEY, 2**20, CPU, fake.make_runner) == GPU_DEFAULT
    assert not cache_file(tuner).exists()
    assert tuner.choices()[-1].source == "default (tuning failed)"


def test_out_of_memory_halves_the_scratch_size(tmp_path):
    fake = FakeGPU()

    def hungry(config, numel):
        if numel > 2**18:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return fake.make_runner(config, numel)

    tuner = make_tuner(tmp_path, fake)
    tuner.select(KEY, 2**22, CPU, hungry)
    assert {n for _, n in fake.runners} == {2**18}
    entry = json.loads(cache_file(tuner).read_text())["entries"][entry_key(KEY, 22)]
    assert entry["numel_timed"] == 2**18


def test_scratch_memory_is_capped(tmp_path):
    fake = FakeGPU()
    # The cap is for two runners alive at once: the default's and a challenger's.
    t = make_tuner(tmp_path, fake, max_scratch_bytes=64 * 2**20)
    assert t.scratch_numel(25, CPU, None) == 2**20  # 32 B/elem assumed when unknown
    assert t.scratch_numel(25, CPU, 16) == 2**21
    assert t.scratch_numel(12, CPU, 16) == 2**12
    t = make_tuner(tmp_path, fake, free_bytes=lambda d: 2**31)  # a quarter of 2 GiB free
    assert t.scratch_numel(27, CPU, 32) == 2**23
    t = make_tuner(tmp_path, fake, free_bytes=lambda d: 2**10)
    assert t.scratch_numel(27, CPU, 32) == 0
    assert t.select(KEY, 2**27, CPU, fake.make_runner) == arch_default("cuda", "sm_90", 27).config
    assert fake.runners == []


def test_tuning_leaves_the_users_random_stream_alone(tmp_path):
    fake = FakeGPU()

    def noisy(config, numel):
        torch.randn(16)  # scratch buffers filled with random numbers
        return fake.make_runner(config, numel)

    torch.manual_seed(1234)
    before = torch.get_rng_state()
    make_tuner(tmp_path, fake).select(KEY, 2**20, CPU, noisy)
    assert fake.runners and torch.equal(torch.get_rng_state(), before)


# --- modes and devices ------------------------------------------------------------------


def test_cpu_and_interpreter_never_tune(tmp_path, monkeypatch):
    def boom(config, numel):
        raise AssertionError("make_runner must not be called on CPU")

    tuner = Tuner(cache=DiskCache(tmp_path), stream=io.StringIO())
    assert tuner.select(KEY, 2**20, CPU, boom) == INTERPRETER_DEFAULT
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tuner.select(KEY, 2**20, torch.device("cuda"), boom) == INTERPRETER_DEFAULT
    monkeypatch.setenv("TRITONADAM_AUTOTUNE", "on")
    assert tuner.select(KEY2, 2**20, CPU, boom) == INTERPRETER_DEFAULT
    assert list(tmp_path.iterdir()) == []
    assert all("not timed" in c.source for c in tuner.choices())
    # The process-wide entry point too.
    assert autotune.select_config(KEY, 2**20, CPU, boom) == INTERPRETER_DEFAULT


def test_mode_off_uses_the_architecture_default(tmp_path, monkeypatch):
    fake = FakeGPU()
    tuner = make_tuner(tmp_path, fake)
    assert tuner.select(KEY, 2**20, CPU, fake.make_runner, mode="off") == arch_default("cuda", "sm_90", 20).config
    monkeypatch.setenv("TRITONADAM_AUTOTUNE", "off")
    assert tuner.select(KEY2, 2**20, CPU, fake.make_runner) == arch_default("cuda", "sm_90", 20).config
    assert fake.runners == [] and not cache_file(tuner).exists()
    assert "unmeasured default" in tuner.choices()[-1].source
    # The keyword wins over the environment.
    assert tuner.select(KEY, 2**20, CPU, fake.make_runner, mode="on") == BEST


def test_cache_only_never_times(tmp_path, monkeypatch):
    fake = FakeGPU()
    tuner = make_tuner(tmp_path, fake)
    assert tuner.select(KEY, 2**20, CPU, fake.make_runner, mode="cache-only") == GPU_DEFAULT
    assert fake.runners == []
    make_tuner(tmp_path, fake).select(KEY, 2**20, CPU, fake.make_runner)  # another run tunes
    monkeypatch.setenv("TRITONADAM_AUTOTUNE", "cache-only")
    fake2 = FakeGPU()
    assert make_tuner(tmp_path, fake2).select(KEY, 2**20, CPU, fake2.make_runner) == BEST
    assert fake2.runners == []


@pytest.mark.parametrize("mode", ["fast", "auto", ""])
def test_invalid_modes_are_refused(tmp_path, monkeypatch, mode):
    fake = FakeGPU()
    tuner = make_tuner(tmp_path, fake)
    if mode:
        with pytest.raises(ValueError, match="off, on, cache-only"):
            tuner.select(KEY, 2**20, CPU, fake.make_runner, mode=mode)
        monkeypatch.setenv("TRITONADAM_AUTOTUNE", mode)
        with pytest.raises(ValueError, match="TRITONADAM_AUTOTUNE"):
            tuner.select(KEY, 2**20, CPU, fake.make_runner)
    else:
        monkeypatch.setenv("TRITONADAM_AUTOTUNE", mode)  # empty = unset = on
        assert tuner.select(KEY, 2**20, CPU, fake.make_runner) == BEST


# --- the disk cache under damage ------------------------------------------------------------


def _count_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in caught if issubclass(w.category, AutotuneCacheWarning)]


def _valid_file(tuner: Tuner, tmp_path) -> dict:
    fake = FakeGPU()
    other = make_tuner(tmp_path, fake)
    other.select(KEY, 2**20, CPU, fake.make_runner)
    other.select(KEY2, 2**20, CPU, fake.make_runner)
    return json.loads(cache_file(other).read_text())


def _damage_truncate(path):
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def _damage_garbage(path):
    path.write_bytes(b"\x80\x04\x95 not json, and never unpickled \x00\xff")


def _damage_format(path):
    obj = json.loads(path.read_text())
    obj["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(obj))


def _damage_identity(path):
    obj = json.loads(path.read_text())
    obj["identity"]["triton"] = "2.0.0"
    path.write_text(json.dumps(obj))


def _damage_list(path):
    path.write_text("[1, 2, 3]")


def _damage_old_format(path):
    """A version-1 file (picked by a strict minimum, without the comparison to the default)
    under this identity."""
    obj = json.loads(path.read_text())
    obj["format_version"] = 1
    for e in obj["entries"].values():
        for k in ("vs_default", "decision", "untimed"):
            e.pop(k)
        e["default"].pop("pairs")
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize(
    "damage",
    [_damage_truncate, _damage_garbage, _damage_format, _damage_old_format, _damage_identity, _damage_list],
    ids=["truncated", "corrupt", "stale-format", "version-1", "stale-identity", "not-an-object"],
)
def test_bad_file_gives_one_warning_and_a_retune(tmp_path, damage):
    fake = FakeGPU()
    tuner = make_tuner(tmp_path, fake)
    _valid_file(tuner, tmp_path)
    path = cache_file(tuner)
    damage(path)

    def both():
        return (
            tuner.select(KEY, 2**20, CPU, fake.make_runner),
            tuner.select(KEY2, 2**20, CPU, fake.make_runner),
        )

    (a, b), caught = _count_warnings(both)
    assert a == b == BEST
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert str(path) in str(caught[0].message)
    assert len(fake.timed) == 2 * timings_per_tune()  # both re-tuned
    obj = json.loads(path.read_text())  # rewritten whole and valid
    assert obj["format"] == FORMAT and obj["identity"] == tuner.identity(FAKE_H100).to_json()
    assert set(obj["entries"]) == {entry_key(KEY, 20), entry_key(KEY2, 20)}


@pytest.mark.parametrize(
    "field, value",
    [
        ("config", {"block_size": 3000, "num_warps": 8}),
        ("config", {"block_size": 512, "num_warps": 16}),  # outside the space
        ("config", {"block_size": 4096.0, "num_warps": 8}),
        ("config", "__import__('os').system('echo pwned')"),
        ("time_ms", float("nan")),
        ("time_ms", -1.0),
        ("bucket", 99),
        ("runner_up", {"config": {"block_size": 7, "num_warps": 8}, "time_ms": 1.0, "ratio": 1.0, "pairs": 2}),
        ("runner_up", {"config": {"block_size": 1024, "num_warps": 4}, "time_ms": 1.0}),  # no ratio
        ("default", {"config": {"block_size": 1024, "num_warps": 8}, "time_ms": None, "pairs": 3}),
        ("default", None),
        ("vs_default", {"ratio": float("inf"), "spread": 0.0, "pairs": 8}),
        ("vs_default", {"ratio": 0.9, "spread": -0.1, "pairs": 8}),
        ("decision", {"reason": "x"}),
        ("untimed", [{"config": "block=1"}]),
        ("vs_default", {"ratio": 0.9, "pairs": 8}),  # no spread: `show` read it and crashed
        ("runner_up", {"config": {"block_size": 1024, "num_warps": 4}, "time_ms": 1.0, "ratio": 1.0, "pairs": 2}),
        ("measured", ["not", "an", "object"]),
    ],
)
def test_invalid_entries_are_ignored_and_retuned(tmp_path, field, value):
    fake = FakeGPU()
    tuner = make_tuner(tmp_path, fake)
    obj = _valid_file(tuner, tmp_path)
    obj["entries"][entry_key(KEY, 20)][field] = value
    cache_file(tuner).write_text(json.dumps(obj))
    (a, b), caught = _count_warnings(
        lambda: (tuner.select(KEY, 2**20, CPU, fake.make_runner), tuner.select(KEY2, 2**20, CPU, fake.make_runner))
    )
    assert a == b == BEST
    assert len(caught) == 1 and "invalid entr" in str(caught[0].message)
    assert len(fake.timed) == timings_per_tune()  # KEY re-tuned, KEY2 read from disk


def test_entries_tuned_over_another_space_are_retuned_silently(tmp_path):
    fake = FakeGPU()
    tuner = make_tuner(tmp_path, fake)
    tuner.select(KEY, 2**27, CPU, fake.make_runner)
    n = len(fake.timed)
    obj = json.loads(cache_file(tuner).read_text())
    obj["entries"][entry_key(KEY, 27)]["space"] = "an-older-space"
    cache_file(tuner).write_text(json.dumps(obj))
    fresh = make_tuner(tmp_path, fake)
    (_, caught) = _count_warnings(lambda: fresh.select(KEY, 2**27, CPU, fake.make_runner))
    assert caught == [] and len(fake.timed) == 2 * n


def test_unwritable_cache_warns_once_and_keeps_the_choice(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    fake = FakeGPU()
    tuner = make_tuner(blocker, fake)
    (cfgs, caught) = _count_warnings(
        lambda: [tuner.select(KEY, 2**20, CPU, fake.make_runner), tuner.select(KEY2, 2**20, CPU, fake.make_runner),
                 tuner.select(KEY, 2**20, CPU, fake.make_runner)]
    )
    assert cfgs == [BEST] * 3
    assert len(caught) == 1 and "could not write" in str(caught[0].message)


def test_no_home_directory_caches_in_the_temp_dir(tmp_path, monkeypatch):
    """A container run as a uid without a home (HOME unset): tuning persists in a per-user
    folder of the temp dir, with one warning naming TRITONADAM_CACHE_DIR, instead of the
    lookup failing and every tuning being thrown away."""
    import pathlib
    import sys
    import tempfile

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("TRITONADAM_CACHE_DIR", raising=False)
    monkeypatch.setattr("tritonadam.autotune.cache._warned", set())
    monkeypatch.setattr(pathlib.Path, "home", staticmethod(no_home))
    monkeypatch.setitem(sys.modules, "platformdirs", None)  # its own lookup fails the same way
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    with pytest.warns(autotune.AutotuneCacheWarning, match="TRITONADAM_CACHE_DIR"):
        directory = DiskCache().directory
    assert directory.parent.parent == tmp_path and directory.name == "autotune"


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("ON", True), ("yes", True), ("y", True),
                                       ("2", False), ("0", False), ("false", False), ("", False), (" 1", False),
                                       (None, False)])
def test_triton_interpret_is_read_as_triton_reads_it(value, on, monkeypatch):
    """tritonadam and its bench agree with Triton on whether kernels are interpreted (with
    TRITON_INTERPRET=2 Triton compiles for the GPU: tritonadam must tune, not take the
    interpreter's config)."""
    from triton._C.libtriton import getenv_bool

    from tritonadam import _env

    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _env.interpret() is on
    assert getenv_bool("TRITON_INTERPRET", False) is on


@pytest.mark.parametrize("value", ["1", "true", "ON", "yes", "y", "2", "0", "off", "", " 1", None])
@pytest.mark.parametrize("switch", ["TRITON_DEFAULT_FP_FUSION", "TRITON_FORCE_DISABLE_FP_FUSION"])
def test_fma_fusion_switches_are_read_as_triton_reads_them(switch, value, monkeypatch):
    """The launches pin enable_fp_fusion from these switches: with TRITON_DEFAULT_FP_FUSION=yes
    Triton fuses, and so must tritonadam's launches."""
    from triton._C.libtriton import getenv_bool

    from tritonadam import _env

    monkeypatch.delenv("TRITON_DEFAULT_FP_FUSION", raising=False)
    monkeypatch.delenv("TRITON_FORCE_DISABLE_FP_FUSION", raising=False)
    if value is not None:
        monkeypatch.setenv(switch, value)
    default = switch == "TRITON_DEFAULT_FP_FUSION"
    set_on = getenv_bool(switch, default)
    assert _env.fp_fusion() is (set_on if default else not set_on)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONADAM_CACHE_DIR", str(tmp_path / "here"))
    assert DiskCache().directory == tmp_path / "here"
    monkeypatch.delenv("TRITONADAM_CACHE_DIR")
    assert DiskCache().directory.name == "autotune" and "tritonadam" in str(DiskCache().directory)


def test_file_is_readable_json_with_identity(tmp_path):
    fake = FakeGPU()
    tuner = make_tuner(tmp_path, fake)
    tuner.select(KEY, 2**20, CPU, fake.make_runner, bytes_per_elem=16)
    path = cache_file(tuner)
    assert "fake-h100-80gb-hbm3" in path.name and "cuda9.0" in path.name and "triton" in path.name
    obj = json.loads(path.read_text())
    ident = obj["identity"]
    assert ident["gpu"] == FAKE_H100.name and ident["capability"] == "9.0"
    assert ident["config_space_hash"] == space_hash("cuda")
    import triton

    assert ident["triton"] == triton.__version__
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [path.name]  # no temp files left


# --- saying what it does ---------------------------------------------------------------------


def test_verbose_prints_every_round_and_choices_are_listed(tmp_path):
    fake = FakeGPU()
    out = io.StringIO()
    tuner = make_tuner(tmp_path, fake, verbose=True, stream=out)
    tuner.select(KEY, 2**20, CPU, fake.make_runner, bytes_per_elem=28)
    text = out.getvalue()
    assert "tuning adam|" in text and "budget" in text and "the incumbent, warmed up" in text
    assert text.count("[screen]") == len(challengers()) and text.count("[confirm]") == CONFIRM_TOP
    assert "picked block=2048 warps=4" in text and "faster than the default" in text
    table = autotune.format_choices(tuner.choices())
    assert "block=2048 warps=4" in table and "tuned" in table and "2^20" in table
    d_ms = prefer(BEST)(GPU_DEFAULT)
    assert f"{1 / d_ms:.3f} (IQR 0.000, {CONFIRM_PAIRS} pairs)" in table and f"{d_ms:.4g}" in table


def test_quiet_mode_still_announces_tuning(tmp_path):
    fake = FakeGPU()
    out = io.StringIO()
    make_tuner(tmp_path, fake, verbose=False, stream=out).select(KEY, 2**20, CPU, fake.make_runner)
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 2 and "tuning" in lines[0] and "picked" in lines[1]


def test_process_wide_tuner_can_be_swapped(tmp_path):
    fake = FakeGPU()
    old = autotune.set_tuner(make_tuner(tmp_path, fake))
    try:
        assert autotune.select_config(KEY, 2**20, CPU, fake.make_runner) == BEST
        assert autotune.choices()[-1].config == BEST
        buf = io.StringIO()
        autotune.print_choices(file=buf)
        assert "block=2048" in buf.getvalue()
    finally:
        autotune.set_tuner(old)


# --- with the real optimizer ------------------------------------------------------------------


def _tuned_vs_untuned_step(cache_dir: str) -> dict:
    """Runs in a child process (see the test below). Tuning runs the real scratch kernels
    (interpreter) several times per config; returns what the step launched and whether the
    params and state after one tuned step are bit-identical to an untuned step."""
    import tritonadam
    import tritonadam.step_cache as step_cache

    target = LaunchConfig(512, 2)  # not the default, so the tuned choice is visible

    def timer(unit):
        # Like a real timer, the kernel runs on scratch at every timing, and each config is
        # timed many times (pairs against the default); one launch of the unit's unit.n, to
        # keep the interpreter's time down.
        unit.fn()
        return (1.0 if unit.config == target else 2.0) * unit.n

    launched = []
    real_launch = step_cache.launch_update

    def spy(*args, **kw):
        launched.append((kw.get("block_size"), kw.get("num_warps")))
        return real_launch(*args, **kw)

    step_cache.launch_update = spy

    torch.manual_seed(0)
    init, grad = torch.randn(5000), torch.randn(5000)

    def one_step(mode):
        p = torch.nn.Parameter(init.clone())
        p.grad = grad.clone()
        opt = tritonadam.AdamW([p], lr=1e-2, weight_decay=0.1, autotune=mode)
        opt.step()
        return p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}

    tuner = Tuner(  # the timer tells configs apart by unit.config
        timer=timer, cache=DiskCache(cache_dir), device_info=lambda d: FAKE_H100, budget_s=600,
        free_bytes=lambda d: None, time_any_device=True, stream=io.StringIO(),
    )
    autotune.set_tuner(tuner)
    p_tuned, s_tuned = one_step("on")
    tuned_launch = launched[-1]
    autotune.set_tuner(Tuner(cache=DiskCache(cache_dir)))  # CPU: never tunes
    p_plain, s_plain = one_step("on")
    return {
        "choice": [tuner.choices()[-1].source, tuner.choices()[-1].config.to_json()],
        "target": target.to_json(),
        "tuned_launch": list(tuned_launch),
        "plain_launch": list(launched[-1]),
        "params_equal": bool(torch.equal(p_tuned, p_plain)),
        "state_equal": s_tuned.keys() == s_plain.keys() and all(torch.equal(s_tuned[k], s_plain[k]) for k in s_tuned),
    }


def test_tuning_never_touches_live_tensors_and_the_step_launches_the_choice(tmp_path):
    """In a child process: a scratch runner that frees its buffers before it runs makes the
    interpreter dereference freed memory (segfault), and that must fail this test, not kill
    the whole run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not autotune.tuner._env.interpret():
        pytest.skip("needs Triton's interpreter")
    here = Path(__file__).resolve().parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(here.parent), str(here), env.get("PYTHONPATH")]))
    code = (
        "import json, sys, test_autotune as t; "
        "print('RESULT ' + json.dumps(t._tuned_vs_untuned_step(sys.argv[1])))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (
        f"child exited with {proc.returncode} (a negative code is a signal: -11 = segfault, e.g. a scratch "
        f"runner whose buffers were freed before it ran)\n{proc.stderr[-3000:]}"
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    assert r["choice"] == ["tuned", r["target"]]
    assert r["tuned_launch"] == [r["target"]["block_size"], r["target"]["num_warps"]]  # the step ran the choice
    assert r["plain_launch"] != r["tuned_launch"]
    assert r["params_equal"] and r["state_equal"]  # tuning left the live tensors alone


# --- on a real GPU (skipped on CPU) ----------------------------------------------------------

_no_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or autotune.tuner._env.interpret(),
    reason="needs a CUDA/ROCm GPU outside Triton's interpreter",
)


@pytest.mark.gpu
@_no_gpu
def test_event_timer_measures_a_gpu_op():
    from tritonadam.autotune.timing import cuda_event_timer

    x = torch.zeros(2**24, device="cuda")
    ms = cuda_event_timer(lambda: x.add_(1.0), warmup_ms=5, rep_ms=20)
    assert math.isfinite(ms) and 0 < ms < 100


@pytest.mark.gpu
@_no_gpu
def test_first_use_tuning_on_a_gpu_writes_a_valid_cache(tmp_path):
    dev = torch.device("cuda", torch.cuda.current_device())

    def make_runner(config, numel):
        buf = torch.zeros(numel, device=dev)  # the runner owns its scratch buffer
        return lambda: buf.mul_(0.5)

    tuner = Tuner(cache=DiskCache(tmp_path), budget_s=3, stream=io.StringIO())
    cfg = tuner.select(KEY, 2**22, dev, make_runner, bytes_per_elem=8)
    info = tuner.device_info(dev)
    assert cfg in config_space(info.backend)
    parsed = tuner.cache.read(tuner.cache.path(tuner.identity(info)), tuner.identity(info))
    assert parsed.problem is None and entry_key(KEY, 22) in parsed.entries
    assert tuner.choices()[-1].source == "tuned"
    assert tuner.select(KEY, 2**22, dev, make_runner) == cfg  # memory hit


@pytest.mark.parametrize("options", [{}, {"state_dtype": "8bit", "master_weights": "remainder"},
                                     {"state_dtype": "4bit", "amsgrad": True}], ids=["fp32", "8bit", "4bit"])
def test_scratch_mix_and_runner(options):
    """Scratch launches of every state format: quantized ones get codes and scales of their
    own per tensor (the kernel reads a scale pointer for every quantized moment)."""
    from tritonadam.kernels.scratch import make_scratch_runner, scaled_mix
    from tritonadam.state import variant

    assert scaled_mix([4096] * 10_000, 2**14) == [4096] * 4  # a mix of small tensors is cut
    assert scaled_mix([100, 30], 250) == [100, 30, 100, 20]  # or repeated, to the scratch size
    assert scaled_mix([2**30], 2**20) == [2**20] and scaled_mix([], 5) == [5]
    if not autotune.tuner._env.interpret():
        pytest.skip("runs the scratch launch in Triton's interpreter")
    dtype = torch.bfloat16 if options.get("master_weights") else torch.float32
    run = make_scratch_runner(variant("adamw", dtype, torch.bfloat16, **options),
                              config=LaunchConfig(1024, 4, True), numels=[4096, 7, 3000], device=CPU)
    before = [t.clone() for t in run.params]
    run()
    assert all(not torch.equal(a, b) for a, b in zip(before, run.params))  # every tensor stepped
    assert run.numels == [4096, 7, 3000] and run.compile() is None  # the interpreter reports nothing


@pytest.mark.parametrize("algorithm", ["adam", "adamw", "adamax"])
def test_the_compiler_report_is_of_the_heaviest_launch_the_config_serves(algorithm, monkeypatch):
    """The tuner prunes a candidate by the compiler's report: of the launch with
    GradScaler's found_inf and scale (the grads written back) and L2 weight decay (beside
    decoupled decay for AdamW), which a
    step may launch with the tuned config, not only the timed launch's flags (with these
    the report was of a variant no step launched: fp32 params, bf16 grads, L2 decay, 4096/8
    persistent, sm_90, clean as timed, 8 bytes of stack as launched)."""
    from types import SimpleNamespace

    from tritonadam.kernels import scratch
    from tritonadam.state import variant

    compiled = []

    def fake_launch(tables, bucket, **kw):
        compiled.append(kw)
        return SimpleNamespace(_init_handles=lambda: None, n_regs=72, n_spills=0,
                               metadata=SimpleNamespace(shared=0))

    run = scratch.make_scratch_runner(variant(algorithm, torch.float32, torch.bfloat16),
                                      config=LaunchConfig(4096, 8, True), numels=[3000, 70], device=CPU)
    monkeypatch.setattr(scratch, "launch_update", fake_launch)
    monkeypatch.setattr(scratch, "interpreted", lambda: False)
    assert run.compile() == {"registers": 72, "spills": 0, "shared": 0}
    (kw,) = compiled
    assert kw["compile_only"] and kw["found_inf"] is not None and kw["coupled_wd"]
    assert kw["unscale_grads"]  # GradScaler's step writes the grads back: 25 registers more at 4096/8
    assert kw["decoupled_wd"] == (algorithm == "adamw")
    assert (kw["block_size"], kw["num_warps"], kw["persistent"]) == (4096, 8, True)
    assert kw["adamax"] == (algorithm == "adamax")


def test_compile_only_launches_nothing():
    """The tuner reads the compiler's report through a launch that compiles and runs
    nothing (in the interpreter, which compiles nothing, it returns None)."""
    from tritonadam.kernels import scratch
    from tritonadam.state import variant

    run = scratch.make_scratch_runner(variant("adam", torch.float32), config=LaunchConfig(1024, 4),
                                      numels=[3000], device=CPU)
    before = run.params[0].clone()
    assert run.compile() is None
    assert torch.equal(run.params[0], before)
    run()
    assert not torch.equal(run.params[0], before)