"""One-pass TileLang design of mhc_pre, mhc_fused_post_pre and hc_head for Hopper (``TUNING["design"] = "one_pass"``).

Same math as the two-pass kernels (see ``mhc_pre``/``hc_head``); what changes is where the residual lives.

Layout: a thread-block CLUSTER of ``C`` CTAs (``TUNING["onepass_cluster"]``, 8 = the portable maximum) owns a
tile of ``BT`` tokens; CTA rank r holds columns ``[r D/C, (r+1) D/C)`` of all 4 streams of those tokens in
shared memory (Flash BT = 32: 128 KB; Pro BT = 16: 112 KB), read from HBM exactly once. Per CTA:

1. (fused only) the previous sublayer's hc_post on its slice: ``R' = bf16(post f + comb^T R)``, written to
   global memory AND over the staged R (so the pre half reads the rounded new residual, the contract).
2. partial projection of its K slice on the tensor cores, ``x[BT, 4 D/C] @ fn[:, slice].T``, with each fp32 fn
   chunk split into bf16 hi + mid + lo terms (R is exactly bf16; see ``mhc_pre``: ~1e-6 relative, emulated on
   the CPU in tests/test_mhc_onepass_emulation.py), plus the partial sum of squares.
3. cluster exchange: each CTA pushes its [BT, n_mix + 1] partials into slot r of every peer's shared memory
   (distributed shared memory), cluster barrier, and every CTA sums the C slots in rank order: all ranks get
   bitwise-identical mixes, no atomics, no global scratch.
4. mixes -> sigmoid -> Sinkhorn (one thread per token, reference order), redundantly on every rank (rank 0
   writes post/comb); the collapse ``y = bf16(sum_i pre_i R_i)`` of its slice from shared memory; with a norm
   weight a second exchange of the BT partial ``sum(y^2)`` gives the exact RMS of the ROUNDED collapse (the
   reference contract; no Gram-matrix approximation needed), then ``layer_input`` is written.

HBM bytes: 10TD (pre), 20TD (fused), 10TD (head): the roofline minima. The price: every cluster streams all of
fn (384 D bytes, fp32) from L2 per BT tokens, i.e. 48/BT x the residual bytes (1.5x at Flash BT = 32, 3x at
Pro BT = 16), and a CTA's R load is not overlapped with its own projection (other CTAs' loads fill HBM). At
T = 1 the C CTAs of one cluster stream fn in parallel, all in one launch. Whether this beats the two-pass
design is what the bench's ``design`` comparison measures.
"""
# no `from __future__ import annotations`: TileLang reads the prim_func annotations in the builder's scope.
import functools

from . import _mhc_common as common

CHUNK = common.ONEPASS_CHUNK   # K elements per projection step (fn chunk [n_mix, 128] fp32: 12 KB for pre)
STAGES = 4          # fn chunks in flight: at T = 1 the fn stream (1/C of 1.5-2.75 MB per CTA) is latency-bound
POST_COLS = 64      # fused: columns of the new residual formed per step in registers
GEMM_MIN_M = 32     # mma tile rows: 4 warps over N = 80 need M >= 32 (rows >= BT are zero)
THREADS = 128       # one warpgroup
MIX_W = 32          # partial row: n_mix mixes, then the sum of squares, padded
# No warp specialisation: it would leave the exchange and collapse to the consumer warpgroup while the
# producer's threads run off the end, and every thread of the CTA must reach each cluster barrier.
PASS_CONFIGS = (("tl.disable_warp_specialized", True),)


def block_tokens(d: int) -> int:
    """Tokens per cluster: the staged slice is BT x 4 x D/C bf16; keep it <= ~128 KB per CTA."""
    return common.TUNING["onepass_block_tokens"] or (32 if d <= 4096 else 16)


