"""TileLang hc_head for Hopper: the final collapse before the LM head (dsv4-layers.md 2.7).

    m   = (flatten(R) @ fn.T) * rsqrt(sum(flatten(R)^2) / nD + rms_eps)       fn [4, nD], fp32 math
    pre = sigmoid(m * scale[0] + base) + hc_eps
    out = bf16(sum_i pre_i R[i])                                              [T, D]; the caller applies norm.weight

Designs as for ``mhc_pre`` (``_mhc_common.TUNING["design"]``): "one_pass" = ``_mhc_onepass`` with 4 mixes;
"l2_chunked" = the two kernels below per chunk of tokens; "two_pass" (default): two kernels, the split-K
prenorm GEMM of ``mhc_pre`` with 4 mixes (wgmma n16: 3 bf16 terms x 4 + 4 zero columns), then ``head_epilogue_kernel`` (reduce splits, sigmoid, collapse; blocks walk the
tokens in reverse so the first ones find the GEMM's last tiles in L2). The launcher allocates and returns
``out``, the functional form PR #43905 gave vLLM's ``hc_head_fused_kernel_tilelang``.
"""
# no `from __future__ import annotations`: TileLang reads the prim_func annotations in the builder's scope.
import functools

import torch

from dsv4lab.kernels.reference import _checks as chk

from . import _mhc_common as common
from .mhc_pre import (EPILOGUE_THREADS, MAX_TOKENS_PER_BLOCK, MIX_LANES, SPLIT_LANES, block_reduce_macro,
                      epilogue_design, gemm_kernel, gemm_splits, split_reduce_macro)


@functools.lru_cache(maxsize=None)
def head_epilogue_kernel(d: int, arch: str, rms_eps: float, hc_eps: float, design: str = "v2"):
    """``head_epilogue_func`` compiled for ``arch``."""
    return common.compile_kernel(head_epilogue_func(d, rms_eps, hc_eps, design), arch)


@functools.lru_cache(maxsize=None)
def head_epilogue_func(d: int, rms_eps: float, hc_eps: float, design: str = "v2"):
    """TileLang prim_func of the hc_head epilogue for hidden size ``d`` (n = 4). Arguments: mix_part [S, T, 4], sq_part [S, T],
    residual [T, 4, d] bf16, scale [1], base [4], out [T, d] bf16 (out), tokens_per_block (int32 scalar)."""
    import tilelang.language as T

    n = common.HC_MULT
    nd = n * d
    num_tokens = T.dynamic("num_tokens")
    n_splits = T.dynamic("n_splits")
    if design not in ("v1", "v2"):
        raise ValueError(f"design: expected 'v1' or 'v2', got {design!r}")
    reduce_splits = split_reduce_macro(n)
    reduce_block = block_reduce_macro(n)   # v2: all the block's tokens at once (see mhc_pre)

    @T.prim_func
    def head_epilogue(mix_part: T.Tensor((n_splits, num_tokens, n), "float32"),
                      sq_part: T.Tensor((n_splits, num_tokens), "float32"),
                      residual: T.Tensor((num_tokens, n, d), "bfloat16"),
                      scale: T.Tensor((1,), "float32"),
                      base: T.Tensor((n,), "float32"),
                      out: T.Tensor((num_tokens, d), "bfloat16"),
                      tokens_per_block: T.int32):
        with T.Kernel(T.ceildiv(num_tokens, tokens_per_block), threads=EPILOGUE_THREADS) as bx:
            lanes = T.alloc_fragment((SPLIT_LANES, MIX_LANES), "float32")
            lane_sum = T.alloc_fragment((MIX_LANES,), "float32")
            mixes = T.alloc_shared((MAX_TOKENS_PER_BLOCK, MIX_LANES), "float32")
            pre_s = T.alloc_shared((MAX_TOKENS_PER_BLOCK, n), "float32")
            t0 = (T.ceildiv(num_tokens, tokens_per_block) - 1 - bx) * tokens_per_block
            if design == "v1":
                for tok in T.serial(tokens_per_block):
                    if t0 + tok < num_tokens:
                        reduce_splits(mix_part, sq_part, n_splits, t0 + tok, tok, lanes, lane_sum, mixes)
            else:
                reduce_block(mix_part, sq_part, n_splits, t0, tokens_per_block, num_tokens, mixes)
            T.sync_threads()
            for tok, i in T.Parallel(MAX_TOKENS_PER_BLOCK, n):
                if tok < tokens_per_block:
                    pre_s[tok, i] = 1.0 / (1.0 + T.exp(-(mixes[tok, i] * T.rsqrt(mixes[tok, n] / nd + rms_eps)
                                                          * scale[0] + base[i]))) + hc_eps
            T.sync_threads()
            for tok in T.serial(tokens_per_block):
                if t0 + tok < num_tokens:
                    for e in T.Parallel(d):
                        out[t0 + tok, e] = T.cast(
                            pre_s[tok, 0] * T.cast(residual[t0 + tok, 0, e], "float32")
                            + pre_s[tok, 1] * T.cast(residual[t0 + tok, 1, e], "float32")
                            + pre_s[tok, 2] * T.cast(residual[t0 + tok, 2, e], "float32")
                            + pre_s[tok, 3] * T.cast(residual[t0 + tok, 3, e], "float32"),
                            "bfloat16")

    return head_epilogue


