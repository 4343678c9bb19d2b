"""DSv4 quantisation formats in plain torch (CPU and GPU), dsv4-layers.md section 6.

- fp8 e4m3 (Qmax 448) with block scales: 1x128 activations, 128x128 weights, 1x32 MoE inputs, 1x64 KV nope.
  Scales are powers of two (UE8M0: ``2^ceil(log2(amax/Qmax))``) or plain fp32 (``amax/Qmax``).
- fp4 e2m1 (Qmax 6, magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}), two codes per byte, low nibble first, with 1x32
  UE8M0 scales (MXFP4).
- UE8M0 byte ``b`` encodes ``2^(b-127)``; byte 255 is NaN.

Every cast rounds to nearest, ties to even, after clamping to +-Qmax (the block amax maps to at most Qmax).
"""
from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
FP8_AMAX_FLOOR = 1e-4          # activations / KV cache (vLLM, DS-ref)
FP4_AMAX_FLOOR = 6 * 2.0 ** -126
UE8M0_MIN_BYTE, UE8M0_MAX_BYTE = 1, 254   # exponent clamp of MegaMoE staging: 2^-126 .. 2^127
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])

HAS_E8M0_DTYPE = hasattr(torch, "float8_e8m0fnu")


def _check_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"{name}: expected a bf16/fp16/fp32/fp64 tensor, got {x.dtype}")


# ---- UE8M0 --------------------------------------------------------------------------------------
def ue8m0_to_float(s: torch.Tensor) -> torch.Tensor:
    """UE8M0 bytes (uint8, or torch.float8_e8m0fnu) -> fp32 ``2^(b-127)``; 255 -> NaN."""
    if HAS_E8M0_DTYPE and s.dtype == torch.float8_e8m0fnu:
        s = s.view(torch.uint8)
    if s.dtype != torch.uint8:
        raise TypeError(f"s: expected uint8 or float8_e8m0fnu UE8M0 bytes, got {s.dtype}")
    # byte << 23 is exactly the fp32 bit pattern of 2^(b-127) for b in 1..254; b = 0 gives 0 -> use ldexp.
    out = torch.ldexp(torch.ones_like(s, dtype=torch.float32), s.to(torch.int32) - 127)
    return torch.where(s == 255, torch.full_like(out, float("nan")), out)


