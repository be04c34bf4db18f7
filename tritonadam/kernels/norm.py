"""The gradient-norm kernels behind fused clipping: a norm pass and a tiny reduction.

The norm kernel reads every grad of one grad dtype on a device through the device
tables (one launch covers every tensor with that grad dtype, across buckets and param
groups) and writes one partial per *chunk*: a fixed number of consecutive block-map
entries, summed in a fixed order. The reduction kernel, one program, adds the partials
in index order, takes the root, and writes the total norm and the clip coefficient that
the next step's prepare kernel folds into each tensor's grad multiplier. No atomics: the
same grads give the same bits on every run, and the chunking depends only on the tensors
(their sizes and order in the tables), not on the GPU or the optimizer's launch config.

Each lane accumulates its elements of a chunk in fp32 (fp64 for fp64 grads); a chunk's
lanes are summed once in that dtype, and the chunks' partials added in fp64.
"""
import triton
import triton.language as tl

from .adam import ieee_div
from .layout import (
    BLOCK_INDEX_BITS,
    BLOCK_INDEX_MASK,
    CLIP_COEF,
    CLIP_MAX_NORM,
    CLIP_P,
    COL_NUMEL,
    TABLE_COLUMNS,
)
from .rounding import widen

# The norm's order p, as a constexpr: each kind compiles its own elementwise map.
NORM_L1 = tl.constexpr(1)
NORM_L2 = tl.constexpr(2)
NORM_INF = tl.constexpr(3)
NORM_P = tl.constexpr(4)  # any other finite p > 0, through exp2/log2


@triton.jit
def _elementwise(g, p, NORM: tl.constexpr):
    """|g|**p (or |g| for the inf norm, which takes a max instead of a sum)."""
    if NORM == NORM_L2:
        return g * g
    elif NORM == NORM_P:
        # log2(0) = -inf, so 0 maps to 0 without a branch; inf and NaN pass through.
        return tl.exp2(p * tl.log2(tl.abs(g)))
    else:
        return tl.abs(g)


@triton.jit
def _unscaled(g, inv_scale, CDTYPE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    if HAS_GRAD_SCALE:
        return widen(g, CDTYPE, False) * inv_scale
    else:
        return widen(g, CDTYPE, False)


@triton.jit
def _combine(acc, x, NORM: tl.constexpr):
    if NORM == NORM_INF:
        # torch's max propagates NaN; Triton's drops it unless asked.
        return tl.maximum(acc, x, propagate_nan=tl.PropagateNan.ALL)
    else:
        return acc + x


@triton.jit
def _total(acc, NORM: tl.constexpr):
    if NORM == NORM_INF:
        # tl.max drops NaN and has no option not to (a custom tl.reduce would, but runs
        # element by element in the interpreter): add the lanes' NaNs back, as a sum.
        return tl.max(acc, axis=0) + tl.sum(tl.where(acc != acc, acc, 0.0), axis=0)
    else:
        return tl.sum(acc, axis=0)


# The number of blocks and the chunk length change with the model: no recompiles.
@triton.jit(do_not_specialize=["num_blocks", "chunk"])
def _norm_kernel(
    table_ptr, grads_ptr, block_map_ptr, partials_ptr, clip_ptr, grad_scale_ptr, num_blocks, chunk,
    G_DTYPE: tl.constexpr, CDTYPE: tl.constexpr, NORM: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    BLOCK: tl.constexpr, SUB: tl.constexpr,
):
    pid = tl.program_id(0)
    if NORM == NORM_P:
        p = tl.load(clip_ptr + CLIP_P).to(CDTYPE)
    else:
        p = 0.0
    if HAS_GRAD_SCALE:
        # The norm of the unscaled grads, each unscaled before its power as
        # GradScaler.unscale_ does (fp32 1/scale, taken in double): the p-th powers of
        # scaled grads overflow fp32 long before the unscaled ones (p = 8 at scale 2**16).
        inv_scale = (1.0 / tl.load(grad_scale_ptr).to(tl.float64)).to(tl.float32).to(CDTYPE)
    else:
        inv_scale = tl.full([], 1.0, CDTYPE)
    # One accumulator per lane across the chunk's blocks: a reduction across the
    # program's warps per block would put shared memory and a barrier in the loop.
    acc = tl.zeros([BLOCK], dtype=CDTYPE)
    tail = tl.zeros([SUB], dtype=CDTYPE)
    offs = tl.arange(0, BLOCK)
    sub = tl.arange(0, SUB)
    e = pid.to(tl.int64) * chunk
    last = tl.minimum(e + chunk, num_blocks)
    while e < last:
        entry = tl.load(block_map_ptr + e)
        t = entry >> BLOCK_INDEX_BITS
        g_addr = tl.load(grads_ptr + t)
        numel = tl.load(table_ptr + t * TABLE_COLUMNS + COL_NUMEL)
        start = (entry & BLOCK_INDEX_MASK) * BLOCK
        if ((g_addr & 15) == 0) & (start + BLOCK <= numel):
            # Full, 16-byte-aligned block: unmasked, hinted loads (a pointer read from
            # memory carries no alignment, and sm_90 would issue 4-byte loads).
            g_ptr = tl.multiple_of(g_addr.to(tl.pointer_type(G_DTYPE)), 16) + start
            g = tl.load(g_ptr + tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK))
            acc = _combine(acc, _elementwise(_unscaled(g, inv_scale, CDTYPE, HAS_GRAD_SCALE), p, NORM), NORM)
        else:
            # Tail blocks and misaligned views (FSDP shards, slices): masked sub-blocks.
            left = tl.minimum(numel - start, BLOCK).to(tl.int32)
            g_ptr = g_addr.to(tl.pointer_type(G_DTYPE)) + start
            first = 0
            while first < left:
                # Masked lanes load 0, which every kind maps to 0.
                g = tl.load(g_ptr + first + sub, mask=sub < left - first, other=0.0)
                tail = _combine(tail, _elementwise(_unscaled(g, inv_scale, CDTYPE, HAS_GRAD_SCALE), p, NORM), NORM)
                first += SUB
        e += 1
    total = _combine(_total(acc, NORM).to(tl.float64), _total(tail, NORM).to(tl.float64), NORM)
    tl.store(partials_ptr + pid, total)


