"""Adam, AdamW and Adamax as drop-in ``torch.optim`` optimizers backed by Triton kernels.

The classes keep torch.optim's contract (constructor arguments and validation,
``param_groups`` keys, state keys, ``state_dict``, hooks, LR schedulers, GradScaler)
and add mixed-precision options. A step flows one way: ``_init_group`` gathers and
validates each group's tensors with their state (``gather``, ``state``), a
:class:`~tritonadam.step_cache.StepCache` lays them out in device tables and launches
the kernels; while nothing changes, the cache's per-step check replaces the gathering.
"""
from __future__ import annotations

import collections.abc
import contextlib
import copy
import sys
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import autotune, differentiable, gather, host
from .clip import Clipper, check_max_norm, fsdp1_clip_error, grad_scaler_scale, norm_order, replicated
from .hyper import check_hyper, group_hyper
from .options import check_group_extras, check_group_options, checked_extras
from .broadcast import (
    broadcasting_from_rank0, building_full_load_template, seed_stand_ins, share_rank0_entries, without_stand_ins,
)
from .state import (
    SEED_KEY, StatePolicy, check_loadable, encoded_orders, export_full_state, export_state,
    localize_full_state, masters_follow_params, own_storages, record_orders, restore_loaded, saved_pairs,
)
from .step_cache import StepCache
from .tensors import is_fsdp1_shard, outside_inference_mode

__all__ = ["Adam", "AdamW", "Adamax", "AdaMax"]


def _built_by_zero(depth: int = 8) -> bool:
    """Whether torch's ZeroRedundancyOptimizer is constructing this optimizer (it builds
    one per rank over that rank's partition of the params, and nothing on the params or
    groups says so)."""
    # Looked up, not imported: a ZeroRedundancyOptimizer constructing us has imported its
    # module, and importing torch.distributed.optim takes seconds and warns (torch.jit).
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if module is None:
        return False
    ZeroRedundancyOptimizer = module.ZeroRedundancyOptimizer
    frame = sys._getframe(1)
    for _ in range(depth):
        frame = frame.f_back
        if frame is None:
            return False
        if isinstance(frame.f_locals.get("self"), ZeroRedundancyOptimizer):
            return True
    return False


def _zero_clip_error(what: str, instead: str) -> NotImplementedError:
    return NotImplementedError(
        f"{what}: this optimizer is ZeroRedundancyOptimizer's local one, which holds this rank's "
        f"partition of the params: its norm would be the partition's alone. Instead {instead} "
        "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) before step()")


class _Calls:
    """What an optimizer's calls leave for its later calls: the step cache, the state a
    clip made (``_ready``), the loaded masters to reconcile with their params, GradScaler's
    opt-out. One object the optimizer holds, written through, never rebound: a wrapper
    that subclasses the optimizer's class and forwards attribute reads to it (Lightning's
    ``LightningOptimizer``, Fabric's ``_FabricOptimizer``) runs these methods with itself
    as ``self``, and its attribute writes would stay on the wrapper, unseen by the
    optimizer's own calls (a clip through the wrapper, then the optimizer's step)."""

    __slots__ = ("cache", "clip_made_state", "known_masters", "amp_scaling")

    def __init__(self) -> None:
        self.cache: StepCache | None = None
        self.clip_made_state: list | None = None
        # The state dicts with a master the last gathering saw, by id (empty after a load:
        # every master then follows its param at the next gathering).
        self.known_masters: dict = {}
        self.amp_scaling: bool | None = None


