"""The optimizers the bench compares, behind one small interface.

A provider turns a list of model parameters (with ``.grad`` set) into a zero-argument
``step`` callable. Where a provider cannot do a dtype setup the way it is asked (torch keeps
Adam state in the parameter's dtype; torch has no master weights), it builds what its users
do instead and says so in ``Built.label``; ``Built.layout`` describes the memory it really
moves, which is what the bench's GB/s column is computed from (:func:`built_traffic`):
tritonadam's bytes come from the library's own bytes model (``tritonadam.state.variant``,
:func:`tritonadam_traffic`), every other provider's from ``workloads.traffic`` of its layout.

A "clip + step" case (:func:`with_clip`) clips the grads' total norm before every step the
way the provider's users do (:meth:`Provider.clip`): torch's ``clip_grad_norm_`` for all but
tritonadam, whose ``clip_grad_norm_`` leaves the coefficient for the step's kernel.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .. import _env

from .workloads import (DTYPE_BYTES, QUANT_STATES, Layout, Setup, Traffic, Workload, dense_twin,
                        torch_dtype, traffic)

_DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
               torch.float64: "fp64"}


@dataclass(frozen=True)
class HyperParams:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    amsgrad: bool = False
    seed: int = 0  # of stochastic rounding, so that a run's checks are reproducible


@dataclass
class Built:
    """One provider's optimizer over one workload, ready to step.

    ``params``: the tensors whose values after a step are the result (the model's params).
    ``held``: tensors the provider allocates beyond the optimizer state (counted as its
    memory). ``label``: what it does differently from the setup asked for, or "".
    ``step`` returns None, or for a clip + step case the total grad norm its clip measured.
    """

    step: Callable[[], torch.Tensor | None]
    params: list[torch.Tensor]
    layout: Layout
    optimizer: object
    label: str = ""
    held: list[torch.Tensor] = field(default_factory=list)
    #: steps the build itself took (a CUDA graph's warm-up before capture)
    pre_steps: int = 0
    #: the grads must stay the same tensors, rewritten in place (a captured graph)
    static_grads: bool = False
    #: the check's absolute tolerance per step, as a fraction of lr (quantized state: looser)
    check_lr_tol: float = 0.05
    #: correct ``layout.state`` from the dtype of the optimizer's ``exp_avg`` after a step
    observe_state: bool = True
    #: the step's own ``(tensor, read, written)`` bytes per param where the provider has a
    #: bytes model of its own (tritonadam's); None: ``workloads.traffic(layout)``
    own_traffic: tuple | None = None


def built_traffic(built: Built, algo: str, amsgrad: bool) -> Traffic:
    """What one step of ``built`` moves per param: its own bytes model where it has one
    (tritonadam), else ``workloads.traffic`` of its layout; with the passes around the step
    (``layout.extra``: a clip, copies) first, as ``workloads.traffic`` lists them."""
    if built.own_traffic is not None:
        return Traffic(tuple(built.layout.extra) + tuple(built.own_traffic))
    return traffic(built.layout, algo, amsgrad)


class Provider:
    name = ""
    description = ""

    def unavailable(self, device: torch.device) -> str | None:
        """Why this provider cannot run at all on ``device`` (None if it can)."""
        return None

    def unsupported(self, setup: Setup, algo: str, hp: HyperParams, workload: Workload,
                    device: torch.device, opts: dict) -> str | None:
        """Why this provider skips this case (None if it runs it). ``opts``: the run's
        ``compile_max_tensors`` and the case's ``clip`` (a max norm, or None)."""
        return None

    def build(self, params: list[torch.Tensor], setup: Setup, algo: str,
              hp: HyperParams) -> Built:
        raise NotImplementedError

    def clip(self, built: Built, max_norm: float, grad_bytes: int):
        """``(call, passes)``: the call that clips the grads ``built`` steps, as this
        provider's users do before each step (returning the total norm), and the
        per-parameter passes over grads of ``grad_bytes`` it adds (``Layout.extra``).

        torch's ``clip_grad_norm_`` reads every grad for the norm, then multiplies every
        grad in place by the coefficient (a read and a write) before the step reads them.
        """
        params = built.params

        def call():
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

        return call, (("clip_grad_norm_ norm", grad_bytes, 0),
                      ("clip_grad_norm_ grad *= coef", grad_bytes, grad_bytes))

    def exact_twin(self, setup: Setup) -> Setup | None:
        """A setup whose params this provider must leave bit for bit equal to ``setup``'s
        after the same steps from the same values, or None."""
        return None


def with_clip(provider: Provider, built: Built, setup: Setup, max_norm: float) -> Built:
    """``built`` made a clip + step case: every step first clips the grads' total norm to
    ``max_norm`` (``Provider.clip``) and returns that norm; the layout gains the clip's
    passes over the grads."""
    clip, passes = provider.clip(built, max_norm, DTYPE_BYTES[setup.grad])
    step = built.step

    def clip_and_step():
        norm = clip()
        step()
        return norm

    built.step = clip_and_step
    built.layout = replace(built.layout, extra=built.layout.extra + passes)
    return built


def no_quantized_state(library: str, setup: Setup) -> str | None:
    """Why a provider without quantized state skips a quantized setup: its stand-in (the
    same step with fp32 state) is timed in the dense twin setup, so a row here would repeat
    that one."""
    if setup.state not in QUANT_STATES:
        return None
    twin = dense_twin(setup)
    return (f"{library} has no {setup.state} state: its step with fp32 state is the "
            f"{twin.name if twin else 'dense'} setup's row")


# ------------------------------------------------------------------------------ tritonadam

class TritonAdamProvider(Provider):
    name = "tritonadam"
    description = "tritonadam.{Adam,AdamW,Adamax}: one multi-tensor Triton launch per dtype mix, across param groups"

    def unavailable(self, device):
        if device.type == "cpu" and not _env.interpret():
            return "Triton runs on CPU tensors only in its interpreter (TRITON_INTERPRET=1 before import)"
        return None

    def build(self, params, setup, algo, hp, config=None, autotune=None):
        """``config``: a fixed LaunchConfig instead of the tuned one; ``autotune``: the
        optimizer's autotune mode (default: as the environment says)."""
        import tritonadam

        cls = {"adam": tritonadam.Adam, "adamw": tritonadam.AdamW, "adamax": tritonadam.Adamax}[algo]
        kw = dict(lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay,
                  seed=hp.seed, **tritonadam_modes(setup))
        if algo != "adamax":
            kw["amsgrad"] = hp.amsgrad
        if config is not None:
            kw.update(block_size=config.block_size, num_warps=config.num_warps, persistent=config.persistent)
        if autotune is not None:
            kw["autotune"] = autotune
        opt = cls(params, **kw)
        return Built(step=opt.step, params=params, layout=setup.layout, optimizer=opt,
                     own_traffic=tritonadam_traffic(setup, algo, hp.amsgrad).items)

    def clip(self, built, max_norm, grad_bytes):
        """``opt.clip_grad_norm_``: one read of every grad for the norm; the step's kernel
        applies the coefficient as it reads the grads, which are never rewritten."""
        opt = built.optimizer

        def call():
            return opt.clip_grad_norm_(max_norm)

        return call, (("grad norm", grad_bytes, 0),)

    def exact_twin(self, setup):
        # The remainder is the fp32 master, split: the same steps bit for bit.
        return replace(setup, name="master_weights=True", remainder=False) if setup.remainder else None


# --------------------------------------------------------------------------- CUDA graphs

#: eager steps before capture (tables, state, any tuning), on a side stream
GRAPH_WARMUP_STEPS = 3


def capture_step(step: Callable[[], None], warmup: int = GRAPH_WARMUP_STEPS):
    """``step`` warmed up on a side stream, then captured once: returns the graph's replay
    (torch's CUDA-graph recipe; docs/integration.md). The warm-up steps are real steps."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _graph_unsupported(setup: Setup, opts: dict) -> str | None:
    if opts.get("clip") is not None:
        return "clip + step is not captured in this bench (the plain step's graph is timed)"
    return None


def _graph_unavailable(device) -> str | None:
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if _env.interpret():
        return "TRITON_INTERPRET=1: kernels run on the CPU, nothing to capture"
    return None


class TritonAdamGraph(TritonAdamProvider):
    name = "tritonadam-graph"
    description = ("tritonadam with capturable=True and lr a device tensor, the step captured "
                   "once in a CUDA graph and replayed (host cost independent of the tensor count)")

    def unavailable(self, device):
        return _graph_unavailable(device)

    def unsupported(self, setup, algo, hp, workload, device, opts):
        return _graph_unsupported(setup, opts)

    def build(self, params, setup, algo, hp, config=None, autotune=None):
        import tritonadam

        cls = {"adam": tritonadam.Adam, "adamw": tritonadam.AdamW, "adamax": tritonadam.Adamax}[algo]
        kw = dict(lr=torch.tensor(hp.lr, device=params[0].device), betas=hp.betas, eps=hp.eps,
                  weight_decay=hp.weight_decay, seed=hp.seed, capturable=True, **tritonadam_modes(setup))
        if algo != "adamax":
            kw["amsgrad"] = hp.amsgrad
        if config is not None:
            kw.update(block_size=config.block_size, num_warps=config.num_warps, persistent=config.persistent)
        if autotune is not None:
            kw["autotune"] = autotune
        opt = cls(params, **kw)
        replay = capture_step(opt.step)
        return Built(step=replay, params=params, layout=setup.layout, optimizer=opt,
                     label="one CUDA graph replay per step; static grads rewritten in place",
                     pre_steps=GRAPH_WARMUP_STEPS, static_grads=True,
                     own_traffic=tritonadam_traffic(setup, algo, hp.amsgrad).items)


def tritonadam_modes(setup: Setup) -> dict:
    """The tritonadam optimizer options that keep what ``setup`` asks for."""
    state = setup.state if setup.state in QUANT_STATES else torch_dtype(setup.state)
    return dict(master_weights="remainder" if setup.remainder else setup.master is not None,
                state_dtype=state, stochastic_rounding=setup.stochastic)


def tritonadam_variant(setup: Setup, algo: str = "adamw", amsgrad: bool = False):
    """The library's kernel variant for ``setup``'s params under the options the bench gives
    the optimizer (:func:`tritonadam_modes`): ``tritonadam.state.variant``, the one bytes
    model of tritonadam's steps."""
    from tritonadam.state import variant

    return variant(algo, torch_dtype(setup.param), torch_dtype(setup.grad), amsgrad=amsgrad,
                   **tritonadam_modes(setup))


def tritonadam_traffic(setup: Setup, algo: str = "adamw", amsgrad: bool = False) -> Traffic:
    """Bytes per param one tritonadam step moves in ``setup`` (the setup's floor: the
    roofline and ``--list`` use it too), from the library's bytes model."""
    if algo == "adamax" and amsgrad:
        raise ValueError("AdaMax has no amsgrad variant")
    return Traffic(tuple(tritonadam_variant(setup, algo, amsgrad).traffic()))


def tritonadam_held(setup: Setup, algo: str = "adamw", amsgrad: bool = False) -> float:
    """Bytes per param resident while tritonadam steps ``setup``: param, grad and the
    optimizer's state (moments with their scales, master copy) from the library's bytes
    model (the "state MiB" column counts the tensors the optimizer really allocated)."""
    kept = tritonadam_variant(setup, algo, amsgrad).state_bytes_per_elem()
    return DTYPE_BYTES[setup.param] + DTYPE_BYTES[setup.grad] + kept


# ----------------------------------------------------------------------------------- torch

_TORCH_CLASSES = {"adam": "Adam", "adamw": "AdamW", "adamax": "Adamax"}


class _TorchBase(Provider):
    impl_kwargs: dict = {}
    impl_text = ""

    def _cls(self, algo):
        return getattr(torch.optim, _TORCH_CLASSES[algo])

    def _kwargs(self, algo, hp):
        kw = dict(lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay)
        if algo != "adamax":
            kw["amsgrad"] = hp.amsgrad
        kw.update(self.impl_kwargs)
        return kw

    def unsupported(self, setup, algo, hp, workload, device, opts):
        if "fused" in self.impl_kwargs and algo == "adamax":
            return "torch.optim.Adamax has no fused implementation"
        return no_quantized_state("torch.optim", setup)

    def _make_step(self, opt) -> Callable[[], None]:
        return opt.step

    def build(self, params, setup, algo, hp):
        cls = self._cls(algo)
        if setup.master is None:
            opt = cls(params, **self._kwargs(algo, hp))
            layout = Layout(param=setup.param, grad=setup.grad, state=setup.param)
            notes = []
            if setup.state != setup.param:
                notes.append(f"{setup.param} state: torch keeps Adam state in the param dtype, "
                             f"it cannot keep {setup.state} state for {setup.param} params")
            if setup.stochastic:
                notes.append("rounded to nearest: torch has no stochastic rounding")
            return Built(step=self._make_step(opt), params=params, layout=layout,
                         optimizer=opt, label="; ".join(notes))
        # Master weights: what torch users do is keep fp32 params for the optimizer, copy
        # the model's low-precision grads into their fp32 .grad, step, and copy the result
        # back into the model's params (one foreach copy each way). For the remainder setup
        # too: without master weights there is no 2-byte form of them either.
        master = [p.detach().to(torch.float32).requires_grad_(True) for p in params]
        mgrads = [torch.empty_like(m) for m in master]
        for m, g in zip(master, mgrads):
            m.grad = g
        opt = cls(master, **self._kwargs(algo, hp))
        inner = self._make_step(opt)

        def step():
            torch._foreach_copy_(mgrads, [p.grad for p in params])  # this step's grads
            inner()
            with torch.no_grad():
                torch._foreach_copy_(params, master)

        b = DTYPE_BYTES
        layout = Layout(
            param=setup.master, grad=setup.master, state=setup.master,
            extra=((f"{setup.grad} grad -> {setup.master} grad copy", b[setup.grad], b[setup.master]),
                   (f"{setup.master} -> {setup.param} param copy", b[setup.master], b[setup.param])))
        label = (f"{setup.master} params stepped by torch{self.impl_text} + foreach copies "
                 f"{setup.grad} grad -> {setup.master} and {setup.master} -> {setup.param} param "
                 f"(torch has no master weights)")
        return Built(step=step, params=params, layout=layout, optimizer=opt, label=label,
                     held=master + mgrads)


class TorchFused(_TorchBase):
    name = "torch-fused"
    description = "torch.optim.* with fused=True"
    impl_kwargs = {"fused": True}
    impl_text = " fused"


class TorchForeach(_TorchBase):
    name = "torch-foreach"
    description = "torch.optim.* with foreach=True"
    impl_kwargs = {"foreach": True}
    impl_text = " foreach"


class TorchForLoop(_TorchBase):
    name = "torch-forloop"
    description = "torch.optim.* with foreach=False (one tensor at a time)"
    impl_kwargs = {"foreach": False}
    impl_text = " for-loop"


class TorchFusedGraph(TorchFused):
    name = "torch-fused-graph"
    description = ("torch.optim.* with fused=True, capturable=True and lr a device tensor, the "
                   "step captured once in a CUDA graph and replayed")
    impl_text = " fused, captured"

    def unavailable(self, device):
        return _graph_unavailable(device)

    def unsupported(self, setup, algo, hp, workload, device, opts):
        if setup.master is not None and setup.state not in QUANT_STATES:
            return "the master-weight emulation is not captured in this bench"
        return _graph_unsupported(setup, opts) or super().unsupported(setup, algo, hp, workload,
                                                                        device, opts)

    def _kwargs(self, algo, hp):
        kw = super()._kwargs(algo, hp)
        kw.update(capturable=True, lr=torch.tensor(hp.lr, device="cuda"))
        return kw

    def _make_step(self, opt):
        return capture_step(opt.step)

    def build(self, params, setup, algo, hp):
        built = super().build(params, setup, algo, hp)
        note = "one CUDA graph replay per step; static grads rewritten in place"
        built.label = f"{built.label}; {note}" if built.label else note
        built.pre_steps = GRAPH_WARMUP_STEPS
        built.static_grads = True
        return built


class TorchCompile(_TorchBase):
    name = "torch-compile"
    description = "torch.compile of a torch.optim.* (foreach) step, as in torch's compile-the-optimizer recipe"
    impl_kwargs = {"foreach": True}
    impl_text = " compiled"

    def unsupported(self, setup, algo, hp, workload, device, opts):
        limit = opts.get("compile_max_tensors", 200)
        if workload.tensors > limit:
            return (f"{workload.tensors} tensors > --compile-max-tensors {limit}: "
                    "compile time grows with the tensor count")
        return super().unsupported(setup, algo, hp, workload, device, opts)

    def _make_step(self, opt):
        import torch._dynamo

        torch._dynamo.reset()  # a fresh cache per optimizer: the recompile limit is per code object

        @torch.compile(fullgraph=False)
        def compiled_step():
            opt.step()

        return compiled_step


# ------------------------------------------------------------------------- third party

def _state_dtype_of(opt) -> str | None:
    for st in getattr(opt, "state", {}).values():
        t = st.get("exp_avg") if isinstance(st, dict) else None
        if isinstance(t, torch.Tensor):
            return _DTYPE_NAME.get(t.dtype)
    return None


class _ThirdPartyFusedAdam(Provider):
    """A CUDA-only fused Adam from another library, used when it is installed."""

    module = ""  # what to import
    library = ""  # its name in messages

    def unavailable(self, device):
        if device.type != "cuda":
            return f"{self.library} FusedAdam is CUDA-only"
        try:
            importlib.import_module(self.module)
        except Exception as e:
            return f"{self.module.split('.')[0]} not installed ({type(e).__name__})"
        return None

    def unsupported(self, setup, algo, hp, workload, device, opts):
        if setup.state in QUANT_STATES:
            return no_quantized_state(f"{self.library} FusedAdam", setup)
        if algo == "adamax":
            return f"{self.library} has no fused AdaMax"
        if hp.amsgrad:
            return f"{self.library} FusedAdam does not support amsgrad"
        if setup.stochastic:
            return (f"{self.library} has no stochastic rounding (its rounding to nearest is "
                    "timed in the bf16 setups)")
        return None


class ApexFusedAdam(_ThirdPartyFusedAdam):
    name = "apex"
    description = "apex.optimizers.FusedAdam (when installed)"
    module = "apex.optimizers"
    library = "apex"

    def unsupported(self, setup, algo, hp, workload, device, opts):
        if setup.remainder and setup.state not in QUANT_STATES:
            return "apex keeps no master weights in 2 bytes (its fp32 master is timed in bf16-master)"
        return super().unsupported(setup, algo, hp, workload, device, opts)

    def build(self, params, setup, algo, hp):
        from apex.optimizers import FusedAdam

        kw = dict(lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay,
                  adam_w_mode=(algo == "adamw"))
        if setup.master:
            kw.update(master_weights=True, capturable=True)  # apex needs capturable for master weights
        opt = FusedAdam(params, **kw)
        return Built(step=opt.step, params=params, optimizer=opt,
                     layout=Layout(param=setup.param, grad=setup.grad, state=setup.param,
                                   master=setup.master),
                     label="state dtype as observed after the first step")


class TransformerEngineFusedAdam(_ThirdPartyFusedAdam):
    name = "te"
    description = "transformer_engine.pytorch.optimizers.FusedAdam (when installed)"
    module = "transformer_engine.pytorch.optimizers"
    library = "TransformerEngine"

    def unsupported(self, setup, algo, hp, workload, device, opts):
        if setup.state == "bf16":
            # Some versions step bf16 moments through fp32 copies made in Python around the
            # kernel: bytes this bench cannot state for an unknown version.
            return ("TransformerEngine's bf16 moments are not timed: how it moves them depends "
                    "on its version")
        return super().unsupported(setup, algo, hp, workload, device, opts)

    def build(self, params, setup, algo, hp):
        from transformer_engine.pytorch.optimizers import FusedAdam

        kw = dict(lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay,
                  adam_w_mode=(algo == "adamw"))
        if setup.param != "fp32":
            kw.update(exp_avg_dtype=torch.float32, exp_avg_sq_dtype=torch.float32)
        if setup.master:
            kw.update(master_weights=True)
        if setup.remainder:
            kw.update(store_param_remainders=True)
        opt = FusedAdam(params, **kw)
        return Built(step=opt.step, params=params, optimizer=opt,
                     layout=Layout(param=setup.param, grad=setup.grad, state=setup.state,
                                   master=setup.master, remainder=setup.remainder))


# ------------------------------------------------------------------------------- peers

class _Peer(Provider):
    """Another library's AdamW with quantized state, timed where it is installed (the GPU
    check installs them from a wheelhouse: tritonadam/bench/wheelhouse.sh): the same task
    as tritonadam's quantized setups of its bits (8-bit or 4-bit moments), and for
    comparison in the bf16 and fp32 setups. Its format is not tritonadam's (other blocks,
    other scales): the row is labelled with what it keeps, with what it does instead of a
    master copy or stochastic rounding it lacks, and the bytes that moves; it is checked with
    a loose tolerance (the float64 reference keeps fp32 moments)."""

    module = ""
    library = ""
    #: bits per moment: the quantized setups it is timed in
    bits = 8
    #: bytes per element of the two moments, read + written, and per-element extras
    state = "int8"
    extra: tuple = ()
    #: rounds bf16 params stochastically when asked (torchao's bf16_stochastic_round)
    stochastic_rounding = False

    def unavailable(self, device):
        if device.type != "cuda":
            return f"{self.library} is timed on a GPU only"
        try:
            importlib.import_module(self.module)
        except Exception as e:  # noqa: BLE001
            return f"{self.module.split('.')[0]} not installed ({type(e).__name__})"
        return None

    def unsupported(self, setup, algo, hp, workload, device, opts):
        if algo != "adamw" or hp.amsgrad:
            return f"{self.library}: AdamW without amsgrad only in this bench"
        if QUANT_STATES.get(setup.state, self.bits) != self.bits or (
                setup.state not in QUANT_STATES and setup.name not in ("bf16", "fp32")):
            return f"{self.library}: timed in the bf16, fp32 and {self.bits}-bit setups only"
        return None

    def _make(self, params, hp, stochastic: bool):
        raise NotImplementedError

    def build(self, params, setup, algo, hp):
        sr = setup.stochastic and self.stochastic_rounding and setup.param == "bf16"
        opt = self._make(params, hp, sr)
        notes = [f"{self.library}: {self.what}"]
        if setup.master:
            notes.append(self.master_note(setup))
        if setup.stochastic and not sr:
            notes.append(self.rounding_note(setup))
        layout = Layout(param=setup.param, grad=setup.grad, state=self.state,
                        extra=tuple(self.extra_for(setup)), stochastic=sr)
        return Built(step=opt.step, params=params, layout=layout, optimizer=opt,
                     label="; ".join(notes), check_lr_tol=0.75, observe_state=False)

    what = ""

    def extra_for(self, setup):
        return self.extra

    def master_note(self, setup) -> str:
        return f"no master weights: {setup.param} params rounded to nearest"

    def rounding_note(self, setup) -> str:
        return f"rounded to nearest: {self.library} has no stochastic rounding"


class TorchaoAdamW8bit(_Peer):
    name = "torchao-8bit"
    description = "torchao.optim.AdamW8bit (when installed): 8-bit blockwise moments, block 256"
    module = "torchao.optim"
    library = "torchao AdamW8bit"
    state = "int8"
    what = "8-bit moments, an fp32 scale per 256 elements (tensors under 4096 elements: full precision)"
    extra = (("m, v scales fp32/256", 8 / 256, 8 / 256),)
    stochastic_rounding = True

    def _make(self, params, hp, stochastic):
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay,
                         bf16_stochastic_round=stochastic)


