"""Adam / AdamW (L2 or decoupled weight decay, AMSGrad, maximize, master weights)."""
import triton
import triton.language as tl

from .common import (
    COL_EXP_AVG,
    COL_MASTER,
    COL_MAX_EXP_AVG_SQ,
    COL_PARAM,
    COL_STATE2,
    begin_step,
    end_step,
    ieee_div,
    ieee_sqrt,
    load_ptr,
    load_hyper,
    locate_block,
    one_minus_pow,
)
from .rounding import round_to


@triton.jit
def lerp(start, end, weight):
    # torch.lerp's formula (two branches on the weight), so exp_avg matches torch bit for bit.
    diff = end - start
    return tl.where(weight < 0.5, start + weight * diff, end - diff * (1.0 - weight))


@triton.jit
def _adam_block(
    p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr, offs, mask,
    lr, w1, beta2, w2, eps, weight_decay, inv_scale, step_size, bc2_sqrt,
    P_DTYPE: tl.constexpr, CDTYPE: tl.constexpr,
    HAS_WD: tl.constexpr, DECOUPLED_WD: tl.constexpr, AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr, MASTER: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr,
):
    g = tl.load(g_ptr + offs, mask=mask).to(CDTYPE)
    if HAS_GRAD_SCALE:
        g = g * inv_scale
    if MASTER:
        p = tl.load(w_ptr + offs, mask=mask)
    else:
        p = tl.load(p_ptr + offs, mask=mask).to(CDTYPE)
    m = tl.load(m_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    if MAXIMIZE:
        g = -g
    if HAS_WD:
        if DECOUPLED_WD:
            p = p * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    m = lerp(m, g, w1)
    v = v * beta2 + w2 * g * g
    if AMSGRAD:
        vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask), v, propagate_nan=tl.PropagateNan.ALL)
        tl.store(vmax_ptr + offs, vmax, mask=mask)
        vhat = vmax
    else:
        vhat = v
    # IEEE sqrt and division (the GPU default for '/' and tl.sqrt is approximate) so the
    # step follows torch's op sequence: denom = sqrt(v) / sqrt(bc2) + eps.
    denom = ieee_sqrt(vhat)
    if BIAS_CORRECTION:
        denom = ieee_div(denom, bc2_sqrt)
    denom = denom + eps
    p = p - ieee_div(step_size * m, denom)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if MASTER:
        tl.store(w_ptr + offs, p, mask=mask)
    tl.store(p_ptr + offs, round_to(p, P_DTYPE), mask=mask)


@triton.jit
def _adam_program(
    pid,
    table_ptr, grads_ptr, block_map_ptr, counters_ptr,
    lr_hi, lr_lo, lr_ptr,
    beta1_ptr,
    beta2_hi, beta2_lo, beta2_ptr,
    w1_hi, w1_lo, w2_hi, w2_lo,
    log_beta1_hi, log_beta1_lo, log_beta2_hi, log_beta2_lo,
    eps_hi, eps_lo, wd_hi, wd_lo,
    grad_scale_ptr, found_inf_ptr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CDTYPE: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr, BETAS_ARE_TENSORS: tl.constexpr,
    HAS_WD: tl.constexpr, DECOUPLED_WD: tl.constexpr, AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr, MASTER: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, row, numel, start = locate_block(table_ptr, block_map_ptr, pid, BLOCK)
    step_ptr, step, skip = begin_step(row, found_inf_ptr, HAS_FOUND_INF)
    if not skip:
        lr, beta2, w1, w2, log_beta1, log_beta2, eps, weight_decay, inv_scale = load_hyper(
            lr_hi, lr_lo, lr_ptr, beta1_ptr, beta2_hi, beta2_lo, beta2_ptr,
            w1_hi, w1_lo, w2_hi, w2_lo, log_beta1_hi, log_beta1_lo, log_beta2_hi, log_beta2_lo,
            eps_hi, eps_lo, wd_hi, wd_lo, grad_scale_ptr,
            LR_IS_TENSOR, BETAS_ARE_TENSORS, HAS_GRAD_SCALE, CDTYPE,
        )
        if BIAS_CORRECTION:
            cstep = step.to(CDTYPE)
            step_size = ieee_div(lr, one_minus_pow(log_beta1, cstep))
            bc2_sqrt = ieee_sqrt(one_minus_pow(log_beta2, cstep))
        else:
            step_size = lr
            bc2_sqrt = lr  # unused

        p_addr, p_ptr = load_ptr(row, COL_PARAM, P_DTYPE)
        m_addr, m_ptr = load_ptr(row, COL_EXP_AVG, CDTYPE)
        v_addr, v_ptr = load_ptr(row, COL_STATE2, CDTYPE)
        vmax_addr, vmax_ptr = load_ptr(row, COL_MAX_EXP_AVG_SQ, CDTYPE)
        w_addr, w_ptr = load_ptr(row, COL_MASTER, CDTYPE)
        g_addr = tl.load(grads_ptr + t)
        g_ptr = g_addr.to(tl.pointer_type(G_DTYPE))
        offs = start + tl.arange(0, BLOCK)
        aligned = ((p_addr | g_addr | m_addr | v_addr | vmax_addr | w_addr) & 15) == 0
        if aligned & (start + BLOCK <= numel):
            # Fast path: the compiler cannot know the alignment of a pointer read from
            # memory; without these hints sm_90 gets 4-byte scalar accesses, with them
            # 16-byte vector ones (DESIGN.md section 2). Each pointer is cast here, not
            # reused from outside the branch: triton 3.6 merges identical int-to-pointer
            # casts and the hint on the shared one is lost (checked in test_aot.py).
            _adam_block(
                tl.multiple_of(p_addr.to(tl.pointer_type(P_DTYPE)), 16),
                tl.multiple_of(g_addr.to(tl.pointer_type(G_DTYPE)), 16),
                tl.multiple_of(m_addr.to(tl.pointer_type(CDTYPE)), 16),
                tl.multiple_of(v_addr.to(tl.pointer_type(CDTYPE)), 16),
                tl.multiple_of(vmax_addr.to(tl.pointer_type(CDTYPE)), 16),
                tl.multiple_of(w_addr.to(tl.pointer_type(CDTYPE)), 16),
                tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK), None,
                lr, w1, beta2, w2, eps, weight_decay, inv_scale, step_size, bc2_sqrt,
                P_DTYPE, CDTYPE, HAS_WD, DECOUPLED_WD, AMSGRAD, MAXIMIZE, MASTER,
                HAS_GRAD_SCALE, BIAS_CORRECTION,
            )
        else:
            _adam_block(
                p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr, offs, offs < numel,
                lr, w1, beta2, w2, eps, weight_decay, inv_scale, step_size, bc2_sqrt,
                P_DTYPE, CDTYPE, HAS_WD, DECOUPLED_WD, AMSGRAD, MAXIMIZE, MASTER,
                HAS_GRAD_SCALE, BIAS_CORRECTION,
            )
        end_step(step_ptr, step, counters_ptr, t, numel, BLOCK)


