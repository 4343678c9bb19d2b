"""TileLang mhc_pre for Hopper: hc_pre + the fused sublayer RMSNorm (dsv4-layers.md 2.2-2.4).

Math (per token, fp32; reference ``dsv4lab.kernels.reference.mhc.mhc_pre``), with ``x = flatten(R) [nD]``:

    m     = (x @ fn.T) * rsqrt(sum(x^2) / nD + rms_eps)                                   [24]
    pre   = sigmoid(m[0:4] * scale[0] + base[0:4]) + hc_eps
    post  = sigmoid(m[4:8] * scale[1] + base[4:8]) * post_mult
    comb  = Sinkhorn(m[8:24].view(4, 4) * scale[2] + base[8:24]; hc_eps, sinkhorn_iters)
    y     = bf16(sum_i pre_i R[i]);   layer_input = bf16(y * rsqrt(sum(y^2) / D + rms_eps) * norm_weight)
                                      (layer_input = y when norm_weight is None)

Two kernels (the design vLLM and TileKernels also use; the reasons are below):

1. ``prenorm_gemm_kernel``: split-K partial sums ``mix_part[s, t, :] = x[t, Ks] @ fn[:, Ks].T`` and
   ``sq_part[s, t] = sum(x[t, Ks]^2)``, grid ``(n_splits, ceil(T / 64))``. The 24-wide projection runs on the
   tensor cores in fp32-equivalent precision: x is bf16 (exact), and each fp32 fn chunk is split in shared
   memory into three bf16 terms ``fn = hi + mid + lo`` (8 + 8 + 8 significant bits, exact up to ~2^-24|fn|);
   one wgmma ``[64 tokens, K] x [K, 80]`` (72 = 3 x 24 columns + 8 zero columns) accumulates the three
   products in fp32, summed as ``hi + (mid + lo)`` at the end. Doing the 24 dot products with FMAs instead
   would need 25 FMAs per loaded element, more than an H100 SM issues at HBM speed; TF32 (DeepGEMM's
   ``tf32_hc_prenorm_gemm``) is ~1e-3 accurate, the split is ~1e-6. TMA loads x and fn tiles; TileLang
   warp-specialises (producer warpgroup + one consumer warpgroup).
2. ``pre_epilogue_kernel``: per token, reduce the splits, sigmoid mixes, Sinkhorn (one thread per token,
   reciprocal-multiply normalisations), then the collapse re-reads R (from L2 when the GEMM has just
   streamed it: blocks walk the tokens in reverse, so the first ones find the GEMM's last tiles still
   cached), rounds to bf16 and applies the RMSNorm. Token order never changes a result.

Why not one kernel: the collapse needs the pre weights, which need the full-K reduction, so R is read twice
unless a block keeps its tokens on chip; a block of a few tokens would then re-stream all of fn (1.5 MB
Flash / 2.75 MB Pro) from L2 per few tokens, ~12x the residual traffic. Minimum HBM traffic is 10TD bytes
(roofline row 2); this design moves ~18TD at large T (the second R read misses L2 beyond ~1-2k tokens).

Epilogue designs (``_mhc_common.TUNING["epilogue"]``, used where ``overlap_epilogue`` is off): "v2" sums the
splits of all the block's tokens at once (thread (token, mix) loops over the splits: no per-token block-wide tree and barrier) and packs
up to 16 tokens per block (Sinkhorn on one thread per token, all the block's tokens in parallel, so its ~2k
dependent instructions cost one latency per block, not per token); "v1" = the first H100 run. Expected: this
op stays a two-pass design, 18TD bytes against the 10TD minimum, so it caps at ~55% of copy bandwidth at large
T; hc_head (the same structure, 4 mixes) measured 447 us at Flash T = 16384, ~90% of that 18TD cap, which is
what pre can reach if its epilogue and 24-mix GEMM stream as well (the bench's design sweep times each kernel
alone to show which one does not). Small T has many splits: there the launcher keeps v1 (``epilogue_design``).

Designs (``_mhc_common.TUNING["design"]``, issue #6): "two_pass" (default, the kernels above over all T);
"l2_chunked" (the same two kernels per chunk of ``l2_chunk_mb`` of residual, so the epilogue's re-read hits L2:
10TD bytes from HBM, at the cost of 2 launches per chunk); "one_pass" (``_mhc_onepass``: a cluster of 8 CTAs
stages a token tile's residual in shared memory and exchanges partial mixes through distributed shared memory;
one launch, 10TD bytes, but fn is re-streamed from L2 per tile: 48/BT x the residual bytes); "auto". Why not
only one_pass: fn is 48 tokens' worth of residual bytes, and shared memory holds ~32 (Flash) / ~16 (Pro) tokens
per cluster, so at large T the L2 traffic for fn outweighs the saved HBM read (see ``_mhc_onepass``).

Issue #6 latency work (``_mhc_overlap``): TUNING["overlap_epilogue"] = True (the default since the H100 run at
42be99d) swaps the epilogue for "v3" (one CTA per token, Sinkhorn lane-parallel on warp 0 overlapped with the
collapse on warps 1-7; 40 registers vs 70 (Flash) / 150 (Pro) for v1/v2, whose 150 leave Pro at one 256-thread
CTA per SM); the GEMM's token tile is 128 from T = 4096 on, 64 below (``_mhc_common.gemm_block_tokens``, with
the measurements). Opt-in design "small_t" (T <= 32) replaces the GEMM by an FMA split-K projection over
128-element K slices and always uses v3 (it lost to two_pass + v3 at T <= 16 on the H100).

Split-K: ``n_splits`` divides the 64-element K-chunks, at most ``MAX_SPLITS``; T and n_splits are dynamic
dimensions, so one compile per (D, norm flavour) serves every T.
"""
# no `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations of a prim_func
# in the builder's scope (shapes are closure variables), which postponed annotations would break.
import functools

