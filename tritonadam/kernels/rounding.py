"""Rounding from the fp32 compute type to what is stored in 16 bits, and widening back.

Every function here gives the same bits on the GPU and in Triton's interpreter (the
interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even, so bf16 is
rounded by hand; and it widens bf16 subnormals wrongly, so ``widen`` shifts there).
"""
import triton
import triton.language as tl

from .._env import interpret

# Triton's interpreter widens bf16 subnormals wrongly (0x0001 to 0.0, 0x0003 to
# 0x00400000; triton 3.6 and 3.9), so there every bf16 -> fp32 is the exact bit shift the
# GPU's conversion is. Read once, as Triton reads it once when it decorates the kernels; a
# constexpr, so compiled kernels are the same code with or without it.
INTERPRETED = tl.constexpr(interpret())


@triton.jit
def widen(x, CDTYPE: tl.constexpr, BY_SHIFT: tl.constexpr):
    """``x.to(CDTYPE)``, with a bf16 -> fp32 widening done as the bit shift it is where
    ``BY_SHIFT`` asks (or in the interpreter, always). Compiled, the shift lets ptxas take a
    packed register's high half with one AND where the conversion moves the half down and
    back up (two instructions); the quantized variants ask for it. Elsewhere the same cut
    tipped ptxas into spills (bf16 param and state, SR, AMSGrad at 1024/8 on sm_80: 16
    bytes of stack), so they keep the conversion."""
    if x.dtype == tl.bfloat16 and CDTYPE == tl.float32 and (BY_SHIFT or INTERPRETED):
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(CDTYPE)


@triton.jit
def _bf16_from_bits(bits):
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _rne_bf16(x):
    bits = x.to(tl.uint32, bitcast=True)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    # A NaN whose payload lives only in the low bits would round to inf: keep it quiet NaN.
    rounded = tl.where(x != x, bits | 0x400000, rounded)
    return _bf16_from_bits(rounded)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """x in DTYPE, rounded to nearest even (torch's ``.to(dtype)``)."""
    if DTYPE == tl.bfloat16:
        return _rne_bf16(x)
    else:
        return x.to(DTYPE)


@triton.jit
def round_master(x):
    """The bf16 half of an fp32 master: nearest, ties away from zero.

    The only rounding whose error a 16-bit remainder can always undo: with ties to even,
    both neighbours of an even bf16 value round to it at an exact tie, one state too many
    for 16 bits. ``master_weights=True`` rounds this way too, so it and
    ``master_weights="remainder"`` step bit for bit alike.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = tl.where(x != x, bits | 0x400000, bits + 0x8000)
    return _bf16_from_bits(rounded)


@triton.jit
def split_master(x):
    """(bf16 param, int16 remainder) holding the fp32 value ``x`` exactly."""
    bits = x.to(tl.uint32, bitcast=True)
    low = (bits & 0xFFFF).to(tl.uint16).to(tl.int16, bitcast=True)
    return round_master(x), low


@triton.jit
def join_master(param, remainder):
    """The fp32 value ``split_master`` split: undo the round-up the remainder records.

    A remainder >= 0x8000 records a round-up of the high half, so the master's bits are
    (param << 16) plus the remainder sign-extended: one integer add, no borrow to select.
    """
    high = param.to(tl.uint16, bitcast=True).to(tl.int32)
    low = remainder.to(tl.int32)
    # No split gives a +-0 high half beside a rounded-up low half: that pair is a param set
    # to zero by hand between steps (pruning, re-initialising), whose master is that zero.
    # Undoing the round-up there would borrow across the sign bit, into a NaN: such a
    # remainder is clamped to 0 there. (Any other param set by hand joins to a master
    # it is the rounding of.) A high half of magnitude >= 1 absorbs the borrow short of
    # the sign bit, so the sum never overflows int32: exact for every pair, NaN patterns
    # included (tests/test_precision.py checks it against the host's join).
    low = tl.where((high & 0x7FFF) == 0, tl.maximum(low, 0), low)
    return ((high << 16) + low).to(tl.float32, bitcast=True)


@triton.jit
def philox2x32(key, c0, c1):
    """Philox-2x32-10 (Salmon et al., Random123): 64 random bits per counter (c0, c1)
    under a 32-bit key, as two uint32.

    Half the state of ``tl.philox`` (4x32), whose four words per element took the
    stochastic-rounding variants to 150-163 registers at 4096/8 (8 resident warps). 16
    bits per rounded value suffice: a bf16 rounding consumes exactly 16, an fp16 one resolves its probability in 16.
    """
    for _ in tl.static_range(10):
        # One 32 x 32 -> 64-bit product gives both halves (IMAD.WIDE.U32); umulhi and a
        # low multiply were two instructions: 155 -> 147 per element, bf16-8bit-sr at
        # 1024/4 (sm_90, triton 3.6). The truncations keep it exact whatever the
        # product's signedness.
        prod = c0.to(tl.uint64) * 0xD256D193
        hi = (prod >> 32).to(tl.uint32)
        lo = prod.to(tl.uint32)
        c0 = hi ^ key ^ c1
        c1 = lo
        key = key + 0x9E3779B9
    return c0, c1


@triton.jit
def round_stochastic(x, random, DTYPE: tl.constexpr):
    """x in DTYPE, rounded up in magnitude with probability (|x| - |lo|) / (|hi| - |lo|),
    where lo and hi are its neighbours in DTYPE: E[result] = x (for fp16, to within 2**-16
    of a unit in the last place: the probability is resolved in 16 bits).

    ``random``: 16 uniformly random bits per element (the low half of a uint32).
    """
    if DTYPE == tl.bfloat16:
        # Adding 16 random bits below the kept half carries into it with exactly that
        # probability (the low half counts units of the fp32 spacing inside one bf16 step).
        bits = x.to(tl.uint32, bitcast=True)
        rounded = tl.where(x != x, bits | 0x400000, bits + (random & 0xFFFF))
        return _bf16_from_bits(rounded)
    else:
        tl.static_assert(DTYPE == tl.float16, "stochastic rounding to bf16 or fp16")
        toward = x
        if INTERPRETED:
            # The interpreter's toward-zero conversion garbles fp32 subnormals (from about
            # 1.4e-43 they come out as up to 6.1e-5). All lie below fp16's smallest step:
            # toward zero they are +-0.
            toward = tl.where(tl.abs(x) < 1.1754943508222875e-38, x * 0.0, x)
        lo = toward.to(tl.float16, fp_downcast_rounding="rtz")
        # The next fp16 away from zero: one more unit in the magnitude bits.
        hi = (lo.to(tl.uint16, bitcast=True) + 1).to(tl.float16, bitcast=True)
        below = tl.abs(x) - tl.abs(lo.to(tl.float32))
        step = tl.abs(hi.to(tl.float32)) - tl.abs(lo.to(tl.float32))
        uniform = (random & 0xFFFF).to(tl.float32) * (1.0 / 65536.0)
        # Past the largest finite fp16 there is no upper neighbour to round to: to nearest
        # there, as torch rounds (65504 below 65520, inf from it). The interpreter's
        # toward-zero conversion made NaN of such values.
        return tl.where(tl.abs(x) > 65504.0, x.to(tl.float16), tl.where(uniform * step < below, hi, lo))