def _check(residual, fn, scale, base, rms_eps, hc_eps) -> tuple[int, int, int, float, float]:
    t, n, d = common.check_residual(residual)
    common.check_mix_params(fn, scale, base, n, d, n, 1)
    return t, n, d, chk.positive_float("rms_eps", rms_eps), chk.positive_float("hc_eps", hc_eps)


def _launch(residual, fn, scale, base, out, rms_eps: float, hc_eps: float) -> None:
    """hc_head in the design ``common.design_for(T, D)`` picks (see ``_mhc_common.TUNING``)."""
    t, n, d = residual.shape
    if t == 0:
        return
    design = common.design_for(t, d)
    if design == "one_pass":
        from . import _mhc_onepass as onepass

        onepass.kernel_for("head", d, residual.device, None, rms_eps, hc_eps)(residual, fn, scale, base, out)
        return
    if design != "l2_chunked":
        _launch_two_pass(residual, fn, scale, base, out, rms_eps, hc_eps)
        return
    # l2_chunked: per chunk the GEMM, then the epilogue re-reading what the GEMM just left in L2 (host work per
    # chunk: slicing and two launches; see mhc_pre.run_pre_chunks)
    dev, step = residual.device, common.chunk_tokens(d)
    arch, sms = common.device_arch(dev), common.sm_count(dev.index or 0)
    x, plans = residual.view(t, n * d), {}
    for a in range(0, t, step):
        b = min(t, a + step)
        if b - a not in plans:
            tile = common.gemm_block_tokens(b - a, n)
            splits = gemm_splits(b - a, n * d, dev, tile)
            plans[b - a] = (torch.empty(splits, b - a, n, dtype=torch.float32, device=dev),
                            torch.empty(splits, b - a, dtype=torch.float32, device=dev),
                            gemm_kernel(n * d, n, dev, tile),
                            head_epilogue_kernel(d, arch, rms_eps, hc_eps, epilogue_design(splits)),
                            min(MAX_TOKENS_PER_BLOCK, common.tokens_per_block(b - a, sms)))
        mix_part, sq_part, gemm, epilogue, tpb = plans[b - a]
        gemm(x[a:b], fn, mix_part, sq_part)
        epilogue(mix_part, sq_part, residual[a:b], scale, base, out[a:b], tpb)


def _launch_two_pass(residual, fn, scale, base, out, rms_eps: float, hc_eps: float) -> None:
    t, n, d = residual.shape
    dev = residual.device
    arch = common.device_arch(dev)
    tile = common.gemm_block_tokens(t, n)   # 64 unless forced (hc_head's GEMM was not swept at 128)
    splits = gemm_splits(t, n * d, dev, tile)
    mix_part = torch.empty(splits, t, n, dtype=torch.float32, device=dev)
    sq_part = torch.empty(splits, t, dtype=torch.float32, device=dev)
    gemm_kernel(n * d, n, dev, tile)(residual.view(t, n * d), fn, mix_part, sq_part)
    tpb = min(MAX_TOKENS_PER_BLOCK, common.tokens_per_block(t, common.sm_count(dev.index or 0)))
    head_epilogue_kernel(d, arch, rms_eps, hc_eps, epilogue_design(splits))(mix_part, sq_part, residual, scale,
                                                                              base, out, tpb)


def hc_head(residual: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
            rms_eps: float = 1e-6, hc_eps: float = 1e-6) -> torch.Tensor:
    """hc_head on an SM90 GPU; same contract as ``reference.mhc.hc_head``: returns [T, D] bf16."""
    t, n, d, rms_eps, hc_eps = _check(residual, fn, scale, base, rms_eps, hc_eps)
    common.check_cuda_layout(residual=residual, fn=fn, scale=scale, base=base)
    out = torch.empty(t, d, dtype=torch.bfloat16, device=residual.device)
    _launch(residual, fn, scale, base, out, rms_eps, hc_eps)
    return out


def hc_head_into(residual: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
                 out: torch.Tensor, *, rms_eps: float = 1e-6, hc_eps: float = 1e-6) -> None:
    """``hc_head`` writing into a caller-allocated ``out`` [T, D] bf16: the mutating form vLLM used before
    #43905 (``_hc_head_fused_kernel_tilelang(..., out, ...)``). Same kernels, same results."""
    t, n, d, rms_eps, hc_eps = _check(residual, fn, scale, base, rms_eps, hc_eps)
    chk.tensor("out", out, (torch.bfloat16,), dim=2)
    chk.shape("out", out, (t, d))
    common.check_cuda_layout(residual=residual, fn=fn, scale=scale, base=base, out=out)
    _launch(residual, fn, scale, base, out, rms_eps, hc_eps)
