"""Adam, AdamW and Adamax as drop-in ``torch.optim`` optimizers backed by Triton kernels.

The classes keep torch.optim's contract (constructor arguments and validation,
``param_groups`` keys, state keys, ``state_dict``, hooks, LR schedulers, GradScaler)
and add mixed-precision options: fp16/bf16 params always keep fp32 state, and with
``master_weights=True`` an fp32 master copy as well. A step gathers and validates each
group's tensors (torch's ``_init_group``), creates missing state, and hands everything
to a :class:`~tritonadam.step_cache.StepCache`, which launches the kernels.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from .clip import ClipState, check_max_norm, grad_scaler_scale, norm_order, replicated
from .kernels.launch import interpreted
from .kernels.layout import MASTER_FP32, MASTER_REMAINDER
from .kernels.plan import rounding_key
from .precision import MASTER_KEY, REMAINDER_KEY, SEED_KEY, Precision, join_master, split_master
from .step_cache import Row, StepCache, group_hyper, local_tensor

__all__ = ["Adam", "AdamW", "Adamax", "AdaMax"]

_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Complex params are stepped as torch.optim does: elementwise on view_as_real(param).
_COMPLEX_DTYPES = (torch.complex64, torch.complex128)
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# The grad dtypes each param dtype steps with (README "Supported dtypes"): the param's
# own, or fp32 grads for fp16/bf16 params (fp32 grad accumulation), or a low-precision
# grad for fp32 params (autocast-style); the kernel widens to the compute dtype.
_GRAD_DTYPES = {
    torch.float32: (torch.float32, torch.float16, torch.bfloat16),
    torch.bfloat16: (torch.bfloat16, torch.float32),
    torch.float16: (torch.float16, torch.float32),
    torch.float64: (torch.float64,),
    torch.complex64: (torch.complex64,),
    torch.complex128: (torch.complex128,),
}
_WARPS = (1, 2, 4, 8, 16, 32)
# The update kernel indexes a block with int32 offsets in one program; Triton caps a
# block at 2**20 elements, and beyond 2**16 every GPU config spills.
_MAX_BLOCK = 1 << 16
_AUTOTUNE_MODES = (None, "off", "on", "cache-only")


def _is_dense(t: Tensor) -> bool:
    """True when the elements fill their memory span exactly once (any dim order)."""
    if t.is_contiguous() or t.numel() <= 1:
        return True
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Same memory order for every element (strides of size-1 dims do not matter)."""
    if a.numel() <= 1:
        return True
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


def _in_layout(value: Tensor, param: Tensor) -> bool:
    """Whether a (local) state tensor sits where the kernel steps it with ``param``: same
    device, same strides (a contiguous copy for non-dense params, which are staged)."""
    if value.device != param.device:
        return False
    return _same_layout(value, param) if _is_dense(param) else value.is_contiguous()


def _like(p: Tensor, dtype: torch.dtype, fmt, local_value: Tensor) -> Tensor:
    """A tensor like param ``p`` (a DTensor for a DTensor) holding ``local_value``."""
    out = torch.empty_like(p, dtype=dtype, memory_format=fmt)
    local_tensor(out).copy_(local_value)
    return out


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _span(t: Tensor) -> tuple[int, int]:
    """The bytes [lo, hi) a tensor's elements can touch (strides are never negative)."""
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    lo = t.data_ptr()
    return lo, lo + extent * t.element_size()


def _check_no_shared_memory(name: str, entries: list) -> None:
    """Raise if two tensors a step writes share memory: two rows of one launch would
    update it concurrently on a GPU (the interpreter, running programs one after
    another, would hide it). ``entries``: (param, its state dict) pairs.

    Distinct Parameter objects over one storage come from tying weights by value
    (``nn.Parameter(other.data)``) or from hand-made views; torch.optim steps them one
    after the other, each with its own state.
    """
    tensors, owners, labels = [], [], []
    for i, (p, state) in enumerate(entries):
        tensors.append(local_tensor(p))
        owners.append(i)
        labels.append("param")
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors.append(local_tensor(value))
                owners.append(i)
                labels.append(f"state[{key!r}]")
    if len(tensors) < 2:
        return
    count = len(tensors)
    lo = np.fromiter(map(Tensor.data_ptr, tensors), dtype=np.int64, count=count)
    hi = lo + (np.fromiter(map(Tensor.numel, tensors), dtype=np.int64, count=count)
               * np.fromiter(map(Tensor.element_size, tensors), dtype=np.int64, count=count))
    for j in np.flatnonzero(~np.fromiter(map(Tensor.is_contiguous, tensors), dtype=bool, count=count)):
        hi[j] = _span(tensors[j])[1]
    device = np.fromiter(map(Tensor.get_device, tensors), dtype=np.int64, count=count)
    for dev in np.unique(device):
        idx = np.flatnonzero((device == dev) & (hi > lo) & (lo != 0))
        idx = idx[np.argsort(lo[idx], kind="stable")]
        reach = np.maximum.accumulate(hi[idx])
        clash = np.flatnonzero(lo[idx[1:]] < reach[:-1])
        if clash.size == 0:
            continue
        later = idx[clash[0] + 1]
        earlier = idx[np.argmax(hi[idx[: clash[0] + 1]])]
        a, b = sorted((earlier, later), key=lambda k: owners[k])
        shape = [tuple(entries[owners[k]][0].shape) for k in (a, b)]
        raise ValueError(
            f"tritonadam.{name}: the {labels[a]} of a param of shape {shape[0]} and the "
            f"{labels[b]} of a param of shape {shape[1]} share memory on {tensors[a].device}; "
            "one launch steps every tensor at once, so shared memory would be updated "
            "concurrently. Tie weights by sharing one nn.Parameter object (e.g. "
            "`decoder.weight = encoder.weight`), not by wrapping the same data in two, and "
            "give each param its own state tensors"
        )


def _param_meta(t: Tensor) -> tuple:
    """What a general row's launch relies on about its param (checked every step)."""
    return t.data_ptr(), t.shape, t.stride(), t.dtype, t.device


