"""``python -m tritonadam.autotune``: pre-tune, show, export, import and clear the cache."""
from __future__ import annotations

import argparse
import re
import sys

from .configs import MIN_BUCKET

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# --state-dtype: the optimizer's state_dtype= (None keeps fp32 moments, fp64 for fp64 params).
STATE_DTYPES = {"fp32": None, "bf16": "bfloat16", "8bit": "8bit", "4bit": "4bit"}

_EPILOG = """\
The cache lives in $TRITONADAM_CACHE_DIR, else the user's cache directory (see `path`).
One JSON file per GPU model + compute capability + triton version + kernel source and
config-space hash; files for other GPUs or versions are left alone and never used.

examples:
  python -m tritonadam.autotune tune --optimizer adamw --param-dtype bf16 --master-weights --model-size 7B --world-size 8
  python -m tritonadam.autotune tune --param-dtype bf16 --state-dtype 8bit --master-weights remainder --model-size 7B
  python -m tritonadam.autotune show
  python -m tritonadam.autotune export tuned.json     # on the GPU box
  python -m tritonadam.autotune import tuned.json     # on another box with the same GPU
"""


def _parse_size(text: str) -> int:
    """'7B', '125M', '64k', '1e6', '2^20', '2**20', '4096' -> elements."""
    t = text.strip().replace("_", "")
    m = re.fullmatch(r"2(?:\^|\*\*)(\d+)", t)
    if m:
        return 2 ** int(m.group(1))
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMbBgGtT]?)", t)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4096, 1e6, 2^20, 125M, 7B)")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    value = float(m.group(1)) * scale
    if not value < 2**62:  # also inf (1e400)
        raise argparse.ArgumentTypeError(f"size too large: {text!r}")
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return n


