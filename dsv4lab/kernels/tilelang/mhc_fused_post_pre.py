"""TileLang mhc_fused_post_pre for Hopper: hc_post of one sublayer, then hc_pre of the next (dsv4-layers.md 2.6).

    new_residual = bf16(post[k] f + sum_j comb[j, k] R[j])                    (mhc_post, fp32 math)
    (layer_input, post', comb') = mhc_pre(new_residual, fn, scale, base, norm_weight)

The pre half reads the ROUNDED new residual, exactly like the reference (``mhc_post`` then ``mhc_pre``).

Designs (``_mhc_common.TUNING["design"]``, see ``_mhc_common``): "one_pass" = the cluster kernel of
``_mhc_onepass`` (post on the staged slice, then pre on it; 20TD bytes, one launch); "l2_chunked" = per chunk of
tokens the mhc_post kernel then the two-pass pre, so the pre half reads the new residual from L2 (20TD bytes);
"two_pass" = the full-T kernels below, selected by ``TUNING["fused"]``:

"post_then_pre" (default since the first H100 run): the ``mhc_post`` kernel, then ``mhc_pre`` on its output
(three launches). The new residual is bitwise mhc_post's by construction (the v1 kernel's could differ by a bf16
ulp: nvcc contracts its fp32 expression into FMAs differently), and each kernel runs at its own speed: on the
H100 mhc_post streamed at 92-96% of copy bandwidth while the v1 fused GEMM (16-column TMA boxes, 32-byte
scattered stores of the new residual from registers) made the fused op SLOWER than post + pre (1589 us vs
422 + 605 us, Flash, T = 16384). Bytes: post 18TD + pre 18TD (two-pass) = 36TD against roofline row 4's
~20TD, so this caps at ~55% of bandwidth and should land near (18 + 18) / (18 / 0.94 + 18 / e_pre) of it.

"v1" (the first run's kernels, kept for comparison):
1. ``post_prenorm_gemm_kernel``: the prenorm GEMM of ``mhc_pre`` with the post computed in its prologue.
   A pipeline stage covers 16 columns of D for all 4 streams (K = 64): TMA brings f [64 tokens, 16],
   R [64, 4, 16] and fn [24, 4, 16]; the consumer warpgroup forms the bf16 new residual tile (written to
   global memory and to the wgmma A operand in shared memory), accumulates its squares, splits fn into
   hi/mid/lo bf16 terms and issues the [64, 64] x [64, 80] wgmma (see ``mhc_pre``). R and f are read once,
   the new residual written once, as in a standalone mhc_post.
2. the ``mhc_pre`` epilogue (mixes, Sinkhorn, collapse + RMSNorm) on the new residual; for small T it is
   still in L2, at large T this is the one extra 8TD read beyond roofline row 4's ~20TD.
"""
# no `from __future__ import annotations`: TileLang reads the prim_func annotations in the builder's scope.
import functools

import torch

from . import _mhc_common as common
from . import mhc_post as post_module
from .mhc_post import mhc_post
from .mhc_pre import (MAX_SPLITS, _weight_or_placeholder, check_pre_inputs, gemm_splits, mhc_pre, norm_dtype_of,
                      padded_columns, run_pre_chunks, run_pre_epilogue)

BLOCK_D = 16        # columns of D per pipeline stage; x 4 streams = K 64 (128-byte bf16 rows of the A tile)
STAGES = 3


@functools.lru_cache(maxsize=None)
def post_prenorm_gemm_kernel(d: int, arch: str, block_tokens: int = 64, stages: int = STAGES):
    """``post_prenorm_gemm_func`` compiled for ``arch``."""
    return common.compile_kernel(post_prenorm_gemm_func(d, block_tokens, stages), arch)


