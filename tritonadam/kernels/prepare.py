"""The prepare kernel: advance step counts and fill the per-tensor scalar table.

Launched once per step and device, before the update kernels, over every tensor of the
optimizer on that device. Keeping step counts out of the update kernel means the update
kernel needs no atomics or fences (the last program of a tensor would otherwise have to
know it is last), and the bias corrections, computed here in fp64 like torch.optim's
Python floats, cost the update kernel nothing.
"""
import triton
import triton.language as tl

from .layout import (
    CLIP_COEF,
    COL_STEP,
    COL_STEP_FP64,
    G_BETA1,
    G_BETA2,
    G_BIAS_CORRECTION,
    G_DECOUPLED,
    G_EPS,
    G_LR,
    G_SIGN,
    G_W1,
    G_W2,
    G_WD,
    GP_BETA1,
    GP_BETA2,
    GP_LR,
    GROUP_COLUMNS,
    GROUP_POINTER_COLUMNS,
    S_BC2_SQRT,
    S_BETA2,
    S_DECAY,
    S_EPS,
    S_GMUL,
    S_STEP,
    S_STEP_SIZE,
    S_UNSCALE,
    S_W1,
    S_W2,
    S_WD,
    SCALAR_COLUMNS,
    TABLE_COLUMNS,
)

@triton.jit
def _one_minus_power(beta, step):
    """1 - beta**step for any beta. A beta of 0 is taken as the least normal double: the
    same 1 - beta**t, and no log(0). A negative one, which only a value set after
    construction gives (torch.optim checks betas there alone, and steps with what a
    scheduler writes later), is raised by its magnitude and signed by the step's parity."""
    magnitude = one_minus_pow(tl.log(tl.maximum(tl.abs(beta), 2.2250738585072014e-308)), step)
    odd = (step - 2.0 * tl.floor(step * 0.5)) == 1.0
    return tl.where((beta < 0) & odd, 2.0 - magnitude, magnitude)


@triton.jit
def one_minus_pow(log_beta, step):
    """1 - beta**step from log(beta), accurate where beta**step is close to 1.

    1 - exp(x) cancels badly for beta2 = 0.999 at small steps; Kahan's expm1 trick keeps
    full relative precision with only exp and log, which the interpreter and every GPU
    backend have.
    """
    x = step * log_beta
    u = tl.exp(x)
    um1 = u - 1.0
    expm1 = tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, (um1 * x) / tl.log(u)))
    # +0 for a beta of 1, as torch's 1 - beta**t (a scheduler may write one after
    # construction): lr / bc1 is then +inf, where -expm1's -0 stepped the other way.
    return 0.0 - expm1


@triton.jit
def _group_tensor(gptrs, gprow, COL: tl.constexpr, mask):
    """(whether the group's value is a tensor, its current value as float64)."""
    addr = tl.load(gptrs + gprow + COL, mask=mask, other=0)
    is64 = tl.load(gptrs + gprow + COL + 1, mask=mask, other=0) != 0
    f32 = tl.load(addr.to(tl.pointer_type(tl.float32)), mask=mask & (addr != 0) & ~is64)
    f64 = tl.load(addr.to(tl.pointer_type(tl.float64)), mask=mask & (addr != 0) & is64)
    return addr != 0, tl.where(is64, f64, f32.to(tl.float64))


