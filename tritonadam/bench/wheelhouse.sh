#!/usr/bin/env bash
# Fills the checkout's bench/wheelhouse/ (data, beside bench/results/) with the peers' wheels
# the GPU check times beside tritonadam (torchao, FlashOptim, bitsandbytes), for a GPU machine
# without network access: run this where PyPI is reachable, then bring bench/wheelhouse along
# with the checkout (it is git-ignored; about 47 MB). tritonadam/bench/gpu_check.sh installs
# them with `pip install --no-index --no-deps --target` into its work directory and times them
# in its peers step.
#
#   bash tritonadam/bench/wheelhouse.sh   # PYTHON=... picks the pip; PY_VERSION=3.12 by default
#
# Versions: those the CPU machine's lowbit runs used (pyproject's `lowbit` extra) and FlashOptim's
# release on PyPI; all three are pure Python or ship their own CUDA binaries, and none is
# installed with its dependencies (torch and triton are already on the GPU image).
set -euo pipefail
cd "$(dirname "$0")/../../bench"  # the checkout's bench/: wheelhouse/ is made there
PY="${PYTHON:-python3}"
PY_VERSION="${PY_VERSION:-3.12}"
mkdir -p wheelhouse
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
    -d wheelhouse torchao==0.18.0 flashoptim==0.1.4 bitsandbytes==0.50.2
ls -la wheelhouse
du -sh wheelhouse