class TorchaoAdamW4bit(TorchaoAdamW8bit):
    name = "torchao-4bit"
    description = "torchao.optim.AdamW4bit (when installed): 4-bit blockwise moments, block 128"
    library = "torchao AdamW4bit"
    bits = 4
    state = "int4"
    what = "4-bit moments, an fp32 scale per 128 elements (tensors under 4096 elements: full precision)"
    extra = (("m, v scales fp32/128", 8 / 128, 8 / 128),)

    def _make(self, params, hp, stochastic):
        from torchao.optim import AdamW4bit

        return AdamW4bit(params, lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay,
                         bf16_stochastic_round=stochastic)


class FlashOptimAdamW(_Peer):
    name = "flashoptim"
    description = ("flashoptim.FlashAdamW (when installed): int8 m, uint8 sqrt(v), fp16 scale per "
                   "32; bf16 params get an int8 correction (24-bit master)")
    module = "flashoptim"
    library = "FlashOptim FlashAdamW"
    state = "int8"
    what = "int8 m, uint8 sqrt(v), an fp16 scale per 32 elements"

    def extra_for(self, setup):
        out = [("m, v scales fp16/32", 4 / 32, 4 / 32)]
        if setup.param != "fp32":
            out.append(("master correction int8", 1, 1))
        return out

    def master_note(self, setup):
        return "a 24-bit master (an int8 correction per param) for the fp32 one"

    def rounding_note(self, setup):
        return "a 24-bit master (an int8 correction per param) instead of stochastic rounding"

    def _make(self, params, hp, stochastic):
        from flashoptim import FlashAdamW

        return FlashAdamW(params, lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay)