@triton.jit(do_not_specialize=["num_partials"])
def _norm_reduce_kernel(
    partials_ptr, num_partials, total_ptr, norm_ptr, clip_ptr,
    NORM: tl.constexpr, REDUCE: tl.constexpr, FINALIZE: tl.constexpr,
    COMPOUND: tl.constexpr, CHECK_FINITE: tl.constexpr,
    OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    """REDUCE: add the partials (fixed order) into this device's total; FINALIZE: turn
    the total into the norm and the clip coefficient. Both in one launch on a single
    device; split around the all-reduce of the total when params are sharded DTensors."""
    if REDUCE:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        offs = tl.arange(0, BLOCK)
        first = 0
        while first < num_partials:
            x = tl.load(partials_ptr + first + offs, mask=first + offs < num_partials, other=0.0)
            acc = _combine(acc, x, NORM)
            first += BLOCK
        total = _total(acc, NORM)
    else:
        total = tl.load(total_ptr)
    if FINALIZE:
        if NORM == NORM_L2:
            root = tl.sqrt(total)
        elif NORM == NORM_P:
            root = tl.exp2(tl.log2(total) / tl.load(clip_ptr + CLIP_P))
        else:
            root = total
        # torch's total norm and coefficient are in the grads' dtype: fp32, or fp64. (The
        # norm pass measured unscaled grads.)
        norm = root.to(OUT_DTYPE)
        coef = tl.full([], 1.0, tl.float64)
        if COMPOUND:
            # A clip since the last step already scales the grads the step will read:
            # measure those, as torch's second in-place clip would.
            coef = tl.load(clip_ptr + CLIP_COEF)
            norm = norm * coef.to(OUT_DTYPE)
        # torch's formula and op order: max_norm / (norm + 1e-6), where the division by
        # a tensor is a reciprocal times max_norm; the epsilon in the norm's dtype.
        max_norm = tl.load(clip_ptr + CLIP_MAX_NORM).to(OUT_DTYPE)
        clip = ieee_div(tl.full([], 1.0, OUT_DTYPE), norm + tl.full([], 1e-6, OUT_DTYPE)) * max_norm
        # torch.clamp(max=1) keeps NaN: a NaN norm turns every grad into NaN, as in torch.
        clip = tl.minimum(clip, 1.0, propagate_nan=tl.PropagateNan.ALL)
        coef = coef * clip.to(tl.float64)
        tl.store(norm_ptr, norm)
        if CHECK_FINITE:
            # The host raises on a non-finite norm: leave the coefficient as it was.
            if (norm == norm) & (tl.abs(norm) != float("inf")):
                tl.store(clip_ptr + CLIP_COEF, coef)
        else:
            tl.store(clip_ptr + CLIP_COEF, coef)
    else:
        tl.store(total_ptr, total)