def _parse_seconds(text: str) -> float:
    """A budget in seconds: finite and >= 0, as the environment switches take it."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return value


def _parse_world_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 rank, got {text!r}")
    return value


def _parse_dir(text: str) -> str:
    # An empty value (``--cache-dir "$UNSET"``) must not fall back to the default directory:
    # ``clear`` would delete the user's real cache.
    if not text.strip():
        raise argparse.ArgumentTypeError("empty directory name")
    return text


def _cache(args):
    from .cache import DiskCache

    return DiskCache(args.cache_dir) if args.cache_dir is not None else DiskCache()


def _fmt_cfg(obj) -> str:
    from .configs import LaunchConfig

    cfg = LaunchConfig.from_json(obj)
    return cfg.short() if cfg else "?"


def _fmt_gbps(x) -> str:
    if not x:
        return ""
    return f"{x:.0f}" if x >= 10 else f"{x:.3g}"


def _entry_rows(entries: dict) -> list:
    from .tuner import ratio_text

    rows = []
    for name in _sorted_names(entries):
        e = entries[name]
        ru = e.get("runner_up")
        d = e["default"]
        vs = e.get("vs_default")
        meas = e.get("measured") or {}
        dec = e.get("decision") or {}
        untimed = e.get("untimed") or []
        short = sum(1 for u in untimed if u["why"].endswith("budget"))
        how = ", ".join(
            str(x)
            for x in (
                meas.get("at", ""),
                meas.get("how", ""),
                f"{meas.get('configs_timed', '?')}/{meas.get('configs_considered', '?')} timed"
                + (f", {meas['configs_pruned']} pruned by the compiler's report" if meas.get("configs_pruned") else "")
                + (
                    f", {short} not timed for lack of budget (a full tune: about {meas['full_tune_s']:.3g} s)"
                    if short and isinstance(meas.get("full_tune_s"), (int, float)) else
                    (f", {short} not timed for lack of budget" if short else "")
                ),
                f"margin {100 * dec['min_margin']:g}%" if isinstance(dec.get("min_margin"), (int, float)) else "",
                f"noise {dec['noise']:.3f}" if isinstance(dec.get("noise"), (int, float)) else "",
            )
            if x
        )
        kept = d["config"] == e["config"]
        rows.append(
            (
                "|".join(e["key"]),
                f"2^{e['bucket']}",
                _fmt_cfg(e["config"]) + (" (default)" if kept else ""),
                f"{e['time_ms']:.4g}",
                _fmt_gbps(e.get("gbps")),
                "" if kept else f"{_fmt_cfg(d['config'])} {d['time_ms']:.4g} ms",
                ratio_text(vs["ratio"], vs["spread"], vs["pairs"]) if vs else "",
                f"{_fmt_cfg(ru['config'])} {ratio_text(ru['ratio'], ru['spread'], ru['pairs'])}" if ru else "",
                how,
            )
        )
    return rows


def _sorted_names(entries: dict) -> list:
    return sorted(entries, key=lambda n: (entries[n]["key"], entries[n]["bucket"]))


def _entry_details(entries: dict) -> list[str]:
    """Per entry: the decision in words, then every candidate left untimed and why."""
    lines = []
    for name in _sorted_names(entries):
        e = entries[name]
        lines.append(f"{name}: {(e.get('decision') or {}).get('reason', '')}")
        for u in e.get("untimed") or []:
            lines.append(f"    untimed: {_fmt_cfg(u['config'])}: {u['why']}")
    return lines


_HEADERS = ["key", "n <=", "config", "ms", "GB/s", "default (if not kept)", "vs default", "runner-up", "measured"]


def cmd_show(args) -> int:
    from tabulate import tabulate

    cache = _cache(args)
    files = cache.files()
    if not files:
        print(f"no tuned configs in {cache.directory}")
        return 0
    for path in files:
        parsed = cache.read(path)
        print(f"== {path}")
        if parsed.identity is not None:
            print(f"   {parsed.identity.describe()}")
        if parsed.problem:
            print(f"   ignored: {parsed.problem}" if not parsed.entries else f"   note: {parsed.problem}")
        if parsed.entries:
            print(tabulate(_entry_rows(parsed.entries), headers=_HEADERS, tablefmt=args.format))
            if args.details:
                print("\n".join(_entry_details(parsed.entries)))
        print()
    return 0


def cmd_path(args) -> int:
    cache = _cache(args)
    print(cache.directory)
    import torch

    from .. import _env

    if torch.cuda.is_available() and not _env.interpret():
        from .tuner import Tuner

        t = Tuner(cache=cache)
        dev = torch.device("cuda", torch.cuda.current_device())
        print(cache.path(t.identity(t.device_info(dev))))
    return 0


def cmd_clear(args) -> int:
    cache = _cache(args)
    n = cache.clear()
    print(f"removed {n} cache file{'s' if n != 1 else ''} from {cache.directory}")
    return 0


def cmd_export(args) -> int:
    cache = _cache(args)
    try:
        n, notes = cache.export_bundle(args.file)
    except OSError as e:
        print(f"cannot export to {args.file}: {e}", file=sys.stderr)
        return 1
    for note in notes:
        print(note)
    print(f"exported {n} entr{'y' if n == 1 else 'ies'} from {cache.directory} to {args.file}")
    return 0


def cmd_import(args) -> int:
    cache = _cache(args)
    try:
        n, notes = cache.import_file(args.file)
    except (OSError, ValueError) as e:
        print(f"cannot import {args.file}: {e}", file=sys.stderr)
        return 1
    for note in notes:
        print(note)
    print(f"imported {n} entr{'y' if n == 1 else 'ies'} into {cache.directory}")
    return 0 if n or not notes else 1


def cmd_tune(args) -> int:
    import torch

    from .. import _env
    from ..state import variant

    if tune_variants(args, variant) is None:
        return 2
    if not torch.cuda.is_available() or _env.interpret():
        why = "TRITON_INTERPRET=1 is set" if _env.interpret() else "no CUDA or ROCm GPU is visible to torch"
        print(
            f"tritonadam.autotune tune: nothing tuned: {why}. Tuning times the kernels on a GPU; "
            "on CPU the optimizer uses its built-in defaults and never tunes.",
            file=sys.stderr,
        )
        return 1
    from ..kernels.scratch import make_scratch_runner
    from .tuner import Tuner

    try:
        device = torch.device(args.device) if args.device else torch.device("cuda", torch.cuda.current_device())
    except RuntimeError as e:
        print(f"tritonadam.autotune tune: --device {args.device!r}: {e}", file=sys.stderr)
        return 2
    if device.type != "cuda" or (device.index is not None and device.index >= torch.cuda.device_count()):
        print(f"tritonadam.autotune tune: --device {args.device!r}: expected a visible GPU, cuda or "
              f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}", file=sys.stderr)
        return 2
    if device.index is not None:
        torch.cuda.set_device(device)
    tuner = Tuner(cache=_cache(args), budget_s=args.budget, compile_budget_s=args.compile_budget,
                  verbose=args.verbose or None)
    return run_tune(args, tuner=tuner, device=device, variant_of=variant,
                    make_scratch_runner=make_scratch_runner)


def tune_variants(args, variant_of) -> list | None:
    """The kernel variants ``tune`` times, or None after saying why the optimizer would
    refuse one. Every combination is checked before any is timed (and before looking for
    a GPU): one the optimizer would refuse stops the command, with its reason."""
    import torch

    state_dtype = STATE_DTYPES[args.state_dtype]
    variants = []
    for opt in args.optimizer:
        for pd in args.param_dtype:
            gd = pd if args.grad_dtype == "same" else args.grad_dtype
            kw = dict(
                optimizer=opt,
                param_dtype=getattr(torch, DTYPES[pd]),
                grad_dtype=getattr(torch, DTYPES[gd]),
                amsgrad=args.amsgrad,
                master_weights={"true": True, "false": False}.get(args.master_weights, args.master_weights),
                state_dtype=getattr(torch, state_dtype) if state_dtype == "bfloat16" else state_dtype,
                stochastic_rounding=args.stochastic_rounding,
            )
            try:
                variants.append(variant_of(**kw))
            except (ValueError, TypeError) as err:
                print(f"tritonadam.autotune tune: nothing tuned: {opt} with {pd} params and these "
                      f"options: {err}", file=sys.stderr)
                return None
    return variants


def run_tune(args, *, tuner, device, variant_of, make_scratch_runner) -> int:
    """The body of ``tune`` (separate so CPU tests can drive it with a fake GPU and kernels).

    ``variant_of(optimizer=..., param_dtype=..., ...)``: the kernel variant of those
    options (``tritonadam.state.variant``), with ``autotune_key()`` and
    ``bytes_per_elem()``; ``make_scratch_runner(variant, config=, numels=, device=)``:
    ``tritonadam.kernels.scratch``'s, or a stand-in."""
    from ..kernels.scratch import scaled_mix
    from .cache import entry_key
    from .configs import size_bucket, space_id
    from .tuner import ratio_text

    if args.numel:
        sizes = list(args.numel)
    else:
        top = max(1, args.model_size // max(1, args.world_size))
        lo, hi = size_bucket(args.min_numel), size_bucket(top)
        if lo > hi:
            print(f"tritonadam.autotune tune: nothing to tune: --min-numel {args.min_numel} is above the "
                  f"largest launch, {top} (--model-size / --world-size)", file=sys.stderr)
            return 2
        sizes = [2**b for b in range(lo, hi + 1)]
    buckets = sorted({size_bucket(n) for n in sizes})
    info = tuner.device_info(device)
    identity = tuner.identity(info)
    space = space_id(info.backend)
    variants = tune_variants(args, variant_of)
    if variants is None:
        return 2
    rows = []
    for variant in variants:
        key = tuple(variant.autotune_key())
        bpe = variant.bytes_per_elem()

        def make_runner(config, numel, _variant=variant):
            numels = [numel] if args.tensor_numel is None else scaled_mix([args.tensor_numel], numel)
            return make_scratch_runner(_variant, config=config, numels=numels, device=device)

        for b in buckets:
            name = entry_key(key, b)
            if not args.force:
                hit = tuner.cache.lookup(identity, name, space)
                # An entry cut short by the first-use budget is worth finishing here.
                if hit is not None and (hit.get("measured") or {}).get("complete", True):
                    rows.append((name, _fmt_cfg(hit["config"]), f"{hit['time_ms']:.4g}", "", "",
                                 "cached (use --force to re-tune)"))
                    continue
            res = tuner.tune(key, 2**b, device, make_runner, bytes_per_elem=bpe, how="cli tune")
            if res is None:
                rows.append((name, "", "", "", "", "failed: not even the default could be timed"))
                continue
            vs = res.vs_default
            timed = res.entry["measured"]["configs_timed"]
            rows.append((
                name, res.config.short(), f"{res.time_ms:.4g}", f"{res.default.time_ms:.4g}",
                ratio_text(vs.ratio, vs.spread, vs.pairs) if vs else "default kept",
                f"tuned {timed}/{res.considered}" + ("" if res.complete else " (budget ran out)"),
            ))
    from tabulate import tabulate

    print(tabulate(rows, headers=["entry", "config", "ms", "default ms", "vs default", "result"]))
    print(f"cache: {tuner.cache.path(identity)}")
    return 0 if all(not r[5].startswith("failed") for r in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tritonadam.autotune",
        description="Launch configs for tritonadam's optimizer kernels, tuned per GPU and cached on disk.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        type=_parse_dir,
        help="cache directory to use instead of $TRITONADAM_CACHE_DIR / the user's cache directory",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser(
        "tune",
        help="time the configs now, on this GPU, for given optimizers, dtypes and sizes, and cache the winners",
        description=(
            "Pre-tune so that training does not pay for tuning on its first step. For every "
            "optimizer x param dtype and every power-of-two size bucket from --min-numel up "
            "to the largest launch (--numel, or --model-size / --world-size), time the "
            "candidate configs against the default on scratch buffers and store the decision "
            "(the default stays unless a challenger beats it beyond noise). Needs a GPU: on "
            "CPU it says so and exits with status 1."
        ),
    )
    t.add_argument("--optimizer", nargs="+", default=["adamw"], choices=["adam", "adamw", "adamax"],
                   help="optimizer variants to tune (default: adamw)")
    t.add_argument("--param-dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES),
                   help="parameter dtypes (default: fp32 bf16)")
    t.add_argument("--grad-dtype", default="same", choices=["same", *sorted(DTYPES)],
                   help="gradient dtype (default: same as the parameter)")
    t.add_argument("--master-weights", nargs="?", const="true", default="false", choices=["true", "remainder", "false"],
                   help="tune the master-weights variant: the fp32 copy (flag alone or 'true') or the "
                        "bf16 param's 16-bit remainder ('remainder'); as the optimizer's master_weights=")
    t.add_argument("--state-dtype", default="fp32", choices=sorted(STATE_DTYPES),
                   help="how the moments are stored, as the optimizer's state_dtype= (default: fp32, "
                        "i.e. the optimizer's default)")
    t.add_argument("--stochastic-rounding", action="store_true",
                   help="tune the stochastic-rounding variant (stochastic_rounding=True)")
    t.add_argument("--amsgrad", action="store_true", help="tune the AMSGrad variant")
    size = t.add_mutually_exclusive_group(required=True)
    size.add_argument("--numel", nargs="+", type=_parse_size, metavar="N",
                      help="elements per launch to tune for, e.g. 2^20 125M (each is rounded up to its bucket)")
    size.add_argument("--model-size", type=_parse_size, metavar="N",
                      help="parameters in the model (e.g. 7B): tunes every bucket from --min-numel up to N / --world-size")
    t.add_argument("--world-size", type=_parse_world_size, default=1,
                   help="ranks the model's parameters are sharded over (FSDP/ZeRO); default 1")
    t.add_argument("--min-numel", type=_parse_size, default=2**MIN_BUCKET,
                   help=f"smallest launch to tune with --model-size (default 2^{MIN_BUCKET})")
    t.add_argument("--tensor-numel", type=_parse_size, default=None, metavar="N",
                   help="time scratch launches made of tensors of N elements, like a model of many "
                        "tensors that size (default: one tensor per launch)")
    t.add_argument("--budget", type=_parse_seconds, default=None, metavar="SECONDS",
                   help="timing budget per entry (default: $TRITONADAM_AUTOTUNE_BUDGET, else 10)")
    t.add_argument("--compile-budget", type=_parse_seconds, default=None, metavar="SECONDS",
                   help="compile budget per entry, spent before timing "
                        "(default: $TRITONADAM_AUTOTUNE_COMPILE_BUDGET, else 30)")
    t.add_argument("--device", default=None, help="GPU to tune on (default: the current CUDA device)")
    t.add_argument("--force", action="store_true",
                   help="re-tune entries that are already cached (entries whose first-use tuning ran out of budget are re-tuned anyway)")
    t.add_argument("-v", "--verbose", action="store_true", help="print every config's time")
    t.set_defaults(func=cmd_tune)

    s = sub.add_parser(
        "show",
        help="print the cache as tables: the chosen config against the default, with its spread",
        description=(
            "Print every cache file in the cache directory with its identity (GPU, triton, hashes) and "
            "entries: the chosen config and its ms; the default and its ms from the same interleaved "
            "pairs when a challenger replaced it; 'vs default', the chosen config's time ratio to the "
            "default (median of the pairs, below 1 = faster) with the ratios' inter-quartile range; "
            "the closest other config the same way; and how it was measured (candidates timed, "
            "pruned, left untimed for lack of budget, the margin and the default's own noise). "
            "See docs/autotune.md."
        ),
    )
    s.add_argument("--format", default="simple", help="tabulate table format (simple, github, grid, ...)")
    s.add_argument("--details", action="store_true",
                   help="after each table, every entry's decision in words and the candidates it left untimed")
    s.set_defaults(func=cmd_show)

    e = sub.add_parser(
        "export",
        help="write every usable cache file into one JSON bundle FILE",
        description="Write every usable cache file of the cache directory into one JSON bundle, to copy to other machines.",
    )
    e.add_argument("file", metavar="FILE")
    e.set_defaults(func=cmd_export)

    i = sub.add_parser(
        "import",
        help="merge a bundle (from export) or a cache file into the cache, after validating it",
        description=(
            "Merge FILE (an export bundle or a single cache file) into the cache directory. "
            "Every entry is checked like a cache read: unknown configs, bad numbers and files "
            "for another config space are skipped and reported. Imported entries replace "
            "local ones with the same key. Exit status 1 if entries were found and none could be imported."
        ),
    )
    i.add_argument("file", metavar="FILE")
    i.set_defaults(func=cmd_import)

    c = sub.add_parser(
        "clear",
        help="delete every tritonadam autotune cache file in the cache directory",
        description="Delete every tritonadam-autotune-*.json file (and its lock) in the cache directory; nothing else.",
    )
    c.set_defaults(func=cmd_clear)

    pa = sub.add_parser(
        "path",
        help="print the cache directory (and, on a GPU, this GPU's cache file)",
        description="Print the cache directory; on a GPU also the file this GPU and install would use.",
    )
    pa.set_defaults(func=cmd_path)
    return p



def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `show | head`: stop quietly, as other CLI tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