class _TritonAdamBase(Optimizer):
    """Shared machinery: validation, lazy state, state_dict, the step."""

    _kind = "adam"
    _second_key = "exp_avg_sq"
    _step_supports_amp_scaling = True  # grad_scale / found_inf are handled in the kernel

    _EXTRAS = {
        "bias_correction": True,
        "master_weights": False,
        "state_dtype": None,
        "stochastic_rounding": False,
        "seed": None,
        "block_size": None,
        "num_warps": None,
        "autotune": None,
        "persistent": None,
        "max_grad_norm": None,
        "grad_norm_type": 2.0,
    }

    def _init_extras(self, bias_correction, master_weights, block_size, num_warps, autotune,
                     persistent, state_dtype=None, stochastic_rounding=False, seed=None,
                     max_grad_norm=None, grad_norm_type=2.0):
        if block_size is not None and (
            not isinstance(block_size, int) or isinstance(block_size, bool)
            or not 16 <= block_size <= _MAX_BLOCK or block_size & (block_size - 1)
        ):
            raise ValueError(
                f"Invalid block_size: {block_size} (a power of two from 16 to {_MAX_BLOCK}, or None)"
            )
        if num_warps is not None and num_warps not in _WARPS:
            raise ValueError(f"Invalid num_warps: {num_warps} (one of {_WARPS}, or None)")
        if autotune not in _AUTOTUNE_MODES:
            raise ValueError(f"Invalid autotune: {autotune!r} (one of {_AUTOTUNE_MODES})")
        if persistent not in (None, True, False):
            raise ValueError(f"Invalid persistent: {persistent!r} (True, False or None)")
        if not isinstance(bias_correction, bool):
            raise ValueError(f"Invalid bias_correction: {bias_correction!r} (True or False)")
        name = type(self).__name__
        precision = Precision.checked(master_weights, state_dtype, stochastic_rounding, name)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                                 or not 0 <= seed < 2**63):
            raise ValueError(f"Invalid seed: {seed!r} (an int in [0, 2**63), or None)")
        if max_grad_norm is not None:
            max_grad_norm = check_max_norm(max_grad_norm)
        grad_norm_type = norm_order(grad_norm_type)
        for group in self.param_groups:
            if group.get("differentiable") and (master_weights or state_dtype is not None
                                                or stochastic_rounding):
                raise RuntimeError(
                    f"tritonadam.{name}: differentiable=True steps with torch.optim's "
                    "implementation, which has no master_weights, state_dtype or "
                    "stochastic_rounding"
                )
            for p in group["params"]:
                precision.check_param(p, name)
        if any(group.get("differentiable") for group in self.param_groups):
            # torch.optim's implementation does not unscale: let GradScaler do it (and
            # skip steps on inf), as it does for torch.optim's own non-fused optimizers.
            self._step_supports_amp_scaling = False
        self.bias_correction = bias_correction
        self.master_weights = master_weights
        self.state_dtype = precision.state_dtype
        self.stochastic_rounding = stochastic_rounding
        # Reproducible from torch.manual_seed; saved in the state of every param that is
        # rounded stochastically, so a resumed run draws the same numbers.
        self.seed = seed if seed is not None else int(torch.randint(0, 2**62, ()))
        self.block_size = block_size
        self.num_warps = num_warps
        self.autotune = autotune
        self.persistent = persistent
        self.max_grad_norm = max_grad_norm
        self.grad_norm_type = grad_norm_type
        self._cache: StepCache | None = None
        self._clip: ClipState | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The cache holds raw pointers into this optimizer's tensors: never copy it (a
        # deepcopy would step the original's state).
        state = super().__getstate__()
        state.pop("_cache", None)
        state.pop("_clip", None)  # device buffers and references to this optimizer's grads
        state.update({k: getattr(self, k, v) for k, v in self._EXTRAS.items()})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict calls __setstate__ without our options: keep the
        # current ones then; unpickling a fresh object takes them from the pickle.
        extras = {k: state.pop(k, getattr(self, k, v)) for k, v in self._EXTRAS.items()}
        state.pop("_cache", None)
        state.pop("_clip", None)
        super().__setstate__(state)
        for k, v in extras.items():
            setattr(self, k, v)
        self._set_group_defaults()
        self._cache = None
        self._clip = getattr(self, "_clip", None)

    def _set_group_defaults(self) -> None:
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "master_weights"):  # not during torch's __init__: checked after it
            params = param_group["params"]
            params = [params] if isinstance(params, Tensor) else list(params)
            for p in params:
                if isinstance(p, Tensor):
                    self._precision.check_param(p, type(self).__name__)
        super().add_param_group(param_group)
        self._cache = None

    # ---- state ---------------------------------------------------------------------

    @property
    def _precision(self) -> Precision:
        return Precision(self.master_weights, self.state_dtype, self.stochastic_rounding)

    def _state_keys(self, group) -> tuple[str, ...]:
        """The moment tensors a param of ``group`` steps with."""
        keys = ("exp_avg", self._second_key)
        if group.get("amsgrad", False):
            keys += ("max_exp_avg_sq",)
        return keys

    def _check_state(self, p: Tensor, group, state: dict) -> bool:
        """Raise if ``state`` cannot be stepped with ``p``; True if it needs converting.

        A param whose shape, dtype or device no longer matches its state (``p.data = ...``
        after steps, a model moved without its optimizer) gets an error saying what to
        do. What the modes can convert is converted instead: a layout change alone (same
        shape, other strides: torch.optim steps elementwise by index, so the state is
        re-laid out to the param's strides and the kernel pairs what torch pairs), moments
        in fp32 or bf16, a master copy in either form.
        """
        name = type(self).__name__
        self._precision.check_param(p, name)
        if not state:
            return True
        missing = [k for k in ("step", "exp_avg", self._second_key) if k not in state]
        if missing:
            raise RuntimeError(
                f"tritonadam.{name}: the state of a param of shape {tuple(p.shape)} has "
                f"{sorted(state)} but lacks {missing}; load a complete state dict, or clear "
                "this param's state (`opt.state.pop(param)`) to restart it"
            )
        moment = self._precision.moment_dtype(p)
        moments = (moment,) if moment in (torch.float64, *_COMPLEX_DTYPES) else (torch.float32, torch.bfloat16)
        wanted = {k: moments for k in self._state_keys(group)}
        wanted.update({MASTER_KEY: (torch.float32,), REMAINDER_KEY: (torch.int16,)})
        lp = local_tensor(p)
        convert = False
        for key, dtypes in wanted.items():
            value = state.get(key)
            if value is None:
                convert = True
                continue
            if not isinstance(value, Tensor):
                raise RuntimeError(f"tritonadam.{name}: state[{key!r}] is a {type(value).__name__}, "
                                   "not a tensor")
            lv = local_tensor(value)
            problem = None
            if value.shape != p.shape or lv.shape != lp.shape:
                problem = f"shape {tuple(value.shape)} for a param of shape {tuple(p.shape)}"
            elif value.dtype not in dtypes:
                problem = f"dtype {value.dtype} where a {p.dtype} param needs {dtypes[0]}"
            elif lv.device != lp.device:
                problem = f"device {lv.device} for a param on {lp.device}"
            if problem is not None:
                raise RuntimeError(
                    f"tritonadam.{name}: state[{key!r}] has {problem}: the param changed after "
                    "its optimizer state was created. Load a state dict that matches the "
                    "params (`opt.load_state_dict(...)` also moves state to the params' "
                    "device), or clear this param's state (`opt.state.pop(param)`) to restart it"
                )
            convert |= value.dtype != dtypes[0] or not _in_layout(lv, lp)
        return convert or not self._state_in_mode(p, group, state)

    def _state_in_mode(self, p: Tensor, group, state: dict) -> bool:
        """Whether ``state`` holds exactly what this optimizer's modes step ``p`` with."""
        master = self._precision.master(p)
        step = state.get("step")
        return (
            isinstance(step, Tensor) and step.dtype == torch.float32 and step.dim() == 0
            and step.device == local_tensor(p).device
            and (MASTER_KEY in state) == (master == MASTER_FP32)
            and (REMAINDER_KEY in state) == (master == MASTER_REMAINDER)
            and (SEED_KEY in state) == self._precision.rounds_stochastically(p)
            and all(k in state for k in self._state_keys(group))
        )

    def _init_state(self, p: Tensor, group, convert: bool) -> dict:
        """Create missing state and convert what the modes store differently."""
        state = self.state[p]
        if not convert:
            return state
        lp = local_tensor(p)
        precision = self._precision
        step = state.get("step", 0.0)
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=lp.device)
        # Dense params: state with the param's strides. Non-dense ones are stepped in a
        # contiguous staging copy, and so is their state.
        fmt = torch.preserve_format if _is_dense(lp) else torch.contiguous_format

        def fit(value, dtype):
            if value.dtype == dtype and _in_layout(local_tensor(value), lp):
                return value
            return torch.empty_like(p, dtype=dtype, memory_format=fmt).copy_(value)

        moment = precision.moment_dtype(p)
        for key in self._state_keys(group):
            value = state.get(key)
            state[key] = torch.zeros_like(p, dtype=moment, memory_format=fmt) if value is None else fit(value, moment)
        master = precision.master(p)
        if master == MASTER_FP32:
            if MASTER_KEY not in state:
                if REMAINDER_KEY in state:
                    joined = join_master(local_tensor(p), local_tensor(state[REMAINDER_KEY]))
                    state[MASTER_KEY] = _like(p, torch.float32, fmt, joined)
                else:
                    state[MASTER_KEY] = p.detach().to(torch.float32, memory_format=fmt, copy=True)
            state[MASTER_KEY] = fit(state[MASTER_KEY], torch.float32)
            state.pop(REMAINDER_KEY, None)
        elif master == MASTER_REMAINDER:
            if MASTER_KEY in state:
                # The exact pair for this master: the param becomes its high half.
                high, low = split_master(local_tensor(state.pop(MASTER_KEY)))
                local_tensor(p).copy_(high)
                state[REMAINDER_KEY] = _like(p, torch.int16, fmt, low)
            elif REMAINDER_KEY not in state:
                state[REMAINDER_KEY] = torch.zeros_like(p, dtype=torch.int16, memory_format=fmt)
            state[REMAINDER_KEY] = fit(state[REMAINDER_KEY], torch.int16)
        else:
            state.pop(MASTER_KEY, None)
            state.pop(REMAINDER_KEY, None)
        if precision.rounds_stochastically(p):
            state[SEED_KEY] = torch.tensor(self.seed, dtype=torch.int64)
        else:
            state.pop(SEED_KEY, None)
        return state

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict; a ``master_weights="remainder"`` master is exported
        as the fp32 ``master_param`` it stands for, so the checkpoint loads into either
        master mode (and torch.optim keeps it)."""
        sd = super().state_dict()
        if self.master_weights != "remainder":
            return sd
        params = [p for g in self.param_groups for p in g["params"]]
        state = {}
        for index, value in sd["state"].items():
            if REMAINDER_KEY in value and index < len(params):
                p = params[index]
                value = {k: v for k, v in value.items() if k != REMAINDER_KEY}
                joined = join_master(local_tensor(p), local_tensor(self.state[p][REMAINDER_KEY]))
                value[MASTER_KEY] = _like(p, torch.float32, torch.preserve_format, joined)
            state[index] = value
        return {"state": state, "param_groups": sd["param_groups"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from this class (any precision mode) or from torch.optim's
        Adam/AdamW/Adamax.

        The whole incoming state is checked (keys, shapes, dtypes) before anything
        changes: a failed load leaves the optimizer as it was. torch's base class casts
        floating state to the param dtype; the state is restored at full precision
        afterwards and converted to this optimizer's modes (moment dtype, master form;
        loading an fp32 master into ``master_weights="remainder"`` sets each bf16 param to
        its master's high half, so the pair is exact), and step counts become 0-dim
        float32 tensors on the param's device.
        """
        # Check and read the state dict torch actually loads: the one user pre-hooks
        # returned. A hook registered last, just for this call, sees it.
        seen = {}

        def capture(optimizer, final):
            self._check_loadable(final)
            seen["state_dict"] = final

        handle = self.register_load_state_dict_pre_hook(capture)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
        state_dict = seen.get("state_dict", state_dict)
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        pairs = [
            (saved_id, p, group)
            for group, saved in zip(self.param_groups, saved_groups)
            for saved_id, p in zip(saved["params"], group["params"])
        ]
        for saved_id, p, group in pairs:
            if saved_id not in saved_state or p not in self.state:
                continue
            src, dst = saved_state[saved_id], self.state[p]
            for key, value in src.items():
                if key == "step":
                    step = float(value.item() if isinstance(value, Tensor) else value)
                    dst[key] = torch.tensor(step, dtype=torch.float32, device=local_tensor(p).device)
                elif key == SEED_KEY:
                    self.seed = int(value)
                elif isinstance(value, Tensor):
                    # Full precision, then converted to this optimizer's form below.
                    dst[key] = value.detach().clone()
        with torch.no_grad():  # converting a master can set the param to its high half
            for saved_id, p, group in pairs:
                if p in self.state and self.state[p]:
                    self._init_state(p, group, True)
        self._cache = None

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        """Every param state in ``state_dict`` is one this optimizer can step, or raise."""
        name = type(self).__name__
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            return  # torch's own check raises with its message
        saved_state = state_dict["state"]
        for group, saved_group in zip(self.param_groups, saved_groups):
            if len(group["params"]) != len(saved_group["params"]):
                return  # torch's own check raises with its message
            amsgrad = saved_group.get("amsgrad", group.get("amsgrad", False))
            required = ["step", "exp_avg", self._second_key]
            if amsgrad and self._kind == "adam":
                required.append("max_exp_avg_sq")
            for saved_id, p in zip(saved_group["params"], group["params"]):
                state = saved_state.get(saved_id)
                if not state:
                    continue
                missing = [k for k in required if k not in state]
                if missing:
                    other = ("exp_inf" in state and "Adamax") or ("exp_avg_sq" in state and "Adam/AdamW")
                    hint = f" (it looks like a state dict of {other})" if other and other != name else ""
                    raise ValueError(
                        f"tritonadam.{name}.load_state_dict: the state of param {saved_id} lacks "
                        f"{missing}{hint}; a {name} state has {required}"
                    )
                step = state["step"]
                if isinstance(step, Tensor) and step.numel() != 1:
                    raise ValueError(
                        f"tritonadam.{name}.load_state_dict: state 'step' of param {saved_id} has "
                        f"{step.numel()} elements, expected one"
                    )
                for key, value in state.items():
                    if key in ("step", SEED_KEY) or not isinstance(value, Tensor):
                        continue
                    if value.shape != p.shape:
                        raise ValueError(
                            f"tritonadam.{name}.load_state_dict: state {key!r} of param {saved_id} "
                            f"has shape {tuple(value.shape)}, but the param has shape "
                            f"{tuple(p.shape)}"
                        )
                    if key != REMAINDER_KEY and not (value.is_floating_point() or value.is_complex()):
                        raise ValueError(
                            f"tritonadam.{name}.load_state_dict: state {key!r} of param {saved_id} "
                            f"has dtype {value.dtype}, expected a floating point tensor"
                        )

    # ---- step ----------------------------------------------------------------------

    def _validate(self, p: Tensor, g: Tensor, fused: bool | None = None) -> Tensor:
        """The grad to step with, in the param's layout (a dense copy if needed), or raise."""
        name = type(self).__name__
        if g.is_sparse or g.layout != torch.strided:
            raise RuntimeError(
                f"{name} does not support sparse gradients, please consider SparseAdam instead"
            )
        if torch.is_complex(p) or torch.is_complex(g):
            if p.dtype not in _COMPLEX_DTYPES or g.dtype != p.dtype:
                raise RuntimeError(
                    f"tritonadam.{name} steps complex64 and complex128 params with grads of "
                    f"the same dtype, got param {p.dtype} with grad {g.dtype}"
                )
        elif p.dtype not in _PARAM_DTYPES or g.dtype not in _PARAM_DTYPES:
            raise RuntimeError(
                f"tritonadam.{name} steps float32, float16, bfloat16 and float64 params and "
                f"grads, got param {p.dtype} with grad {g.dtype}"
            )
        elif g.dtype not in _GRAD_DTYPES[p.dtype]:
            allowed = ", ".join(str(d).replace("torch.", "") for d in _GRAD_DTYPES[p.dtype])
            raise RuntimeError(
                f"tritonadam.{name}: a {str(p.dtype).replace('torch.', '')} param steps with "
                f"{allowed} grads, got {str(g.dtype).replace('torch.', '')}; cast the grad "
                "(or the param) so the pair is one of README's supported dtypes"
            )
        lp, lg = local_tensor(p), local_tensor(g)
        if lg.device != lp.device:
            raise RuntimeError(
                f"tritonadam.{name}: grad on {lg.device} but param on {lp.device}: "
                "params and their grads must be on the same device"
            )
        if lg.shape != lp.shape or g.shape != p.shape:
            raise RuntimeError(
                f"tritonadam.{name}: grad of shape {tuple(g.shape)} for param of shape "
                f"{tuple(p.shape)}"
            )
        supported = "cpu" if interpreted() else "cuda"  # torch calls ROCm devices cuda too
        if lp.device.type != supported:
            if interpreted():
                msg = (f"tritonadam.{name}: TRITON_INTERPRET=1 runs kernels on the CPU; params "
                       f"on {lp.device} need it unset")
            else:
                msg = (f"tritonadam.{name} runs Triton kernels, which need a CUDA or ROCm device "
                       f"(got a param on {lp.device}): move the model to the GPU, or for a slow "
                       "CPU check set TRITON_INTERPRET=1 before importing tritonadam")
            if fused:
                # torch.optim's wording for fused=True, which its test-suite matches
                msg = ("`fused=True` requires all the params to be floating point Tensors of "
                       f"supported devices: ['{supported}'] but {p.dtype} and {lp.device.type}. "
                       + msg)
            raise RuntimeError(msg)
        for what, t in (("param", lp), ("grad", lg)):
            if t.numel() and t.data_ptr() == 0:
                raise RuntimeError(
                    f"tritonadam.{name}: a {what} of shape {tuple(t.shape)} has no storage (its "
                    "memory was freed, e.g. by `untyped_storage().resize_(0)`); step only "
                    "tensors whose storage is allocated"
                )
        if not _is_dense(lp):
            # Stepped through a contiguous staging copy; its state is contiguous too.
            return lg if lg.is_contiguous() else lg.contiguous()
        if not _same_layout(lg, lp):
            return torch.empty_like(lp, dtype=lg.dtype).copy_(lg)  # never write into .grad
        return lg

    def _torch_inputs(self, group):
        """Params and grads of a differentiable=True group, validated (nothing written)."""
        name = type(self).__name__
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{name} does not support sparse gradients, please consider SparseAdam instead"
                )
            if p.dtype in _LOW_PRECISION:
                raise RuntimeError(
                    f"tritonadam.{name}: differentiable=True steps with torch.optim's "
                    f"implementation, which needs float32/float64 params, got {p.dtype}"
                )
            params.append(p)
            grads.append(p.grad)
        return params, grads

    def _torch_step(self, group, params, grads) -> None:
        """differentiable=True: torch.optim's single-tensor step on this optimizer's state,
        with autograd on, so the update can be differentiated through (as in torch.optim)."""
        if not params:
            return
        states = [self._init_state(p, group, self._check_state(p, group, self.state.get(p, {})))
                  for p in params]
        beta1, beta2 = group["betas"]
        common = dict(
            foreach=False, maximize=group["maximize"], differentiable=True, capturable=False,
            has_complex=any(torch.is_complex(p) for p in params),
            eps=group["eps"], beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"],
        )
        steps = [s["step"] for s in states]
        exp_avgs = [s["exp_avg"] for s in states]
        with torch.enable_grad():
            if self._kind == "adamax":
                from torch.optim.adamax import adamax as torch_adamax

                torch_adamax(params, grads, exp_avgs, [s["exp_inf"] for s in states], steps, **common)
            else:
                from torch.optim.adam import adam as torch_adam

                amsgrad = group.get("amsgrad", False)
                torch_adam(
                    params, grads, exp_avgs, [s["exp_avg_sq"] for s in states],
                    [s["max_exp_avg_sq"] for s in states] if amsgrad else [], steps,
                    fused=False, amsgrad=amsgrad,
                    decoupled_weight_decay=group.get("decoupled_weight_decay", False), **common,
                )

    def _init_group(self, index: int, group, seen: dict, pending: list, inactive: list) -> None:
        """torch's per-group gather: validate each param with a grad and its state.

        Appends (param, grad to step with, group index, keys to re-lay out) to ``pending``
        and params without grads to ``inactive``; writes nothing.
        """
        for p in group["params"]:
            if seen.setdefault(id(p), index) != index:
                # torch's add_param_group error, for params added to groups by hand
                raise ValueError("some parameters appear in more than one parameter group")
            if p.grad is None:
                inactive.append(p)
                continue
            grad = self._validate(p, p.grad, group.get("fused"))
            convert = self._check_state(p, group, self.state.get(p, {}))
            pending.append((p, grad, index, convert))

    def _row(self, p: Tensor, grad: Tensor, index: int, group, key: int) -> Row:
        state = self.state[p]
        lp = local_tensor(p)
        staging = None if _is_dense(lp) else torch.empty(lp.shape, dtype=lp.dtype, device=lp.device)
        general = staging is not None or not lp.is_contiguous() or grad is not local_tensor(p.grad)
        precision = self._precision
        master = precision.master(p)
        return Row(
            param=p, grad=grad, group=index, param_meta=_param_meta(lp),
            exp_avg=state["exp_avg"], second=state[self._second_key], step=state["step"],
            max_second=state.get("max_exp_avg_sq") if group.get("amsgrad", False) else None,
            master=state.get(REMAINDER_KEY if master == MASTER_REMAINDER else MASTER_KEY),
            master_kind=master, stochastic_rounding=precision.rounds_stochastically(p),
            key=key, general=general or not grad.is_contiguous(), staging=staging,
        )

    def _build(self, groups) -> StepCache:
        """Validate every group, then create missing state and a fresh step cache."""
        seen: dict[int, int] = {}
        pending: list = []
        inactive: list = []
        for index, group in groups:
            self._init_group(index, group, seen, pending, inactive)
        if len({id(p) for p, *_ in pending}) != len(pending):
            raise ValueError(
                f"tritonadam.{type(self).__name__}: a parameter appears more than once in a "
                "param group; list each parameter once"
            )
        _check_no_shared_memory(type(self).__name__, [(p, self.state.get(p, {})) for p, *_ in pending])
        # A tensor's random stream: its index in the optimizer (as in state_dict), and on
        # a sharded run its rank, so shards of one param draw different numbers.
        index_of = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        rank = _rank() << 24
        rows = []
        for p, grad, index, convert in pending:
            group = self.param_groups[index]
            self._init_state(p, group, convert)
            stream = index_of[id(p)] + (rank if local_tensor(p) is not p else 0)
            rows.append(self._row(p, grad, index, group, rounding_key(self.seed, stream)))
        lists = [g["params"] for g in self.param_groups]
        return StepCache(self._kind, rows, lists, inactive, self.state, self._layout())

    def _layout(self) -> tuple:
        """The options that decide which tensors a param steps with (compared every step)."""
        return (self.master_weights, self.state_dtype, self.stochastic_rounding), tuple(
            (bool(g.get("amsgrad", False)), bool(g.get("differentiable", False)))
            for g in self.param_groups
        )

    def _general_grads(self, cache: StepCache) -> list[Tensor] | None:
        """This step's grads for the rows checked one by one, or None to rebuild."""
        grads = []
        for row in cache.general_rows:
            g = row.param.grad
            if g is None or _param_meta(local_tensor(row.param)) != row.param_meta:
                return None
            grad = self._validate(row.param, g, self.param_groups[row.group].get("fused"))
            if grad.dtype != row.grad.dtype:
                return None
            grads.append(grad)
        return grads

    def _ready(self) -> tuple[StepCache, list[int], list[Tensor]]:
        """The step cache for the current grads, and their pointers and general grads: the
        cache's per-step check, or full validation and a new cache when it no longer
        applies (which raises, writing nothing, on a bad grad)."""
        cache = self._cache
        ptrs = general = None
        if cache is not None:
            ptrs = cache.check(self.param_groups, self.state, self._layout())
            if ptrs is not None:
                general = self._general_grads(cache)
        if ptrs is None or general is None:
            self._cache = None
            kernel_groups = [(i, g) for i, g in enumerate(self.param_groups) if not g.get("differentiable")]
            cache = self._build(kernel_groups)
            self._cache = cache
            ptrs, general = cache.fast_grad_ptrs(), [r.grad for r in cache.general_rows]
        return cache, ptrs, general

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step.

        With ``max_grad_norm`` set, the step first clips as ``clip_grad_norm_`` does; a
        coefficient left by ``clip_grad_norm_`` for these grads is applied too.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        check = getattr(self, "_accelerator_graph_capture_health_check", None) or getattr(
            self, "_cuda_graph_capture_health_check", None
        )
        if check is not None:
            check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Check everything before writing anything, so a bad value or grad anywhere leaves
        # every param and state as it was: group values, a pending clip, then the tensors
        # (through the cache's per-step check, or full validation).
        hypers = [group_hyper(g, self._kind, self.bias_correction) for g in self.param_groups]
        torch_work = [(g, self._torch_inputs(g)) for g in self.param_groups if g.get("differentiable")]
        grad_scale = getattr(self, "grad_scale", None)
        cache, ptrs, general = self._ready()
        self._check_pending_clip(cache, grad_scale)
        clip = self._clip
        if self.max_grad_norm is not None and not cache.empty:
            self._check_clip_supported(self.grad_norm_type, complex_grads=cache.has_complex)
            self._clip_grads(cache, ptrs, general, self.max_grad_norm, self.grad_norm_type,
                             grad_scale=grad_scale, check_finite=False, auto=True)
            clip = self._clip

        for group, inputs in torch_work:
            self._torch_step(group, *inputs)
        pending = clip is not None and clip.pending
        if pending:
            clip.clear()  # consumed by this step, or by nothing when there is nothing to step
        if cache.empty:
            return loss
        cache.launch(
            ptrs, general, self.param_groups, hypers,
            block_size=self.block_size, num_warps=self.num_warps, autotune_mode=self.autotune,
            persistent=self.persistent, grad_scale=grad_scale,
            found_inf=getattr(self, "found_inf", None), clip=clip.buffer if pending else None,
        )
        return loss

    # ---- gradient clipping --------------------------------------------------------------

    @torch.compiler.disable
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        foreach: bool | None = None, *, scaler=None) -> Tensor:
        r"""Clip the gradient norm of this optimizer's params, fused into the next step.

        Call it where you would call :func:`torch.nn.utils.clip_grad_norm_` (after the
        backward, before :meth:`step`), with the same arguments. The norm is taken over
        the grads of every param of this optimizer that has one, as if they were
        concatenated into one vector, and returned as a device tensor (for DTensor grads,
        a replicated DTensor) with no host sync. Unlike torch's function this does *not*
        write ``.grad``: the coefficient :math:`\min(1, \mathrm{max\_norm} / (\mathrm{norm} +
        10^{-6}))` waits in device memory and the next :meth:`step` multiplies the grads it
        reads by it. ``.grad`` keeps the unclipped values. For torch's in-place behaviour
        (to inspect clipped grads), call torch's function instead, which this optimizer
        steps like any other grads:
        ``torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], max_norm)``.

        The coefficient belongs to the grads it measured. ``zero_grad()``, or grads
        replaced before the step (a new backward after ``set_to_none``), drop it, as the
        grads torch's in-place clip scaled would be gone. A second call before the step
        measures the grads as already clipped by the first and compounds, as a second
        in-place clip would. Changing the grads in place after the call is not seen.

        GradScaler: the norm must be of unscaled grads. Either call
        ``scaler.unscale_(opt)`` first (torch's recipe; it rewrites the grads), or pass
        ``scaler=scaler`` here: the scale is folded into the norm and the step unscales
        in its kernel, so the grads are never rewritten. A clip of scaled grads without
        either makes the step raise. Inf/NaN grads make the norm non-finite; GradScaler's
        ``found_inf`` then skips the whole step on the device as usual.

        Args:
            max_norm (float): max norm of the gradients (``inf``: measure only).
            norm_type (float): order of the norm: any ``p > 0``, or ``inf``. The norm is
                computed in fp32 (fp64 when any grad is fp64) from grads of any dtype.
            error_if_nonfinite (bool): raise if the total norm is NaN or inf, as torch
                does (the check syncs with the device); the coefficient is then unchanged.
            foreach: accepted for torch's signature (the norm is always one fused pass).
            scaler (torch.amp.GradScaler, optional): the scaler whose scale the grads
                carry (ignored when disabled, or after ``scaler.unscale_(opt)``).

        Returns:
            Total norm of the grads (viewed as a single vector), of the unscaled grads
            when ``scaler`` is given.
        """
        max_norm = check_max_norm(max_norm)
        p = norm_order(norm_type)
        if foreach not in (None, True, False):
            raise ValueError(f"foreach must be None, True or False, got {foreach!r}")
        grad_scale = grad_scaler_scale(scaler, self)
        self._check_clip_supported(p, complex_grads=p != 2.0 and any(
            q.is_complex() for g in self.param_groups for q in g["params"] if q.grad is not None))
        cache, ptrs, general = self._ready()
        if cache.empty:
            return torch.tensor(0.0)  # torch's value for no grads
        norm = self._clip_grads(cache, ptrs, general, max_norm, p, grad_scale=grad_scale,
                                check_finite=bool(error_if_nonfinite), auto=False)
        return replicated(norm, cache.norm_mesh)

    @property
    def last_grad_norm(self) -> Tensor | None:
        """The total grad norm of the latest clip (``clip_grad_norm_`` or ``max_grad_norm``)
        as ``clip_grad_norm_`` returns it, or None before any. With ``max_grad_norm`` it is
        one fixed tensor that each step overwrites (CUDA-graph safe): ``.item()`` or
        ``.clone()`` it to keep a value."""
        clip = self._clip
        if clip is None or clip.last_norm is None:
            return None
        return replicated(clip.last_norm, clip.mesh)

    @torch._disable_dynamo
    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; also drops a clip coefficient waiting for these grads."""
        super().zero_grad(set_to_none)
        if getattr(self, "_clip", None) is not None:
            self._clip.clear()  # the grads a clip measured are gone

    def _check_pending_clip(self, cache: StepCache, grad_scale) -> None:
        """Drop a pending coefficient whose grads are gone; refuse one of scaled grads."""
        clip = self._clip
        if clip is None or not clip.pending:
            return
        if not clip.holds(cache.params):
            clip.clear()
            return
        if grad_scale is not None and not clip.scaled:
            raise RuntimeError(
                f"tritonadam.{type(self).__name__}: clip_grad_norm_ measured grads that "
                "GradScaler still scales (this step got its scale), so it clipped by the norm "
                "of scaled grads. Call scaler.unscale_(opt) before clip_grad_norm_, pass "
                "clip_grad_norm_(..., scaler=scaler), or construct the optimizer with "
                "max_grad_norm=... and let step() clip"
            )

    def _check_clip_supported(self, p: float, *, complex_grads: bool) -> None:
        """Refuse what the fused clip does not cover."""
        if any(g.get("differentiable") and any(q.grad is not None for q in g["params"])
               for g in self.param_groups):
            raise NotImplementedError(
                f"tritonadam.{type(self).__name__}: fused clipping does not cover "
                "differentiable=True groups (torch.optim steps them); use "
                "torch.nn.utils.clip_grad_norm_"
            )
        if p != 2.0 and complex_grads:
            raise ValueError(
                f"tritonadam.{type(self).__name__}: complex grads are clipped by their 2-norm "
                f"only (got norm_type={p}); use torch.nn.utils.clip_grad_norm_"
            )

    def _clip_grads(self, cache: StepCache, ptrs, general, max_norm: float, p: float, *,
                    grad_scale, check_finite: bool, auto: bool) -> Tensor:
        """Launch the norm of the grads ``cache`` will step and leave the coefficient;
        returns the norm's local tensor (``auto``: the fixed one of the step path)."""
        if grad_scale is not None and not (grad_scale.numel() == 1 and grad_scale.is_floating_point()):
            raise ValueError("the GradScaler scale must be a 1-element floating point tensor")
        device = cache.norm_device
        clip = self._clip
        if clip is None or clip.device != device:
            clip = ClipState(device)
        params = cache.params
        compound = clip.holds(params)
        out = (clip.auto_out(cache.norm_dtype) if auto
               else torch.empty((), dtype=cache.norm_dtype, device=device))
        mesh = cache.norm_mesh
        clip.set_args(max_norm, p)
        cache.grad_norm(ptrs, general, clip.buffer, out, norm_type=p, grad_scale=grad_scale,
                        compound=compound, check_finite=check_finite)
        self._clip = clip
        if check_finite and not torch.isfinite(out).item():
            raise RuntimeError(
                f"The total norm of order {p} for gradients from `parameters` is non-finite, so "
                "it cannot be clipped. To disable this error and scale the gradients by the "
                "non-finite norm anyway, set `error_if_nonfinite=False`"
            )
        if auto:
            clip.pending = True  # this very step consumes it: no need to remember the grads
        else:
            clip.set_pending(params, scaled=grad_scale is not None and (not compound or clip.scaled))
        clip.last_norm, clip.mesh = out, mesh
        return out


