"""Blockwise 8-bit and 4-bit optimizer state in plain torch: the update kernel's codec
(``tritonadam/kernels/quant.py``), bit for bit, for converting state on load and export
and as the tests' reference.

A quantized moment of ``numel`` elements is two flat tensors:

- ``codes``: uint8, ``numel`` bytes (8-bit) or ``(numel + 1) // 2`` (4-bit: element 2i in
  the low nibble of byte i, element 2i + 1 in the high nibble; the high nibble of an odd
  tensor's last byte is 0);
- ``scales``: bfloat16, one per ``QUANT_BLOCK`` elements counted from element 0 (the last
  block may be partial): the block's absmax rounded up to bf16.

Two maps (docs/quantization.md has the measurements behind them):

- signed (``exp_avg``): code k in -K..K (int8 two's complement; 4-bit: a 4-bit two's
  complement nibble), value = scale * sign(k) * k**2 / K**2, K = 127 or 7;
- positive (``exp_avg_sq``, ``max_exp_avg_sq``, AdaMax's ``exp_inf``): code c in 0..N-1,
  value = scale * (c + 1)**2 / N**2, N = 256 or 16: no code decodes to 0, so a second
  moment is never 0 unless its whole block is (scale 0, as a fresh state).

Encoding rounds to the nearest code in the value domain (ties down), or stochastically
with 16 random bits per element: up with probability (x - lo) / (hi - lo) to within
2**-17, so E[decode(encode(x))] = x (unbiased in the value domain). Values are encoded
from fp32; a NaN in a block makes its scale NaN and the block decodes to NaN. Blocks
of fp32-subnormal size (scale at most 2**-128; signed 8-bit: below ~3.1e-37) and inf
blocks get the kernel's codes, not always the nearest (docs/quantization.md).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .kernels.layout import QUANT_BLOCK as _QB
from .kernels.variant import code_bytes as _code_bytes
from .kernels.variant import num_scales

__all__ = ["QUANT_BLOCK", "code_bytes", "num_scales", "state_bytes", "quantize", "requantize", "dequantize",
           "per_element", "dequantize_per_element"]

QUANT_BLOCK = _QB.value
_F32 = torch.float32
_NEAREST = 65536.0  # encode's weight that rounds to nearest (2r + 1 for 16 random bits r: stochastic)


def code_bytes(numel: int, bits: int) -> int:
    """Bytes of codes for ``numel`` elements."""
    _check_bits(bits)
    return _code_bytes(numel, bits)


def state_bytes(numel: int, bits: int) -> int:
    """Bytes one quantized moment of ``numel`` elements holds (codes and scales)."""
    return code_bytes(numel, bits) + 2 * num_scales(numel)


def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")


def _levels(bits: int, signed: bool) -> int:
    return (1 << (bits - 1)) - 1 if signed else 1 << bits


def _magnitude_bits(x: Tensor) -> Tensor:
    return x.contiguous().view(torch.int32).to(torch.int64) & 0x7FFFFFFF


def round_scale(absmax_bits: Tensor) -> Tensor:
    """The kernel's scale from the int bits of a block's absmax (see ``quantize``):
    rounded up to bf16, NaN as the quiet NaN, as fp32."""
    up = torch.where(absmax_bits > 0x7F800000, 0x7FC00000, (absmax_bits + 0xFFFF) & 0x7FFF0000)
    return up.to(torch.int32).view(_F32)


def bf16_scales(scale: Tensor) -> Tensor:
    """fp32 scales, bf16 values already (``round_scale``), as bf16: their high halves, so
    NaN stays a positive quiet NaN (0x7FC0, as the kernel stores it in the interpreter;
    compiled, its conversion may give 0x7FFF). torch's vectorised CPU conversion makes it
    0xFFFF, a NaN with the sign bit set, which the kernel now reads as NaN too."""
    return (scale.contiguous().view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)


def _blocks(x: Tensor) -> tuple[Tensor, int]:
    flat = x.detach().reshape(-1).to(_F32)
    numel = flat.numel()
    pad = (-numel) % QUANT_BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(-1, QUANT_BLOCK), numel


def _unit(scale: Tensor, levels: int) -> Tensor:
    return scale * (1.0 / (levels * levels))


def _threshold(q: Tensor, weight) -> Tensor:
    return q * q + (weight * (2.0 * q + 1.0)) * (1.0 / 131072)


def encode(x: Tensor, scale: Tensor, inv: Tensor, weight, bits: int, signed: bool) -> Tensor:
    """Codes (fp32 integers) of fp32 ``x`` given broadcastable fp32 ``scale`` and ``inv``
    (~1 / scale, 0 where scale is 0) and ``weight`` (2**16: nearest; 2r + 1 per element for
    16 random bits r: stochastic): the number of thresholds below |x| (between levels q and
    q + 1: ``q**2 + weight * (2q + 1) / 2**17`` units), the kernel's ``encode``, in its
    form: nearest with the one comparison below the level nearest in the square-root
    domain, stochastic with the two around it (clamped below the top). Where that level is
    no estimate (a subnormal scale, whose inverse overflows; an inf scale) the codes are
    still the kernel's."""
    levels = _levels(bits, signed)
    q0 = 0 if signed else 1
    a = x.abs()
    y = a * inv
    y = torch.where(y < 1.0, y, torch.ones_like(y))
    u = _unit(scale, levels)
    nearest = not torch.is_tensor(weight) and weight == _NEAREST
    c0 = torch.round(y.sqrt() * levels).clamp(q0 + 1.0, None if nearest else levels - 1.0)
    code = (c0 - 1.0 - q0) + (a > _threshold(c0 - 1.0, weight) * u).to(_F32)
    if not nearest:
        code = code + (a > _threshold(c0, weight) * u).to(_F32)
    if signed:
        code = torch.where(x < 0, -code, code)
    return code


