"""Latency-oriented pieces of the TileLang mhc_pre (issue #6): the "v3" epilogue and the "small_t" projection.

Why (H100 records, Flash, T = 1, CUDA events per kernel): the two-pass pre spends ~10 us in the prenorm GEMM
and ~23 us in the epilogue, against ~11 us for hc_head's epilogue, which has the same split reduction and
collapse but no Sinkhorn. The difference is the serial Sinkhorn: 39 passes x 4 IEEE divisions on ONE thread
(each division has a slow-path branch, so the 4 columns of a pass do not overlap), and it runs BEFORE the
collapse although the collapse only needs the 4 pre weights.

``overlap_epilogue_func`` ("v3" epilogue; same arguments as ``mhc_pre.pre_epilogue_func``): one CTA per token,
256 threads.
1. all threads: the split partials -> 24 mixes + sum of squares (thread (w, m) sums splits w, w + 8, ...;
   then the 8 lanes in order);
2. warp 0: Sinkhorn with one lane per comb entry (lane 4j + k; lanes 16-31 mirror 0-15): row / column sums
   gather the 4 entries with warp shuffles and add them in index order, then + hc_eps and ONE division per
   lane, exactly the reference's ``C / (C.sum(dim) + eps)`` (the two-pass macro multiplies by a reciprocal);
   meanwhile warps 1-7 compute the pre weights (each thread, redundantly) and the collapse
   ``y = bf16(sum_i pre_i R_i)`` of the token into shared memory with its partial ``sum(y^2)`` (warp shuffles);
3. one barrier, then all threads write ``layer_input = bf16(y * rsqrt(sum(y^2) / D + eps) * w)``.
So the Sinkhorn latency hides behind the collapse, and costs ~one shuffle + one division per pass.

``small_proj_func`` ("small_t" design, T up to ``TUNING["small_t_max_tokens"]``): the prenorm projection as
plain fp32 FMAs, split K into ``SMALL_K``-element slices (Flash: 128 CTAs, Pro: 224), ``SMALL_TB`` tokens per
CTA; thread (token, mix) runs a 128-long FMA chain over shared memory. The products bf16 x fp32 are exact in
fp32 (no hi/mid/lo split needed), the outputs are the GEMM's ``mix_part [S, T, n_mix]`` / ``sq_part [S, T]``,
so the "v3" epilogue consumes them unchanged. At T = 1 each CTA streams 12 KB of fn (one memory latency),
where the wgmma GEMM streams 48 KB per CTA over 32 CTAs through a 64-row token tile that is 63/64 padding.
"""
# no `from __future__ import annotations`: TileLang reads the prim_func annotations in the builder's scope.
import functools

from . import _mhc_common as common

SMALL_K = 128         # K elements per projection CTA (fn slice [24, 128] fp32 = 12 KB)
SMALL_TB = 8          # tokens per projection CTA: 8 x 32 (mix lanes) = 256 threads
MIX_LANES = 32        # lane m < n_mix: a mix; m == n_mix: the sum of squares
THREADS = 256
WORKERS = THREADS - 32   # warps 1-7: the collapse
VEC = 8               # bf16 per 16-byte load
SPLIT_ILP = 4         # v3 split reduction: independent partial loads in flight per thread


@functools.lru_cache(maxsize=None)
def small_proj_kernel(nd: int, n_mix: int, arch: str):
    """``small_proj_func`` compiled for ``arch``."""
    return common.compile_kernel(small_proj_func(nd, n_mix), arch)


def small_splits(nd: int) -> int:
    """Split count of the small_t projection (one CTA column per SMALL_K elements of K)."""
    if nd % SMALL_K:
        raise ValueError(f"nd: expected a multiple of {SMALL_K}, got {nd}")
    return nd // SMALL_K


