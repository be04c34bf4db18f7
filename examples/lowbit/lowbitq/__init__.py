"""Training-quality evidence for low-bit optimizer state: the same tasks, seeds and
hyper-parameters for torch.optim.AdamW (fp32, the reference), tritonadam's precision
modes and the 8-bit/4-bit optimizers of other libraries.

Importing this package chooses where everything runs, as ``examples/paper``'s package
does (it is imported first, for the MNIST loader): on a CUDA GPU when there is one,
otherwise on the CPU with tritonadam's kernels in Triton's interpreter. The interpreter
must be switched on before tritonadam is imported, so the scripts import this package
before anything that imports tritonadam.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
PAPER = REPO / "examples" / "paper"
if str(PAPER) not in sys.path:
    sys.path.insert(0, str(PAPER))

import adampaper  # noqa: E402  (sets TRITON_INTERPRET / TRITON_DEFAULT_FP_FUSION before tritonadam)

DEVICE = adampaper.DEVICE
one_cpu_thread = adampaper.one_cpu_thread