# num_blocks changes with the model: no recompiles for its value (1, multiple of 16).
@triton.jit(do_not_specialize=["num_blocks"])
def _adam_kernel(
    table_ptr, grads_ptr, block_map_ptr, counters_ptr,
    lr_hi, lr_lo, lr_ptr,
    beta1_ptr,
    beta2_hi, beta2_lo, beta2_ptr,
    w1_hi, w1_lo, w2_hi, w2_lo,
    log_beta1_hi, log_beta1_lo, log_beta2_hi, log_beta2_lo,
    eps_hi, eps_lo, wd_hi, wd_lo,
    grad_scale_ptr, found_inf_ptr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CDTYPE: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr, BETAS_ARE_TENSORS: tl.constexpr,
    HAS_WD: tl.constexpr, DECOUPLED_WD: tl.constexpr, AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr, MASTER: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    num_blocks, PERSISTENT: tl.constexpr, BLOCK: tl.constexpr,
):
    if PERSISTENT:
        # A grid of a few programs per SM, each looping over blocks: amortizes the
        # per-program prologue; the autotuner decides whether it pays on a GPU. A while
        # loop: triton 3.6's interpreter cannot take range() bounds from program_id.
        pid = tl.program_id(0)
        while pid < num_blocks:
            _adam_program(
                pid,
                table_ptr, grads_ptr, block_map_ptr, counters_ptr, lr_hi, lr_lo, lr_ptr,
                beta1_ptr, beta2_hi, beta2_lo, beta2_ptr, w1_hi, w1_lo, w2_hi, w2_lo,
                log_beta1_hi, log_beta1_lo, log_beta2_hi, log_beta2_lo, eps_hi, eps_lo,
                wd_hi, wd_lo, grad_scale_ptr, found_inf_ptr, P_DTYPE, G_DTYPE, CDTYPE,
                LR_IS_TENSOR, BETAS_ARE_TENSORS, HAS_WD, DECOUPLED_WD, AMSGRAD,
                MAXIMIZE, MASTER, BIAS_CORRECTION, HAS_GRAD_SCALE, HAS_FOUND_INF, BLOCK,
            )
            pid += tl.num_programs(0)
    else:
        _adam_program(
            tl.program_id(0),
            table_ptr, grads_ptr, block_map_ptr, counters_ptr, lr_hi, lr_lo, lr_ptr,
            beta1_ptr, beta2_hi, beta2_lo, beta2_ptr, w1_hi, w1_lo, w2_hi, w2_lo,
            log_beta1_hi, log_beta1_lo, log_beta2_hi, log_beta2_lo, eps_hi, eps_lo,
            wd_hi, wd_lo, grad_scale_ptr, found_inf_ptr, P_DTYPE, G_DTYPE, CDTYPE,
            LR_IS_TENSOR, BETAS_ARE_TENSORS, HAS_WD, DECOUPLED_WD, AMSGRAD,
            MAXIMIZE, MASTER, BIAS_CORRECTION, HAS_GRAD_SCALE, HAS_FOUND_INF, BLOCK,
        )