@functools.lru_cache(maxsize=None)
def post_prenorm_gemm_func(d: int, block_tokens: int = 64, stages: int = STAGES):
    """TileLang prim_func of the post + split-K prenorm GEMM for hidden size ``d`` (n = 4, 24 mixes). Arguments: f [T, d] bf16,
    residual [T, 4, d] bf16, post [T, 4] fp32, comb [T, 4, 4] fp32, fn [24, 4, d] fp32 (fn viewed per stream),
    new_residual [T, 4, d] bf16 (out), mix_part [S, T, 24] (out), sq_part [S, T] (out); S divides d / 16."""
    import tilelang.language as T

    n = common.HC_MULT
    n_mix = (2 + n) * n
    n_cols = padded_columns(n_mix)
    kc = n * BLOCK_D
    n_chunks = d // BLOCK_D
    num_tokens = T.dynamic("num_tokens")
    n_splits = T.dynamic("n_splits")

    @T.prim_func
    def post_prenorm_gemm(f: T.Tensor((num_tokens, d), "bfloat16"),
                          residual: T.Tensor((num_tokens, n, d), "bfloat16"),
                          post: T.Tensor((num_tokens, n), "float32"),
                          comb: T.Tensor((num_tokens, n, n), "float32"),
                          fn: T.Tensor((n_mix, n, d), "float32"),
                          new_residual: T.Tensor((num_tokens, n, d), "bfloat16"),
                          mix_part: T.Tensor((n_splits, num_tokens, n_mix), "float32"),
                          sq_part: T.Tensor((n_splits, num_tokens), "float32")):
        with T.Kernel(n_splits, T.ceildiv(num_tokens, block_tokens), threads=128) as (split, tile):
            f_s = T.alloc_shared((block_tokens, BLOCK_D), "bfloat16")
            r_s = T.alloc_shared((block_tokens, n, BLOCK_D), "bfloat16")
            fn_s = T.alloc_shared((n_mix, n, BLOCK_D), "float32")
            x_s = T.alloc_shared((block_tokens, kc), "bfloat16")
            w_s = T.alloc_shared((n_cols, kc), "bfloat16")
            mix_s = T.alloc_shared((block_tokens, n + 1, n), "float32")  # comb[j, :] rows, then post
            acc = T.alloc_fragment((block_tokens, n_cols), "float32")
            sq = T.alloc_fragment((block_tokens, kc), "float32")
            sq_sum = T.alloc_fragment((block_tokens,), "float32")
            acc_s = T.alloc_shared((block_tokens, n_cols), "float32")
            t0 = tile * block_tokens
            for i, j, k in T.Parallel(block_tokens, n, n):
                mix_s[i, j, k] = T.if_then_else(t0 + i < num_tokens, comb[t0 + i, j, k], 0.0)
            for i, k in T.Parallel(block_tokens, n):
                mix_s[i, n, k] = T.if_then_else(t0 + i < num_tokens, post[t0 + i, k], 0.0)
            T.clear(acc)
            T.clear(sq)
            chunks_per_split = n_chunks // n_splits
            for c in T.Pipelined(chunks_per_split, num_stages=stages):
                d0 = (split * chunks_per_split + c) * BLOCK_D
                T.copy(f[t0:t0 + block_tokens, d0:d0 + BLOCK_D], f_s)
                T.copy(residual[t0:t0 + block_tokens, :, d0:d0 + BLOCK_D], r_s)
                T.copy(fn[:, :, d0:d0 + BLOCK_D], fn_s)
                for m, k, j in T.Parallel(n_mix, n, BLOCK_D):
                    hi = T.cast(fn_s[m, k, j], "bfloat16")
                    r1 = fn_s[m, k, j] - T.cast(hi, "float32")
                    mid = T.cast(r1, "bfloat16")
                    w_s[m, k * BLOCK_D + j] = hi
                    w_s[n_mix + m, k * BLOCK_D + j] = mid
                    w_s[2 * n_mix + m, k * BLOCK_D + j] = T.cast(r1 - T.cast(mid, "float32"), "bfloat16")
                for m, j in T.Parallel(n_cols - 3 * n_mix, kc):
                    w_s[3 * n_mix + m, j] = T.cast(0, "bfloat16")
                # hc_post of the previous sublayer: stream k of the new residual takes column k of comb
                for i, k, j in T.Parallel(block_tokens, n, BLOCK_D):
                    v = T.cast(
                        mix_s[i, n, k] * T.cast(f_s[i, j], "float32")
                        + (((mix_s[i, 0, k] * T.cast(r_s[i, 0, j], "float32")
                             + mix_s[i, 1, k] * T.cast(r_s[i, 1, j], "float32"))
                            + mix_s[i, 2, k] * T.cast(r_s[i, 2, j], "float32"))
                           + mix_s[i, 3, k] * T.cast(r_s[i, 3, j], "float32")),
                        "bfloat16")
                    x_s[i, k * BLOCK_D + j] = v
                    sq[i, k * BLOCK_D + j] += T.cast(v, "float32") * T.cast(v, "float32")
                    if t0 + i < num_tokens:
                        new_residual[t0 + i, k, d0 + j] = v
                T.gemm(x_s, w_s, acc, transpose_B=True)
            T.reduce_sum(sq, sq_sum, dim=1)
            T.copy(acc, acc_s)
            for i, m in T.Parallel(block_tokens, n_mix):
                if t0 + i < num_tokens:
                    mix_part[split, t0 + i, m] = acc_s[i, m] + (acc_s[i, n_mix + m] + acc_s[i, 2 * n_mix + m])
            for i in T.Parallel(block_tokens):
                if t0 + i < num_tokens:
                    sq_part[split, t0 + i] = sq_sum[i]

    return post_prenorm_gemm