@functools.lru_cache(maxsize=None)
def small_proj_func(nd: int, n_mix: int):
    """TileLang prim_func: ``mix_part[s, t, m] = sum_{k in slice s} x[t, k] fn[m, k]`` and ``sq_part[s, t] =
    sum_{k in slice s} x[t, k]^2`` (fp32 FMAs, k in order), slice s = [s SMALL_K, (s + 1) SMALL_K).
    Arguments: x [T, nd] bf16, fn [n_mix, nd] fp32, mix_part [S, T, n_mix] fp32 (out), sq_part [S, T] fp32
    (out), with S = nd / SMALL_K (``small_splits``)."""
    import tilelang.language as T

    small_splits(nd)
    if n_mix >= MIX_LANES:
        raise ValueError(f"n_mix: expected < {MIX_LANES}, got {n_mix}")
    num_tokens = T.dynamic("num_tokens")
    n_splits = T.dynamic("n_splits")

    @T.prim_func
    def small_proj(x: T.Tensor((num_tokens, nd), "bfloat16"),
                   fn: T.Tensor((n_mix, nd), "float32"),
                   mix_part: T.Tensor((n_splits, num_tokens, n_mix), "float32"),
                   sq_part: T.Tensor((n_splits, num_tokens), "float32")):
        with T.Kernel(n_splits, T.ceildiv(num_tokens, SMALL_TB), threads=THREADS) as (split, tile):
            # fn rows padded by one word: lanes m = 0..23 read column k of 24 rows without bank conflicts
            fn_s = T.alloc_shared((n_mix, SMALL_K + 1), "float32")
            x_s = T.alloc_shared((SMALL_TB, SMALL_K), "float32")
            acc = T.alloc_local((1,), "float32")
            tx = T.get_thread_binding(0)
            k0 = split * SMALL_K
            t0 = tile * SMALL_TB
            for m, k in T.Parallel(n_mix, SMALL_K):
                fn_s[m, k] = fn[m, k0 + k]
            for i, k in T.Parallel(SMALL_TB, SMALL_K):
                x_s[i, k] = T.if_then_else(t0 + i < num_tokens, T.cast(x[t0 + i, k0 + k], "float32"), 0.0)
            T.sync_threads()
            i = tx // MIX_LANES
            m = tx % MIX_LANES
            acc[0] = 0.0
            if m < n_mix:
                for k in T.unroll(SMALL_K):
                    acc[0] += x_s[i, k] * fn_s[m, k]
            elif m == n_mix:
                for k in T.unroll(SMALL_K):
                    acc[0] += x_s[i, k] * x_s[i, k]
            if t0 + i < num_tokens:
                if m < n_mix:
                    mix_part[split, t0 + i, m] = acc[0]
                elif m == n_mix:
                    sq_part[split, t0 + i] = acc[0]

    return small_proj


