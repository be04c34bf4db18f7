"""Rounding from the fp32 compute type to the stored param dtype."""
import triton
import triton.language as tl


@triton.jit
def _rne_bf16(x):
    # Triton's interpreter truncates fp32 -> bf16 (numpy has no bf16, it drops the low
    # half), while the GPU rounds to nearest even. Rounding the bits by hand gives the same
    # bf16 on both, equal to torch's .to(torch.bfloat16).
    bits = x.to(tl.uint32, bitcast=True)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    # A NaN whose payload lives only in the low bits would round to inf: keep it quiet NaN.
    rounded = tl.where(x != x, bits | 0x400000, rounded)
    return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """x converted to DTYPE with round-to-nearest-even, identical on GPU and interpreter."""
    if DTYPE == tl.bfloat16:
        return _rne_bf16(x)
    else:
        return x.to(DTYPE)
