"""inverse RoPE + per-(token, 128-chunk) fp8 quant: reference vs independent math, Triton vs reference bit for bit."""
import math

import pytest
import torch

from dsv4lab.config import get_config
from dsv4lab.kernels.reference import attn_out as ref
from dsv4lab.kernels.triton import inv_rope_fp8_quant as tri
from dsv4lab.rope import apply_rope, base_inv_freq, layer_inv_freq

_CODES = torch.arange(0, 127, dtype=torch.uint8)           # every non-negative finite e4m3 code (0x7f is NaN)
E4M3_GRID = _CODES.view(torch.float8_e4m3fn).double()      # ascending; even index = mantissa lsb 0
MAX_POS = 70000


def cache(inv_freq=None):
    return ref.rope_cos_sin_cache(base_inv_freq(64, 10000.0) if inv_freq is None else inv_freq, MAX_POS)


def attn_output(t, h, d, dtype=torch.bfloat16):
    """Unit-RMS attention output with per-token magnitudes spread over 1e-3 .. 1e3 (scales of many binades)."""
    mags = torch.logspace(-3, 3, t)[:, None, None]
    return (torch.randn(t, h, d) * mags).to(dtype)


def brute_force_quant(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y fp32 [T, K] -> (codes uint8 [T, K], scales fp64 [T, K/128]) from first principles, in float64:
    scale = smallest 2^k with 448 * 2^k >= max(amax, fp32(1e-10)); code = nearest e4m3 to y/scale, ties to even."""
    floor = float(torch.tensor(1e-10, dtype=torch.float32))
    yb = y.double().reshape(y.shape[0], -1, 128)
    amax = yb.abs().amax(-1).clamp_min(floor)
    k = torch.tensor([[math.ceil(math.log2(a / 448.0)) for a in row] for row in amax.tolist()], dtype=torch.float64)
    k = k - ((448.0 * 2.0 ** (k - 1)) >= amax).double()   # guard log2 rounding: the smallest k that fits
    k = k + ((448.0 * 2.0 ** k) < amax).double()
    scale = 2.0 ** k
    v = (yb / scale[..., None]).reshape(-1)
    dist = (v.abs()[:, None] - E4M3_GRID[None, :]).abs()
    best = dist == dist.min(dim=1, keepdim=True).values
    even = (torch.arange(E4M3_GRID.numel()) % 2 == 0)[None, :]
    idx = torch.where(best & even, 2, torch.where(best, 1, 0)).argmax(dim=1)   # tie -> even code
    codes = _CODES[idx] | (torch.signbit(v).to(torch.uint8) << 7)
    return codes.reshape(y.shape), scale


def as_bytes(q):
    return q.view(torch.uint8)


# ---- the reference against independent math --------------------------------------------------------------
def test_reference_rotation_is_rope_inverse_bitwise():
    cfg = get_config("flash")
    for inv_freq in (layer_inv_freq(cfg, 0), layer_inv_freq(cfg, 2)):       # plain and YaRN tables
        o = attn_output(6, 3, 256)
        pos = torch.randint(0, MAX_POS, (6,))
        got = ref.inv_rope(o, pos, ref.rope_cos_sin_cache(inv_freq, MAX_POS))
        assert torch.equal(got, apply_rope(o.float(), pos, inv_freq, inverse=True))   # dsv4lab.rope, same fp32 ops
        assert torch.equal(got[..., :192], o[..., :192].float())                      # nope channels untouched


def test_reference_rotation_undoes_the_query_rotation():
    inv_freq = base_inv_freq(64, 10000.0)
    o = torch.randn(5, 2, 128, dtype=torch.float64)
    pos = torch.randint(0, MAX_POS, (5,))
    # forward rotation by hand in fp64, at the table's angle: the angle itself is an fp32 product (vLLM's cache
    # too), which at positions ~7e4 is ~4e-3 rad away from the exact one
    theta = (pos[:, None].float() * inv_freq[None, :]).double()
    e, od = o[..., 64::2], o[..., 65::2]
    c, s = torch.cos(theta)[:, None, :], torch.sin(theta)[:, None, :]
    rotated = o.clone()
    rotated[..., 64::2], rotated[..., 65::2] = e * c - od * s, od * c + e * s
    back = ref.inv_rope(rotated, pos, cache(inv_freq), dtype=torch.float64)
    # the fp32 cos/sin table is within ~2^-24 relative of fp64 cos/sin: a few 1e-7 on unit values
    assert (back - o).abs().max() < 1e-6


def test_reference_quant_matches_brute_force():
    o = attn_output(4, 4, 128)
    o[0, 1] = 0.0                       # an all-zero chunk: amax floor 1e-10 -> scale 2^-42
    o[1, 2, :64] = 1e-12                # tiny nope values under the floor: 1e-12 * 2^42 = 4.398 -> 4.5
    o[1, 2, 64:] = 0.0
    pos = torch.randint(0, MAX_POS, (4,))
    q, s = ref.inv_rope_fp8_quant(o, pos, cache())
    codes, scale = brute_force_quant(apply_rope(o.float(), pos, base_inv_freq(64, 10000.0), inverse=True).reshape(4, -1))
    assert torch.equal(as_bytes(q), codes)
    assert torch.equal(s.double(), scale)
    assert s[0, 1].item() == 2.0 ** -42 and not q[0, 128:256].float().any()   # (rotated zeros may be -0)
    assert s[1, 2].item() == 2.0 ** -42 and q[1, 256].float().item() == 4.5


# ---- Triton vs reference, bit for bit --------------------------------------------------------------------
@pytest.mark.parametrize("t,h,d,dtype", [(8, 4, 128, torch.bfloat16),      # toy head, rope 64 in one chunk
                                         (3, 2, 512, torch.bfloat16),      # DSv4 head: 4 chunks, rope in the last
                                         (5, 3, 256, torch.float16),
                                         (4, 2, 128, torch.float32),
                                         (2, 10, 512, torch.bfloat16),     # two head blocks, the second partial
                                         (3, 2, 384, torch.bfloat16)])     # 3 chunks per head (padded to 4)
def test_triton_bitwise_equals_reference(device, t, h, d, dtype):
    o = attn_output(t, h, d, dtype)
    o[0, 0] = 0.0
    pos = torch.randint(0, MAX_POS, (t,))
    cs = cache(layer_inv_freq(get_config("flash"), 2))
    q_ref, s_ref = ref.inv_rope_fp8_quant(o, pos, cs)
    q, s = tri.inv_rope_fp8_quant(o.to(device), pos.to(device), cs.to(device))
    assert q.shape == (t, h * d) and s.shape == (t, h * d // 128)
    assert torch.equal(as_bytes(q).cpu(), as_bytes(q_ref))
    assert torch.equal(s.cpu(), s_ref)


@pytest.mark.parametrize("tile_elements,num_warps", [(2048, 4), (16384, 8)])   # ends of the bench's tuning sweep
def test_triton_bitwise_equals_reference_for_every_tuned_tile(device, monkeypatch, tile_elements, num_warps):
    monkeypatch.setitem(tri.TUNING, "tile_elements", tile_elements)
    monkeypatch.setitem(tri.TUNING, "num_warps", num_warps)
    t, h, d = 3, 37, 512                        # 37 heads: a partial head block for every tile size
    o = attn_output(t, h, d)
    pos = torch.randint(0, MAX_POS, (t,))
    cs = cache(layer_inv_freq(get_config("flash"), 2))
    q_ref, s_ref = ref.inv_rope_fp8_quant(o, pos, cs)
    q, s = tri.inv_rope_fp8_quant(o.to(device), pos.to(device), cs.to(device))
    assert torch.equal(as_bytes(q).cpu(), as_bytes(q_ref))
    assert torch.equal(s.cpu(), s_ref)


@pytest.mark.parametrize("rope_dim", [32, 128])
def test_triton_other_rope_widths(device, rope_dim):
    """rope_dim is a parameter: 32 (4 rope rows per chunk boundary) and 128 (the whole last chunk rotates)."""
    o = attn_output(3, 2, 256)
    pos = torch.randint(0, MAX_POS, (3,))
    cs = ref.rope_cos_sin_cache(base_inv_freq(rope_dim, 10000.0), MAX_POS)
    q_ref, s_ref = ref.inv_rope_fp8_quant(o, pos, cs)
    q, s = tri.inv_rope_fp8_quant(o.to(device), pos.to(device), cs.to(device))
    assert torch.equal(as_bytes(q).cpu(), as_bytes(q_ref)) and torch.equal(s.cpu(), s_ref)


def test_triton_rounds_ties_carries_and_subnormals_like_torch(device):
    """fp32 input with hand-picked values at scale 1 (chunk amax exactly 448): ties to even, carry into the next
    binade, subnormal ties, signed zeros. The interpreter's own fp32->e4m3 cast gets several of these wrong."""
    special = torch.tensor([448.0, 1.0625, 1.1875, -1.0625, 125.95, 2 ** -10, 3 * 2 ** -10, -2 ** -10, 2 ** -11,
                            447.9, 239.99, 0.01171875, -0.0, 1e-30, 13.0, 14.5])
    expect = torch.tensor([448.0, 1.0, 1.25, -1.0, 128.0, 0.0, 2 ** -8, -0.0, 0.0,
                           448.0, 240.0, 0.01171875, -0.0, 0.0, 13.0, 14.0])
    o = torch.zeros(2, 1, 128)
    o[0, 0, :16] = special
    o[0, 0, 16:64] = torch.randn(48) * 50
    o[1, 0, :64] = torch.randn(64) * torch.logspace(-6, 2, 64)       # many binades in one chunk
    pos = torch.tensor([0, 7])                                        # position 0: the rope part is unrotated
    q_ref, s_ref = ref.inv_rope_fp8_quant(o, pos, cache())
    q, s = tri.inv_rope_fp8_quant(o.to(device), pos.to(device), cache().to(device))
    assert s_ref[0, 0].item() == 1.0
    assert torch.equal(q_ref[0, :16].float(), expect)
    assert torch.equal(torch.signbit(q_ref[0, :16].float()), torch.signbit(expect))
    assert torch.equal(as_bytes(q).cpu(), as_bytes(q_ref))
    assert torch.equal(s.cpu(), s_ref)


def test_triton_reads_a_head_slice_of_a_padded_buffer(device):
    o_padded = attn_output(3, 6, 128).to(device)
    o = o_padded[:, :4]                                # vLLM slices o_padded[:, :n_local_heads]
    pos = torch.randint(0, MAX_POS, (3,), device=device)
    q, s = tri.inv_rope_fp8_quant(o, pos, cache().to(device))
    q_ref, s_ref = ref.inv_rope_fp8_quant(o.contiguous().cpu(), pos.cpu(), cache())
    assert torch.equal(as_bytes(q).cpu(), as_bytes(q_ref)) and torch.equal(s.cpu(), s_ref)


@pytest.mark.parametrize("fn", [ref.inv_rope_fp8_quant, tri.inv_rope_fp8_quant])
def test_zero_tokens_give_empty_outputs(fn, device):
    q, s = fn(torch.empty(0, 4, 128, dtype=torch.bfloat16, device=device),
              torch.empty(0, dtype=torch.int64, device=device), cache().to(device))
    assert q.shape == (0, 512) and q.dtype == torch.float8_e4m3fn
    assert s.shape == (0, 4) and s.dtype == torch.float32


@pytest.mark.parametrize("fn", [ref.inv_rope_fp8_quant, tri.inv_rope_fp8_quant])
def test_bad_inputs_raise_before_any_work(fn):
    o, pos, cs = attn_output(2, 2, 128), torch.tensor([1, 2]), cache()
    with pytest.raises(ValueError, match="o: head_dim"):
        fn(torch.zeros(2, 2, 96, dtype=torch.bfloat16), pos, cs)
    with pytest.raises(ValueError, match="o: expected 3 dims"):
        fn(o[0], pos, cs)
    with pytest.raises(TypeError, match="positions"):
        fn(o, pos.float(), cs)
    with pytest.raises(ValueError, match=r"positions: expected rows of cos_sin_cache in \[0, "):
        fn(o, torch.tensor([1, MAX_POS]), cs)
    with pytest.raises(ValueError, match="positions: expected shape"):
        fn(o, torch.tensor([1, 2, 3]), cs)
    with pytest.raises(TypeError, match="cos_sin_cache"):
        fn(o, pos, cs.double())
    with pytest.raises(ValueError, match="rope_dim"):
        fn(o, pos, torch.zeros(10, 130))
    with pytest.raises(TypeError, match="o: expected dtype"):
        fn(o.to(torch.int32), pos, cs)


def test_triton_refuses_a_non_power_of_two_rope_dim():
    o, pos = attn_output(2, 2, 128), torch.tensor([1, 2])
    cs = ref.rope_cos_sin_cache(base_inv_freq(48, 10000.0), 16)
    assert ref.inv_rope_fp8_quant(o, pos, cs)[0].shape == (2, 256)     # the reference takes any even width
    with pytest.raises(ValueError, match="power-of-two rope_dim"):
        tri.inv_rope_fp8_quant(o, pos, cs)


def test_registry_backends_share_the_reference_signature(device):
    from dsv4lab.kernels import registry

    assert registry.backends("inv_rope_fp8_quant") == ["reference", "triton"]
    o, pos = attn_output(2, 2, 128), torch.tensor([3, 4])
    q, s = registry.get("inv_rope_fp8_quant", "triton")(o.to(device), pos.to(device), cache().to(device))
    q_ref, s_ref = registry.get("inv_rope_fp8_quant", "reference")(o, pos, cache())
    assert torch.equal(as_bytes(q).cpu(), as_bytes(q_ref)) and torch.equal(s.cpu(), s_ref)


_AOT_SCRIPT = r"""
import os, re
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from dsv4lab.kernels.triton import inv_rope_fp8_quant as K
sig = {"o_ptr": "*bf16", "pos_ptr": "*i64", "cs_ptr": "*fp32", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32",
       "stride_ot": "i32", "stride_oh": "i32", "n_heads": "i32", "HEAD_DIM": "constexpr", "ROPE_DIM": "constexpr",
       "HEADS": "constexpr", "CHUNKS": "constexpr", "AMAX_FLOOR": "constexpr", "SOFT_ROUND": "constexpr"}
src = triton.compiler.ASTSource(fn=K._inv_rope_fp8_quant_kernel, signature=sig,   # DSv4 heads, as launched on a GPU
                                constexprs={"HEAD_DIM": 512, "ROPE_DIM": 64, "HEADS": 8, "CHUNKS": 4,
                                            "AMAX_FLOOR": 1e-10, "SOFT_ROUND": False},
                                attrs={(i,): [["tt.divisibility", 16]] for i in range(7)})  # JIT specialisation
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(K.LAUNCH_OPTIONS)).asm["ptx"]
print(len(re.findall(r"\bfma\.", ptx)), len(re.findall(r"\bdiv\.", ptx)), len(re.findall(r"\.ftz", ptx)),
      " ".join(sorted(set(re.findall(r"cvt\.[a-z0-9.]*e4m3[a-z0-9.]*", ptx)))))
"""


def test_sm90_build_has_no_fma_division_or_ftz():
    """GPU bitwise agreement rests on the compiled kernel rounding like torch: no fused multiply-add in the rotation,
    no (approximate) division, no flush-to-zero, and the e4m3 cast with round-to-nearest-even (the hardware cast;
    the interpreter's software rounding is compiled out). Checked on the sm_90a PTX compiled ahead of time (no GPU
    needed; ptxas ships with triton)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0 and "CUDA" in proc.stderr and "backend" in proc.stderr.lower():
        pytest.skip(f"triton cannot compile for CUDA here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    fma, div, ftz, cvt = proc.stdout.split(maxsplit=3)
    assert (int(fma), int(div), int(ftz)) == (0, 0, 0)
    assert cvt.strip() == "cvt.rn.satfinite.e4m3x2.f32"
