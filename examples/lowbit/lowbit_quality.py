"""Training quality of low-bit optimizer state, side by side: the same tasks, seeds and
hyper-parameters for torch.optim.AdamW (fp32, the reference), tritonadam.AdamW (fp32
state, bf16 state, 8-bit and 4-bit state; bf16 params with the exact 2-byte master) and
the 8-bit/4-bit AdamW of bitsandbytes, torchao and flashoptim.

    python examples/lowbit/lowbit_quality.py --preset quick                     # results in a scratch dir
    python examples/lowbit/lowbit_quality.py --preset quick --regenerate-docs   # docs/lowbit.{md,png,json}
    python examples/lowbit/lowbit_quality.py --preset smoke --out /tmp/lb --optimizers torch ta-fp32
    python examples/lowbit/lowbit_quality.py --render docs/lowbit.json --out /tmp/lb   # tables and plot again, no training

Tasks: ``mlp`` (the Adam paper's MLP on 4,000 MNIST digits, examples/paper's data) and
``lm`` (a byte-level transformer on the Python standard library's sources). An
optimizer that cannot be built here (not installed, an option that does not exist yet,
a library that needs a GPU) is reported as unavailable and the sweep goes on. Nothing is
written into the repository unless ``--regenerate-docs`` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowbitq  # noqa: E402  (first: it sets up Triton's interpreter on a CPU before tritonadam loads)
from lowbitq import optimizers, presets, report, tasks, train  # noqa: E402

DOCS = lowbitq.REPO / "docs"
BEGIN, END = "<!-- results: begin (written by examples/lowbit/lowbit_quality.py) -->", "<!-- results: end -->"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets.PRESETS), default="quick")
    parser.add_argument("--tasks", nargs="+", choices=sorted(tasks.TASKS), default=list(tasks.TASKS))
    parser.add_argument("--optimizers", nargs="+", choices=list(optimizers.REGISTRY), default=optimizers.DEFAULT,
                        metavar="NAME", help=f"default: {' '.join(optimizers.DEFAULT)}; "
                        f"also: {' '.join(n for n in optimizers.REGISTRY if n not in optimizers.DEFAULT)}")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: the preset's (quick: 0 1 2)")
    parser.add_argument("--layout", choices=("flat", "modules"),
                        help="flat: one padded tensor per model (the preset default for smoke and quick); "
                             "modules: the model's own parameters")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="no training: summarise, tabulate and plot the runs of a results file again")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="folder for lowbit.json, lowbit.png, lowbit.md (default: a new "
                                                "scratch folder)")
    where.add_argument("--regenerate-docs", action="store_true",
                       help=f"write {DOCS / 'lowbit.json'}, .png and the results section of lowbit.md")
    args = parser.parse_args(argv)
    if optimizers.REFERENCE not in args.optimizers:
        args.optimizers = [optimizers.REFERENCE, *args.optimizers]  # the gaps are measured against it
    return args


def write_docs_markdown(path: Path, section: str) -> None:
    """Replaces the results section of ``path`` (between the markers), keeping the rest."""
    text = path.read_text() if path.exists() else f"# Low-bit optimizer state: training quality\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{BEGIN}\n{section}\n{END}{tail}")


def sweep(args: argparse.Namespace, argv: list[str], preset: dict, seeds: list[int], layout: str) -> dict:
    """Every task x optimizer x seed run, and their summaries."""
    start = time.perf_counter()
    results = {"command": shlex.join(["python", "examples/lowbit/lowbit_quality.py", *argv]),
               "preset": args.preset, "seeds": seeds, "layout": layout, "optimizers": args.optimizers,
               "environment": report.environment(), "bytes_per_param": report.BYTES_NOTE, "tasks": {}}
    for task_name in args.tasks:
        settings = preset[task_name]
        task = tasks.TASKS[task_name](settings)
        runs = []
        for name in args.optimizers:
            spec = optimizers.REGISTRY[name]
            for seed in seeds:
                record = train.run(task, spec, seed, settings, layout, preset["pad_multiple"])
                runs.append(record)
                if record["status"] != "ok":
                    print(f"{task_name:3s} {name:24s} {record['status']}: {record['reason']}", flush=True)
                    break  # the same for every seed
                print(f"{task_name:3s} {name:24s} seed {seed}  train {record['final_train_loss']:.4f}  "
                      f"held-out {record['final_held_out_loss']:.4f}  state {record['state_bytes_per_param']:.2f} "
                      f"B/param  {record['seconds']:.1f} s" + ("  DIVERGED" if record["diverged"] else ""), flush=True)
        probe = task.make_model(0, optimizers.FP32, layout, preset["pad_multiple"])
        results["tasks"][task_name] = {
            "name": task_name, "title": task.title, "settings": settings, "data": task.data_info,
            "params": probe.numel, "stepped_elements": probe.stepped_numel,
            "summary": report.summarize(runs), "runs": runs}
    results["wall_seconds"] = time.perf_counter() - start
    results["environment"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:  # checked before the sweep, not after it
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("lowbit_quality.py draws lowbit.png with matplotlib, not installed: "
                         "pip install -e '.[lowbit]' (or just matplotlib)") from None
    preset = presets.PRESETS[args.preset]
    seeds = args.seeds or preset["seeds"]
    layout = args.layout or preset["layout"]
    out = DOCS if args.regenerate_docs else (args.out or Path(tempfile.mkdtemp(prefix="lowbit-")))
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        results = json.loads(args.render.read_text())
        for task in results["tasks"].values():
            task["summary"] = report.summarize(task["runs"])
    else:
        results = sweep(args, argv, preset, seeds, layout)
    report.save_json(out / "lowbit.json", results)
    report.plot(results, out / "lowbit.png")
    section = report.markdown(results)
    if args.regenerate_docs:
        write_docs_markdown(out / "lowbit.md", section)
    else:
        (out / "lowbit.md").write_text(section + "\n")
    print(section)
    took = "rendered" if args.render else f"sweep {results['wall_seconds']:.0f} s"
    print(f"\nwrote {out / 'lowbit.json'}, {out / 'lowbit.png'}, {out / 'lowbit.md'} ({took})")
    return results


if __name__ == "__main__":
    lowbitq.one_cpu_thread()
    main()
