"""@triton.jit pieces shared by the Adam and AdaMax kernels.

Every launch covers many tensors. The host builds, per bucket of same-dtype tensors, a
device table (one int64 row per tensor, columns below) and a block map (program id ->
row). A program finds its tensor through the map, loads that tensor's pointers from the
row and updates one BLOCK of it.
"""
import triton
import triton.language as tl

# Columns of the per-tensor table (int64). Pointers are raw data_ptr() values.
COL_PARAM = tl.constexpr(0)
COL_EXP_AVG = tl.constexpr(1)
COL_STATE2 = tl.constexpr(2)  # exp_avg_sq (Adam) or exp_inf (AdaMax)
COL_MAX_EXP_AVG_SQ = tl.constexpr(3)  # AMSGrad only, else 0
COL_MASTER = tl.constexpr(4)  # fp32 master copy, else 0
COL_STEP = tl.constexpr(5)  # 0-dim fp32 step tensor of this param
COL_NUMEL = tl.constexpr(6)
COL_FIRST_BLOCK = tl.constexpr(7)
TABLE_COLUMNS = 8
NCOL = tl.constexpr(TABLE_COLUMNS)


@triton.jit
def load_ptr(row_ptr, COL: tl.constexpr, DTYPE: tl.constexpr):
    addr = tl.load(row_ptr + COL)
    return addr, addr.to(tl.pointer_type(DTYPE))


@triton.jit
def locate_block(table_ptr, block_map_ptr, pid, BLOCK: tl.constexpr):
    """(tensor index, its table row, its numel, first element of block ``pid``)."""
    t = tl.load(block_map_ptr + pid).to(tl.int64)
    row = table_ptr + t * NCOL
    numel = tl.load(row + COL_NUMEL)
    first = tl.load(row + COL_FIRST_BLOCK)
    # int64 so tensors beyond 2**31 elements index correctly.
    start = (pid - first) * BLOCK
    return t, row, numel, start


@triton.jit
def scalar(hi, lo, ptr, IS_TENSOR: tl.constexpr, CDTYPE: tl.constexpr):
    """A hyper-parameter in the compute dtype.

    Python floats reach Triton as fp32, so fp64 steps get each scalar as an fp32 pair
    (hi + lo) to keep double precision. A tensor hyper-parameter (lr for schedulers and
    CUDA graphs) is read from its pointer, so replays see in-place updates.
    """
    if IS_TENSOR:
        return tl.load(ptr).to(CDTYPE)
    elif CDTYPE == tl.float64:
        # Widen before adding ('+' of two fp32 scalars would round away lo).
        zero = tl.zeros((), dtype=tl.float64)
        return (zero + hi) + lo
    else:
        return hi


@triton.jit
def ieee_div(a, b):
    # '/' and tl.sqrt are approximate for fp32 on NVIDIA GPUs; the _rn forms are IEEE
    # like torch's kernels. fp64 '/' and sqrt are IEEE already (and have no _rn form).
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def ieee_sqrt(x):
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def load_hyper(
    lr_hi, lr_lo, lr_ptr, beta1_ptr, beta2_hi, beta2_lo, beta2_ptr,
    w1_hi, w1_lo, w2_hi, w2_lo, log_beta1_hi, log_beta1_lo, log_beta2_hi, log_beta2_lo,
    eps_hi, eps_lo, wd_hi, wd_lo, grad_scale_ptr,
    LR_IS_TENSOR: tl.constexpr, BETAS_ARE_TENSORS: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, CDTYPE: tl.constexpr,
):
    """(lr, beta2, 1-beta1, 1-beta2, log beta1, log beta2, eps, weight decay, 1/grad scale)."""
    lr = scalar(lr_hi, lr_lo, lr_ptr, LR_IS_TENSOR, CDTYPE)
    eps = scalar(eps_hi, eps_lo, eps_hi, False, CDTYPE)
    weight_decay = scalar(wd_hi, wd_lo, wd_hi, False, CDTYPE)
    if BETAS_ARE_TENSORS:
        beta1 = tl.load(beta1_ptr).to(CDTYPE)
        beta2 = tl.load(beta2_ptr).to(CDTYPE)
        w1 = 1.0 - beta1
        w2 = 1.0 - beta2
        log_beta1 = tl.log(beta1)
        log_beta2 = tl.log(beta2)
    else:
        # Derived on the host in double, as torch.optim does with Python floats.
        beta2 = scalar(beta2_hi, beta2_lo, beta2_ptr, False, CDTYPE)
        w1 = scalar(w1_hi, w1_lo, w1_hi, False, CDTYPE)
        w2 = scalar(w2_hi, w2_lo, w2_hi, False, CDTYPE)
        log_beta1 = scalar(log_beta1_hi, log_beta1_lo, log_beta1_hi, False, CDTYPE)
        log_beta2 = scalar(log_beta2_hi, log_beta2_lo, log_beta2_hi, False, CDTYPE)
    inv_scale = 1.0
    if HAS_GRAD_SCALE:
        # The value GradScaler.unscale_ multiplies by: 1/scale in double, then rounded.
        inv_scale = (1.0 / tl.load(grad_scale_ptr).to(tl.float64)).to(CDTYPE)
    return lr, beta2, w1, w2, log_beta1, log_beta2, eps, weight_decay, inv_scale


@triton.jit
def one_minus_pow(log_beta, step):
    """1 - beta**step from log(beta), accurate where beta**step is close to 1.

    1 - exp(x) cancels badly for beta2 = 0.999 at small steps (fp32 keeps ~4 digits of
    0.001); Kahan's expm1 trick keeps full relative precision with only exp and log,
    which the interpreter and every GPU backend have.
    """
    x = step * log_beta
    u = tl.exp(x)
    um1 = u - 1.0
    expm1 = tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, ieee_div(um1 * x, tl.log(u))))
    return -expm1


@triton.jit
def begin_step(row, found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """(pointer to this tensor's step, the step number being taken, whether to skip)."""
    step_ptr = tl.load(row + COL_STEP).to(tl.pointer_type(tl.float32))
    step = tl.load(step_ptr) + 1.0
    skip = False
    if HAS_FOUND_INF:
        # GradScaler found inf/NaN in some grad: the whole step is skipped on the device,
        # step counts included, with no host sync.
        skip = tl.load(found_inf_ptr) != 0
    return step_ptr, step, skip


@triton.jit
def end_step(step_ptr, step, counters_ptr, t, numel, BLOCK: tl.constexpr):
    """Store the incremented step once every program of this tensor has read the old one.

    Each program reads the step, updates its block, then bumps the tensor's counter; the
    last of the tensor's programs (acq_rel orders the others' reads before it) writes the
    new step and re-arms the counter. This keeps step counting inside the one launch.
    """
    nblocks = tl.maximum(tl.cdiv(numel, BLOCK), 1)
    arrived = tl.atomic_add(counters_ptr + t, 1, sem="acq_rel")
    if arrived == nblocks - 1:
        tl.store(step_ptr, step)
        tl.atomic_xchg(counters_ptr + t, 0, sem="release")