def decode(codes: Tensor, scale: Tensor, bits: int, signed: bool) -> Tensor:
    """fp32 values of integer ``codes`` in blocks of broadcastable fp32 ``scale``:
    ``q * |q|`` (signed) or ``q**2`` (positive, q = code + 1), exact, times the unit
    ``scale * (1 / L**2)``."""
    levels = _levels(bits, signed)
    q = codes.to(_F32) if signed else codes.to(_F32) + 1.0
    return (q * q.abs()) * _unit(scale, levels)


def quantize(x: Tensor, bits: int, signed: bool, random: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(codes, scales) of ``x`` (any shape, flattened; encoded from fp32).

    ``random``: None to round to nearest, or 16 random bits per element (integers in
    [0, 65536), ``x``'s number of elements) to round stochastically as the kernel does with
    the same bits.
    """
    _check_bits(bits)
    xb, numel = _blocks(x)
    # The max of |x|'s bits: float order for non-negative values, NaN above inf.
    absmax = _magnitude_bits(xb).amax(dim=1) if xb.numel() else torch.zeros(0, dtype=torch.int64, device=xb.device)
    scale = round_scale(absmax)
    inv = _inverse(scale)
    if random is None:
        weight = _NEAREST
    else:
        r = random.reshape(-1).to(torch.int64) & 0xFFFF
        if r.numel() != numel:
            raise ValueError(f"random has {r.numel()} values for {numel} elements")
        weight = torch.cat([r, r.new_zeros(xb.numel() - numel)]).reshape(xb.shape).to(_F32) * 2.0 + 1.0
    return _encode_blocks(xb, numel, scale, inv, weight, bits, signed), bf16_scales(scale)


def _encode_blocks(xb: Tensor, numel: int, scale: Tensor, inv: Tensor, weight, bits: int, signed: bool) -> Tensor:
    codes = encode(xb, scale[:, None], inv[:, None], weight, bits, signed).reshape(-1)[:numel]
    return _pack(codes.to(torch.int64), bits)


def _inverse(scale: Tensor) -> Tensor:
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, 1.0 / safe, torch.zeros_like(scale))


def _exact_blocks(codes: Tensor, scale: Tensor, xb: Tensor, numel: int, bits: int, signed: bool) -> Tensor:
    """Per block: whether ``codes`` with ``scale`` decode to exactly ``xb``'s values. In the
    map without zero, an exact 0 matches the lowest code: what that code was exported as
    where the export's holder put zeros back in its place (FSDP1's padding elements,
    dropped from its state dicts and refilled with 0 on load)."""
    back = dequantize(codes, bf16_scales(scale), numel, bits, signed)
    x = xb.reshape(-1)[:numel]
    same = back == x
    if not signed:
        same |= (x == 0) & (_unpack(codes.reshape(-1), numel, bits, signed) == 0)
    same = torch.cat([same, same.new_ones(xb.numel() - numel)])
    return same.reshape(xb.shape).all(dim=1)


def requantize(x: Tensor, bits: int, signed: bool) -> tuple[Tensor, Tensor]:
    """(codes, scales) that decode to exactly ``x`` wherever some codes and scales do, else
    those of ``quantize(x, bits, signed)``: what a moment exported at full precision (a
    DTensor shard's, ``torch_state_dict()``) converts back to on load, so a save and load
    round trip gives back the same codes and scales and training continues bit for bit.

    ``quantize`` alone does not: it takes a block's scale from its absmax, and the absmax
    element is encoded to the nearer of the two highest levels. In the positive 8-bit map
    those are 1 and (255/256)**2, less than a bf16 unit in the last place apart, so the
    absmax often takes the lower one; its block then decodes to a maximum below its scale,
    and quantizing the decoded values again derives a smaller scale and moves codes. Such a
    block is tried with the scale that puts its maximum on the second-highest level.
    """
    codes, scales = quantize(x, bits, signed)
    xb, numel = _blocks(x)
    if not numel:
        return codes, scales
    scale = scales.to(_F32)
    exact = _exact_blocks(codes, scale, xb, numel, bits, signed)
    if bool(exact.all()):
        return codes, scales
    levels = _levels(bits, signed)
    highest = levels if signed else levels - 1
    second = float(decode(torch.tensor(float(highest - 1), dtype=_F32, device="cpu"),
                          torch.tensor(1.0, dtype=_F32, device="cpu"), bits, signed))
    absmax = xb.abs().amax(dim=1)
    alt = torch.where(exact, scale, (absmax / second).to(torch.bfloat16).to(_F32))
    alt_codes = _encode_blocks(xb, numel, alt, _inverse(alt), _NEAREST, bits, signed)
    use = ~exact & _exact_blocks(alt_codes, alt, xb, numel, bits, signed)
    if not bool(use.any()):
        return codes, scales
    final = torch.where(use, alt, scale)
    return _encode_blocks(xb, numel, final, _inverse(final), _NEAREST, bits, signed), bf16_scales(final)


def dequantize(codes: Tensor, scales: Tensor, numel: int, bits: int, signed: bool) -> Tensor:
    """The fp32 values (flat, ``numel``) that ``codes`` and ``scales`` hold."""
    _check_bits(bits)
    if codes.numel() != code_bytes(numel, bits) or scales.numel() != num_scales(numel):
        raise ValueError(f"{codes.numel()} code bytes and {scales.numel()} scales do not hold "
                         f"{numel} elements at {bits} bits")
    k = _unpack(codes.reshape(-1), numel, bits, signed)
    scale = scales.reshape(-1).to(_F32).repeat_interleave(QUANT_BLOCK)[:numel]
    return decode(k, scale, bits, signed)


def per_element(codes: Tensor, scales: Tensor, numel: int, bits: int) -> tuple[Tensor, Tensor]:
    """Each element's code (one per byte; 4-bit codes in the low nibble) and its block's
    scale: a form that means the same whatever the blocks were, so it survives any
    resharding of the elements (``dequantize_per_element`` reads it)."""
    _check_bits(bits)
    if codes.numel() != code_bytes(numel, bits) or scales.numel() != num_scales(numel):
        raise ValueError(f"{codes.numel()} code bytes and {scales.numel()} scales do not hold "
                         f"{numel} elements at {bits} bits")
    k = _unpack(codes.reshape(-1), numel, bits, False)
    return k.to(torch.uint8), scales.reshape(-1).repeat_interleave(QUANT_BLOCK)[:numel]


def dequantize_per_element(codes: Tensor, scales: Tensor, bits: int, signed: bool) -> Tensor:
    """The fp32 values that ``per_element``'s codes and scales hold (any shape, same)."""
    _check_bits(bits)
    c = codes.to(torch.int64)
    if signed:
        c = torch.where(c >= 128, c - 256, c) if bits == 8 else ((c ^ 8) - 8)
    return decode(c, scales.to(_F32), bits, signed)


def _pack(codes: Tensor, bits: int) -> Tensor:
    if bits == 8:
        return (codes & 0xFF).to(torch.uint8)
    nib = codes & 15
    if nib.numel() % 2:
        nib = torch.cat([nib, nib.new_zeros(1)])
    return (nib[0::2] | (nib[1::2] << 4)).to(torch.uint8)


def _unpack(codes: Tensor, numel: int, bits: int, signed: bool) -> Tensor:
    c = codes.to(torch.int64)
    if bits == 8:
        return torch.where(c >= 128, c - 256, c) if signed else c
    nib = torch.stack([c & 15, c >> 4], dim=1).reshape(-1)[:numel]
    return ((nib ^ 8) - 8) if signed else nib