import torch

from . import _mhc_common as common

BLOCK_K = 64            # K elements per pipeline stage of the prenorm GEMM (128-byte bf16 rows)
GEMM_STAGES = 4
MAX_SPLITS = 128        # hard bound; TUNING["max_splits"] (32) is the one used (T = 1: 32 blocks stream fn)
SPLIT_LANES = 8         # v1 epilogue: splits reduced in parallel
MIX_LANES = 32          # epilogue: lanes for the 24 (or 4) mixes + the sum of squares
MAX_TOKENS_PER_BLOCK = 32
EPILOGUE_THREADS = 256


def padded_columns(n_mix: int) -> int:
    """GEMM N: 3 bf16 terms per mix, rounded up to 16 (wgmma n80 for 24 mixes, n16 for hc_head's 4)."""
    return -(-3 * n_mix // 16) * 16


@functools.lru_cache(maxsize=None)
def prenorm_gemm_kernel(nd: int, n_mix: int, arch: str, block_tokens: int = 64, stages: int = GEMM_STAGES):
    """``prenorm_gemm_func`` compiled for ``arch``."""
    return common.compile_kernel(prenorm_gemm_func(nd, n_mix, block_tokens, stages), arch)


@functools.lru_cache(maxsize=None)
def prenorm_gemm_func(nd: int, n_mix: int, block_tokens: int = 64, stages: int = GEMM_STAGES):
    """TileLang prim_func of the split-K prenorm GEMM for K = nd, ``n_mix`` rows of fn (24 mhc_pre, 4 hc_head).

    Arguments: x [T, nd] bf16, fn [n_mix, nd] fp32, mix_part [S, T, n_mix] fp32 (out), sq_part [S, T] fp32
    (out); S = n_splits must divide nd / 64.
    """
    import tilelang.language as T

    if nd % BLOCK_K:
        raise ValueError(f"nd: expected a multiple of {BLOCK_K}, got {nd}")
    n_cols = padded_columns(n_mix)
    n_chunks = nd // BLOCK_K
    num_tokens = T.dynamic("num_tokens")
    n_splits = T.dynamic("n_splits")

    @T.prim_func
    def prenorm_gemm(x: T.Tensor((num_tokens, nd), "bfloat16"),
                     fn: T.Tensor((n_mix, nd), "float32"),
                     mix_part: T.Tensor((n_splits, num_tokens, n_mix), "float32"),
                     sq_part: T.Tensor((n_splits, num_tokens), "float32")):
        with T.Kernel(n_splits, T.ceildiv(num_tokens, block_tokens), threads=128) as (split, tile):
            x_s = T.alloc_shared((block_tokens, BLOCK_K), "bfloat16")
            fn_s = T.alloc_shared((n_mix, BLOCK_K), "float32")
            w_s = T.alloc_shared((n_cols, BLOCK_K), "bfloat16")
            acc = T.alloc_fragment((block_tokens, n_cols), "float32")
            sq = T.alloc_fragment((block_tokens, BLOCK_K), "float32")
            sq_sum = T.alloc_fragment((block_tokens,), "float32")
            acc_s = T.alloc_shared((block_tokens, n_cols), "float32")
            T.clear(acc)
            T.clear(sq)
            chunks_per_split = n_chunks // n_splits
            for c in T.Pipelined(chunks_per_split, num_stages=stages):
                k0 = (split * chunks_per_split + c) * BLOCK_K
                T.copy(x[tile * block_tokens, k0], x_s)
                T.copy(fn[0, k0], fn_s)
                # fp32 -> hi + mid + lo (bf16 each); the differences are exact in fp32
                for m, j in T.Parallel(n_mix, BLOCK_K):
                    hi = T.cast(fn_s[m, j], "bfloat16")
                    r1 = fn_s[m, j] - T.cast(hi, "float32")
                    mid = T.cast(r1, "bfloat16")
                    w_s[m, j] = hi
                    w_s[n_mix + m, j] = mid
                    w_s[2 * n_mix + m, j] = T.cast(r1 - T.cast(mid, "float32"), "bfloat16")
                for m, j in T.Parallel(n_cols - 3 * n_mix, BLOCK_K):
                    w_s[3 * n_mix + m, j] = T.cast(0, "bfloat16")
                for i, j in T.Parallel(block_tokens, BLOCK_K):
                    sq[i, j] += T.cast(x_s[i, j], "float32") * T.cast(x_s[i, j], "float32")
                T.gemm(x_s, w_s, acc, transpose_B=True)
            T.reduce_sum(sq, sq_sum, dim=1)
            T.copy(acc, acc_s)
            for i, m in T.Parallel(block_tokens, n_mix):
                if tile * block_tokens + i < num_tokens:
                    mix_part[split, tile * block_tokens + i, m] = (
                        acc_s[i, m] + (acc_s[i, n_mix + m] + acc_s[i, 2 * n_mix + m]))
            for i in T.Parallel(block_tokens):
                if tile * block_tokens + i < num_tokens:
                    sq_part[split, tile * block_tokens + i] = sq_sum[i]

    return prenorm_gemm


def split_reduce_macro(n_mix: int):
    """T.macro: ``mixes[tok, 0:n_mix]`` and ``mixes[tok, n_mix]`` (sum of squares) of token ``t``, summed
    over the ``n_splits`` partials, SPLIT_LANES splits at a time across the block's threads."""
    import tilelang.language as T

    @T.macro
    def reduce_splits(mix_part, sq_part, n_splits, t, tok, lanes, lane_sum, mixes):
        T.clear(lanes)
        for r in T.serial(T.ceildiv(n_splits, SPLIT_LANES)):
            for s, m in T.Parallel(SPLIT_LANES, MIX_LANES):
                sp = r * SPLIT_LANES + s
                if sp < n_splits:
                    if m < n_mix:
                        lanes[s, m] += mix_part[sp, t, m]
                    elif m == n_mix:
                        lanes[s, m] += sq_part[sp, t]
        T.reduce_sum(lanes, lane_sum, dim=0)
        for m in T.Parallel(MIX_LANES):
            mixes[tok, m] = lane_sum[m]

    return reduce_splits


def block_reduce_macro(n_mix: int):
    """T.macro (v2 epilogue): ``mixes[tok, 0:n_mix]`` and ``mixes[tok, n_mix]`` (sum of squares) for ALL the
    block's tokens at once: thread (tok, m) sums its element over the splits in split order (no tree, no
    per-token barrier); one pass of coalesced loads per split instead of one block-wide reduction per token."""
    import tilelang.language as T

    @T.macro
    def reduce_block(mix_part, sq_part, n_splits, t0, tokens_per_block, num_tokens, mixes):
        for tok, m in T.Parallel(MAX_TOKENS_PER_BLOCK, MIX_LANES):
            mixes[tok, m] = 0.0
        for s in T.serial(n_splits):
            for tok, m in T.Parallel(MAX_TOKENS_PER_BLOCK, MIX_LANES):
                if tok < tokens_per_block and t0 + tok < num_tokens:
                    if m < n_mix:
                        mixes[tok, m] += mix_part[s, t0 + tok, m]
                    elif m == n_mix:
                        mixes[tok, m] += sq_part[s, t0 + tok]

    return reduce_block


@functools.lru_cache(maxsize=None)
def pre_epilogue_kernel(d: int, arch: str, norm_dtype: str | None, rms_eps: float, hc_eps: float,
                        post_mult: float, sinkhorn_iters: int, design: str = "v2"):
    """``pre_epilogue_func`` compiled for ``arch``."""
    return common.compile_kernel(pre_epilogue_func(d, norm_dtype, rms_eps, hc_eps, post_mult, sinkhorn_iters,
                                                   design), arch)


@functools.lru_cache(maxsize=None)
def pre_epilogue_func(d: int, norm_dtype: str | None, rms_eps: float, hc_eps: float, post_mult: float,
                      sinkhorn_iters: int, design: str = "v2"):
    """TileLang prim_func of the mhc_pre epilogue for hidden size ``d`` (n = 4). ``norm_dtype`` None: no RMSNorm (the
    ``norm_weight`` argument is then ignored). Arguments: mix_part [S, T, 24], sq_part [S, T], residual
    [T, 4, d] bf16, scale [3], base [24], norm_weight [d], layer_input [T, d] bf16 (out), post [T, 4] (out),
    comb [T, 4, 4] (out), tokens_per_block (int32 scalar, <= MAX_TOKENS_PER_BLOCK).

    ``design``: "v2" (default) reduces the splits of all the block's tokens at once (``block_reduce_macro``);
    "v1" (the first H100 run) reduces them token by token with a block-wide tree. Both then run Sinkhorn on one
    thread per token (all the block's tokens in parallel) and the collapse + RMSNorm token by token."""
    if design == "v3":   # issue #6: one CTA per token, Sinkhorn overlapped with the collapse (_mhc_overlap)
        from . import _mhc_overlap as overlap

        return overlap.overlap_epilogue_func(d, norm_dtype, rms_eps, hc_eps, post_mult, sinkhorn_iters)
    if design not in ("v1", "v2"):
        raise ValueError(f"design: expected 'v1', 'v2' or 'v3', got {design!r}")
    import tilelang.language as T

    n = common.HC_MULT
    n_mix = (2 + n) * n
    nd = n * d
    num_tokens = T.dynamic("num_tokens")
    n_splits = T.dynamic("n_splits")
    reduce_splits = split_reduce_macro(n_mix)
    reduce_block = block_reduce_macro(n_mix)
    comb_sinkhorn = common.comb_sinkhorn_macro(n, sinkhorn_iters, hc_eps)
    w_dtype = norm_dtype or "bfloat16"

    @T.prim_func
    def pre_epilogue(mix_part: T.Tensor((n_splits, num_tokens, n_mix), "float32"),
                     sq_part: T.Tensor((n_splits, num_tokens), "float32"),
                     residual: T.Tensor((num_tokens, n, d), "bfloat16"),
                     scale: T.Tensor((3,), "float32"),
                     base: T.Tensor((n_mix,), "float32"),
                     norm_weight: T.Tensor((d,), w_dtype),
                     layer_input: T.Tensor((num_tokens, d), "bfloat16"),
                     post: T.Tensor((num_tokens, n), "float32"),
                     comb: T.Tensor((num_tokens, n, n), "float32"),
                     tokens_per_block: T.int32):
        with T.Kernel(T.ceildiv(num_tokens, tokens_per_block), threads=EPILOGUE_THREADS) as bx:
            lanes = T.alloc_fragment((SPLIT_LANES, MIX_LANES), "float32")
            lane_sum = T.alloc_fragment((MIX_LANES,), "float32")
            mixes = T.alloc_shared((MAX_TOKENS_PER_BLOCK, MIX_LANES), "float32")
            pre_s = T.alloc_shared((MAX_TOKENS_PER_BLOCK, n), "float32")
            c = T.alloc_local((n * n,), "float32")
            stat = T.alloc_local((4,), "float32")
            y = T.alloc_fragment((d,), "float32")
            y_sq = T.alloc_fragment((d,), "float32")
            y_ss = T.alloc_fragment((1,), "float32")
            tx = T.get_thread_binding(0)
            # reverse block order: the first epilogue blocks read the tokens the GEMM streamed last (in L2)
            t0 = (T.ceildiv(num_tokens, tokens_per_block) - 1 - bx) * tokens_per_block

            if design == "v1":
                for tok in T.serial(tokens_per_block):
                    if t0 + tok < num_tokens:
                        reduce_splits(mix_part, sq_part, n_splits, t0 + tok, tok, lanes, lane_sum, mixes)
            else:
                reduce_block(mix_part, sq_part, n_splits, t0, tokens_per_block, num_tokens, mixes)
            T.sync_threads()

            # one thread per token: mixes, sigmoid, Sinkhorn (dsv4-layers.md 2.3, reference order)
            if tx < tokens_per_block and t0 + tx < num_tokens:
                t = t0 + tx
                stat[1] = T.rsqrt(mixes[tx, n_mix] / nd + rms_eps)
                for i in T.unroll(n):
                    pre_s[tx, i] = 1.0 / (1.0 + T.exp(-(mixes[tx, i] * stat[1] * scale[0] + base[i]))) + hc_eps
                    post[t, i] = post_mult / (1.0 + T.exp(-(mixes[tx, n + i] * stat[1] * scale[1] + base[n + i])))
                comb_sinkhorn(mixes, tx, scale, base, c, stat)
                for j in T.unroll(n):
                    for k in T.unroll(n):
                        comb[t, j, k] = c[j * n + k]
            T.sync_threads()

            # collapse -> bf16 -> RMSNorm -> bf16, one token at a time across the block
            for tok in T.serial(tokens_per_block):
                if t0 + tok < num_tokens:
                    for e in T.Parallel(d):
                        y[e] = T.cast(T.cast(
                            pre_s[tok, 0] * T.cast(residual[t0 + tok, 0, e], "float32")
                            + pre_s[tok, 1] * T.cast(residual[t0 + tok, 1, e], "float32")
                            + pre_s[tok, 2] * T.cast(residual[t0 + tok, 2, e], "float32")
                            + pre_s[tok, 3] * T.cast(residual[t0 + tok, 3, e], "float32"),
                            "bfloat16"), "float32")
                    if norm_dtype is None:
                        for e in T.Parallel(d):
                            layer_input[t0 + tok, e] = T.cast(y[e], "bfloat16")
                    else:
                        for e in T.Parallel(d):
                            y_sq[e] = y[e] * y[e]
                        T.reduce_sum(y_sq, y_ss, dim=0)
                        for e in T.Parallel(d):
                            layer_input[t0 + tok, e] = T.cast(
                                y[e] * T.rsqrt(y_ss[0] / d + rms_eps) * T.cast(norm_weight[e], "float32"),
                                "bfloat16")

    return pre_epilogue


# ---- launcher ---------------------------------------------------------------------------------------------
def check_pre_inputs(residual, fn, scale, base, norm_weight, rms_eps, hc_eps, post_mult, sinkhorn_iters,
                     layout: bool = True):
    """Input contract of mhc_pre (and the pre half of mhc_fused_post_pre, which checks the device/layout of
    all its tensors at once: ``layout=False``); returns (T, n, D, scalars)."""
    t, n, d = common.check_residual(residual)
    common.check_mix_params(fn, scale, base, n, d, (2 + n) * n, 3)
    common.check_norm_weight(norm_weight, d)
    scalars = common.check_pre_scalars(rms_eps, hc_eps, post_mult, sinkhorn_iters)
    if layout:
        common.check_cuda_layout(residual=residual, fn=fn, scale=scale, base=base, norm_weight=norm_weight)
    return t, n, d, scalars


_placeholders: dict[tuple, torch.Tensor] = {}


def _weight_or_placeholder(norm_weight: torch.Tensor | None, d: int, device: torch.device) -> torch.Tensor:
    """The kernel signature always has a norm weight; without one it is compiled not to read it."""
    if norm_weight is not None:
        return norm_weight
    key = (d, str(device))
    if key not in _placeholders:
        _placeholders[key] = torch.empty(d, dtype=torch.bfloat16, device=device)
    return _placeholders[key]


def run_pre_epilogue(mix_part, sq_part, residual, scale, base, norm_weight, scalars, layer_input, post, comb):
    """Launch the epilogue on the outputs of a prenorm GEMM (shared with mhc_fused_post_pre)."""
    t, _, d = residual.shape
    rms_eps, hc_eps, post_mult, iters = scalars
    arch = common.device_arch(residual.device)
    norm_dtype = norm_dtype_of(norm_weight)
    kernel = pre_epilogue_kernel(d, arch, norm_dtype, rms_eps, hc_eps, post_mult, iters,
                                 pre_epilogue_design(mix_part.shape[0]))
    tpb = min(MAX_TOKENS_PER_BLOCK, common.tokens_per_block(t, common.sm_count(residual.device.index or 0)))
    kernel(mix_part, sq_part, residual, scale, base, _weight_or_placeholder(norm_weight, d, residual.device),
           layer_input, post, comb, tpb)


def epilogue_design(n_splits: int) -> str:
    """TUNING["epilogue"]; "auto" = v2 for at most ``v2_max_splits`` splits (large T), else v1: v2's thread
    loops over the splits one dependent load at a time (128 splits: ~128 L2 latencies), v1 reads 8 at once."""
    design = common.TUNING["epilogue"]
    if design == "auto":
        return "v2" if n_splits <= common.TUNING["v2_max_splits"] else "v1"
    return design


def pre_epilogue_design(n_splits: int) -> str:
    """mhc_pre's epilogue: "v3" where TUNING["overlap_epilogue"] (issue #6; the default), else ``epilogue_design``
    (hc_head keeps ``epilogue_design``: it has no Sinkhorn to overlap)."""
    return "v3" if common.TUNING["overlap_epilogue"] else epilogue_design(n_splits)


def gemm_kernel(nd: int, n_mix: int, device: torch.device, block_tokens: int):
    """The prenorm GEMM with ``block_tokens``-token tiles (``common.gemm_block_tokens``) and TUNING["gemm_stages"]."""
    return prenorm_gemm_kernel(nd, n_mix, common.device_arch(device), block_tokens=block_tokens,
                               stages=common.TUNING["gemm_stages"])


def gemm_splits(t: int, nd: int, device: torch.device, block_tokens: int) -> int:
    """Split-K count of the prenorm GEMM for T = t, K = nd, ``block_tokens``-token tiles on ``device``
    (see ``common.split_k``)."""
    return common.split_k(t, nd // BLOCK_K, common.sm_count(device.index or 0),
                          min(MAX_SPLITS, common.TUNING["max_splits"]), block_tokens)


def mhc_pre(residual: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
            norm_weight: torch.Tensor | None, *, rms_eps: float = 1e-6, hc_eps: float = 1e-6,
            post_mult: float = 2.0, sinkhorn_iters: int = 20
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hc_pre + fused RMSNorm on an SM90 GPU; same contract as ``reference.mhc.mhc_pre``:
    returns ``(layer_input [T, D] bf16, post [T, 4] fp32, comb [T, 4, 4] fp32)``."""
    t, n, d, scalars = check_pre_inputs(residual, fn, scale, base, norm_weight, rms_eps, hc_eps, post_mult,
                                        sinkhorn_iters)
    dev = residual.device
    layer_input = torch.empty(t, d, dtype=torch.bfloat16, device=dev)
    post = torch.empty(t, n, dtype=torch.float32, device=dev)
    comb = torch.empty(t, n, n, dtype=torch.float32, device=dev)
    if t == 0:
        return layer_input, post, comb
    run_pre(residual, fn, scale, base, norm_weight, scalars, layer_input, post, comb)
    return layer_input, post, comb


def norm_dtype_of(norm_weight: torch.Tensor | None) -> str | None:
    return None if norm_weight is None else str(norm_weight.dtype).removeprefix("torch.")


def run_pre(residual, fn, scale, base, norm_weight, scalars, layer_input, post, comb) -> None:
    """mhc_pre on checked inputs into the given outputs, in the design ``common.design_for(T, D)`` picks."""
    t, n, d = residual.shape
    dev = residual.device
    design = common.design_for(t, d)
    if design == "one_pass":
        from . import _mhc_onepass as onepass

        kernel = onepass.kernel_for("pre", d, dev, norm_dtype_of(norm_weight), *scalars)
        kernel(residual, fn, scale, base, _weight_or_placeholder(norm_weight, d, dev), layer_input, post, comb)
        return
    if design == "small_t":
        run_pre_small(residual, fn, scale, base, norm_weight, scalars, layer_input, post, comb)
        return
    if design == "l2_chunked":
        run_pre_chunks(residual, fn, scale, base, norm_weight, scalars, layer_input, post, comb,
                       common.chunk_tokens(d))
    else:
        run_pre_two_pass(residual, fn, scale, base, norm_weight, scalars, layer_input, post, comb)


def run_pre_chunks(residual, fn, scale, base, norm_weight, scalars, layer_input, post, comb, step: int,
                   before_chunk=None) -> None:
    """The l2_chunked design: the two-pass kernels per chunk of ``step`` tokens, so the epilogue re-reads a chunk
    the GEMM has just left in L2. ``before_chunk(a, b)`` runs first for each chunk (the fused op's post kernel).
    Host work per chunk is kept to slicing and two launches (kernels, split counts and partial buffers are set
    up once per chunk length): a chunk is ~10-25 us of GPU work, comparable to a launch from Python."""
    t, n, d = residual.shape
    dev, n_mix = residual.device, fn.shape[0]
    rms_eps, hc_eps, post_mult, iters = scalars
    weight = _weight_or_placeholder(norm_weight, d, dev)
    x = residual.view(t, n * d)
    arch, sms = common.device_arch(dev), common.sm_count(dev.index or 0)
    plans: dict[int, tuple] = {}
    for a in range(0, t, step):
        b = min(t, a + step)
        if b - a not in plans:
            length = b - a
            tile = common.gemm_block_tokens(length, n_mix)
            splits = gemm_splits(length, n * d, dev, tile)
            epilogue = pre_epilogue_kernel(d, arch, norm_dtype_of(norm_weight), rms_eps, hc_eps, post_mult, iters,
                                           pre_epilogue_design(splits))
            plans[length] = (torch.empty(splits, length, n_mix, dtype=torch.float32, device=dev),
                             torch.empty(splits, length, dtype=torch.float32, device=dev),
                             gemm_kernel(n * d, n_mix, dev, tile), epilogue,
                             min(MAX_TOKENS_PER_BLOCK, common.tokens_per_block(length, sms)))
        mix_part, sq_part, gemm, epilogue, tpb = plans[b - a]
        if before_chunk is not None:
            before_chunk(a, b)
        gemm(x[a:b], fn, mix_part, sq_part)
        epilogue(mix_part, sq_part, residual[a:b], scale, base, weight, layer_input[a:b], post[a:b], comb[a:b], tpb)


def run_pre_two_pass(residual, fn, scale, base, norm_weight, scalars, layer_input, post, comb) -> None:
    """The two-pass design: split-K prenorm GEMM (token tile ``common.gemm_block_tokens``), then the epilogue."""
    t, n, d = residual.shape
    dev, n_mix = residual.device, fn.shape[0]
    tile = common.gemm_block_tokens(t, n_mix)
    splits = gemm_splits(t, n * d, dev, tile)
    mix_part = torch.empty(splits, t, n_mix, dtype=torch.float32, device=dev)
    sq_part = torch.empty(splits, t, dtype=torch.float32, device=dev)
    gemm_kernel(n * d, n_mix, dev, tile)(residual.view(t, n * d), fn, mix_part, sq_part)
    run_pre_epilogue(mix_part, sq_part, residual, scale, base, norm_weight, scalars, layer_input, post, comb)



def run_pre_small(residual, fn, scale, base, norm_weight, scalars, layer_input, post, comb) -> None:
    """The small_t design (issue #6): the FMA split-K projection (_mhc_overlap.small_proj, nD / 128 splits), then
    the "v3" epilogue (Sinkhorn on warp 0 overlapped with the collapse)."""
    from . import _mhc_overlap as overlap

    t, n, d = residual.shape
    dev = residual.device
    rms_eps, hc_eps, post_mult, iters = scalars
    arch = common.device_arch(dev)
    splits = overlap.small_splits(n * d)
    mix_part = torch.empty(splits, t, fn.shape[0], dtype=torch.float32, device=dev)
    sq_part = torch.empty(splits, t, dtype=torch.float32, device=dev)
    overlap.small_proj_kernel(n * d, fn.shape[0], arch)(residual.view(t, n * d), fn, mix_part, sq_part)
    pre_epilogue_kernel(d, arch, norm_dtype_of(norm_weight), rms_eps, hc_eps, post_mult, iters, "v3")(
        mix_part, sq_part, residual, scale, base, _weight_or_placeholder(norm_weight, d, dev), layer_input, post,
        comb, 1)
