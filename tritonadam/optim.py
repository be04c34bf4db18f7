"""Adam, AdamW and Adamax as drop-in ``torch.optim`` optimizers backed by Triton kernels.

The classes keep torch.optim's contract (constructor arguments and validation,
``param_groups`` keys, state keys, ``state_dict``, hooks, LR schedulers, GradScaler)
and add mixed-precision options: fp16/bf16 params always keep fp32 state, and with
``master_weights=True`` an fp32 master copy as well.
"""
from __future__ import annotations

from typing import Any

import operator

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from .functional import StepCache, build_cache, local_tensor
from .kernels import KERNELS, Hyper

__all__ = ["Adam", "AdamW", "Adamax", "AdaMax"]

_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Complex params are stepped as torch.optim does: elementwise on view_as_real(param).
_COMPLEX_DTYPES = (torch.complex64, torch.complex128)
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_WARPS = (1, 2, 4, 8, 16, 32)
_AUTOTUNE_MODES = (None, "off", "on", "cache-only")


_GRAD = operator.attrgetter("grad")
_DTYPE = operator.attrgetter("dtype")


def _interpreted() -> bool:
    # Triton picks the interpreter when a kernel is decorated, so ask the kernel itself:
    # setting TRITON_INTERPRET after import has no effect.
    return type(KERNELS["adam"]).__name__ == "InterpretedFunction"


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


def _state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    if param_dtype in _COMPLEX_DTYPES:
        return param_dtype  # complex state, as torch.optim keeps it (state_dict parity)
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def _as_real(t: Tensor | None) -> Tensor | None:
    return torch.view_as_real(t) if t is not None and t.is_complex() else t