def padded_columns(n_mix: int) -> int:
    return -(-3 * n_mix // 16) * 16


def kernel_for(mode: str, d: int, device, norm_dtype=None, rms_eps: float = 1e-6, hc_eps: float = 1e-6,
               post_mult: float = 2.0, sinkhorn_iters: int = 20):
    """The compiled one-pass kernel for the current TUNING (cluster size, token tile) on ``device``."""
    return onepass_kernel(mode, d, common.device_arch(device), norm_dtype, rms_eps, hc_eps, post_mult,
                          sinkhorn_iters, block_tokens(d), common.onepass_cluster(d))


@functools.lru_cache(maxsize=None)
def onepass_kernel(mode: str, d: int, arch: str, norm_dtype, rms_eps: float, hc_eps: float, post_mult: float,
                   sinkhorn_iters: int, bt: int, cluster: int):
    """``onepass_func`` compiled for ``arch``."""
    return common.compile_kernel(onepass_func(mode, d, norm_dtype, rms_eps, hc_eps, post_mult, sinkhorn_iters,
                                              bt, cluster), arch, PASS_CONFIGS)


@functools.lru_cache(maxsize=None)
def onepass_func(mode: str, d: int, norm_dtype, rms_eps: float, hc_eps: float, post_mult: float,
                 sinkhorn_iters: int, bt: int, cluster: int):
    """TileLang prim_func of the one-pass design. ``mode``:

    - "pre":   residual [T,4,d], fn [24,4d], scale [3], base [24], norm_weight [d], layer_input [T,d] (out),
               post [T,4] (out), comb [T,4,4] (out)
    - "fused": f [T,d], residual, post_in [T,4], comb_in [T,4,4], fn, scale, base, norm_weight,
               new_residual [T,4,d] (out), layer_input, post, comb (outs)
    - "head":  residual, fn [4,4d], scale [1], base [4], out [T,d] (out)

    ``norm_dtype`` None: no RMSNorm (norm_weight is then not read); ignored for "head".
    """
    if mode not in ("pre", "fused", "head"):
        raise ValueError(f"mode: expected 'pre', 'fused' or 'head', got {mode!r}")
    if d % (cluster * CHUNK) or d // cluster % CHUNK:
        raise ValueError(f"d: expected a multiple of cluster x {CHUNK} = {cluster * CHUNK}, got {d}")
    import tilelang.cuda.language as TC
    import tilelang.language as T

    n = common.HC_MULT
    comb_sinkhorn = common.comb_sinkhorn_macro(n, sinkhorn_iters, hc_eps)
    n_mix = n if mode == "head" else (2 + n) * n
    n_scale = 1 if mode == "head" else 3
    n_cols = padded_columns(n_mix)
    nd = n * d
    dc = d // cluster                      # columns of one stream held by one CTA
    gm = max(bt, GEMM_MIN_M)
    k_chunks = n * dc // CHUNK             # projection steps (stream-major: chunk c is stream c // (dc / 64))
    per_stream = dc // CHUNK
    norm = mode != "head" and norm_dtype is not None
    w_dtype = norm_dtype or "bfloat16"
    num_tokens = T.dynamic("num_tokens")

    @T.macro
    def project_and_reduce(x_s, fn, part_s, slots, mix_s, rank):
        """Steps 2-3: mix_s[i, 0:n_mix] = x @ fn.T over the whole row, mix_s[i, n_mix] = sum(x^2)."""
        fn_s = T.alloc_shared((n_mix, CHUNK), "float32")
        w_s = T.alloc_shared((n_cols, CHUNK), "bfloat16")
        a_s = T.alloc_shared((gm, CHUNK), "bfloat16")
        acc = T.alloc_fragment((gm, n_cols), "float32")
        sq = T.alloc_fragment((bt, CHUNK), "float32")
        sq_sum = T.alloc_fragment((bt,), "float32")
        acc_s = T.alloc_shared((gm, n_cols), "float32")
        T.clear(acc)
        T.clear(sq)
        for i, j in T.Parallel(gm, CHUNK):   # padding rows stay zero
            a_s[i, j] = T.cast(0, "bfloat16")
        for c in T.Pipelined(k_chunks, num_stages=STAGES):
            # global column of this chunk: stream s, this CTA's slice, step within the stream
            g0 = (c // per_stream) * d + rank * dc + (c % per_stream) * CHUNK
            T.copy(fn[0:n_mix, g0:g0 + CHUNK], fn_s)
            for m, j in T.Parallel(n_mix, CHUNK):
                hi = T.cast(fn_s[m, j], "bfloat16")
                r1 = fn_s[m, j] - T.cast(hi, "float32")
                mid = T.cast(r1, "bfloat16")
                w_s[m, j] = hi
                w_s[n_mix + m, j] = mid
                w_s[2 * n_mix + m, j] = T.cast(r1 - T.cast(mid, "float32"), "bfloat16")
            for m, j in T.Parallel(n_cols - 3 * n_mix, CHUNK):
                w_s[3 * n_mix + m, j] = T.cast(0, "bfloat16")
            for i, j in T.Parallel(bt, CHUNK):
                a_s[i, j] = x_s[i, c * CHUNK + j]
                sq[i, j] += T.cast(x_s[i, c * CHUNK + j], "float32") * T.cast(x_s[i, c * CHUNK + j], "float32")
            T.gemm(a_s, w_s, acc, transpose_B=True)
        T.reduce_sum(sq, sq_sum, dim=1)
        T.copy(acc, acc_s)
        for i, m in T.Parallel(bt, MIX_W):
            part_s[i, m] = T.if_then_else(
                m < n_mix, acc_s[i, T.min(m, n_mix - 1)] + (acc_s[i, n_mix + T.min(m, n_mix - 1)]
                                                            + acc_s[i, 2 * n_mix + T.min(m, n_mix - 1)]),
                T.if_then_else(m == n_mix, sq_sum[i], 0.0))
        # TileLang's shared-memory planner reuses dead buffers' space (slots may alias fn_s / w_s), blind to
        # the peers' remote stores: wait until every CTA of the cluster is past its projection before pushing
        TC.cluster_sync()
        for p in T.serial(cluster):
            T.copy_cluster(part_s, slots[rank, :, :], dst_block=p)
        TC.cluster_sync()
        for i, m in T.Parallel(bt, MIX_W):
            mix_s[i, m] = slots[0, i, m]
        for p in T.serial(cluster - 1):
            for i, m in T.Parallel(bt, MIX_W):
                mix_s[i, m] += slots[p + 1, i, m]
        T.sync_threads()

    @T.macro
    def gates(mix_s, scale, base, pre_s, post, comb, t0, rank, c, stat):
        """Step 4, one thread per token: pre weights into pre_s; post and Sinkhorn comb written by rank 0."""
        tx = T.get_thread_binding(0)
        if tx < bt:
            stat[1] = T.rsqrt(mix_s[tx, n_mix] / nd + rms_eps)
            for i in T.unroll(n):
                pre_s[tx, i] = 1.0 / (1.0 + T.exp(-(mix_s[tx, i] * stat[1] * scale[0] + base[i]))) + hc_eps
            if mode != "head":
                if rank == 0 and t0 + tx < num_tokens:
                    for i in T.unroll(n):
                        post[t0 + tx, i] = post_mult / (
                            1.0 + T.exp(-(mix_s[tx, n + i] * stat[1] * scale[1] + base[n + i])))
                    comb_sinkhorn(mix_s, tx, scale, base, c, stat)
                    for j in T.unroll(n):
                        for k in T.unroll(n):
                            comb[t0 + tx, j, k] = c[j * n + k]
        T.sync_threads()

    @T.macro
    def collapse(x_s, pre_s, norm_weight, out, t0, rank, ysq_s, yslots):
        """y = bf16(sum_i pre_i R_i) on this CTA's columns; with a norm, RMS over all d via a 2nd exchange."""
        if norm:
            yq = T.alloc_fragment((bt, CHUNK), "float32")
            yq_sum = T.alloc_fragment((bt,), "float32")
            T.clear(yq)
            for cc in T.serial(per_stream):
                for i, j in T.Parallel(bt, CHUNK):
                    yv = T.cast(T.cast(
                        pre_s[i, 0] * T.cast(x_s[i, cc * CHUNK + j], "float32")
                        + pre_s[i, 1] * T.cast(x_s[i, dc + cc * CHUNK + j], "float32")
                        + pre_s[i, 2] * T.cast(x_s[i, 2 * dc + cc * CHUNK + j], "float32")
                        + pre_s[i, 3] * T.cast(x_s[i, 3 * dc + cc * CHUNK + j], "float32"), "bfloat16"), "float32")
                    yq[i, j] += yv * yv
            T.reduce_sum(yq, yq_sum, dim=1)
            for i in T.Parallel(bt):
                ysq_s[i] = yq_sum[i]
            TC.cluster_sync()   # yslots may alias mix_s: every peer must be past its gates (see above)
            for p in T.serial(cluster):
                T.copy_cluster(ysq_s, yslots[rank, :], dst_block=p)
            TC.cluster_sync()
            for i in T.Parallel(bt):
                ysq_s[i] = yslots[0, i]
            for p in T.serial(cluster - 1):
                for i in T.Parallel(bt):
                    ysq_s[i] += yslots[p + 1, i]
            T.sync_threads()
            for i in T.Parallel(bt):
                ysq_s[i] = T.rsqrt(ysq_s[i] / d + rms_eps)
            T.sync_threads()
        for i, e in T.Parallel(bt, dc):
            if t0 + i < num_tokens:
                yv = T.cast(T.cast(
                    pre_s[i, 0] * T.cast(x_s[i, e], "float32") + pre_s[i, 1] * T.cast(x_s[i, dc + e], "float32")
                    + pre_s[i, 2] * T.cast(x_s[i, 2 * dc + e], "float32")
                    + pre_s[i, 3] * T.cast(x_s[i, 3 * dc + e], "float32"), "bfloat16"), "float32")
                if norm:
                    out[t0 + i, rank * dc + e] = T.cast(
                        yv * ysq_s[i] * T.cast(norm_weight[rank * dc + e], "float32"), "bfloat16")
                else:
                    out[t0 + i, rank * dc + e] = T.cast(yv, "bfloat16")

    @T.macro
    def stage_residual(residual, x_s, t0, rank):
        for s in T.unroll(n):
            T.copy(residual[t0:t0 + bt, s, rank * dc:(rank + 1) * dc], x_s[:, s * dc:(s + 1) * dc])

    @T.macro
    def buffers_and_run(x_s, fn, scale, base, norm_weight, out, post, comb, t0, rank):
        part_s = T.alloc_shared((bt, MIX_W), "float32")
        slots = T.alloc_shared((cluster, bt, MIX_W), "float32")
        mix_s = T.alloc_shared((bt, MIX_W), "float32")
        pre_s = T.alloc_shared((bt, n), "float32")
        ysq_s = T.alloc_shared((bt,), "float32")
        yslots = T.alloc_shared((cluster, bt), "float32")
        c = T.alloc_local((n * n,), "float32")
        stat = T.alloc_local((4,), "float32")
        project_and_reduce(x_s, fn, part_s, slots, mix_s, rank)
        gates(mix_s, scale, base, pre_s, post, comb, t0, rank, c, stat)
        collapse(x_s, pre_s, norm_weight, out, t0, rank, ysq_s, yslots)

    if mode == "pre":
        @T.prim_func
        def mhc_pre_onepass(residual: T.Tensor((num_tokens, n, d), "bfloat16"),
                            fn: T.Tensor((n_mix, nd), "float32"),
                            scale: T.Tensor((n_scale,), "float32"),
                            base: T.Tensor((n_mix,), "float32"),
                            norm_weight: T.Tensor((d,), w_dtype),
                            layer_input: T.Tensor((num_tokens, d), "bfloat16"),
                            post: T.Tensor((num_tokens, n), "float32"),
                            comb: T.Tensor((num_tokens, n, n), "float32")):
            with T.Kernel(cluster, T.ceildiv(num_tokens, bt), threads=THREADS, cluster_dims=(cluster, 1, 1)) as (
                    rank, tile):
                x_s = T.alloc_shared((bt, n * dc), "bfloat16")
                TC.cluster_sync()   # every peer has started: its shared memory may receive our partials
                stage_residual(residual, x_s, tile * bt, rank)
                buffers_and_run(x_s, fn, scale, base, norm_weight, layer_input, post, comb, tile * bt, rank)

        return mhc_pre_onepass

    if mode == "head":
        @T.prim_func
        def hc_head_onepass(residual: T.Tensor((num_tokens, n, d), "bfloat16"),
                            fn: T.Tensor((n_mix, nd), "float32"),
                            scale: T.Tensor((n_scale,), "float32"),
                            base: T.Tensor((n_mix,), "float32"),
                            out: T.Tensor((num_tokens, d), "bfloat16")):
            with T.Kernel(cluster, T.ceildiv(num_tokens, bt), threads=THREADS, cluster_dims=(cluster, 1, 1)) as (
                    rank, tile):
                x_s = T.alloc_shared((bt, n * dc), "bfloat16")
                TC.cluster_sync()
                stage_residual(residual, x_s, tile * bt, rank)
                buffers_and_run(x_s, fn, scale, base, None, out, None, None, tile * bt, rank)

        return hc_head_onepass

    @T.prim_func
    def mhc_fused_onepass(f: T.Tensor((num_tokens, d), "bfloat16"),
                          residual: T.Tensor((num_tokens, n, d), "bfloat16"),
                          post_in: T.Tensor((num_tokens, n), "float32"),
                          comb_in: T.Tensor((num_tokens, n, n), "float32"),
                          fn: T.Tensor((n_mix, nd), "float32"),
                          scale: T.Tensor((n_scale,), "float32"),
                          base: T.Tensor((n_mix,), "float32"),
                          norm_weight: T.Tensor((d,), w_dtype),
                          new_residual: T.Tensor((num_tokens, n, d), "bfloat16"),
                          layer_input: T.Tensor((num_tokens, d), "bfloat16"),
                          post: T.Tensor((num_tokens, n), "float32"),
                          comb: T.Tensor((num_tokens, n, n), "float32")):
        with T.Kernel(cluster, T.ceildiv(num_tokens, bt), threads=THREADS, cluster_dims=(cluster, 1, 1)) as (
                rank, tile):
            x_s = T.alloc_shared((bt, n * dc), "bfloat16")
            mix_in = T.alloc_shared((bt, n + 1, n), "float32")   # rows 0..3: comb_in[j, :]; row 4: post_in
            t0 = tile * bt
            TC.cluster_sync()
            for i, j, k in T.Parallel(bt, n, n):
                mix_in[i, j, k] = T.if_then_else(t0 + i < num_tokens, comb_in[t0 + i, j, k], 0.0)
            for i, k in T.Parallel(bt, n):
                mix_in[i, n, k] = T.if_then_else(t0 + i < num_tokens, post_in[t0 + i, k], 0.0)
            stage_residual(residual, x_s, t0, rank)
            # hc_post on this slice, POST_COLS columns at a time through registers (then over the staged R)
            nr = T.alloc_fragment((bt, n, POST_COLS), "bfloat16")
            for cc in T.serial(dc // POST_COLS):
                for i, k, j in T.Parallel(bt, n, POST_COLS):
                    nr[i, k, j] = T.cast(
                        mix_in[i, n, k] * T.cast(f[T.min(t0 + i, num_tokens - 1), rank * dc + cc * POST_COLS + j],
                                                 "float32")
                        + (((mix_in[i, 0, k] * T.cast(x_s[i, cc * POST_COLS + j], "float32")
                             + mix_in[i, 1, k] * T.cast(x_s[i, dc + cc * POST_COLS + j], "float32"))
                            + mix_in[i, 2, k] * T.cast(x_s[i, 2 * dc + cc * POST_COLS + j], "float32"))
                           + mix_in[i, 3, k] * T.cast(x_s[i, 3 * dc + cc * POST_COLS + j], "float32")), "bfloat16")
                T.sync_threads()
                for i, k, j in T.Parallel(bt, n, POST_COLS):
                    x_s[i, k * dc + cc * POST_COLS + j] = nr[i, k, j]
                    if t0 + i < num_tokens:
                        new_residual[t0 + i, k, rank * dc + cc * POST_COLS + j] = nr[i, k, j]
            T.sync_threads()
            buffers_and_run(x_s, fn, scale, base, norm_weight, layer_input, post, comb, t0, rank)

    return mhc_fused_onepass
