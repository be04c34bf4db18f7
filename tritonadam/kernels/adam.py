"""The update kernel of Adam, AdamW and AdaMax: one source, variants as constexpr flags
(algorithm, dtypes of param, grad and state, master copy: none, fp32 or a 16-bit
remainder, stochastic rounding, 8-bit or 4-bit blockwise-quantized moments).

One launch steps every tensor of a bucket (same device, param dtype, grad dtype and state
layout) whatever param group it belongs to: per-tensor scalars (hyper-parameters, bias
corrections, grad multiplier) come from the scalar table the prepare kernel fills, so
groups differ in data, not in code.
"""
import torch
import triton
import triton.language as tl

from .._env import interpret
from .layout import (
    MASTER_FP32,
    MASTER_NONE,
    MASTER_REMAINDER,
    BLOCK_INDEX_BITS,
    BLOCK_INDEX_MASK,
    COL_EXP_AVG,
    COL_EXP_AVG_SCALE,
    COL_MASTER,
    COL_MAX,
    COL_MAX_SCALE,
    COL_NUMEL,
    COL_PARAM,
    COL_SECOND,
    COL_SECOND_SCALE,
    COL_KEY,
    QUANT_BLOCK,
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
from .quant import full_offsets, load_moment, store_moment, tail_offsets
from .rounding import join_master, philox2x32, round_master, round_stochastic, round_to, split_master, widen


@triton.jit
def ieee_div(a, b):
    # '/' is approximate for fp32 on NVIDIA GPUs; div_rn is IEEE like torch's kernels.
    # fp64 '/' is IEEE already (and has no _rn form).
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


# Compiled for an NVIDIA GPU, where PTX is the target (not Triton's interpreter, not ROCm).
PTX = tl.constexpr(not interpret() and torch.version.hip is None)


@triton.jit
def fast_div(a, b):
    """fp32 a / b for the quantized update (see _update). On an NVIDIA GPU PTX's
    div.approx.ftz.f32: a times the approximate reciprocal of b, two instructions per
    element (2 ulp for |b| in [2**-126, 2**126]; a subnormal a, b or quotient reads as 0),
    where div_rn took nine (its check and slow-path branch included) and Triton's '/'
    (div.full.f32, which rescales subnormal and huge operands first) eight. Triton 3.6
    has no approximate division of its own. Elsewhere IEEE."""
    if PTX:
        return tl.inline_asm_elementwise("div.approx.ftz.f32 $0, $1, $2;", "=r,r,r", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.div_rn(a, b)


# eps bc2 below which a subnormal second moment's root matters to the quantized update's
# denominator: the root of a subnormal is under 2**-63, under an ulp of eps bc2 >= 2**-39.
SUBNORMAL_ROOT_EPS = tl.constexpr(2.0 ** -39)


@triton.jit
def fast_sqrt(x, eps_bc2):
    """fp32 sqrt(x) for the quantized update's denominator sqrt(x) + eps_bc2. On an NVIDIA GPU
    Triton's sqrt is sqrt.approx.ftz.f32 (MUFU.SQRT, one instruction), which reads a
    subnormal x as 0: with eps 0 an element whose second moment is subnormal would step by
    m / 0. PTX's sqrt.approx.f32 (no .ftz) scales a subnormal x by 2**24 and its root back
    (a product, a compare, a select and a predicated product beside the root: four
    instructions more per element), so it runs only where the root can matter: eps bc2
    under SUBNORMAL_ROOT_EPS, a uniform branch on the row's scalar. Elsewhere tl.sqrt."""
    if PTX:
        if eps_bc2 < SUBNORMAL_ROOT_EPS:
            root = tl.inline_asm_elementwise("sqrt.approx.f32 $0, $1;", "=r,r", [x],
                                             dtype=tl.float32, is_pure=True, pack=1)
        else:
            root = tl.sqrt(x)
    else:
        root = tl.sqrt(x)
    return root


@triton.jit
def ieee_sqrt(x):
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def lerp(start, end, weight):
    # torch.lerp's formula (two branches on the weight), so exp_avg matches torch bit for bit.
    # torch branches on |weight| < 0.5; a weight below -0.5 (beta1 above 1.5, which only a
    # value written after construction gives) takes the first formula here, an ulp from
    # torch's: the abs moved ptxas' allocation, and a variant spilled (bf16 SR AMSGrad at
    # 512/4, sm_80, triton 3.6).
    diff = end - start
    return tl.where(weight < 0.5, start + weight * diff, end - diff * (1.0 - weight))


@triton.jit
def _scalar(srow, COL: tl.constexpr, CDTYPE: tl.constexpr):
    return tl.load(srow + COL).to(CDTYPE)


@triton.jit
def _store_rounded(ptr, offs, x, mask, random, DTYPE: tl.constexpr, SR: tl.constexpr):
    if SR and DTYPE != tl.float32 and DTYPE != tl.float64:
        tl.store(ptr + offs, round_stochastic(x, random, DTYPE), mask=mask)
    else:
        tl.store(ptr + offs, round_to(x, DTYPE), mask=mask)


@triton.jit
def _load_state(ptr, scale_ptr, offs, mask, n, CDTYPE: tl.constexpr, QUANT: tl.constexpr,
                SIGNED: tl.constexpr, TAIL: tl.constexpr, VEC: tl.constexpr, GROUP_SCALES: tl.constexpr):
    if QUANT:
        return load_moment(ptr, scale_ptr, offs, n, QUANT, SIGNED, TAIL, VEC, GROUP_SCALES)
    else:
        return widen(tl.load(ptr + offs, mask=mask), CDTYPE, False)


@triton.jit
def _store_state(ptr, scale_ptr, x, offs, mask, n, random, S_DTYPE: tl.constexpr,
                 SR: tl.constexpr, QUANT: tl.constexpr, SIGNED: tl.constexpr,
                 TAIL: tl.constexpr, VEC: tl.constexpr, PICK_OFFSET: tl.constexpr):
    if QUANT:
        store_moment(ptr, scale_ptr, x, offs, n, random, QUANT, SIGNED, TAIL, VEC, SR, PICK_OFFSET)
    else:
        _store_rounded(ptr, offs, x, mask, random, S_DTYPE, SR)


@triton.jit
def _random(g, offs, srow, first, key, SR: tl.constexpr):
    r0 = 0
    r1 = 0
    if SR:
        # Counter-based, 16 random bits per rounded value: the same (seed, tensor, element,
        # step) draws the same bits on every backend and every replay of a CUDA graph, and
        # the step count (advanced on the device) moves the stream on. Blocks are aligned
        # to their power-of-two size, so one never crosses a multiple of 2**32 elements.
        # The (g != g) term, 0 unless the update is NaN anyway, ties the counter to loaded
        # data so the compiler gives the random bits the data's register layout; from the
        # index alone it picks another and moves the bits through shared memory.
        low = (first & 0xFFFFFFFF).to(tl.uint32) + offs.to(tl.uint32) + (g != g).to(tl.uint32)
        step = _scalar(srow, S_STEP, tl.float32).to(tl.uint32) ^ ((first >> 32).to(tl.uint32) << 24)
        r0, r1 = philox2x32(key, low, step)
    return r0, r1


@triton.jit
def _store_moments(m_ptr, v_ptr, vmax_ptr, ms_ptr, vs_ptr, xs_ptr, m, v, vmax, offs, mask, n,
                   r0, r1, S_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, SR: tl.constexpr,
                   QUANT: tl.constexpr, TAIL: tl.constexpr, VEC: tl.constexpr,
                   PICK_OFFSET: tl.constexpr):
    # 16 random bits each: m the low half of r1, v its high half, vmax the high half of r0
    # (the param takes r0's low half). Quantized, vmax first: with a master copy r0 is
    # then dead for the other two encodes (cubin, sm_80, triton 3.9, 4-bit AMSGrad + SR:
    # 64 registers and 8 bytes of spills -> 74 and none). Unquantized, last: first cost
    # bf16 state + SR + AMSGrad 60 -> 68 registers at 1024/8 on sm_90.
    if AMSGRAD and QUANT:
        _store_state(vmax_ptr, xs_ptr, vmax, offs, mask, n, r0 >> 16, S_DTYPE, SR, QUANT, False,
                     TAIL, VEC, PICK_OFFSET)
    _store_state(m_ptr, ms_ptr, m, offs, mask, n, r1, S_DTYPE, SR, QUANT, True, TAIL, VEC, PICK_OFFSET)
    _store_state(v_ptr, vs_ptr, v, offs, mask, n, r1 >> 16, S_DTYPE, SR, QUANT, False, TAIL, VEC,
                 PICK_OFFSET)
    if AMSGRAD and not QUANT:
        _store_state(vmax_ptr, xs_ptr, vmax, offs, mask, n, r0 >> 16, S_DTYPE, SR, QUANT, False,
                     TAIL, VEC, PICK_OFFSET)


@triton.jit
def _update(
    p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr, ms_ptr, vs_ptr, xs_ptr, offs, mask, n, srow,
    first, key,
    CDTYPE: tl.constexpr, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, ADAMAX: tl.constexpr,
    AMSGRAD: tl.constexpr, MASTER: tl.constexpr, DECOUPLED_WD: tl.constexpr,
    COUPLED_WD: tl.constexpr, SR: tl.constexpr, QUANT: tl.constexpr, TAIL: tl.constexpr,
    VEC: tl.constexpr, PERSISTENT: tl.constexpr, UNSCALE_GRADS: tl.constexpr,
):
    # Data loads first: the scalars below come from one row already in flight, and
    # nothing the loads need waits on arithmetic.
    g = tl.load(g_ptr + offs, mask=mask)
    if MASTER == MASTER_FP32:
        p = tl.load(w_ptr + offs, mask=mask)
    else:
        p = tl.load(p_ptr + offs, mask=mask)
        if MASTER == MASTER_REMAINDER:
            p = join_master(p, tl.load(w_ptr + offs, mask=mask))
    # Quantized moments (QUANT): ptr -> codes, *s_ptr -> block scales; m is signed, v and
    # vmax (and AdaMax's exp_inf) use the map without a zero. A persistent grid's 4-bit
    # AdaMax moments read their scales in groups (quant.load_moment: GROUP_SCALES;
    # _program_call says why). Adam's took them too until its update's division became
    # fast_div (2026-12-05); since then the group kept pid on the stack of a twin and the
    # single load none (bf16 4-bit remainder at 4096/8, sm_90, triton 3.9: 64 registers
    # and 8 bytes, with single loads 73 and none; every persistent twin of
    # tests/aot_compile_variants.py, sm_80 and sm_90, triton 3.6 and 3.9).
    GROUP_SCALES: tl.constexpr = PERSISTENT and QUANT == 4 and ADAMAX
    # Its 8-bit moments encode with the older code offset (quant.encode: PICK_OFFSET).
    PICK_OFFSET: tl.constexpr = not (PERSISTENT and QUANT == 8)
    m = _load_state(m_ptr, ms_ptr, offs, mask, n, CDTYPE, QUANT, True, TAIL, VEC, GROUP_SCALES)
    v = _load_state(v_ptr, vs_ptr, offs, mask, n, CDTYPE, QUANT, False, TAIL, VEC, GROUP_SCALES)
    vmax = m
    if AMSGRAD:
        vmax = _load_state(vmax_ptr, xs_ptr, offs, mask, n, CDTYPE, QUANT, False, TAIL, VEC, GROUP_SCALES)

    g = widen(g, CDTYPE, QUANT)
    if UNSCALE_GRADS:
        # A step GradScaler handed its scale leaves the grads unscaled, as
        # GradScaler.unscale_ leaves them (times its fp32 1/scale, rounded to the grad's
        # dtype; torch's fused step, which divides, stores the same bits for power-of-two
        # scales), before maximize's sign and any clip coefficient, which are never written.
        tl.store(g_ptr + offs, round_to(g * _scalar(srow, S_UNSCALE, CDTYPE), g_ptr.dtype.element_ty),
                 mask=mask)
    g = g * _scalar(srow, S_GMUL, CDTYPE)
    p = widen(p, CDTYPE, False)
    w1 = _scalar(srow, S_W1, CDTYPE)
    beta2 = _scalar(srow, S_BETA2, CDTYPE)
    eps = _scalar(srow, S_EPS, CDTYPE)
    step_size = _scalar(srow, S_STEP_SIZE, CDTYPE)
    # The dense update's bias correction read with the other scalars: read where it divides,
    # ptxas kept the row's index on the stack to address it (fp32 Adam with L2, fp16
    # AMSGrad AdamW at 1024/4, sm_90, triton 3.9: 8 bytes). Not with a master copy or
    # stochastic rounding, where the register it holds spilled instead (bf16 fp32-master
    # AMSGrad AdamW at 4096/8 on sm_80, fp16 SR with L2 at 1024/8 on sm_90: 8-16 bytes).
    EARLY_BC2: tl.constexpr = not QUANT and not ADAMAX and MASTER == MASTER_NONE and not SR
    bc2 = _scalar(srow, S_BC2_SQRT, CDTYPE) if EARLY_BC2 else 1.0
    # The quantized Adam update decays p where it steps it: fast_sqrt's branch between the
    # two would keep the product from fusing with the step (one instruction per element).
    # Not in a persistent program, where the decay kept live until then cost 8 bytes of
    # stack (bf16 4-bit remainder at 4096/8, sm_90, triton 3.9; 69 registers and none
    # with the early product).
    DECAY_LATE: tl.constexpr = DECOUPLED_WD and QUANT and not ADAMAX and not PERSISTENT
    if DECOUPLED_WD and not DECAY_LATE:
        p = p * _scalar(srow, S_DECAY, CDTYPE)
    if COUPLED_WD:
        # torch adds nothing to the grad of a group without L2 decay (0 here, so are
        # decoupled groups): 0 * p would turn a NaN or inf param's moments NaN, and +0 a
        # -0 grad into +0. Where the decay is 0, as torch tests it (the group's float64
        # value: a decay that rounds to 0 in fp32 still adds 0 * p), p's bits are replaced
        # by the zero whose product with the decay is -0, which leaves every grad as it is.
        # About 3 instructions per element (bench/sass_per_element.py); a select or a
        # branch instead spilled or cost resident warps (tests/test_aot.py).
        wd64 = tl.load(srow + S_WD)
        IT: tl.constexpr = tl.int64 if CDTYPE == tl.float64 else tl.int32
        SIGN: tl.constexpr = -(1 << 63) if CDTYPE == tl.float64 else -(1 << 31)
        bits = wd64.to(tl.int64, bitcast=True)
        keep = tl.where((bits & 0x7FFFFFFFFFFFFFFF) != 0, -1, 0).to(IT)  # a decay of either sign
        zero = tl.where(bits < 0, 0, SIGN).to(IT)  # -0, or +0 for a decay of -0.0
        g = g + wd64.to(CDTYPE) * ((p.to(IT, bitcast=True) & keep) | (zero & ~keep)).to(CDTYPE, bitcast=True)
    m = lerp(m, g, w1)
    if ADAMAX:
        # torch takes amax over (u * beta2, |g| + eps), which propagates NaN.
        v = tl.maximum(v * beta2, tl.abs(g) + eps, propagate_nan=tl.PropagateNan.ALL)
        vhat = v
    else:
        v = v * beta2 + _scalar(srow, S_W2, CDTYPE) * g * g
        vhat = v
        if AMSGRAD:
            vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
            vhat = vmax
    # Where the moments are stored: before the step's divisions and square roots (early) or
    # after them (late). IEEE division and root have slow-path subroutines shared by every
    # call site, and every register live at any call is kept from them: fewer live values
    # there cost fewer registers. Each variant keeps the order that compiles without spills
    # and with its resident warps on triton 3.6 and 3.9, sm_80 and sm_90 (tests/test_aot.py;
    # figures are ptxas's at 1024/8 unless said):
    # - quantized state: early; codes and scales out of the way before the update
    #   (78 -> 64 registers with AMSGrad and a remainder, sm_90).
    # - fp32 compute, no remainder master, with 16-bit state or L2 decay: early. Late, a
    #   bf16 param with bf16 state kept 8 bytes of stack at 1024/4 under triton 3.9 (48
    #   registers early), and fp32 moments with L2 8 bytes at 1024/4 under 3.6.
    #   - except stochastic rounding with fp32 params or AMSGrad: late. Early, fp32 params
    #     with bf16 state kept 8-32 bytes (sm_90 under 3.6; sm_80 with fp16 grads; bf16
    #     grads with AMSGrad under 3.9), 16-bit params with AMSGrad 8-16 bytes under 3.6.
    # - fp64 AdamW with AMSGrad: early; late it took 82 registers (16 resident warps),
    #   early 58-62.
    # - everything else: late; early spilled (a remainder master with bf16 state and SR,
    #   plain bf16 AdamW on sm_80 under 3.9, fp64 Adam with AMSGrad).
    EARLY_FP32: tl.constexpr = (MASTER != MASTER_REMAINDER and CDTYPE == tl.float32
                                and (S_DTYPE != CDTYPE or COUPLED_WD))
    LATE_SR: tl.constexpr = SR and (P_DTYPE == tl.float32 or AMSGRAD)
    EARLY_FP64: tl.constexpr = CDTYPE == tl.float64 and AMSGRAD and DECOUPLED_WD and not COUPLED_WD
    STORE_EARLY: tl.constexpr = QUANT or (EARLY_FP32 and not LATE_SR) or EARLY_FP64
    if STORE_EARLY:
        r0, r1 = _random(g, offs, srow, first, key, SR)
        _store_moments(m_ptr, v_ptr, vmax_ptr, ms_ptr, vs_ptr, xs_ptr, m, v, vmax, offs, mask, n,
                       r0, r1, S_DTYPE, AMSGRAD, SR, QUANT, TAIL, VEC, PICK_OFFSET)
    if QUANT and not ADAMAX:
        # Quantized moments have no torch counterpart to match bit for bit, and an ulp of
        # the update is far below their rounding: torch's update with the bias correction
        # moved out of the denominator, step_size bc2 m / (sqrt(v) + eps bc2) (bc2 =
        # sqrt(1 - beta2**t), 1 without bias correction), one division per element
        # instead of two, and the GPU's approximate square root and division (IEEE in the
        # interpreter) instead of sqrt_rn, div_rn and their slow-path checks: ~16
        # instructions per element fewer (bench/sass_per_element.py; the division ~6 of
        # them, 2026-12-05).
        bc2 = _scalar(srow, S_BC2_SQRT, CDTYPE)
        # For a positive eps, eps bc2 at least 2**-126, the least normal fp32: below it
        # (eps under ~1e-37) the product is subnormal, which fast_div reads as 0 on a GPU,
        # or 0 itself (eps under ~1e-44), and an element whose moments are 0 would step by
        # 0 / 0 where torch's steps by 0 / eps = 0. Where v > 0, the IEEE sqrt(v) >= 2**-75
        # absorbs either (fast_sqrt keeps a subnormal v's root); eps 0 stays 0 (0 / 0, NaN, as
        # in torch), and a negative or NaN one (set after construction) is kept as it is.
        eps_bc2 = tl.where(eps > 0, tl.maximum(eps * bc2, 1.1754943508222875e-38), eps * bc2)
        root = fast_sqrt(vhat, eps_bc2)
        if DECAY_LATE:
            p = p * _scalar(srow, S_DECAY, CDTYPE)
        p = p - fast_div((step_size * bc2) * m, root + eps_bc2)
    elif ADAMAX:
        p = p - ieee_div(step_size * m, vhat)
    else:
        # torch's op order: denom = sqrt(v) / sqrt(1 - beta2**t) + eps, IEEE throughout.
        if not EARLY_BC2:
            bc2 = _scalar(srow, S_BC2_SQRT, CDTYPE)
        denom = ieee_div(ieee_sqrt(vhat), bc2) + eps
        p = p - ieee_div(step_size * m, denom)
    if not STORE_EARLY:
        r0, r1 = _random(g, offs, srow, first, key, SR)
        _store_moments(m_ptr, v_ptr, vmax_ptr, ms_ptr, vs_ptr, xs_ptr, m, v, vmax, offs, mask, n,
                       r0, r1, S_DTYPE, AMSGRAD, SR, QUANT, TAIL, VEC, PICK_OFFSET)
    if MASTER == MASTER_FP32:
        tl.store(w_ptr + offs, p, mask=mask)
        if P_DTYPE == tl.bfloat16:
            tl.store(p_ptr + offs, round_master(p), mask=mask)
        else:
            tl.store(p_ptr + offs, round_to(p, P_DTYPE), mask=mask)
    elif MASTER == MASTER_REMAINDER:
        high, low = split_master(p)
        tl.store(p_ptr + offs, high, mask=mask)
        tl.store(w_ptr + offs, low, mask=mask)
    else:
        _store_rounded(p_ptr, offs, p, mask, r0, P_DTYPE, SR)


@triton.jit
def _hinted(addr, DTYPE: tl.constexpr, VEC: tl.constexpr):
    # One access covers VEC elements of every array, at most 16 bytes.
    ALIGN: tl.constexpr = min(16, VEC * DTYPE.primitive_bitwidth // 8)
    return tl.multiple_of(addr.to(tl.pointer_type(DTYPE)), ALIGN)


@triton.jit
def _codes(addr, at, S_DTYPE: tl.constexpr, QUANT: tl.constexpr, VEC: tl.constexpr, HINT: tl.constexpr):
    """The moment's storage at element ``at``: values, or codes (4-bit: two per byte)."""
    if QUANT == 4:
        ptr = _hinted(addr, S_DTYPE, VEC // 2) if HINT else addr.to(tl.pointer_type(S_DTYPE))
        return ptr + at // 2
    else:
        ptr = _hinted(addr, S_DTYPE, VEC) if HINT else addr.to(tl.pointer_type(S_DTYPE))
        return ptr + at


@triton.jit
def _scales(addr, at, VEC: tl.constexpr, HINT: tl.constexpr):
    ptr = _hinted(addr, tl.bfloat16, VEC) if HINT else addr.to(tl.pointer_type(tl.bfloat16))
    return ptr + at // QUANT_BLOCK


@triton.jit
def _program(
    pid, table_ptr, grads_ptr, scalars_ptr, block_map_ptr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CDTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    ADAMAX: tl.constexpr, AMSGRAD: tl.constexpr, MASTER: tl.constexpr,
    DECOUPLED_WD: tl.constexpr, COUPLED_WD: tl.constexpr, SR: tl.constexpr,
    QUANT: tl.constexpr, QVEC: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
    FULL: tl.constexpr, PERSISTENT: tl.constexpr, UNSCALE_GRADS: tl.constexpr,
):
    # Two dependent trips before the data loads: block map -> (tensor row, grad pointer,
    # scalar row), all three addressed by the row index.
    entry = tl.load(block_map_ptr + pid)
    t = entry >> BLOCK_INDEX_BITS
    row = table_ptr + t * TABLE_COLUMNS
    srow = scalars_ptr + t * SCALAR_COLUMNS
    g_addr = tl.load(grads_ptr + t)
    p_addr = tl.load(row + COL_PARAM)
    m_addr = tl.load(row + COL_EXP_AVG)
    v_addr = tl.load(row + COL_SECOND)
    x_addr = tl.load(row + COL_MAX) if AMSGRAD else p_addr
    w_addr = tl.load(row + COL_MASTER) if MASTER != MASTER_NONE else p_addr
    ms_addr = tl.load(row + COL_EXP_AVG_SCALE) if QUANT else p_addr
    vs_addr = tl.load(row + COL_SECOND_SCALE) if QUANT else p_addr
    xs_addr = tl.load(row + COL_MAX_SCALE) if QUANT and AMSGRAD else p_addr
    key = tl.load(row + COL_KEY).to(tl.uint32) if SR else 0
    numel = tl.load(row + COL_NUMEL)
    # int64: tensors beyond 2**31 elements index correctly.
    start = (entry & BLOCK_INDEX_MASK) * BLOCK
    W_DTYPE: tl.constexpr = tl.int16 if MASTER == MASTER_REMAINDER else CDTYPE
    if QUANT:
        # Elements per access, chosen by the launcher: it knows the warps (the blockwise
        # scales are read and written in groups of VEC, which must be one thread's).
        VEC: tl.constexpr = QVEC
    else:
        # Elements per access, the same for every array so all share one register layout
        # (16-byte accesses of 2-byte arrays beside 4-byte ones would put every 4-byte
        # array through shared memory to change layouts): 4, or 8 when every array is 2
        # bytes.
        NARROW: tl.constexpr = (P_DTYPE.primitive_bitwidth == 16 and G_DTYPE.primitive_bitwidth == 16
                                and S_DTYPE.primitive_bitwidth == 16 and MASTER != MASTER_FP32)
        VEC: tl.constexpr = 8 if NARROW else 4
    aligned = ((p_addr | g_addr | m_addr | v_addr | x_addr | w_addr | ms_addr | vs_addr | xs_addr)
               & 15) == 0
    if aligned & (start + BLOCK <= numel):
        # Full, 16-byte-aligned block: unmasked, with alignment hints (a pointer read from
        # memory has none, and without them sm_90 gets 4-byte accesses). Each pointer is
        # cast here, not reused from outside the branch: triton 3.6 merges identical
        # int-to-pointer casts and the hint on the shared one is lost.
        p_full = _hinted(p_addr, P_DTYPE, VEC) + start
        g_full = _hinted(g_addr, G_DTYPE, VEC) + start
        m_full = _codes(m_addr, start, S_DTYPE, QUANT, VEC, True)
        v_full = _codes(v_addr, start, S_DTYPE, QUANT, VEC, True)
        x_full = _codes(x_addr, start, S_DTYPE, QUANT, VEC, True)
        w_full = _hinted(w_addr, W_DTYPE, VEC) + start
        ms_full = _scales(ms_addr, start, VEC, True)
        vs_full = _scales(vs_addr, start, VEC, True)
        xs_full = _scales(xs_addr, start, VEC, True)
        if FULL == BLOCK:
            if QUANT:
                offs = full_offsets(BLOCK)
            else:
                offs = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK), BLOCK), BLOCK)
            _update(
                p_full, g_full, m_full, v_full, x_full, w_full, ms_full, vs_full, xs_full,
                offs, None, BLOCK, srow, start, key,
                CDTYPE, P_DTYPE, S_DTYPE, ADAMAX, AMSGRAD, MASTER, DECOUPLED_WD, COUPLED_WD, SR,
                QUANT, False, VEC, PERSISTENT, UNSCALE_GRADS,
            )
        else:
            # Stochastic rounding and quantized state: the block in a loop of FULL
            # elements, so the random fields and the codecs' temporaries of a whole block
            # are never live at once (register bound).
            if QUANT:
                chunk = full_offsets(FULL)
            else:
                chunk = tl.max_contiguous(tl.multiple_of(tl.arange(0, FULL), FULL), FULL)
            for c in range(0, BLOCK, FULL):
                cc = c // 2 if QUANT == 4 else c
                cs = c // QUANT_BLOCK
                _update(
                    p_full + c, g_full + c, m_full + cc, v_full + cc, x_full + cc, w_full + c,
                    ms_full + cs, vs_full + cs, xs_full + cs,
                    chunk, None, FULL, srow, start + c, key,
                    CDTYPE, P_DTYPE, S_DTYPE, ADAMAX, AMSGRAD, MASTER, DECOUPLED_WD, COUPLED_WD, SR,
                    QUANT, False, VEC, PERSISTENT, UNSCALE_GRADS,
                )
    else:
        # Tail blocks and misaligned views (FSDP shards, slices): masked, in sub-blocks of
        # two fp32 or one fp64 element per thread (launch.tail_sub_block) so this path
        # needs fewer registers than the full one
        # (masked accesses are scalar whatever the block, and every element would hold
        # its own address and predicate).
        left = tl.minimum(numel - start, BLOCK).to(tl.int32)
        if QUANT:
            sub = tail_offsets(SUB, QUANT)
        else:
            sub = tl.arange(0, SUB)
        first = 0
        while first < left:
            at = start + first
            _update(
                p_addr.to(tl.pointer_type(P_DTYPE)) + at,
                g_addr.to(tl.pointer_type(G_DTYPE)) + at,
                _codes(m_addr, at, S_DTYPE, QUANT, VEC, False),
                _codes(v_addr, at, S_DTYPE, QUANT, VEC, False),
                _codes(x_addr, at, S_DTYPE, QUANT, VEC, False),
                w_addr.to(tl.pointer_type(W_DTYPE)) + at,
                _scales(ms_addr, at, VEC, False), _scales(vs_addr, at, VEC, False),
                _scales(xs_addr, at, VEC, False),
                sub, sub < left - first, left - first, srow, at, key,
                CDTYPE, P_DTYPE, S_DTYPE, ADAMAX, AMSGRAD, MASTER, DECOUPLED_WD, COUPLED_WD, SR,
                QUANT, True, VEC, PERSISTENT, UNSCALE_GRADS,
            )
            first += SUB


# The persistent grid's loop body for quantized state: the plain grid's program as a
# function of its own, not inlined, called once per block. Inlined into the loop,
# loop-invariant code motion hoisted every value the program derives from the thread
# index alone (element offsets, their 64-bit extensions, the scales' masks) out of it, all
# of them stayed live across it, and ptxas kept 8 bytes on the stack at 64-80 registers in 11 of 576 quantized
# persistent twins of the candidate configs (d3a9e93: 16 variants, 9 configs, sm_80 and
# sm_90, triton 3.6 and 3.9; docs/performance.md has the list), which the tuner prunes.
# Called, the body recomputes them per block (a few integer instructions beside a
# block's thousands), and a twin needs what its plain twin needs beside its return
# address and pid. ptxas still puts pid on the stack in a twin at times (8 bytes: a store
# when the block starts, a load when it ends) rather than take one more register; the
# quantized codecs' persistent forms, chosen by width, avoid that in every twin compiled:
# 8-bit moments encode with the older code offset (quant.encode: PICK_OFFSET) and, with
# nearest rounding, in iterations of 4 elements per thread (launch.full_sub_block); 4-bit
# AdaMax moments read their scales in groups (quant.load_moment: GROUP_SCALES; Adam's
# since 2026-12-05 one per thread, _update says why). Each other choice tried spilled
# some twin (the comments there have them).
@triton.jit(noinline=True)
def _program_call(
    pid, num_blocks, table_ptr, grads_ptr, scalars_ptr, block_map_ptr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CDTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    ADAMAX: tl.constexpr, AMSGRAD: tl.constexpr, MASTER: tl.constexpr,
    DECOUPLED_WD: tl.constexpr, COUPLED_WD: tl.constexpr, SR: tl.constexpr,
    QUANT: tl.constexpr, QVEC: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
    FULL: tl.constexpr, UNSCALE_GRADS: tl.constexpr,
):
    """One block of a persistent grid; returns the program's next block, or -1 when it is
    done: the caller keeps nothing live across the call. A loop in the caller instead,
    with pid live across the call, put pid on the stack as well (fp32 4-bit AdaMax SR at
    1024/2, sm_90, triton 3.9, and bf16 4-bit remainder AdamW at 4096/8, sm_90, triton
    3.6, with the codecs' plain forms; a 2026-12-04 review's compile: 4-bit AMSGrad at
    1024/2, sm_90, triton 3.9)."""
    _program(pid, table_ptr, grads_ptr, scalars_ptr, block_map_ptr, P_DTYPE, G_DTYPE, CDTYPE,
             S_DTYPE, ADAMAX, AMSGRAD, MASTER, DECOUPLED_WD, COUPLED_WD, SR, QUANT, QVEC, BLOCK,
             SUB, FULL, True, UNSCALE_GRADS)
    nxt = pid + tl.num_programs(0)
    return tl.where(nxt < num_blocks, nxt, -1)


# num_blocks changes with the model: no recompiles for its value.
@triton.jit(do_not_specialize=["num_blocks"])
def _adam_kernel(
    table_ptr, grads_ptr, scalars_ptr, block_map_ptr, found_inf_ptr, num_blocks,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CDTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    ADAMAX: tl.constexpr, AMSGRAD: tl.constexpr, MASTER: tl.constexpr,
    DECOUPLED_WD: tl.constexpr, COUPLED_WD: tl.constexpr, SR: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, PERSISTENT: tl.constexpr, BLOCK: tl.constexpr,
    SUB: tl.constexpr, FULL: tl.constexpr, QUANT: tl.constexpr = 0, QVEC: tl.constexpr = 0,
    UNSCALE_GRADS: tl.constexpr = False,
):
    skip = False
    if HAS_FOUND_INF:
        # GradScaler found inf/NaN in some grad: the whole step is skipped on the device
        # (the prepare kernel leaves step counts alone too), with no host sync.
        skip = tl.load(found_inf_ptr) != 0
    if not skip:
        if PERSISTENT:
            # A few programs per SM looping over the blocks, each block of quantized state
            # a call (see _program_call). While loops: triton 3.6's interpreter takes no
            # range() bounds from program_id.
            pid = tl.program_id(0)
            if QUANT:
                pid = tl.where(pid < num_blocks, pid, -1)
                while pid >= 0:
                    pid = _program_call(pid, num_blocks, table_ptr, grads_ptr, scalars_ptr,
                                        block_map_ptr, P_DTYPE, G_DTYPE, CDTYPE, S_DTYPE, ADAMAX,
                                        AMSGRAD, MASTER, DECOUPLED_WD, COUPLED_WD, SR, QUANT,
                                        QVEC, BLOCK, SUB, FULL, UNSCALE_GRADS)
            else:
                # Unquantized twins keep the program inlined: called, they spilled more
                # (sm_90, the 26 dense variants of the time x 9 configs: triton 3.6 4 -> 7 of 234, 3.9 3 -> 4).
                while pid < num_blocks:
                    _program(pid, table_ptr, grads_ptr, scalars_ptr, block_map_ptr, P_DTYPE,
                             G_DTYPE, CDTYPE, S_DTYPE, ADAMAX, AMSGRAD, MASTER, DECOUPLED_WD,
                             COUPLED_WD, SR, QUANT, QVEC, BLOCK, SUB, FULL, PERSISTENT, UNSCALE_GRADS)
                    pid += tl.num_programs(0)
        else:
            _program(tl.program_id(0), table_ptr, grads_ptr, scalars_ptr, block_map_ptr,
                     P_DTYPE, G_DTYPE, CDTYPE, S_DTYPE, ADAMAX, AMSGRAD, MASTER, DECOUPLED_WD,
                     COUPLED_WD, SR, QUANT, QVEC, BLOCK, SUB, FULL, False, UNSCALE_GRADS)
