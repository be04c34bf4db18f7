"""The @triton.jit optimizer kernels and their launchers.

Lives inside the package (``tritonadam.kernels``) rather than as a top-level ``kernels``
import package, which would collide with the PyPI package of that name.
"""
from .launch import KERNELS, Hyper, launch, launch_counts, variant_key
from .plan import Bucket, build_bucket

__all__ = ["KERNELS", "Hyper", "Bucket", "build_bucket", "launch", "launch_counts", "variant_key"]
