"""One param's state format: which tensors it holds, and how they are made, converted and
exported."""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import quantize
from ..kernels.variant import BucketKey, Master
from ..tensors import in_layout, is_fsdp1_shard, like, local_tensor, placed_unlike, storage_problem
from .entries import (
    CODES_KEYS, _MASTER_DTYPES, MASTER_KEY, _MASTER_KEYS, _MOMENT_KEYS, REMAINDER_KEY, SEED_KEY, align_placements,
    _describe, _fit, _memory_format, _quantized_bits, SCALES_KEYS, scales_key, _seed_problem, _stale, _tensor_problem,
)
from .master import _adopt_master, _rounded_from, join_master, split_master
from .moments import DenseMoments, QuantizedMoments, read_moment
from .orders import _ENCODED_SHAPE
from .steps import STEP_DTYPES, _countable, count_of, step_device


@dataclass(frozen=True)
class ParamFormat:
    """How one param's state is stored: its moments, its master copy, and whether any of
    its 16-bit values are rounded stochastically."""

    moments: DenseMoments | QuantizedMoments
    master: Master = Master.NONE
    stochastic: bool = False

    @property
    def master_key(self) -> str | None:
        return _MASTER_KEYS.get(self.master)

    def check(self, p: Tensor, state: dict, keys: tuple[str, ...], name: str) -> bool:
        """Raise if ``state`` cannot be stepped with ``p``; True if it needs creating or
        converting.

        A param whose shape, dtype or device no longer matches its state (``p.data = ...``
        after steps, a model moved without its optimizer) gets an error saying what to
        do. What the formats can convert is converted instead: a layout change alone
        (same shape, other strides: torch.optim steps elementwise by index, so the state
        is re-laid out to the param's strides), moments in fp32 or bf16, a master copy in
        either form, and state placed unlike a DTensor param on its mesh.
        """
        if not isinstance(state, dict):
            raise RuntimeError(
                f"tritonadam.{name}: the state of a param of shape {tuple(p.shape)} is a "
                f"{type(state).__name__}, not a dict; load a state dict, or clear this param's "
                "state (`opt.state.pop(param)`) to restart it")
        if not state:
            return True
        missing = [k for k in ("step",) + keys[:2]
                   if k not in state and (k == "step" or _quantized_bits(state, k) is None)]
        if missing:
            raise RuntimeError(
                f"tritonadam.{name}: the state of a param of shape {tuple(p.shape)} has "
                f"{sorted(state)} but lacks {missing}; load a complete state dict, or clear "
                "this param's state (`opt.state.pop(param)`) to restart it"
            )
        step = state["step"]
        if not (isinstance(step, numbers.Real) or isinstance(step, Tensor) and step.numel() == 1
                and not step.is_complex()):
            raise RuntimeError(
                f"tritonadam.{name}: state['step'] of a param of shape {tuple(p.shape)} is "
                f"{_describe(step)}, not a step count; set it to a number or a one-element tensor, "
                "or clear this param's state (`opt.state.pop(param)`) to restart it")
        if isinstance(step, Tensor) and (problem := storage_problem(local_tensor(step))) is not None:
            raise _stale("step", problem, name)
        convert = False
        for key in keys:
            if key in state and state[key] is None:  # not absent: torch raises on it too
                raise RuntimeError(
                    f"tritonadam.{name}: state[{key!r}] of a param of shape {tuple(p.shape)} is None, "
                    "not a tensor; load a complete state dict, or clear this param's state "
                    "(`opt.state.pop(param)`) to restart it")
            convert |= self.moments.check(p, key, state, name)
        if SEED_KEY in state and _seed_problem(state[SEED_KEY]) is not None:
            raise RuntimeError(f"tritonadam.{name}: state[{SEED_KEY!r}] {_seed_problem(state[SEED_KEY])}; "
                               "set it to the integer seed of this param's stochastic rounding, or remove it "
                               "to use the optimizer's seed")
        for key, dtypes in _MASTER_DTYPES.items():
            if key in state:
                problem = _tensor_problem(p, key, state[key], dtypes, name)
                if problem is not None:
                    raise _stale(key, problem, name)
                convert |= state[key].dtype != dtypes[0] or not in_layout(local_tensor(state[key]), local_tensor(p)) \
                    or placed_unlike(state[key], p)
        return convert or not self._complete(p, state)

    def _complete(self, p: Tensor, state: dict) -> bool:
        """Whether ``state`` holds exactly the entries this format keeps (besides the
        moments, which ``check`` looked at)."""
        step = state.get("step")
        return (
            _countable(step, local_tensor(p))
            and (MASTER_KEY in state) == (self.master == Master.FP32)
            and (REMAINDER_KEY in state) == (self.master == Master.REMAINDER)
            and (SEED_KEY in state) == self.stochastic
        )

    def prepare(self, p: Tensor, state: dict, keys: tuple[str, ...], seed: int | None,
                step_dtype: torch.dtype = torch.float32) -> None:
        """Create missing entries and convert what other formats store into this one.
        ``step_dtype``: a new step count's (``new_step_dtype``); an existing float32 or
        float64 count keeps its own.

        Converting a master can write the param (a remainder's param holds the master's
        high half): call under ``torch.no_grad()``.
        """
        lp = local_tensor(p)
        align_placements(p, state, keys)
        step = state.get("step", 0.0)
        if not _countable(step, lp):
            if isinstance(step, Tensor) and step.dtype in STEP_DTYPES:
                step_dtype = step.dtype
            # A meta param's count lives on the CPU, as torch.optim's does: a meta one holds
            # no value to save, load or count.
            state["step"] = count_of(step, step_dtype, step_device(lp))
        for key in keys:
            self.moments.prepare(p, key, state)
        if self.master == Master.FP32:
            if MASTER_KEY not in state:
                if REMAINDER_KEY in state:
                    joined = join_master(lp, local_tensor(state[REMAINDER_KEY]))
                    state[MASTER_KEY] = like(p, torch.float32, _memory_format(lp), joined)
                else:
                    state[MASTER_KEY] = p.detach().to(torch.float32, memory_format=_memory_format(lp), copy=True)
            state[MASTER_KEY] = _fit(p, state[MASTER_KEY], torch.float32)
            state.pop(REMAINDER_KEY, None)
        elif self.master == Master.REMAINDER:
            if MASTER_KEY in state:
                # The exact pair for this master where the param is still that master
                # rounded (a param loaded before the optimizer's state, from the same
                # checkpoint). A param that differs is newer than the master (a later
                # save, weights pruned before it) and is kept, with the master's low bits
                # under it: within half a bf16 step of the param, and exact again if the
                # same checkpoint's params are loaded after this (the optimizer first).
                # Popped only once the param is written: a write refused (an inference
                # tensor outside inference_mode) leaves the master where it was.
                master = local_tensor(state[MASTER_KEY])
                high, low = split_master(master)
                lp.copy_(torch.where(_rounded_from(master.to(lp.device), lp, (lp.dtype,)), high.to(lp.device), lp))
                del state[MASTER_KEY]
                state[REMAINDER_KEY] = like(p, torch.int16, _memory_format(lp), low)
            elif REMAINDER_KEY not in state:
                state[REMAINDER_KEY] = torch.zeros_like(p, dtype=torch.int16, memory_format=_memory_format(lp))
            state[REMAINDER_KEY] = _fit(p, state[REMAINDER_KEY], torch.int16)
        else:
            _adopt_master(lp, state)
            state.pop(MASTER_KEY, None)
            state.pop(REMAINDER_KEY, None)
        if self.stochastic:
            own = state.get(SEED_KEY)  # kept: the seed this param's numbers were drawn with
            state[SEED_KEY] = torch.tensor(int(own) if own is not None else seed, dtype=torch.int64, device="cpu")
        else:
            state.pop(SEED_KEY, None)

    def export(self, p: Tensor, saved: dict) -> dict:
        """``saved`` (this param's entry of torch's state dict) as ``state_dict()`` gives
        it: every entry under the key the state holds it (torch's flattened state dicts
        rebuild a param's state from its optimizer's own keys), a remainder joined by the
        fp32 master it stands for, so the checkpoint loads into either master mode and
        into torch.optim whatever order params and state are loaded in; quantized
        moments as codes and scales, shaped so that DCP can reshard them
        (``QuantizedMoments.export``).

        An FSDP1 shard's state at full precision instead (``export_full``): FSDP1's
        optimizer state dicts (``FSDP.optim_state_dict``, DCP's ``get_optimizer_state_dict``)
        all-gather every state tensor of a flat param element for element with the
        shard, and with ``use_orig_params=True`` all of them in one dtype, which neither
        block codes and scales nor an int16 remainder beside an fp32 master are. Loading
        converts back: the same codes, the same remainder."""
        if is_fsdp1_shard(p):
            return self.export_full(p, saved, _MOMENT_KEYS)
        return self._export(p, saved, _unmatched(p, saved))

    def _export(self, p: Tensor, saved: dict, unmatched: str | None) -> dict:
        """``unmatched``: ``_unmatched(p, saved)``, what of it no longer fits the param."""
        out = dict(saved)
        if isinstance(self.moments, QuantizedMoments) and unmatched is None:
            for ck in [k for k in saved if CODES_KEYS.get(k, (None, None))[1] == self.moments.bits]:
                key = CODES_KEYS[ck][0]
                out.pop(ck), out.pop(scales_key(key), None)
                self.moments.export(p, key, saved, out)
        if REMAINDER_KEY in saved and MASTER_KEY not in saved:
            remainder = saved[REMAINDER_KEY]
            lp = local_tensor(p)
            if unmatched is None:
                # The high half is the param in bf16: cast back where the model was cast
                # since (model.half(), model.float(), before the step that refuses or adopts it).
                high = lp if lp.dtype == torch.bfloat16 else lp.to(torch.bfloat16)
                out[MASTER_KEY] = like(p, torch.float32, torch.preserve_format, join_master(high, local_tensor(remainder)))
            # A state dict may travel by collective (a DTensor's full state dict is
            # gathered; a full one, even one saved by a single process, is scattered or
            # broadcast by set_optimizer_state_dict before any load hook runs), and neither
            # NCCL nor gloo has int16: the same values as int32, in every state dict alike.
            out[REMAINDER_KEY] = remainder.to(torch.int32)
        return out

    def exported_keys(self, state: dict) -> set[str]:
        """The keys ``export`` gives this param's ``state`` (not an FSDP1 shard's)."""
        keys = set(state)
        if REMAINDER_KEY in state:
            keys.add(MASTER_KEY)
        return keys

    def export_full(self, p: Tensor, state: dict, keys: tuple[str, ...]) -> dict:
        """This param's state as torch.optim keeps it: every moment at full precision
        (fp32; fp64 for fp64 params, complex for complex ones, as torch keeps them) under
        torch's keys, the master as ``master_param``."""
        dtype = p.dtype if p.dtype in (torch.float64, torch.complex64, torch.complex128) else torch.float32
        unmatched = _unmatched(p, state)
        if unmatched is not None and any(
                k in CODES_KEYS or k == REMAINDER_KEY or k in _MOMENT_KEYS and isinstance(v, Tensor) and v.dtype != dtype
                for k, v in state.items()):
            raise RuntimeError(
                f"tritonadam: the state of a param of shape {tuple(p.shape)} holds {unmatched}: the "
                "param was resized or reshaped under it (`p.data = ...`), so its state cannot be "
                "converted to torch.optim's; give the param its shape back, or clear its state "
                "(`opt.state.pop(param)`)")
        out = {k: v for k, v in self._export(p, state, unmatched).items()
               if not (k in CODES_KEYS or k in SCALES_KEYS or k == REMAINDER_KEY)}
        for key in keys:
            full = read_moment(p, key, state)
            if full is not None and not (isinstance(out.get(key), Tensor) and out[key].dtype == dtype):
                out[key] = like(p, dtype, torch.preserve_format, full)
        return out

    def tensors(self, state: dict, keys: tuple[str, ...]) -> tuple:
        """(data, scales or None) of each moment in ``keys`` order, and the master or None."""
        moments = tuple(self.moments.kernel_tensors(state, key) for key in keys)
        return moments, state[self.master_key] if self.master_key else None

    def bucket_key(self, param_dtype: torch.dtype, grad_dtype: torch.dtype, amsgrad: bool) -> BucketKey:
        """The launch this param's tensors join (dtypes of the real views for complex)."""
        return BucketKey(param_dtype, grad_dtype, self.moments.name, amsgrad, self.master, self.stochastic)


def _unmatched(p: Tensor, state: dict) -> str | None:
    """What of ``state`` no longer fits param ``p``'s shape (the param resized or reshaped
    under it with ``p.data = ...``, which its next step refuses), or None."""
    lp = local_tensor(p)
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        lv = local_tensor(value)
        if key in CODES_KEYS:
            shape, bits = _ENCODED_SHAPE.get(lv), CODES_KEYS[key][1]
            if shape is not None and shape != tuple(lp.shape) or \
                    lv.numel() not in (quantize.code_bytes(lp.numel(), bits), lp.numel()):
                return f"{key!r} encoded for another shape ({shape or lv.numel()})"
        elif key in (*_MOMENT_KEYS, MASTER_KEY, REMAINDER_KEY) and lv.shape != lp.shape:
            return f"{key!r} of shape {tuple(lv.shape)}"
    return None
