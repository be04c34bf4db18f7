"""Make sure Triton kernels can run when the bench (or ``host_time``) runs on the CPU.

Triton chooses between compiling a kernel and interpreting it when the kernel is decorated
(``@triton.jit`` reads ``TRITON_INTERPRET`` then), i.e. when ``tritonadam``'s kernel modules
are imported. With no GPU the bench sets ``TRITON_INTERPRET=1`` itself if the user did not
set it. ``python -m tritonadam.bench`` (or ``-m tritonadam.bench.host_time``) imports the
``tritonadam`` package before this code runs; if that import already decorated kernels for
a GPU, the module re-executes itself with the variable set (once), so that the kernels are
decorated again, as interpreted functions.
"""
from __future__ import annotations

import os
import sys

_REEXEC = "_TRITONADAM_BENCH_REEXEC"


def _compiled_kernels_loaded() -> bool:
    """True when a loaded ``tritonadam`` module holds a kernel decorated for compilation."""
    if "triton" not in sys.modules:
        return False
    try:
        from triton.runtime.jit import JITFunction
    except Exception:  # noqa: BLE001
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # noqa: BLE001
        InterpretedFunction = ()  # type: ignore[assignment]
    for name, mod in list(sys.modules.items()):
        if not (name == "tritonadam" or name.startswith("tritonadam.")) or mod is None:
            continue
        for value in list(vars(mod).values()):
            if isinstance(value, JITFunction) and not isinstance(value, InterpretedFunction):
                return True
    return False


def prepare_interpreter(argv: list[str], want_cpu: bool, module: str = "tritonadam.bench") -> str:
    """Set ``TRITON_INTERPRET=1`` for a CPU run if unset; re-exec ``python -m module argv``
    when too late in-process.

    Returns "preset" (the user set it), "gpu" (not needed) or "set".
    """
    if os.environ.get("TRITON_INTERPRET", "") != "":
        return "preset"
    if not want_cpu:
        return "gpu"
    os.environ["TRITON_INTERPRET"] = "1"
    if _compiled_kernels_loaded() and not os.environ.get(_REEXEC):
        os.environ[_REEXEC] = "1"
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", module, *argv])
    return "set"
