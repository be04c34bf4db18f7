"""Optimizer state memory, counted from the tensors the optimizer actually allocated.

Walks ``opt.state`` (every value of every param's dict, into lists, tuples and dicts);
a tensor subclass that wraps other tensors (torchao's ``OptimState8bit``/``OptimState4bit``
hold ``codes``, ``scale`` and ``qmap``; a ``DTensor`` its local shard) is opened through
``__tensor_flatten__`` and its inner tensors are counted, never the wrapper's nominal
size. Each storage is counted once, at its allocated size (``untyped_storage().nbytes()``),
so a table shared by several params (bitsandbytes' ``qmap``) or state kept as views of
one buffer is not counted twice; storages that belong to a param or its gradient are not
state and are left out. Python numbers in the state (bitsandbytes' ``step``) take no
tensor memory and count 0.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def _storage_key(t: Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _leaves(value, path: str):
    """(path, plain tensor) for every tensor in ``value``, subclasses opened."""
    if isinstance(value, Tensor):
        if is_traceable_wrapper_subclass(value):
            names, _ = value.__tensor_flatten__()
            for name in names:
                yield from _leaves(getattr(value, name), f"{path}.{name}")
        else:
            yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{path}[{i}]")


def state_bytes(opt: torch.optim.Optimizer) -> dict:
    """``{"bytes": total, "by_key": {key: {"bytes", "dtypes"}}}`` for ``opt``'s state;
    keys are the state dict's (``exp_avg``), with a subclass's inner names appended
    (``exp_avg.codes``)."""
    excluded = set()
    for group in opt.param_groups:
        for p in group["params"]:
            for t in (p, p.grad):
                if t is not None:
                    for _, leaf in _leaves(t.detach() if t.requires_grad else t, ""):
                        excluded.add(_storage_key(leaf))
    seen: dict[tuple[str, int], int] = {}
    by_key: dict[str, dict] = defaultdict(lambda: {"bytes": 0, "dtypes": set()})
    for state in opt.state.values():
        for key, value in state.items():
            for path, leaf in _leaves(value, str(key)):
                storage = leaf.untyped_storage()
                skey = _storage_key(leaf)
                if skey in excluded or storage.nbytes() == 0:
                    continue
                by_key[path]["dtypes"].add(str(leaf.dtype).replace("torch.", ""))
                if skey in seen:
                    continue
                seen[skey] = storage.nbytes()
                by_key[path]["bytes"] += storage.nbytes()
    return {"bytes": sum(seen.values()),
            "by_key": {k: {"bytes": v["bytes"], "dtypes": sorted(v["dtypes"])} for k, v in sorted(by_key.items())}}