@functools.lru_cache(maxsize=None)
def overlap_epilogue_func(d: int, norm_dtype, rms_eps: float, hc_eps: float, post_mult: float,
                          sinkhorn_iters: int):
    """TileLang prim_func of the "v3" mhc_pre epilogue (see the module docstring). Arguments as
    ``mhc_pre.pre_epilogue_func``: mix_part [S, T, 24], sq_part [S, T], residual [T, 4, d] bf16, scale [3],
    base [24], norm_weight [d], layer_input [T, d] bf16 (out), post [T, 4] (out), comb [T, 4, 4] (out),
    tokens_per_block (int32; ignored: one token per CTA)."""
    import tilelang.language as T

    n = common.HC_MULT
    n_mix = (2 + n) * n
    nd = n * d
    if d % VEC:
        raise ValueError(f"d: expected a multiple of {VEC}, got {d}")
    n_vec = d // VEC
    vec_rounds = -(-n_vec // WORKERS)
    all_rounds = -(-n_vec // THREADS)
    n_warps = THREADS // 32
    num_tokens = T.dynamic("num_tokens")
    n_splits = T.dynamic("n_splits")
    w_dtype = norm_dtype or "bfloat16"

    @T.prim_func
    def overlap_epilogue(mix_part: T.Tensor((n_splits, num_tokens, n_mix), "float32"),
                         sq_part: T.Tensor((n_splits, num_tokens), "float32"),
                         residual: T.Tensor((num_tokens, n, d), "bfloat16"),
                         scale: T.Tensor((3,), "float32"),
                         base: T.Tensor((n_mix,), "float32"),
                         norm_weight: T.Tensor((d,), w_dtype),
                         layer_input: T.Tensor((num_tokens, d), "bfloat16"),
                         post: T.Tensor((num_tokens, n), "float32"),
                         comb: T.Tensor((num_tokens, n, n), "float32"),
                         tokens_per_block: T.int32):
        with T.Kernel(num_tokens, threads=THREADS) as t:
            lanes_s = T.alloc_shared((n_warps, MIX_LANES), "float32")
            mix_s = T.alloc_shared((MIX_LANES,), "float32")
            y_s = T.alloc_shared((d,), "bfloat16")
            ss_s = T.alloc_shared((n_warps,), "float32")
            acc = T.alloc_local((1,), "float32")
            part = T.alloc_local((SPLIT_ILP,), "float32")
            v = T.alloc_local((4,), "float32")      # Sinkhorn: entry, max / sum scratch
            pre_w = T.alloc_local((n,), "float32")
            rho = T.alloc_local((1,), "float32")
            ss = T.alloc_local((1,), "float32")
            yv = T.alloc_local((VEC,), "float32")
            tx = T.get_thread_binding(0)
            warp = tx // 32
            lane = tx % 32

            # 1. split partials -> mixes: thread (warp, lane) keeps SPLIT_ILP running sums, sum u taking splits
            # warp + 8 (SPLIT_ILP r + u), so SPLIT_ILP independent loads are in flight (small_t: 128-224 splits)
            for u in T.unroll(SPLIT_ILP):
                part[u] = 0.0
            for r in T.serial(T.ceildiv(n_splits, n_warps * SPLIT_ILP)):
                for u in T.unroll(SPLIT_ILP):
                    if (r * SPLIT_ILP + u) * n_warps + warp < n_splits:
                        if lane < n_mix:
                            part[u] += mix_part[(r * SPLIT_ILP + u) * n_warps + warp, t, lane]
                        elif lane == n_mix:
                            part[u] += sq_part[(r * SPLIT_ILP + u) * n_warps + warp, t]
            acc[0] = part[0]
            for u in T.unroll(1, SPLIT_ILP):
                acc[0] += part[u]
            lanes_s[warp, lane] = acc[0]
            T.sync_threads()
            if tx < MIX_LANES:
                acc[0] = 0.0
                for w in T.unroll(n_warps):
                    acc[0] += lanes_s[w, tx]
                mix_s[tx] = acc[0]
            T.sync_threads()
            rho[0] = T.rsqrt(mix_s[n_mix] / nd + rms_eps)

            if tx < 32:
                # 2a. warp 0: post, then Sinkhorn with lane l = 4 j + k holding comb[j, k] (lanes 16-31 mirror)
                if lane >= 16 and lane < 16 + n:
                    post[t, lane - 16] = post_mult / (1.0 + T.exp(-(mix_s[n + lane - 16] * rho[0] * scale[1]
                                                                    + base[n + lane - 16])))
                row = (lane % 16) // n
                col = lane % n
                v[0] = mix_s[2 * n + lane % 16] * rho[0] * scale[2] + base[2 * n + lane % 16]
                v[1] = T.max(T.max(T.shfl_sync(v[0], row * n), T.shfl_sync(v[0], row * n + 1)),
                             T.max(T.shfl_sync(v[0], row * n + 2), T.shfl_sync(v[0], row * n + 3)))
                v[0] = T.exp(v[0] - v[1])
                v[2] = ((T.shfl_sync(v[0], row * n) + T.shfl_sync(v[0], row * n + 1))
                        + T.shfl_sync(v[0], row * n + 2)) + T.shfl_sync(v[0], row * n + 3)
                v[0] = v[0] / v[2] + hc_eps
                for p in T.serial(2 * sinkhorn_iters - 1):
                    if p % 2 == 0:   # columns: sum over j of comb[j, col]
                        v[2] = (((T.shfl_sync(v[0], col) + T.shfl_sync(v[0], n + col))
                                 + T.shfl_sync(v[0], 2 * n + col)) + T.shfl_sync(v[0], 3 * n + col)) + hc_eps
                    else:            # rows: sum over k of comb[row, k]
                        v[2] = (((T.shfl_sync(v[0], row * n) + T.shfl_sync(v[0], row * n + 1))
                                 + T.shfl_sync(v[0], row * n + 2)) + T.shfl_sync(v[0], row * n + 3)) + hc_eps
                    v[0] = v[0] / v[2]
                if lane < 16:
                    comb[t, row, col] = v[0]
            else:
                # 2b. warps 1-7: pre weights, collapse -> bf16 into shared memory, partial sum of squares
                for i in T.unroll(n):
                    pre_w[i] = 1.0 / (1.0 + T.exp(-(mix_s[i] * rho[0] * scale[0] + base[i]))) + hc_eps
                ss[0] = 0.0
                for r in T.serial(vec_rounds):
                    if (tx - 32) + r * WORKERS < n_vec:
                        e0 = ((tx - 32) + r * WORKERS) * VEC
                        for q in T.vectorized(VEC):
                            yv[q] = T.cast(T.cast(
                                pre_w[0] * T.cast(residual[t, 0, e0 + q], "float32")
                                + pre_w[1] * T.cast(residual[t, 1, e0 + q], "float32")
                                + pre_w[2] * T.cast(residual[t, 2, e0 + q], "float32")
                                + pre_w[3] * T.cast(residual[t, 3, e0 + q], "float32"), "bfloat16"), "float32")
                        for q in T.vectorized(VEC):
                            y_s[e0 + q] = T.cast(yv[q], "bfloat16")
                        for q in T.unroll(VEC):
                            ss[0] += yv[q] * yv[q]
                for sh in T.unroll(5):
                    ss[0] += T.shfl_xor(ss[0], 16 >> sh)
                if lane == 0:
                    ss_s[warp] = ss[0]
            T.sync_threads()

            # 3. all threads: RMSNorm of the rounded collapse, written as bf16
            ss[0] = 0.0
            for w in T.unroll(n_warps - 1):   # warps 1-7 in order (warp 0 ran Sinkhorn)
                ss[0] += ss_s[w + 1]
            ss[0] = T.rsqrt(ss[0] / d + rms_eps)
            for r in T.serial(all_rounds):
                if tx + r * THREADS < n_vec:
                    e1 = (tx + r * THREADS) * VEC
                    if norm_dtype is None:
                        for q in T.vectorized(VEC):
                            layer_input[t, e1 + q] = y_s[e1 + q]
                    else:
                        for q in T.vectorized(VEC):
                            layer_input[t, e1 + q] = T.cast(T.cast(y_s[e1 + q], "float32") * ss[0]
                                                            * T.cast(norm_weight[e1 + q], "float32"), "bfloat16")

    return overlap_epilogue