class _TritonAdamBase(Optimizer):
    """Shared machinery: validation, lazy state, state_dict, one launch per bucket."""

    _kind = "adam"
    _second_key = "exp_avg_sq"
    _step_supports_amp_scaling = True  # grad_scale / found_inf are handled in the kernel

    def _init_extras(self, bias_correction, master_weights, block_size, num_warps, autotune,
                     persistent):
        if block_size is not None and (
            not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1)
        ):
            raise ValueError(f"Invalid block_size: {block_size} (a power of two >= 16, or None)")
        if num_warps is not None and num_warps not in _WARPS:
            raise ValueError(f"Invalid num_warps: {num_warps} (one of {_WARPS}, or None)")
        if autotune not in _AUTOTUNE_MODES:
            raise ValueError(f"Invalid autotune: {autotune!r} (one of {_AUTOTUNE_MODES})")
        if persistent not in (None, True, False):
            raise ValueError(f"Invalid persistent: {persistent!r} (True, False or None)")
        for group in self.param_groups:
            if group.get("differentiable") and master_weights:
                raise RuntimeError(
                    f"tritonadam.{type(self).__name__}: differentiable=True steps with "
                    "torch.optim's implementation, which has no master_weights"
                )
        if any(group.get("differentiable") for group in self.param_groups):
            # torch.optim's implementation does not unscale: let GradScaler do it (and
            # skip steps on inf), as it does for torch.optim's own non-fused optimizers.
            self._step_supports_amp_scaling = False
        self.bias_correction = bool(bias_correction)
        self.master_weights = bool(master_weights)
        self.block_size = block_size
        self.num_warps = num_warps
        self.autotune = autotune
        self.persistent = persistent
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._caches: dict[int, StepCache] = {}
        self._generation = getattr(self, "_generation", 0) + 1

    _EXTRAS = {
        "bias_correction": True,
        "master_weights": False,
        "block_size": None,
        "num_warps": None,
        "autotune": None,
        "persistent": None,
    }

    def __getstate__(self) -> dict[str, Any]:
        # Device tables hold raw pointers into this optimizer's tensors: never copy them
        # (a deepcopy would step the original's state).
        state = super().__getstate__()
        state.update({k: getattr(self, k, v) for k, v in self._EXTRAS.items()})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict calls __setstate__ without our options: keep the
        # current ones then; unpickling a fresh object takes them from the pickle.
        extras = {k: state.pop(k, getattr(self, k, v)) for k, v in self._EXTRAS.items()}
        super().__setstate__(state)
        for k, v in extras.items():
            setattr(self, k, v)
        self._set_group_defaults()
        self._reset_caches()

    def _set_group_defaults(self) -> None:
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)

    # ---- state ---------------------------------------------------------------------

    def _float_state_keys(self, group) -> tuple[str, ...]:
        keys = ("exp_avg", self._second_key)
        if group.get("amsgrad", False):
            keys += ("max_exp_avg_sq",)
        return keys

    def _uses_master(self, p: Tensor) -> bool:
        return self.master_weights and p.dtype in _LOW_PRECISION

    def _init_state(self, p: Tensor, group) -> dict:
        state = self.state[p]
        sdtype = _state_dtype(p.dtype)
        created = False
        if len(state) == 0 or "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=local_tensor(p).device)
            created = True
        for key in self._float_state_keys(group):
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.preserve_format)
                created = True
        if self._uses_master(p) and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, copy=True)
            created = True
        if created:
            self._generation += 1
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from this class or from torch.optim's Adam/AdamW/Adamax.

        torch's base class casts floating state to the param dtype; fp32 state of fp16/bf16
        params is restored at full precision from ``state_dict`` afterwards, and step
        counts become 0-dim float32 tensors on the param's device.
        """
        # Read the fp32 values from the state dict torch actually loads: the one user
        # pre-hooks returned. A hook registered last, just for this call, sees it.
        seen = {}

        def capture(optimizer, final):
            seen["state_dict"] = final

        handle = self.register_load_state_dict_pre_hook(capture)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
        state_dict = seen.get("state_dict", state_dict)
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(ids, params):
            if saved_id not in saved_state or p not in self.state:
                continue
            src, dst = saved_state[saved_id], self.state[p]
            sdtype = _state_dtype(p.dtype)
            for key, value in src.items():
                if key == "step":
                    step = float(value.item() if torch.is_tensor(value) else value)
                    dst[key] = torch.tensor(step, dtype=torch.float32, device=local_tensor(p).device)
                elif torch.is_tensor(value) and (value.is_floating_point() or value.is_complex()):
                    # Same layout as the param: the kernels index param and state alike.
                    fresh = torch.empty_like(p, dtype=sdtype, memory_format=torch.preserve_format)
                    dst[key] = fresh.copy_(value)
            if not self._uses_master(p):
                dst.pop("master_param", None)
        self._reset_caches()

    # ---- step ----------------------------------------------------------------------

    def _validate(self, p: Tensor, g: Tensor, fused: bool | None = None) -> Tensor:
        """The grad to step with (a dense copy if its layout differs), or raise."""
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
        lp, lg = local_tensor(p), local_tensor(g)
        if lg.device != lp.device:
            raise RuntimeError(
                f"tritonadam.{name}: grad on {lg.device} but param on {lp.device}: "
                "params and their grads must be on the same device"
            )
        if lg.shape != lp.shape:
            raise RuntimeError(
                f"tritonadam.{name}: grad of shape {tuple(lg.shape)} for param of shape "
                f"{tuple(lp.shape)}"
            )
        supported = "cpu" if _interpreted() else "cuda"  # torch calls ROCm devices cuda too
        if lp.device.type != supported:
            if _interpreted():
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
        if not _is_dense(lp):
            # Stepped through a contiguous staging copy (see _rebuild_cache); its state is
            # contiguous too (zeros_like/empty_like of a non-dense tensor are contiguous).
            return lg if lg.is_contiguous() else lg.contiguous()
        if lg.stride() != lp.stride() and lp.numel() > 1:
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
        states = [self._init_state(p, group) for p in params]
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

    def _hyper(self, group) -> Hyper:
        beta1, beta2 = group["betas"]
        return Hyper(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=group.get("decoupled_weight_decay", False),
            maximize=group["maximize"],
            bias_correction=self.bias_correction,
        )

    def _fast_grad_ptrs(self, index: int, group) -> list[int] | None:
        """This step's grad pointers if the group's cache still applies, else None.

        The per-step host work for a group whose params, state and grad dtypes are as
        when the cache was built: a few C-level maps over the tensors, no Python loop
        body per tensor (host time per step is a benchmarked figure). Anything unusual
        (a new grad dtype, a non-contiguous or sparse grad, a grad gone or appeared, a
        param whose storage moved) returns None and takes the validating path.
        """
        cache = self._caches.get(index)
        params = group["params"]
        if (
            cache is None
            or not cache.fast
            or cache.generation != self._generation
            or cache.params_list is not params
            or cache.n_params != len(params)
        ):
            return None
        grads = list(map(_GRAD, params))
        if cache.active is not None:
            if any(grads[i] is not None for i in cache.inactive):
                return None
            grads = [grads[i] for i in cache.active]
            params = [params[i] for i in cache.active]
        if cache.dtensor:
            grads = list(map(local_tensor, grads))
            params = list(map(local_tensor, params))
        try:
            grad_ptrs = list(map(Tensor.data_ptr, grads))
        except (AttributeError, RuntimeError, TypeError):  # a None or sparse grad
            return None
        if (
            list(map(Tensor.data_ptr, params)) != cache.param_ptrs
            or list(map(_DTYPE, grads)) != cache.grad_dtypes
            or not all(map(Tensor.is_contiguous, grads))
        ):
            return None
        return grad_ptrs

    def _rebuild_cache(self, index, group, params, grads, active) -> list[int]:
        """Create missing state, build the group's launch buckets; returns grad pointers."""
        states = [self._init_state(p, group) for p in params]
        amsgrad = group.get("amsgrad", False)
        local_params = [local_tensor(p) for p in params]
        # Non-dense params (strided views) are stepped in a contiguous staging copy,
        # copied in before and back after each launch.
        staged = [
            (lp, torch.empty(lp.shape, dtype=lp.dtype, device=lp.device))
            for lp in local_params
            if not _is_dense(lp)
        ]
        stage_of = {id(lp): buf for lp, buf in staged}
        kernel_params = [stage_of.get(id(lp), lp) for lp in local_params]
        cache = build_cache(
            [_as_real(p) for p in kernel_params],
            [_as_real(g) for g in grads],
            [_as_real(local_tensor(s["exp_avg"])) for s in states],
            [_as_real(local_tensor(s[self._second_key])) for s in states],
            [_as_real(local_tensor(s["max_exp_avg_sq"])) for s in states] if amsgrad else None,
            [local_tensor(s["master_param"]) if "master_param" in s else None for s in states],
            [s["step"] for s in states],
        )
        cache.staged = staged
        all_params = group["params"]
        cache.generation = self._generation
        cache.params_list = all_params
        cache.n_params = len(all_params)
        if len(active) != len(all_params):
            cache.active = active
            taken = set(active)
            cache.inactive = [i for i in range(len(all_params)) if i not in taken]
        cache.param_ptrs = [p.data_ptr() for p in local_params]
        cache.grad_dtypes = [g.dtype for g in grads]
        cache.dtensor = any(p is not lp for p, lp in zip(params, local_params))
        # The fast path checks grads for contiguity only, which matches the param
        # layout when params are contiguous too.
        cache.fast = all(p.is_contiguous() for p in local_params)
        self._caches[index] = cache
        return [g.data_ptr() for g in grads]

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step.

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

        # Validate every group before touching anything, so a bad grad anywhere leaves
        # all params and state as they were. Each group is stepped one of three ways:
        # "torch" (differentiable=True), "cached" (its launch cache still applies) or
        # "build" (validated afresh; state and launch cache are (re)built).
        work = []
        for index, group in enumerate(self.param_groups):
            if group.get("differentiable", False):
                work.append(("torch", index, group, self._torch_inputs(group)))
                continue
            grad_ptrs = self._fast_grad_ptrs(index, group)
            if grad_ptrs is not None:
                work.append(("cached", index, group, grad_ptrs))
                continue
            params, grads, active = [], [], []
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    grads.append(self._validate(p, p.grad, group.get("fused")))
                    params.append(p)
                    active.append(i)
            work.append(("build", index, group, (params, grads, active)))

        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for how, index, group, inputs in work:
            if how == "torch":
                self._torch_step(group, *inputs)
                continue
            if how == "build":
                if not inputs[0]:
                    self._caches.pop(index, None)
                    continue
                grad_ptrs = self._rebuild_cache(index, group, *inputs)
            else:
                grad_ptrs = inputs
            cache = self._caches[index]
            for lp, buf in cache.staged:
                buf.copy_(lp)
            cache.run(
                self._kind,
                grad_ptrs,
                self._hyper(group),
                block_size=self.block_size,
                num_warps=self.num_warps,
                autotune_mode=self.autotune,
                persistent=self.persistent,
                grad_scale=grad_scale,
                found_inf=found_inf,
            )
            for lp, buf in cache.staged:
                lp.copy_(buf)
        return loss


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
        master_weights (bool): for fp16/bf16 params keep an fp32 copy in
            ``state["master_param"]``, step it, and write the param as its rounded copy
            (default False). Without it, fp16/bf16 params still keep fp32 ``exp_avg`` and
            ``exp_avg_sq`` and are rounded to nearest even after each step.
        block_size (int, optional): elements per Triton program; with ``num_warps`` fixes
            the launch config instead of the autotuned one.
        num_warps (int, optional): warps per Triton program.
        persistent (bool, optional): True: a grid of a few programs per SM looping over the
            blocks; False: one program per block; None (default): the autotuner's choice
            (one program per block when ``block_size`` and ``num_warps`` are fixed).
        autotune (str, optional): ``"on"``, ``"off"`` or ``"cache-only"``; default from
            ``TRITONADAM_AUTOTUNE`` (tuning on first use on GPUs).
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
        master_weights: bool = False,
        block_size: int | None = None,
        num_warps: int | None = None,
        autotune: str | None = None,
        persistent: bool | None = None,
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
                          persistent)

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
        master_weights: bool = False,
        block_size: int | None = None,
        num_warps: int | None = None,
        autotune: str | None = None,
        persistent: bool | None = None,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad,
            foreach=foreach, maximize=maximize, capturable=capturable,
            differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            bias_correction=bias_correction, master_weights=master_weights,
            block_size=block_size, num_warps=num_warps, autotune=autotune,
            persistent=persistent,
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
        bias_correction, master_weights, block_size, num_warps, autotune: as in
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
        master_weights: bool = False,
        block_size: int | None = None,
        num_warps: int | None = None,
        autotune: str | None = None,
        persistent: bool | None = None,
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
                          persistent)


AdaMax = Adamax