def _check_hyper(lr, betas, eps, weight_decay) -> None:
    """torch.optim's checks, in its order and with its messages."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    for i in (0, 1):
        if not 0.0 <= betas[i] < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class Adam(_TritonAdamBase):
    r"""Adam (and, with ``decoupled_weight_decay=True``, AdamW) with Triton multi-tensor kernels.

    A drop-in replacement for :class:`torch.optim.Adam`: same arguments, defaults,
    ``param_groups`` keys and state keys (``step``, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``), so state dicts move freely between the two.

    .. math::
       \begin{aligned}
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                    \\
            &\hspace{5mm} g_t \leftarrow \nabla_{\theta} f_t (\theta_{t-1})
                \text{ (negated if maximize)}                                               \\
            &\hspace{5mm}\textbf{if} \: \lambda \neq 0: \textbf{if} \text{ decoupled: }
                \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda)
                \textbf{ else } g_t \leftarrow g_t + \lambda\theta_{t-1}                   \\
            &\hspace{5mm} m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t                \\
            &\hspace{5mm} v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g^2_t                \\
            &\hspace{5mm} \widehat{m_t} \leftarrow m_t/(1-\beta_1^t), \;
                \widehat{v_t} \leftarrow v_t/(1-\beta_2^t)
                \text{ (or } \max(\widehat{v_t}^{max}, \widehat{v_t}) \text{ with amsgrad)}  \\
            &\hspace{5mm} \theta_t \leftarrow \theta_{t-1} - \gamma \widehat{m_t}/
                \big(\sqrt{\widehat{v_t}} + \epsilon \big)                                  \\
            &\textbf{return} \: \theta_t
       \end{aligned}

    Every tensor of a param group is updated by one kernel launch per (device, param
    dtype, grad dtype) combination; the math runs in fp32 (fp64 for fp64 params).

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, foreach, maximize, capturable,
            differentiable, fused, decoupled_weight_decay: as in :class:`torch.optim.Adam`.
            ``foreach`` and ``fused`` are accepted and stored for compatibility (every
            step is fused here); ``differentiable=True`` groups run torch.optim's own
            implementation so autograd can go through the step. ``lr`` and
            ``betas`` may be tensors; step counts always live on the params' device, so
            ``capturable=True`` steps can be captured in CUDA graphs.
        bias_correction (bool): apply Adam's bias correction (default True); False gives
            the uncorrected update.
        master_weights (bool or "remainder"): True: for fp16/bf16 params keep an fp32
            copy in ``state["master_param"]``, step it, and write the param as its
            rounded copy (bf16: to nearest, ties away from zero). ``"remainder"`` (bf16
            params): the same fp32 master, bit for bit, kept as the param plus its low 16
            bits in ``state["master_param_remainder"]`` (2 bytes instead of 4; exported
            as ``master_param`` by ``state_dict()``). False (default): fp16/bf16 params
            are rounded to nearest even after each step (or stochastically).
        state_dtype (torch.dtype, optional): ``torch.bfloat16`` stores ``exp_avg``,
            ``exp_avg_sq`` (and ``max_exp_avg_sq``) in bf16; the math stays fp32.
            Low-precision second moments are where quality is lost first.
        stochastic_rounding (bool): round values stored in 16 bits without a master
            copy (fp16/bf16 params, bf16 state) stochastically instead of to nearest:
            unbiased, so updates smaller than half a unit in the last place are not lost
            on average. Counter-based random numbers: reproducible, graph-safe.
        seed (int, optional): of the stochastic rounding (default: drawn from torch's
            global generator, so ``torch.manual_seed`` fixes it); saved in the state dict.
        block_size (int, optional): elements per Triton program; with ``num_warps`` fixes
            the launch config instead of the autotuned one.
        num_warps (int, optional): warps per Triton program.
        persistent (bool, optional): True: a grid of a few programs per SM looping over the
            blocks; False: one program per block; None (default): the autotuner's choice
            (one program per block when ``block_size`` and ``num_warps`` are fixed).
        autotune (str, optional): ``"on"``, ``"off"`` or ``"cache-only"``; default from
            ``TRITONADAM_AUTOTUNE`` (tuning on first use on GPUs).
        max_grad_norm (float, optional): clip the grads' total norm to this in every
            :meth:`step`, as :meth:`clip_grad_norm_` does (for trainers that only call
            ``step()``); GradScaler's scale is folded in. The norm is in
            :attr:`last_grad_norm`. Default None: no clipping.
        grad_norm_type (float): the norm's order for ``max_grad_norm`` (default 2.0).
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        bias_correction: bool = True,
        master_weights: bool | str = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        seed: int | None = None,
        block_size: int | None = None,
        num_warps: int | None = None,
        autotune: str | None = None,
        persistent: bool | None = None,
        max_grad_norm: float | None = None,
        grad_norm_type: float = 2.0,
    ) -> None:
        if isinstance(lr, Tensor) and foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        _check_hyper(lr, betas, eps, weight_decay)
        if not (
            (isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))
        ):
            raise ValueError("betas must be either both floats or both Tensors")
        for i in (0, 1):
            if isinstance(betas[i], Tensor):
                if not capturable and foreach:
                    raise ValueError(
                        f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True"
                    )
                if betas[i].numel() != 1:
                    raise ValueError(f"Tensor betas[{i}] must be 1-element")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if fused and differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        # torch keeps 1-element tensor betas as they are but flattens them to 0-dim.
        betas = tuple(b.reshape(()) if isinstance(b, Tensor) else b for b in betas)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults)
        self._init_extras(bias_correction, master_weights, block_size, num_warps, autotune,
                          persistent, state_dtype, stochastic_rounding, seed, max_grad_norm,
                          grad_norm_type)

    def _set_group_defaults(self) -> None:
        super()._set_group_defaults()
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("fused", None)