def float_to_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two fp32 scales -> UE8M0 bytes. Raises if a scale is not an exact power of two in range."""
    _check_float("scale", scale)
    m, e = torch.frexp(scale.float())
    if not bool(((m == 0.5) & (scale > 0)).all()):
        raise ValueError("scale: expected positive exact powers of two")
    b = e.to(torch.int32) - 1 + 127
    if bool(((b < 0) | (b > 254)).any()):
        raise ValueError("scale: exponent outside the UE8M0 range 2^-127 .. 2^127")
    return b.to(torch.uint8)


def pow2_scale(amax: torch.Tensor, qmax: float, amax_floor: float, clamp_exponent: bool = True) -> torch.Tensor:
    """``2^ceil(log2(max(amax, floor) / qmax))`` computed exactly with frexp (no log2 rounding)."""
    v = torch.clamp(amax.float(), min=amax_floor) / qmax
    m, e = torch.frexp(v)               # v = m * 2^e, m in [0.5, 1)
    exp = e - (m == 0.5).to(e.dtype)    # exact powers of two keep their own exponent
    if clamp_exponent:
        exp = exp.clamp(UE8M0_MIN_BYTE - 127, UE8M0_MAX_BYTE - 127)
    return torch.ldexp(torch.ones_like(v), exp)


# ---- block views --------------------------------------------------------------------------------
def _blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """View [..., R, C] as [..., R/br, br, C/bc, bc] (a 1-D block (1, b) works on any leading shape)."""
    br, bc = block
    if x.dim() < (1 if br == 1 else 2):
        raise ValueError(f"x: expected at least {1 if br == 1 else 2} dims for block {block}, got shape {tuple(x.shape)}")
    if x.shape[-1] % bc:
        raise ValueError(f"x: last dim {x.shape[-1]} is not a multiple of the block width {bc}")
    if br == 1:
        return x.reshape(*x.shape[:-1], 1, 1, x.shape[-1] // bc, bc)
    if x.shape[-2] % br:
        raise ValueError(f"x: dim -2 ({x.shape[-2]}) is not a multiple of the block height {br}")
    return x.reshape(*x.shape[:-2], x.shape[-2] // br, br, x.shape[-1] // bc, bc)


def _scale_shape(x_shape: torch.Size, block: tuple[int, int]) -> tuple[int, ...]:
    br, bc = block
    if br == 1:
        return (*x_shape[:-1], x_shape[-1] // bc)
    return (*x_shape[:-2], x_shape[-2] // br, x_shape[-1] // bc)


def _norm_block(block: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(block, int):
        block = (1, block)
    if len(block) != 2 or min(block) <= 0:
        raise ValueError(f"block: expected a positive int or (rows, cols), got {block!r}")
    return int(block[0]), int(block[1])


# ---- fp8 e4m3 -----------------------------------------------------------------------------------
def quant_fp8(x: torch.Tensor, block: int | tuple[int, int] = 128, *, pow2: bool = True,
              amax_floor: float = FP8_AMAX_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantise to fp8 e4m3: returns ``(q, scale)`` with ``x ~= q * scale`` per block.

    ``block``: ``b`` or ``(1, b)`` for per-row blocks along the last dim (scale shape [..., K/b]);
    ``(br, bc)`` for 2-D blocks over the last two dims (scale shape [..., N/br, K/bc]).
    ``pow2=True``: UE8M0 power-of-two scales (exponent clamped to [-126, 127]); else fp32 ``amax/448``.
    """
    _check_float("x", x)
    block = _norm_block(block)
    xb = _blocks(x.float(), block)
    amax = xb.abs().amax(dim=(-3, -1), keepdim=True)
    if pow2:
        scale = pow2_scale(amax, FP8_E4M3_MAX, amax_floor)
    else:
        scale = torch.clamp(amax, min=amax_floor) / FP8_E4M3_MAX
    q = (xb / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.reshape(x.shape), scale.reshape(_scale_shape(x.shape, block))


def dequant_fp8(q: torch.Tensor, scale: torch.Tensor, block: int | tuple[int, int] = 128,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``quant_fp8``: ``q * scale`` broadcast over blocks. UE8M0 byte scales are accepted too."""
    if q.dtype != torch.float8_e4m3fn:
        raise TypeError(f"q: expected float8_e4m3fn, got {q.dtype}")
    block = _norm_block(block)
    if scale.dtype == torch.uint8 or (HAS_E8M0_DTYPE and scale.dtype == torch.float8_e8m0fnu):
        scale = ue8m0_to_float(scale)
    expect = _scale_shape(q.shape, block)
    if tuple(scale.shape) != tuple(expect):
        raise ValueError(f"scale: expected shape {tuple(expect)} for q {tuple(q.shape)} and block {block}, got {tuple(scale.shape)}")
    qb = _blocks(q.float(), block)
    sf = scale.float()
    s = sf.reshape(*sf.shape[:-1], 1, 1, sf.shape[-1], 1) if block[0] == 1 else \
        sf.reshape(*sf.shape[:-2], sf.shape[-2], 1, sf.shape[-1], 1)
    return (qb * s).reshape(q.shape).to(dtype)


def fp8_roundtrip(x: torch.Tensor, block: int | tuple[int, int] = 64, *, pow2: bool = True,
                  amax_floor: float = FP8_AMAX_FLOOR) -> torch.Tensor:
    """Quantise then dequantise (QAT emulation of fp8 storage); returns ``x.dtype``."""
    q, s = quant_fp8(x, block, pow2=pow2, amax_floor=amax_floor)
    return dequant_fp8(q, s, block, dtype=x.dtype)


# ---- fp4 e2m1 -----------------------------------------------------------------------------------
def e2m1_encode(a: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (already scaled into [-6, 6]) to e2m1 codes (uint8, sign in bit 3), ties to even code."""
    mag = a.abs().clamp(max=FP4_E2M1_MAX)
    mids = _E2M1_MIDPOINTS.to(a.device)
    idx = torch.bucketize(mag, mids, right=False)          # ties land on the lower code
    at_mid = mag == mids[idx.clamp(max=mids.numel() - 1)]
    idx = idx + (at_mid & (idx % 2 == 1)).to(idx.dtype)   # ... move to the even (mantissa 0) neighbour
    sign = (torch.signbit(a) & (idx > 0)).to(torch.uint8)  # -0 encodes as +0
    return idx.to(torch.uint8) | (sign << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (uint8, low 4 bits) -> fp32 values."""
    vals = E2M1_VALUES.to(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -vals, vals)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dim, element 2i in the low nibble. Returns uint8 [..., K/2]."""
    if codes.shape[-1] % 2:
        raise ValueError(f"codes: last dim must be even, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_fp4``: uint8/int8 [..., K/2] -> codes uint8 [..., K]."""
    if packed.dtype not in (torch.uint8, torch.int8):
        raise TypeError(f"packed: expected uint8 or int8 packed e2m1, got {packed.dtype}")
    p = packed.view(torch.uint8)
    return torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)


def quant_fp4(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4: returns ``(packed uint8 [..., K/2], scale UE8M0 bytes [..., K/block])``."""
    _check_float("x", x)
    xb = _blocks(x.float(), (1, block))
    amax = xb.abs().amax(dim=-1, keepdim=True)
    scale = pow2_scale(amax, FP4_E2M1_MAX, FP4_AMAX_FLOOR)
    codes = e2m1_encode(xb / scale).reshape(x.shape)
    return pack_fp4(codes), float_to_ue8m0(scale.reshape(_scale_shape(x.shape, (1, block))))


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, block: int = 32,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``quant_fp4``. ``scale``: UE8M0 bytes (or fp32 powers of two) of shape [..., K/block]."""
    vals = e2m1_decode(unpack_fp4(packed))
    if scale.dtype == torch.uint8 or (HAS_E8M0_DTYPE and scale.dtype == torch.float8_e8m0fnu):
        scale = ue8m0_to_float(scale)
    if tuple(scale.shape) != (*vals.shape[:-1], vals.shape[-1] // block):
        raise ValueError(f"scale: expected shape {(*vals.shape[:-1], vals.shape[-1] // block)}, got {tuple(scale.shape)}")
    out = vals.reshape(*vals.shape[:-1], -1, block) * scale.float()[..., None]
    return out.reshape(vals.shape).to(dtype)