class BnbAdamW8bit(_Peer):
    name = "bnb-8bit"
    description = "bitsandbytes.optim.AdamW8bit (when installed): 8-bit blockwise moments, block 256"
    module = "bitsandbytes"
    library = "bitsandbytes AdamW8bit"
    state = "int8"
    what = "8-bit moments, an fp32 absmax per 256 elements (tensors under 4096 elements: fp32)"
    extra = (("m, v absmax fp32/256", 8 / 256, 8 / 256),)

    def _make(self, params, hp, stochastic):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=hp.lr, betas=hp.betas, eps=hp.eps,
                                   weight_decay=hp.weight_decay)


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (TritonAdamProvider(), TorchFused(), TorchForeach(), TorchForLoop(), TorchCompile(),
              TritonAdamGraph(), TorchFusedGraph(), ApexFusedAdam(), TransformerEngineFusedAdam(),
              TorchaoAdamW8bit(), TorchaoAdamW4bit(), FlashOptimAdamW(), BnbAdamW8bit())
}


def observed_layout(built: Built) -> Built:
    """Correct ``built.layout``'s state dtype from the optimizer's actual state (after a step)."""
    seen = _state_dtype_of(built.optimizer) if built.observe_state else None
    if seen and seen != built.layout.state:
        built.layout = replace(built.layout, state=seen)
        note = f"state observed in {seen}"
        built.label = f"{built.label}; {note}" if built.label else note
    elif built.label == "state dtype as observed after the first step":
        built.label = ""
    return built


def state_bytes(built: Built) -> int:
    """Bytes of every tensor in the optimizer's state plus the provider's own buffers
    (deduplicated by storage)."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            try:
                st = t.untyped_storage()
                seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
            except Exception:
                seen[id(t)] = t.numel() * t.element_size()

    def walk(obj, depth=0):
        if depth > 4:
            return
        if isinstance(obj, torch.Tensor):
            flatten = getattr(obj, "__tensor_flatten__", None)
            if type(obj) is not torch.Tensor and type(obj) is not torch.nn.Parameter and flatten:
                # a tensor subclass holding quantized data and scales (torchao's states)
                try:
                    for name in flatten()[0]:
                        walk(getattr(obj, name), depth + 1)
                    return
                except Exception:  # noqa: BLE001
                    pass
            add(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            for v in vars(obj).values():  # a wrapper object (FlashOptim's quantized moments)
                walk(v, depth + 1)

    walk(list(getattr(built.optimizer, "state", {}).values()))
    for t in built.held:
        add(t)
    return sum(seen.values())