class AdamW(Adam):
    r"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter), Triton kernels.

    A drop-in replacement for :class:`torch.optim.AdamW` (default ``weight_decay=1e-2``);
    arguments and mixed-precision options as in :class:`tritonadam.Adam`.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        bias_correction: bool = True,
        master_weights: bool | str = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        seed: int | None = None,
        block_size: int | None = None,
        num_warps: int | None = None,
        autotune: str | None = None,
        persistent: bool | None = None,
        max_grad_norm: float | None = None,
        grad_norm_type: float = 2.0,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad,
            foreach=foreach, maximize=maximize, capturable=capturable,
            differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            bias_correction=bias_correction, master_weights=master_weights,
            state_dtype=state_dtype, stochastic_rounding=stochastic_rounding, seed=seed,
            block_size=block_size, num_warps=num_warps, autotune=autotune,
            persistent=persistent, max_grad_norm=max_grad_norm, grad_norm_type=grad_norm_type,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class Adamax(_TritonAdamBase):
    r"""AdaMax (Adam with the infinity norm, Kingma & Ba section 7.1) with Triton kernels.

    A drop-in replacement for :class:`torch.optim.Adamax`: same arguments, defaults,
    ``param_groups`` keys and state keys (``step``, ``exp_avg``, ``exp_inf``).

    .. math::
       \begin{aligned}
            &\hspace{5mm} g_t \leftarrow \nabla_{\theta} f_t (\theta_{t-1})
                \text{ (negated if maximize)} + \lambda\theta_{t-1}                        \\
            &\hspace{5mm} m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t                \\
            &\hspace{5mm} u_t \leftarrow \max(\beta_2 u_{t-1}, |g_{t}|+\epsilon)            \\
            &\hspace{5mm} \theta_t \leftarrow \theta_{t-1} - \frac{\gamma m_t}{(1-\beta^t_1) u_t}
       \end{aligned}

    Args:
        params, lr, betas, eps, weight_decay, foreach, maximize, differentiable,
            capturable: as in :class:`torch.optim.Adamax`.
        bias_correction, master_weights, state_dtype, stochastic_rounding, seed,
            block_size, num_warps, autotune, persistent, max_grad_norm, grad_norm_type: as in
            :class:`tritonadam.Adam`.
    """

    _kind = "adamax"
    _second_key = "exp_inf"

    def __init__(
        self,
        params,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        bias_correction: bool = True,
        master_weights: bool | str = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        seed: int | None = None,
        block_size: int | None = None,
        num_warps: int | None = None,
        autotune: str | None = None,
        persistent: bool | None = None,
        max_grad_norm: float | None = None,
        grad_norm_type: float = 2.0,
    ) -> None:
        _check_hyper(lr, betas, eps, weight_decay)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
        }
        super().__init__(params, defaults)
        self._init_extras(bias_correction, master_weights, block_size, num_warps, autotune,
                          persistent, state_dtype, stochastic_rounding, seed, max_grad_norm,
                          grad_norm_type)


AdaMax = Adamax
