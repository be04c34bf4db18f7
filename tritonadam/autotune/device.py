"""Facts about the running GPU and software: what the tuner needs, and what names a cache file."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os

import torch

from .. import _env
from .configs import GPU_DEFAULT, INTERPRETER_DEFAULT, DeviceInfo, LaunchConfig, arch_default, size_bucket

__all__ = ["device_info", "default_config", "free_bytes", "triton_version", "kernel_source_hash"]

_info: dict = {}


def device_info(device: torch.device) -> DeviceInfo:
    """Name, architecture and SM count of a CUDA/ROCm device (memoized per index)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device_info needs a GPU device, got {device}")
    idx = device.index if device.index is not None else torch.cuda.current_device()
    info = _info.get(idx)
    if info is None:
        props = torch.cuda.get_device_properties(idx)
        warp = int(getattr(props, "warp_size", 0) or (64 if torch.version.hip is not None else 32))
        # Older torch builds lack the per-SM limits; DeviceInfo's defaults (sm_80/sm_90) stand in.
        limits = {
            k: v
            for k, v in (
                ("regs_per_sm", getattr(props, "regs_per_multiprocessor", None)),
                ("max_warps_per_sm", (getattr(props, "max_threads_per_multi_processor", 0) or 0) // warp or None),
                ("shared_per_sm", getattr(props, "shared_memory_per_multiprocessor", None)),
            )
            if v
        }
        if torch.version.hip is not None:
            # "gfx942:sramecc+:xnack-": the feature flags do not change the code we run.
            arch = str(getattr(props, "gcnArchName", "gfx")).split(":")[0]
            info = DeviceInfo(
                backend="hip",
                name=props.name,
                arch=arch,
                capability=arch,
                num_sms=props.multi_processor_count,
                warp_size=warp,
                l2_bytes=getattr(props, "L2_cache_size", None),
                **limits,
            )
        else:
            info = DeviceInfo(
                backend="cuda",
                name=props.name,
                arch=f"sm_{props.major}{props.minor}",
                capability=f"{props.major}.{props.minor}",
                num_sms=props.multi_processor_count,
                warp_size=warp,
                l2_bytes=getattr(props, "L2_cache_size", None),
                **limits,
            )
        _info[idx] = info
    return info


def default_config(device: torch.device, numel: int | None = None) -> LaunchConfig:
    """The built-in config for ``device`` (no timing, no disk).

    CPU and Triton's interpreter get INTERPRETER_DEFAULT; a GPU gets its architecture's row.
    """
    device = torch.device(device)
    if device.type == "cpu" or _env.interpret():
        return INTERPRETER_DEFAULT
    if device.type != "cuda" or not torch.cuda.is_available():
        return GPU_DEFAULT
    info = device_info(device)
    return arch_default(info.backend, info.arch, size_bucket(numel) if numel is not None else None).config


def free_bytes(device: torch.device) -> int | None:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        free, _total = torch.cuda.mem_get_info(device)
    except Exception:  # some drivers/MIG slices refuse the query; then only the fixed cap applies
        return None
    return int(free)


@functools.lru_cache(maxsize=1)
def triton_version() -> str:
    try:
        import triton

        return str(triton.__version__)
    except Exception:
        return "unknown"


@functools.lru_cache(maxsize=1)
def kernel_source_hash() -> str:
    """Hash of every ``.py`` file of ``tritonadam.kernels`` (read as bytes, never imported).

    A changed kernel may want another config, so its cache file is a different file.
    """
    try:
        spec = importlib.util.find_spec("tritonadam.kernels")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return "no-kernels"
    h = hashlib.sha256()
    for root in sorted(spec.submodule_search_locations):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, root).replace(os.sep, "/").encode())
                h.update(b"\0")
                with open(path, "rb") as f:
                    h.update(f.read())
                h.update(b"\0")
    return h.hexdigest()[:16]
