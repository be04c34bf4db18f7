"""The @triton.jit optimizer kernels, their device tables and launchers.

Lives inside the package (``tritonadam.kernels``) rather than as a top-level ``kernels``
import package, which would collide with the PyPI package of that name.
"""
from .launch import TL_DTYPES, device_guard, launch_counts, launch_prepare, launch_update
from .plan import Bucket, BucketKey, DeviceTables
from .scratch import autotune_key, bytes_per_elem, make_scratch_runner, variant_key

__all__ = [
    "TL_DTYPES",
    "Bucket", "BucketKey", "DeviceTables",
    "device_guard", "launch_counts", "launch_prepare", "launch_update",
    "autotune_key", "bytes_per_elem", "make_scratch_runner", "variant_key",
]
