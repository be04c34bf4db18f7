"""The @triton.jit optimizer kernels and their launchers.

Lives inside the package (``tritonadam.kernels``) rather than as a top-level ``kernels``
import package, which would collide with the PyPI package of that name.
"""
from .launch import KERNELS, Hyper, launch, launch_counts
from .plan import Bucket, build_bucket
from .scratch import autotune_key, bytes_per_elem, make_scratch_runner, variant_key

# The kernels take LaunchConfig.persistent: the autotuner may time persistent grids too.
ALLOW_PERSISTENT = True

__all__ = [
    "ALLOW_PERSISTENT",
    "KERNELS", "Hyper", "Bucket", "build_bucket", "launch", "launch_counts",
    "autotune_key", "bytes_per_elem", "make_scratch_runner", "variant_key",
]
