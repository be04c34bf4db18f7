"""SASS instructions per element of the update kernel's full-block path, as one program of
a launch config runs it: the prediction behind docs/performance.md, with no GPU.

    python bench/sass_per_element.py [--configs 1024/4,1024/8] [--arch 90] [setup ...]

Compiles what the launcher launches (``aot.compile_update``, with the FMA fusion the
launcher pins: on unless TRITON_DEFAULT_FP_FUSION says otherwise), disassembles the cubin
with Triton's bundled ``cuobjdump`` and counts the instructions from the kernel's entry to
the full path's exit, leaving out the IEEE slow-path call blocks (a predicated branch over
a call: never taken for finite, normal operands) and the arm of the quantized update's
root that keeps a subnormal (kernels/adam.fast_sqrt; taken only where eps * bc2 < 2**-39),
and counting the loop over iterations once per iteration. Run it without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402

from tritonadam.kernels import aot  # noqa: E402
from tritonadam.kernels.launch import fp_fusion  # noqa: E402
from tritonadam.kernels.variant import Master  # noqa: E402

BF16, FP32 = torch.bfloat16, torch.float32
SETUPS = {
    "bf16-remainder": dict(param_dtype=BF16, master=Master.REMAINDER, decoupled_wd=True),
    "bf16-8bit-remainder": dict(param_dtype=BF16, master=Master.REMAINDER, quant=8, decoupled_wd=True),
    "bf16-4bit-remainder": dict(param_dtype=BF16, master=Master.REMAINDER, quant=4, decoupled_wd=True),
    "fp32-8bit": dict(param_dtype=FP32, quant=8, decoupled_wd=True),
    "fp32-4bit": dict(param_dtype=FP32, quant=4, decoupled_wd=True),
    "bf16-8bit-sr": dict(param_dtype=BF16, stochastic_rounding=True, quant=8, decoupled_wd=True),
    "bf16-4bit-sr": dict(param_dtype=BF16, stochastic_rounding=True, quant=4, decoupled_wd=True),
}
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P\w+\s+)?)([A-Z][A-Z0-9_.]*)([^;]*);")


def disassemble(cubin: bytes) -> list[tuple[int, str, str, str]]:
    """(address, predicate, opcode, operands) of every instruction."""
    text = aot.cuobjdump(cubin, "-sass")
    return [(int(m.group(1), 16), m.group(2).strip(), m.group(3), m.group(4))
            for m in _INSTRUCTION.finditer(text)]


def _target(operands: str) -> int:
    return int(re.search(r"0x([0-9a-f]+)", operands).group(1), 16)


def full_path_instructions(ins, iterations: int) -> int:
    """Instructions one thread issues on the full path (see the module docstring)."""
    skip = set()
    for i, (addr, pred, op, operands) in enumerate(ins):
        if op == "BRA" and pred:
            region = [j for j in range(i + 1, len(ins)) if addr < ins[j][0] < _target(operands)]
            if len(region) < 12 and any(ins[j][2].startswith("CALL") for j in region):
                skip.update(region)
                skip.add(i)
    index = {addr: i for i, (addr, *_) in enumerate(ins)}
    skip |= _subnormal_root_arms(ins, index, skip)

    def count(lo: int, hi: int) -> int:
        return sum(1 for j in range(lo, hi + 1) if j not in skip)

    end = next((i for i, x in enumerate(ins) if x[2] == "EXIT" and not x[1]), len(ins))
    # A loop ptxas rotated (the branch inside it moves the exit test to the bottom): the
    # last iteration leaves at a predicated EXIT, the others branch back to the head.
    back = next(((i, index[_target(o)]) for i, (a, p, op, o) in enumerate(ins[:end])
                 if op == "BRA" and not p and i not in skip and _target(o) < a), None)
    if back is not None:
        b, head = back
        leave = next((j for j in range(head, b) if ins[j][2] == "EXIT" and ins[j][1]), None)
        if leave is not None:
            return count(0, leave) + (iterations - 1) * count(head, b)
    if end == len(ins):
        raise RuntimeError("no exit on the full path")
    total = count(0, end)
    loops = [(_target(operands), addr) for i, (addr, pred, op, operands) in enumerate(ins[:end + 1])
             if op == "BRA" and i not in skip and _target(operands) < addr]
    if iterations > 1:
        if len(loops) != 1:
            raise RuntimeError(f"expected one loop on the full path, found {len(loops)}")
        lo, hi = loops[0]
        total += (iterations - 1) * sum(1 for j in range(end + 1) if lo <= ins[j][0] <= hi and j not in skip)
    return total


def _subnormal_root_arms(ins, index: dict[int, int], skip) -> set[int]:
    """The arm of kernels/adam.fast_sqrt's if/else that keeps a subnormal's root (its
    square roots beside products by 2**24), which only an eps bc2 under 2**-39 takes: a
    predicated forward branch to the else arm, whose then arm ends in an unpredicated
    forward branch past it. Other if/else arms are counted in full. ``index``: address ->
    position in ``ins``."""
    arms = set()
    for i, (addr, pred, op, operands) in enumerate(ins):
        if op != "BRA" or not pred or i in skip or _target(operands) <= addr:
            continue
        k = index.get(_target(operands))
        if k is None or k < 2:
            continue
        _, jpred, jop, joperands = ins[k - 1]
        if jop != "BRA" or jpred or _target(joperands) <= ins[k][0]:
            continue
        j = index.get(_target(joperands))
        if j is None:
            continue
        for arm in (range(i + 1, k), range(k, j)):
            ops = [ins[x] for x in arm]
            if any(o == "MUFU.SQRT" for _, _, o, _ in ops) and any(
                    o.startswith("FMUL") and "16777216" in args for _, _, o, args in ops):
                arms.update(arm)
    return arms


def per_element(setup: str, block: int, warps: int, arch: int = 90) -> float:
    variant = SETUPS[setup]
    constexprs = aot.update_variant(warps, block, **variant)
    cubin = aot.compile_update(arch=arch, num_warps=warps, block_size=block, **variant).asm["cubin"]
    total = full_path_instructions(disassemble(cubin), block // constexprs["FULL"])
    return total / (block / (32 * warps))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("setups", nargs="*", default=list(SETUPS), help=", ".join(SETUPS))
    parser.add_argument("--configs", default="1024/4,1024/8", help="block/warps, comma-separated")
    parser.add_argument("--arch", type=int, default=90, choices=[80, 86, 89, 90])
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("compiling for a GPU needs TRITON_INTERPRET unset")
    unknown = [s for s in args.setups if s not in SETUPS]
    if unknown:
        parser.error(f"unknown setups {unknown}; choose from {', '.join(SETUPS)}")
    configs = []
    for c in args.configs.split(","):
        block, _, warps = c.partition("/")
        if not (block.isdigit() and warps.isdigit()):
            parser.error(f"--configs {c!r}: expected BLOCK/WARPS, e.g. 1024/4")
        block, warps = int(block), int(warps)
        if block & (block - 1) or warps & (warps - 1) or not 16 <= block or not 1 <= warps <= 32:
            parser.error(f"--configs {c!r}: BLOCK (at least 16) and WARPS (1 to 32) are powers of two")
        configs.append((block, warps))
    print(f"triton {triton.__version__}, sm_{args.arch}, FMA fusion {'on' if fp_fusion() else 'off'}")
    print("setup | " + " | ".join(f"{b}/{w}" for b, w in configs))
    for setup in args.setups:
        cells = []
        for b, w in configs:
            try:
                cells.append(f"{per_element(setup, b, w, args.arch):.1f}")
            except ValueError as e:  # a config this setup's kernel does not take
                cells.append("n/a")
                print(f"{setup} at {b}/{w}: {e}", file=sys.stderr)
        print(f"{setup} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