class _TritonAdamBase(Optimizer):
    """torch.optim's contract around one multi-tensor step."""

    _algorithm = "adam"

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

    def _init_extras(self, bias_correction, master_weights, block_size, num_warps, autotune_mode,
                     persistent, state_dtype=None, stochastic_rounding=False, seed=None,
                     max_grad_norm=None, grad_norm_type=2.0):
        self._zero_partition = _built_by_zero()
        self._set_extras(dict(
            bias_correction=bias_correction, master_weights=master_weights, state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding, seed=seed, block_size=block_size,
            num_warps=num_warps, autotune=autotune_mode, persistent=persistent,
            max_grad_norm=max_grad_norm, grad_norm_type=grad_norm_type))
        extras = self._extras_by_key()
        for group in self.param_groups:
            check_group_extras(type(self).__name__, group, extras)
        self._cache = None
        self._clipper = Clipper(type(self).__name__)

    def _calls(self) -> _Calls:
        calls = getattr(self, "_calls_state", None)  # a forwarding wrapper reads its optimizer's
        if calls is None:  # first use (torch's __init__ adds the groups first), or unpickled
            calls = self._calls_state = _Calls()
            # A copy's state (deepcopy, pickle) is the original's, not a load.
            calls.known_masters = {id(st): st for st in self.state.values()}
        return calls

    @property
    def _cache(self) -> StepCache | None:
        return self._calls().cache

    @_cache.setter
    def _cache(self, cache: StepCache | None) -> None:
        self._calls().cache = cache

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Whether GradScaler leaves unscaling and the inf skip to ``step()`` (read by
        ``GradScaler.step`` each time): the kernels do both, but torch.optim's
        implementation, which steps ``differentiable=True`` groups, does neither, so any
        such group (added or switched on later too) makes GradScaler do them, as for
        torch.optim's own non-fused optimizers. An instance may opt out by setting it."""
        override = self._calls().amp_scaling
        if override is not None:
            return override
        return not any(map(self._torch_steps, self.param_groups))

    @property
    def _records_every_group(self) -> bool:
        """The constructor's ``differentiable``: torch.optim's step sets the grad mode from it
        (not from each group's flag), so with True every group's update is recorded."""
        return bool(self.defaults.get("differentiable"))

    def _torch_steps(self, group: dict) -> bool:
        """Whether torch.optim's implementation steps ``group``: a differentiable=True group,
        and every group of an optimizer that records every group."""
        return bool(group.get("differentiable")) or self._records_every_group

    @_step_supports_amp_scaling.setter
    def _step_supports_amp_scaling(self, value: bool) -> None:
        self._calls().amp_scaling = bool(value)

    def _set_extras(self, values: dict, warn_idle: bool = True) -> None:
        """Check the options tritonadam adds (``values``, keyed as ``_EXTRAS``) as the
        constructor does, and set them normalized; raises, setting nothing, on a bad one."""
        extras = checked_extras(type(self).__name__, self.param_groups, warn_idle=warn_idle,
                                recorded=self._records_every_group, **values)
        max_grad_norm = extras["max_grad_norm"]
        if max_grad_norm is not None and any(is_fsdp1_shard(p) for g in self.param_groups for p in g["params"]):
            raise fsdp1_clip_error("max_grad_norm")
        if max_grad_norm is not None and getattr(self, "_zero_partition", False):
            raise _zero_clip_error("max_grad_norm", "drop max_grad_norm= and call")
        for key in self._EXTRAS:
            setattr(self, key, extras[key])
        self._checked_extras = self._extras()

    def _extras(self) -> tuple:
        return tuple(getattr(self, key) for key in self._EXTRAS)

    def _extras_by_key(self) -> dict:
        return {key: getattr(self, key) for key in self._EXTRAS}

    def _recheck_extras(self) -> None:
        """Options set on the optimizer by hand since they were checked (``opt.state_dtype =
        "8bit"`` between steps): checked as the constructor checks them, before the step
        writes anything."""
        current, checked = self._extras(), getattr(self, "_checked_extras", None)
        if checked is not None and all(a is b or (type(a) is type(b) and a == b) for a, b in zip(current, checked)):
            return
        self._set_extras(dict(zip(self._EXTRAS, current)), warn_idle=False)

    def __getstate__(self) -> dict[str, Any]:
        # The cache holds raw pointers into this optimizer's tensors: never copy it (a
        # deepcopy would step the original's state); the clipper holds device buffers
        # and references to this optimizer's grads.
        state = super().__getstate__()
        state.pop("_calls_state", None)
        state.pop("_clipper", None)
        state.update({k: getattr(self, k, v) for k, v in self._EXTRAS.items()})
        # The element order quantized codes were encoded in lives beside them, not in
        # them: the copy's codes (the same copied objects as in its state) get it too.
        state["_codes_orders"] = encoded_orders(self.state)
        state["_zero_partition"] = getattr(self, "_zero_partition", False)
        return state

    def __deepcopy__(self, memo: dict) -> "_TritonAdamBase":
        # copy's own way (__getstate__, then __setstate__ of the copied state), and a clip
        # coefficient pending for grads this deepcopy copied too (plain tensors' .grad;
        # an nn.Parameter's copy has none): torch's copy of clipped grads is clipped.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        clipper = self.__dict__.get("_clipper")
        if clipper is not None:
            new._clipper = clipper.copied(memo) or new._clipper
        made = [(memo.get(id(p)), memo.get(id(entry)), {k: memo.get(id(v), v) for k, v in values.items()})
                for p, entry, values in self._calls().clip_made_state or ()]
        made = [m for m in made if m[0] is not None and m[1] is not None]
        if made:  # the copy's state a clip made is the copy's clip's (_forget_clip_state)
            new._calls().clip_made_state = made
        return new

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict calls __setstate__ without our options: keep the
        # current ones then; unpickling a fresh object takes them from the pickle.
        extras = {k: state.pop(k, getattr(self, k, v)) for k, v in self._EXTRAS.items()}
        record_orders(state.pop("_codes_orders", ()))
        zero_partition = state.pop("_zero_partition", getattr(self, "_zero_partition", False))
        state.pop("_calls_state", None)  # a live optimizer's (load_state_dict) stays
        clipper = state.pop("_clipper", None) or getattr(self, "_clipper", None)
        super().__setstate__(state)
        for k, v in extras.items():
            setattr(self, k, v)
        self._set_group_defaults()
        self._cache = None
        self._clipper = clipper or Clipper(type(self).__name__)
        self._zero_partition = zero_partition

    def _set_group_defaults(self) -> None:
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)

    @torch._disable_dynamo  # as torch.optim's: run eagerly inside a compiled function
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "master_weights") and isinstance(param_group, dict):  # not during torch's
            # __init__ (checked after it), nor for a non-dict, which torch's own check refuses
            params = param_group["params"]
            if not isinstance(params, (Tensor, set)):
                # A generator (``head.parameters()``) can be read once: torch's own
                # add_param_group (which keeps this dict) gets the list read here.
                param_group["params"] = params = list(params)
            params = [params] if isinstance(params, Tensor) else list(params)
            check_group_options(type(self).__name__, {**param_group, "params": params}, self._policy,
                                bias_correction=self.bias_correction, recorded=self._records_every_group)
            check_group_extras(type(self).__name__, param_group, self._extras_by_key())
        super().add_param_group(param_group)
        self._cache = None

    @property
    def _policy(self) -> StatePolicy:
        return StatePolicy(self.master_weights, self.state_dtype, self.stochastic_rounding)

    def _options(self) -> tuple:
        """What decides which tensors each param steps with (the cache compares it)."""
        return (self.master_weights, self.state_dtype, self.stochastic_rounding), tuple(
            (bool(g.get("amsgrad", False)), self._torch_steps(g)) for g in self.param_groups
        )

    # ---- state dicts ---------------------------------------------------------------

    @torch._disable_dynamo  # as torch.optim's: run eagerly inside a compiled function
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict, each param's state in its format's exported form
        (a ``master_weights="remainder"`` master as the fp32 ``master_param`` it stands
        for, so the checkpoint loads into either master mode and into torch.optim)."""
        params = [p for g in self.param_groups for p in g["params"]]
        sd = self._state_dict_with(lambda saved: export_state(self._policy, params, saved))
        if building_full_load_template() and isinstance(sd.get("state"), dict):
            # after the user's post-hooks, which never see them (load_state_dict drops
            # them before its pre-hooks)
            sd = {**sd, "state": seed_stand_ins(sd["state"], SEED_KEY)}
        return sd

    def _state_dict_with(self, export) -> dict[str, Any]:
        """torch's ``state_dict()`` with ``export`` applied to its ``"state"`` before the
        user's post-hooks run: they see (and may change) what the caller gets."""
        def hook(optimizer, sd):
            sd["state"] = export(sd["state"])
            return sd

        handle = self.register_state_dict_post_hook(hook, prepend=True)
        try:
            with outside_inference_mode(self._written()):
                return super().state_dict()
        finally:
            handle.remove()

    @torch._disable_dynamo  # as torch.optim's: run eagerly inside a compiled function
    def torch_state_dict(self) -> dict[str, Any]:
        """The state dict with every moment at full precision (fp32) under torch.optim's
        keys, whatever this optimizer stores: ``torch.optim.Adam``/``AdamW``/``Adamax``
        (and any tritonadam optimizer) load it. Quantized moments are decoded; a master
        copy is kept as ``master_param``."""
        return self._state_dict_with(
            lambda saved: export_full_state(self._policy, self._algorithm, self.param_groups, saved))

    @torch._disable_dynamo  # as torch.optim's: run eagerly inside a compiled function
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from this class (any option) or from torch.optim's
        Adam/AdamW/Adamax.

        The whole incoming state is checked (keys, shapes, dtypes) before anything
        changes: a failed load leaves the optimizer as it was. torch's base class casts
        floating state to the param dtype; this optimizer's own entries are restored at
        full precision afterwards (others stay as torch loaded them) and converted to this
        optimizer's formats (moment dtype, master form; loading an fp32 master into
        ``master_weights="remainder"`` sets each bf16 param that is still that master
        rounded to its high half, so the pair is exact, and keeps a param newer than it,
        with the master's low bits under it), and step counts become 0-dim
        tensors in the dtype and on the device torch.optim gives them (a float64 count
        stays float64, and a count stays where the state dict had it, unless the group is
        capturable or fused); the next step moves a count to its param's device.
        """
        name = type(self).__name__
        state_dict = without_stand_ins(state_dict, SEED_KEY)
        # Check and read the state dict torch actually loads: the one user pre-hooks
        # returned. A hook registered last, just for this call, sees it.
        seen = {}
        from_rank0 = broadcasting_from_rank0()

        def capture(optimizer, final):
            # The memory of the state held now, by address, not held: torch's load frees
            # what it replaces. Every tensor the load is given exists already (so does
            # anything made from it before torch's load frees the old state): one at an
            # address of these is this state, or a view of it (state_dict()'s exports).
            seen["own"] = own_storages(self.state)
            if from_rank0:
                final = self._with_rank0_entries(final)
            check_loadable(name, self._algorithm, self.param_groups, final)
            final = localize_full_state(name, self.param_groups, final)
            seen["state_dict"] = final
            return final

        def restore(optimizer):  # before the user's post-hooks: they see the loaded state
            seed = restore_loaded(self._algorithm, self._policy, self.seed, self.param_groups,
                                  seen.get("state_dict", state_dict), self.state,
                                  own=seen.get("own", frozenset()))
            if seed is not None:
                self.seed = seed
            # At the next step every master follows its param (the params may load after),
            # and the replaced state is not held until then.
            self._calls().known_masters = {}

        handles = (self.register_load_state_dict_pre_hook(capture),
                   self.register_load_state_dict_post_hook(restore, prepend=True))
        try:
            with outside_inference_mode(self._written(state_dict)):
                super().load_state_dict(state_dict)
        finally:
            for handle in handles:
                handle.remove()
        self._cache = None

    def _with_rank0_entries(self, final: dict) -> dict:
        """``final`` with the entries of rank 0's full state dict that torch's broadcast
        left out on this rank (``tritonadam.broadcast``); rank 0's refusal, on every rank."""
        import torch.distributed as dist

        error = None
        if dist.get_rank() == 0:
            try:
                check_loadable(type(self).__name__, self._algorithm, self.param_groups, final, alone=True)
            except ValueError as e:
                error = e
        params = dict(saved_pairs(self.param_groups, final)) if error is None else {}

        def own_keys(saved_id) -> set:
            p = params.get(saved_id)
            return set() if p is None else self._policy.format(p).exported_keys(self.state.get(p, {}))

        final, error = share_rank0_entries(final, own_keys, error)
        if error is not None:
            raise error
        return final

    # ---- the step ------------------------------------------------------------------

    def _init_group(self, index: int, group: dict, gathered: gather.Gathered) -> None:
        """torch's per-group gather: validate each param with a grad and its state
        (writes nothing)."""
        gather.init_group(type(self).__name__, self._algorithm, self._policy, self.state, index,
                          group, gathered)

    def _ready(self, clipping: bool = False, grads_only: bool = False) -> StepCache:
        """The step cache, having taken this step's grads: the cache's per-step check, or
        a full gathering and a new cache when it no longer applies (which raises,
        writing nothing, on a bad grad). ``clipping``: whether a fused clip will read
        these grads (refused for CPU params torch's implementation steps next to params
        the kernels step: a clip measures one device's grads). ``grads_only``: nothing
        but grads will be read before the next check (``StepCache.check``)."""
        cache, options = self._cache, self._options()
        if cache is not None and cache.check(self.param_groups, self.state, options, grads_only):
            return cache
        self._cache = None
        gathered = gather.Gathered(for_step=not grads_only)
        for index, group in enumerate(self.param_groups):
            if not self._torch_steps(group):
                self._init_group(index, group, gathered)
        # A clip's gathering (grads_only) makes the state its tables point to before any
        # step; torch.optim makes it at the step. Remembered, so that state of a param
        # whose grad is gone by then is dropped (_forget_clip_state).
        made = [p for p, *_ in gathered.pending + gathered.host + gathered.meta if not self.state.get(p)]
        fresh = made if grads_only else ()
        if gathered.host:
            host.check_options(type(self).__name__, bias_correction=self.bias_correction,
                               clipping_with_gpu_params=clipping and bool(gathered.pending))
        if clipping and any(is_fsdp1_shard(p) for p, *_ in gathered.pending + gathered.host):
            raise fsdp1_clip_error("max_grad_norm" if self.max_grad_norm is not None else "clip_grad_norm_")
        self._cache = gather.build(type(self).__name__, self._algorithm, self._policy, self.seed,
                                   self.param_groups, self.state, gathered, options)
        calls = self._calls()
        if fresh:
            calls.clip_made_state = (calls.clip_made_state or []) + [
                (p, self.state[p], dict(self.state[p])) for p in fresh]
        # Masters in state dicts the last gathering did not see follow their params: after
        # a load_state_dict every one, else those loaded around it (ZeroRedundancyOptimizer,
        # state set by hand).
        calls.known_masters = masters_follow_params(self.state, calls.known_masters, made)
        return self._cache

    # Eager inside a compiled function: the step is one fused launch already (torch.optim
    # lets Dynamo trace its step instead). The decorator loads Dynamo at the first call.
    @torch._disable_dynamo
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

        self._check_param_lists()
        with outside_inference_mode(self._written()) as left:
            self._step(torch.inference_mode if left else contextlib.nullcontext)
        return loss

    def _check_param_lists(self) -> None:
        """Groups whose ``params`` were replaced by hand with an iterator (a generator,
        ``filter``): read into a list, as add_param_group reads one (the step's passes read
        the params several times; torch.optim's first step reads it up, and later ones
        find it empty). Other containers (a set, an nn.ParameterList) are read as they are."""
        for group in self.param_groups:
            if isinstance(group.get("params"), collections.abc.Iterator):
                group["params"] = list(group["params"])

    def _written(self, incoming: dict | None = None):
        """The params a call may write or make state for, lazily: those with a grad or
        state, and those ``incoming`` (a state dict being loaded) holds state for (every
        param where it cannot be read so)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None or p in self.state:
                    yield p
        if incoming is not None:
            try:
                loaded = [p for saved_id, p in saved_pairs(self.param_groups, incoming)
                          if saved_id in incoming["state"]]
            except (KeyError, TypeError, AttributeError):
                loaded = [p for group in self.param_groups for p in group["params"]]
            yield from loaded

    def _step(self, caller_mode) -> None:
        """``caller_mode``: a context for torch's own steps of ``differentiable`` groups,
        which record (or not) as torch.optim's would in the caller's mode."""
        # Check everything before writing anything, so a bad value or grad anywhere leaves
        # every param and state as it was: switches and group values, a pending clip,
        # then the tensors (the cache's per-step check, or a full gathering).
        self._forget_clip_state()
        self._recheck_extras()
        name = type(self).__name__
        autotune_mode = autotune.resolve_mode(self.autotune)
        adamax = self._algorithm == "adamax"
        hypers = [group_hyper(g, adamax, self.bias_correction) for g in self.param_groups]
        torch_work = []
        grad_enabled = self._records_every_group
        for g in self.param_groups:
            if self._torch_steps(g):
                check_group_options(name, g, self._policy, bias_correction=self.bias_correction,
                                    recorded=grad_enabled)
                with caller_mode():
                    torch_work.append((g, differentiable.inputs(name, g, self.state, grad_enabled=grad_enabled)))
        grad_scale = getattr(self, "grad_scale", None)
        clipper = self._clipper
        clipper.check_torch_stepped([p for _, (params, _) in torch_work for p in params])
        cache = self._cache
        if clipper.pending and cache is not None and cache.still_taken(self.param_groups, self.state,
                                                                        self._options()):
            clipper.before_step(cache, grad_scale, holds=True)  # the clip just checked them
        else:
            cache = self._ready(clipping=self.max_grad_norm is not None or clipper.pending)
            clipper.before_step(cache, grad_scale)
        if self.max_grad_norm is not None:  # refused whichever groups have grads
            clipper.check_supported([g for g, _ in torch_work], self.grad_norm_type,
                                    complex_grads=cache.has_complex)
            if cache.empty:
                clipper.no_grads()
            else:
                clipper.clip(cache, self.max_grad_norm, self.grad_norm_type, grad_scale=grad_scale,
                             check_finite=False, auto=True)

        for group, inputs in torch_work:
            with caller_mode():
                differentiable.step(name, self._algorithm, self._policy, self.state, group, *inputs,
                                    grad_enabled=grad_enabled)
        coefficient = clipper.take()  # consumed by this step, or by nothing if nothing steps
        try:
            if not cache.empty:
                cache.launch(
                    self.param_groups, hypers, block_size=self.block_size, num_warps=self.num_warps,
                    autotune_mode=autotune_mode, persistent=self.persistent, grad_scale=grad_scale,
                    found_inf=getattr(self, "found_inf", None), clip=coefficient,
                )
            cache.count_meta_steps()
        finally:
            cache.release()
        self._calls().clip_made_state = None  # the rest is this step's now

    def _forget_clip_state(self) -> None:
        """Drop the state a clip made (see ``_ready``) for params that have lost their grad
        or left the optimizer since, before any step read it (a clip, then ``zero_grad()``
        and a skipped step): torch.optim, which makes state at the step, has none for
        them. The rest waits for a step that completes, with the seed the optimizer has by
        then (``opt.seed`` set after the clip: the state is the step's, as without it)."""
        calls = self._calls()
        made, calls.clip_made_state = calls.clip_made_state, None
        if not made:
            return
        members = {id(q) for g in self.param_groups for q in g["params"]}
        waiting = []
        for p, entry, made_values in made:
            if self.state.get(p) is not entry or entry.keys() != made_values.keys() or any(
                    entry[k] is not v for k, v in made_values.items()):
                continue  # loaded or written since: not the clip's
            if p.grad is None or id(p) not in members:
                del self.state[p]
                continue
            if SEED_KEY in entry and self.seed is not None and int(entry[SEED_KEY]) != self.seed:
                entry[SEED_KEY] = made_values[SEED_KEY] = torch.tensor(self.seed, dtype=torch.int64)
            waiting.append((p, entry, made_values))
        if waiting:
            calls.clip_made_state = waiting

    # ---- gradient clipping --------------------------------------------------------------

    @torch._disable_dynamo  # eager, as step(): its launches are fused already
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

        The coefficient belongs to the grads it measured. ``zero_grad()`` drops it, as the
        grads torch's in-place clip scaled would be gone; so do grads replaced before the
        step, with a warning (a new backward, or copies such as ``p.grad.float()``, which
        torch's clip would have left clipped: the step cannot tell). A second call before
        the step measures the grads as already clipped by the first and compounds, as a
        second in-place clip would. Grads changed in place after the call drop it too, with a
        warning at the step (torch's version counters or the grads' addresses show it;
        writes through ``.data``, numpy or collectives do not). The
        step that follows reuses this call's check of the grads, after confirming that
        every param still holds the grad measured here; the params and state it checks
        itself.

        GradScaler: the norm must be of unscaled grads. Either call
        ``scaler.unscale_(opt)`` first (torch's recipe, for fp32 params; it rewrites the
        grads), or pass ``scaler=scaler`` here: the scale is folded into the norm and the
        step unscales in its kernel (and writes the grads back unscaled, not clipped, as
        torch's fused step leaves them). A clip of scaled
        grads without either makes the step raise. Inf/NaN grads make the norm
        non-finite; GradScaler's ``found_inf`` then skips the whole step on the device as
        usual.

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
        if getattr(self, "_zero_partition", False):
            raise _zero_clip_error("clip_grad_norm_", "call")
        max_norm = check_max_norm(max_norm)
        p = norm_order(norm_type)
        if foreach not in (None, True, False):
            raise ValueError(f"foreach must be None, True or False, got {foreach!r}")
        grad_scale = grad_scaler_scale(scaler, self)
        self._check_param_lists()
        clipper = self._clipper
        clipper.check_supported(list(filter(self._torch_steps, self.param_groups)), p, complex_grads=p != 2.0 and any(
            q.is_complex() for g in self.param_groups for q in g["params"] if q.grad is not None))
        with outside_inference_mode(self._written()):
            cache = self._ready(clipping=True, grads_only=True)
            if cache.empty:
                return clipper.no_grads()
            norm = clipper.clip(cache, max_norm, p, grad_scale=grad_scale,
                                check_finite=bool(error_if_nonfinite), auto=False)
            return replicated(norm, clipper.mesh_of(cache))

    @property
    def last_grad_norm(self) -> Tensor | None:
        """The total grad norm of the latest clip (``clip_grad_norm_`` or ``max_grad_norm``)
        as ``clip_grad_norm_`` returns it, or None before any. With ``max_grad_norm`` it is
        one fixed tensor that each step overwrites (CUDA-graph safe): ``.item()`` or
        ``.clone()`` it to keep a value."""
        return self._clipper.last_grad_norm()

    @torch._disable_dynamo
    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; also drops a clip coefficient waiting for these grads."""
        super().zero_grad(set_to_none)
        self._forget_clip_state()
        if getattr(self, "_clipper", None) is not None:
            self._clipper.clear()  # the grads a clip measured are gone
        if getattr(self, "_cache", None) is not None:
            self._cache.release()


class Adam(_TritonAdamBase):
    r"""Adam (and, with ``decoupled_weight_decay=True``, AdamW) with Triton multi-tensor kernels.

    A drop-in replacement for :class:`torch.optim.Adam`: same arguments, defaults,
    ``param_groups`` keys and state keys (``step``, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``), so state dicts move between the two for the state torch has
    (fp32 or bf16 moments); quantized moments and the remainder master have keys of their
    own, which :meth:`torch_state_dict` converts to torch's.

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

    The tensors of all param groups are updated by one kernel launch per bucket: the
    tensors sharing a device, param and grad dtypes and state format (moment storage,
    master copy, AMSGrad, stochastic rounding); the math runs in fp32 (fp64 for fp64
    params).

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
        state_dtype (torch.dtype or str, optional): ``torch.bfloat16`` stores
            ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``) in bf16; ``"8bit"`` and
            ``"4bit"`` store each moment blockwise-quantized (uint8 codes under
            ``<moment>_8bit``/``<moment>_4bit`` and a bf16 scale per 64 elements under
            ``<moment>_scales``; ``torch_state_dict()`` exports fp32 moments for
            torch.optim). The math stays fp32. Low-precision second moments are where
            quality is lost first.
        stochastic_rounding (bool): round values stored in 16 bits or fewer without a
            master copy (fp16/bf16 params, bf16 or quantized state) stochastically instead
            of to nearest:
            unbiased, so updates smaller than half a unit in the last place are not lost
            on average. Counter-based random numbers: reproducible, graph-safe.
        seed (int, optional): of the stochastic rounding (default: ``torch.initial_seed()``
            when the optimizer is built, the seed the last ``torch.manual_seed`` before it
            set, read without drawing from torch's global generator); saved in the state
            dict. Unused without stochastic rounding.
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
        check_hyper(lr, betas, eps, weight_decay)
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
        # torch's _to_scalar: 1-element tensor betas of more dims are squeezed to 0-dim; a
        # 0-dim one is kept as the very tensor given (a learned beta stays a graph leaf).
        betas = tuple(b.squeeze() if isinstance(b, Tensor) and b.dim() != 0 else b for b in betas)
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

    _algorithm = "adamax"

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
        check_hyper(lr, betas, eps, weight_decay)
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