def mhc_fused_post_pre(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                       fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
                       norm_weight: torch.Tensor | None, *, rms_eps: float = 1e-6, hc_eps: float = 1e-6,
                       post_mult: float = 2.0, sinkhorn_iters: int = 20
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hc_post + the next hc_pre on an SM90 GPU; same contract as ``reference.mhc.mhc_fused_post_pre``:
    returns ``(new_residual [T, 4, D] bf16, layer_input [T, D] bf16, post [T, 4] fp32, comb [T, 4, 4] fp32)``."""
    t, n, d = common.check_post_inputs(f, residual, post, comb)
    _, _, _, scalars = check_pre_inputs(residual, fn, scale, base, norm_weight, rms_eps, hc_eps, post_mult,
                                        sinkhorn_iters, layout=False)
    common.check_cuda_layout(f=f, residual=residual, post=post, comb=comb, fn=fn, scale=scale, base=base,
                             norm_weight=norm_weight)
    dev = residual.device
    new_residual = torch.empty_like(residual)
    layer_input = torch.empty(t, d, dtype=torch.bfloat16, device=dev)
    post_out = torch.empty(t, n, dtype=torch.float32, device=dev)
    comb_out = torch.empty(t, n, n, dtype=torch.float32, device=dev)
    if t == 0:
        return new_residual, layer_input, post_out, comb_out
    design = common.design_for(t, d)
    if design == "one_pass":
        from . import _mhc_onepass as onepass

        kernel = onepass.kernel_for("fused", d, dev, norm_dtype_of(norm_weight), *scalars)
        kernel(f, residual, post, comb, fn, scale, base, _weight_or_placeholder(norm_weight, d, dev), new_residual,
               layer_input, post_out, comb_out)
        return new_residual, layer_input, post_out, comb_out
    if design == "l2_chunked":   # per chunk: post, then pre on the new residual the post kernel left in L2
        post_k = post_module.post_kernel(d, common.device_arch(dev))

        def post_chunk(a: int, b: int) -> None:
            post_k(f[a:b], residual[a:b], post[a:b], comb[a:b], new_residual[a:b])
        run_pre_chunks(new_residual, fn, scale, base, norm_weight, scalars, layer_input, post_out, comb_out,
                       common.chunk_tokens(d), before_chunk=post_chunk)
        return new_residual, layer_input, post_out, comb_out
    if common.TUNING["fused"] == "post_then_pre":
        new_residual = mhc_post(f, residual, post, comb)
        layer_input, post_out, comb_out = mhc_pre(new_residual, fn, scale, base, norm_weight, rms_eps=rms_eps,
                                                  hc_eps=hc_eps, post_mult=post_mult, sinkhorn_iters=sinkhorn_iters)
        return new_residual, layer_input, post_out, comb_out
    splits = gemm_splits(t, n * d, dev, 64)  # d / 16 chunks here = n d / 64 there: the same divisors; 64-token tile
    assert splits <= MAX_SPLITS
    mix_part = torch.empty(splits, t, fn.shape[0], dtype=torch.float32, device=dev)
    sq_part = torch.empty(splits, t, dtype=torch.float32, device=dev)
    post_prenorm_gemm_kernel(d, common.device_arch(dev))(f, residual, post, comb, fn.view(fn.shape[0], n, d),
                                                         new_residual, mix_part, sq_part)
    run_pre_epilogue(mix_part, sq_part, new_residual, scale, base, norm_weight, scalars, layer_input,
                     post_out, comb_out)
    return new_residual, layer_input, post_out, comb_out
