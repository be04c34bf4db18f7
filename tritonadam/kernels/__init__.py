"""The @triton.jit optimizer kernels, their device tables and launchers.

Lives inside the package (``tritonadam.kernels``) rather than as a top-level ``kernels``
import package, which would collide with the PyPI package of that name.
"""
from .launch import TL_DTYPES, device_guard, launch_counts, launch_prepare, launch_update
from .plan import Bucket, DeviceTables
from .scratch import make_scratch_runner, scaled_mix
from .variant import BucketKey, Master, Variant

__all__ = [
    "TL_DTYPES",
    "Bucket", "BucketKey", "DeviceTables", "Master", "Variant",
    "device_guard", "launch_counts", "launch_prepare", "launch_update",
    "make_scratch_runner", "scaled_mix",
]
