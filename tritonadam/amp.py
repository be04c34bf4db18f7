"""GradScaler companions for optimizers that unscale inside their step."""
from __future__ import annotations

import torch.distributed as dist
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler as _TorchShardedGradScaler

__all__ = ["ShardedGradScaler"]


class ShardedGradScaler(_TorchShardedGradScaler):
    """``torch.distributed.fsdp.sharded_grad_scaler.ShardedGradScaler`` that agrees across
    ranks when the optimizer unscales in its own step.

    For optimizers with ``_step_supports_amp_scaling`` (tritonadam's, torch's fused ones),
    ``GradScaler.step`` checks for inf/NaN through ``_check_inf_per_device``, which looks
    at this rank's grad shard only; torch's ShardedGradScaler all-reduces the flag only in
    ``unscale_``. Under FSDP1 a rank holding the inf then skips and backs off its scale
    while the others step. This class all-reduces the flags in that check too. Not
    needed when you call ``scaler.unscale_(opt)`` before ``scaler.step(opt)``, nor with
    FSDP2 on a 1-D mesh (DTensor grads make the check a collective) or DDP (grads are
    identical). Needed with FSDP2 on a 2-D mesh: torch reduces a DTensor flag over the
    mesh dims the first grad is sharded on, which a grad replicated along a dim (a norm
    left out of tensor parallelism) does not cross.
    """

    def _check_inf_per_device(self, optimizer):
        found = super()._check_inf_per_device(optimizer)
        if dist.is_available() and dist.is_initialized():
            works = [
                dist.all_reduce(t, async_op=True, group=self.process_group)
                for t in found.values()
            ]
            for work in works:
                work.wait()
        return found