@triton.jit
def _prepare_kernel(
    table_ptr, group_of_ptr, groups_ptr, group_ptrs_ptr, scalars_ptr,
    grad_scale_ptr, found_inf_ptr, clip_ptr, n,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_CLIP: tl.constexpr,
    LR_TENSORS: tl.constexpr, BETA_TENSORS: tl.constexpr, BLOCK: tl.constexpr,
):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    trow = table_ptr + idx.to(tl.int64) * TABLE_COLUMNS
    step_addr = tl.load(trow + COL_STEP, mask=mask, other=0)
    # Step counts are float32, or float64 where torch.optim would make them so (a float64
    # default dtype): each read and written in its own width, counted in float64.
    is64 = tl.load(trow + COL_STEP_FP64, mask=mask, other=0) != 0
    ptr32 = step_addr.to(tl.pointer_type(tl.float32))
    ptr64 = step_addr.to(tl.pointer_type(tl.float64))
    step = tl.where(is64, tl.load(ptr64, mask=mask & is64, other=1.0),
                    tl.load(ptr32, mask=mask & ~is64, other=1.0).to(tl.float64))
    advance = True
    if HAS_FOUND_INF:
        # GradScaler found inf/NaN: no step is taken, step counts included.
        advance = tl.load(found_inf_ptr) == 0
    if advance:
        step = step + 1.0
        step32 = step.to(tl.float32)
        step = tl.where(is64, step, step32.to(tl.float64))
        tl.store(ptr32, step32, mask=mask & ~is64)
        tl.store(ptr64, step, mask=mask & is64)

    grow = tl.load(group_of_ptr + idx, mask=mask, other=0).to(tl.int64) * GROUP_COLUMNS
    lr = tl.load(groups_ptr + grow + G_LR, mask=mask, other=0.0)
    # Lanes past the last tensor compute with harmless values and store nothing.
    beta1 = tl.load(groups_ptr + grow + G_BETA1, mask=mask, other=0.5)
    beta2 = tl.load(groups_ptr + grow + G_BETA2, mask=mask, other=0.5)
    w1 = tl.load(groups_ptr + grow + G_W1, mask=mask, other=0.0)
    w2 = tl.load(groups_ptr + grow + G_W2, mask=mask, other=0.0)
    gprow = (grow // GROUP_COLUMNS) * GROUP_POINTER_COLUMNS
    if LR_TENSORS:
        is_tensor, value = _group_tensor(group_ptrs_ptr, gprow, GP_LR, mask)
        lr = tl.where(is_tensor, value, lr)
    if BETA_TENSORS:
        is_tensor, value = _group_tensor(group_ptrs_ptr, gprow, GP_BETA1, mask)
        beta1 = tl.where(is_tensor, value, beta1)
        w1 = tl.where(is_tensor, 1.0 - value, w1)
        is_tensor, value = _group_tensor(group_ptrs_ptr, gprow, GP_BETA2, mask)
        beta2 = tl.where(is_tensor, value, beta2)
        w2 = tl.where(is_tensor, 1.0 - value, w2)
    eps = tl.load(groups_ptr + grow + G_EPS, mask=mask, other=0.0)
    wd = tl.load(groups_ptr + grow + G_WD, mask=mask, other=0.0)
    decoupled = tl.load(groups_ptr + grow + G_DECOUPLED, mask=mask, other=0.0) != 0
    gmul = tl.load(groups_ptr + grow + G_SIGN, mask=mask, other=1.0)
    corrected = tl.load(groups_ptr + grow + G_BIAS_CORRECTION, mask=mask, other=0.0) != 0

    t = step
    # fp64, like torch.optim's Python-float scalars; the update kernel rounds once.
    bc1 = _one_minus_power(beta1, t)
    bc2 = _one_minus_power(beta2, t)
    step_size = tl.where(corrected, lr / bc1, lr)
    bc2_sqrt = tl.where(corrected, tl.sqrt(bc2), 1.0)
    unscale = 1.0
    if HAS_GRAD_SCALE:
        # What GradScaler.unscale_ multiplies by: 1/scale in double, rounded to fp32.
        unscale = (1.0 / tl.load(grad_scale_ptr).to(tl.float64)).to(tl.float32).to(tl.float64)
        gmul = gmul * unscale
    if HAS_CLIP:
        # Gradient clipping without touching the grads: clip_grad_norm_ left its
        # coefficient in device memory, and every grad element is multiplied by gmul.
        gmul = gmul * tl.load(clip_ptr + CLIP_COEF)

    srow = scalars_ptr + idx.to(tl.int64) * SCALAR_COLUMNS
    tl.store(srow + S_GMUL, gmul, mask=mask)
    tl.store(srow + S_W1, w1, mask=mask)
    tl.store(srow + S_BETA2, beta2, mask=mask)
    tl.store(srow + S_W2, w2, mask=mask)
    tl.store(srow + S_EPS, eps, mask=mask)
    tl.store(srow + S_STEP_SIZE, step_size, mask=mask)
    tl.store(srow + S_BC2_SQRT, bc2_sqrt, mask=mask)
    tl.store(srow + S_DECAY, tl.where(decoupled, 1.0 - lr * wd, 1.0), mask=mask)
    tl.store(srow + S_WD, tl.where(decoupled, 0.0, wd), mask=mask)
    tl.store(srow + S_STEP, t, mask=mask)
    tl.store(srow + S_UNSCALE, unscale, mask=mask)
