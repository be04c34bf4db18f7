"""Optimizer state formats: one object per way a param's state is stored.

A param's state is its step count, its moments (``exp_avg`` and ``exp_avg_sq``, or
AdaMax's ``exp_inf``, plus AMSGrad's ``max_exp_avg_sq``), and depending on the options:

- moments stored in fp32 (the default; fp64 for fp64 params, complex for complex ones),
  in bf16 (``state_dtype=torch.bfloat16``), or blockwise-quantized (``state_dtype="8bit"``
  or ``"4bit"``: uint8 codes under ``<moment>_8bit``/``<moment>_4bit`` and a bf16 scale
  per block under ``<moment>_scales``, see ``tritonadam.quantize``); the math is fp32;
- ``master_weights=True``: an fp32 copy of each fp16/bf16 param (``master_param``);
- ``master_weights="remainder"``: for bf16 params, the low 16 bits of the fp32 master
  (``master_param_remainder``, int16) beside the param, which holds the high half rounded
  to nearest (ties away from zero): the exact fp32 master in 2 extra bytes, exported by
  ``state_dict()`` as the fp32 ``master_param`` it stands for;
- ``stochastic_rounding=True``: what is kept in 16 bits or fewer without a master copy
  (fp16/bf16 params, bf16 or quantized state) is rounded stochastically from counter-based random numbers keyed
  by ``rounding_seed`` (kept in each such param's state), the tensor, the element and the
  step count.

:class:`StatePolicy` holds an optimizer's options and gives each param its
:class:`ParamFormat`: which tensors it holds, how to create them and convert any other
format's (a state dict from torch.optim, another mode) into them, how to export them, and
the bucket of kernel variants they are stepped by (`bucket_key`). The optimizer never
branches on a mode.
"""

from .checkpoint import (
    check_loadable, export_full_state, export_state, localize_full_state, own_storages, restore_loaded, saved_pairs,
)
from .entries import LOW_PRECISION, MASTER_KEY, REMAINDER_KEY, SEED_KEY, WRITTEN_KEYS, moment_keys
from .master import join_master, master_follows_param, masters_follow_params, split_master
from .moments import DenseMoments, QuantizedMoments
from .orders import encoded_orders, record_orders
from .param_format import ParamFormat
from .policy import StatePolicy, variant
from .steps import loaded_step_device, new_step_dtype

__all__ = [
    "LOW_PRECISION", "MASTER_KEY", "REMAINDER_KEY", "SEED_KEY", "DenseMoments", "ParamFormat", "QuantizedMoments",
    "StatePolicy", "WRITTEN_KEYS", "check_loadable", "encoded_orders", "export_full_state", "export_state", "join_master",
    "loaded_step_device", "localize_full_state", "master_follows_param", "masters_follow_params", "moment_keys", "new_step_dtype",
    "own_storages", "record_orders", "restore_loaded", "saved_pairs", "split_master", "variant",
]
