"""Test setup: kernels run in Triton's interpreter unless a GPU run asks otherwise.

Triton decides interpreter mode when kernels are decorated, so the environment is set
here, before any test module imports tritonadam. ``TRITONADAM_TEST_DEVICE=cuda`` runs the
suite's device-generic tests on a GPU (see tritonadam/bench/gpu_check.sh).
"""
import os

if os.environ.get("TRITONADAM_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# FMA contraction changes low bits; tests compare bits, so fix it (triton 3.9 warns if unset).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from fast_interpreter import patch_language_once_per_launch  # noqa: E402

patch_language_once_per_launch()


@pytest.fixture
def device() -> torch.device:
    """The device tensors live on: CPU (interpreter) by default, CUDA in GPU runs."""
    return torch.device(os.environ.get("TRITONADAM_TEST_DEVICE", "cpu"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
