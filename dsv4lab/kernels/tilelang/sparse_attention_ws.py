"""TileLang (Hopper, sm_90a): warp-specialised sparse MQA attention with a per-head sink (design "ws").

Same math, operands and launcher as ``sparse_attention.py`` (design "v1"); only the kernel differs. Per query token
and tile of 64 heads (one CTA, 384 threads = 3 warpgroups), over the token's index list in chunks of ``block_n``:

    l_u = scale * q[h] . kv[idx[u]],   p_u = exp(l_u) / (sum_u' exp(l_u') + exp(sink[h])),   o[h] = sum_u p_u kv[idx[u]]

Roles (the FlashMLA sparse-prefill split):
- producer (warpgroup 2): waits until ring slot c % stages is free (``k_free``), gathers the K = V rows of chunk c
  into it with cp.async (zero-filled where the entry is masked: -1, >= N or past the list; 2 x 16 B per thread and
  row, one warp per row), waits for its own copies, fences them for the tensor cores (async proxy) and arrives on
  ``k_ready``. It works on chunk c + 1 while the consumers compute chunk c (``stages`` = 2), and no consumer thread
  issues or waits for a gather;
- consumer 0 (warpgroup 0): S = Q K^T [64, block_n] on its own (wgmma N = block_n, K = d in two halves), the
  online softmax in the log2 domain (running max starts at the sink logit), P (bf16) and the rescale factor alpha
  to shared memory, then O[:, :d/2] = alpha O[:, :d/2] + P @ K[:, :d/2];
- consumer 1 (warpgroup 1): waits for P, O[:, d/2:] = alpha O[:, d/2:] + P @ K[:, d/2:]; its GEMM of chunk c runs
  while consumer 0 computes S of chunk c + 1, so the tensor cores are idle only during consumer 0's softmax.

Why not design v1: there both warpgroups take half of S's columns (wgmma N = 32 reads all of Q from shared memory
per 32 columns: shared-memory bound) and every row max / row sum crosses the two warpgroups through
``__syncthreads``; the gather is issued by the same threads one chunk ahead (cp.async.wait_group 1), so the CTA is
one serial chain gather-wait -> S -> softmax -> PV.

Each K tile is stored as two [block_n, d/2] halves (left/right output dims) so each consumer's PV B operand is a whole
buffer. Q is staged once per CTA by consumer 0 (its only reader), the same way (two halves), while the producer
already gathers the first chunks. Shared memory at d = 512, block_n = 64, stages = 2:
Q 64 KiB + 2 x 64 KiB + P 8 KiB + alpha/denominator 0.5 KiB ~= 200 KiB (1 CTA per SM). Registers: consumer 0 holds
O-left 64 x 256 fp32 (128 / thread) and S (32 / thread): ``setmaxnreg`` 240; consumer 1 168; producer 80
(128 x (240 + 168 + 80) = 62464 <= 65536). sm_90a build: 168 registers at launch, 0 spills.

Hand-offs use mbarriers (no CTA-wide barrier after the init, so the three roles run decoupled); the only named
barriers TileLang inserts are warpgroup-local (consumer 0's row reductions and P store, the producer's copy wait).

Epilogue: consumer 0 writes ``den = l + exp2(sink - m)`` (1 where it is 0: sink -inf and no candidate) to shared
memory, both consumers store their half of ``o = acc / den`` (bf16).

Barrier phases: slot b is used by chunks b, b + stages, ...; chunk c waits ``k_ready[b]`` with parity
(c // stages) & 1 and the producer waits ``k_free[b]`` with the opposite parity (a fresh mbarrier counts its
"previous" phase, parity 1, as complete). ``p_ready`` / ``p_free`` alternate every chunk.
"""
# no `from __future__ import annotations` (see sparse_attention.py: TileLang evaluates T.Tensor annotations)

LOG2E = 1.4426950408889634
BLOCK_H = 64
THREADS = 384                 # 2 consumer warpgroups + 1 producer warpgroup
REGS = (240, 168, 80)         # setmaxnreg of consumer 0, consumer 1, producer


def smem_bytes(d: int, block_n: int, stages: int, block_h: int = BLOCK_H) -> int:
    """Shared memory of the main buffers: Q, ``stages`` K tiles, the bf16 P tile, alpha and the denominators."""
    return 2 * (block_h * d + stages * block_n * d + block_h * block_n) + 8 * block_h


def sparse_attention_ws_func(n_heads: int, d: int, scale: float, block_n: int = 64, stages: int = 2):
    """The prim_func ``(Q [T, H, d] bf16, KV [N, d] bf16, Idx [T, M] int32, Sink [H] fp32, Chunks [T] int32,
    O [T, H, d] bf16)``; T, N and the list length M are dynamic (one compile serves CSA and HCA lists).
    ``d`` a multiple of 128, ``block_n`` a multiple of 16."""
    import tilelang.language as T

    if d % 128 or block_n % 16 or stages < 1:
        raise ValueError(f"ws design: needs d % 128 == 0 and block_n % 16 == 0, got d={d}, block_n={block_n}")
    num_tokens = T.dynamic("num_tokens")
    n_rows = T.dynamic("n_rows")
    n_cand = T.dynamic("n_cand")
    block_h = BLOCK_H
    head_tiles = -(-n_heads // block_h)
    dh = d // 2
    scale_log2e = float(scale) * LOG2E
    neg_inf = -float("inf")
    bf16, f32, i32 = "bfloat16", "float32", "int32"

    @T.prim_func
    def kernel(Q: T.Tensor((num_tokens, n_heads, d), bf16), KV: T.Tensor((n_rows, d), bf16),
               Idx: T.Tensor((num_tokens, n_cand), i32), Sink: T.Tensor((n_heads,), f32),
               Chunks: T.Tensor((num_tokens,), i32), O: T.Tensor((num_tokens, n_heads, d), bf16)):
        with T.Kernel(num_tokens, head_tiles, threads=THREADS) as (tok, hb):
            q_l = T.alloc_shared((block_h, dh), bf16)
            q_r = T.alloc_shared((block_h, dh), bf16)
            k_l = T.alloc_shared((stages, block_n, dh), bf16)       # ring of K tiles, left / right halves
            k_r = T.alloc_shared((stages, block_n, dh), bf16)
            p_s = T.alloc_shared((block_h, block_n), bf16)
            alpha_s = T.alloc_shared((block_h,), f32)
            den_s = T.alloc_shared((block_h,), f32)

            acc = T.alloc_fragment((block_h, dh), f32)      # consumer 0: O[:, :d/2]
            # consumer 1's own fragment: TileLang lays a fragment out for the threads that use it, so one shared name
            # would leave consumer 1's loops over it empty (its threads own no element of a consumer-0 layout)
            acc_r = T.alloc_fragment((block_h, dh), f32)
            s = T.alloc_fragment((block_h, block_n), f32)
            sink_l = T.alloc_fragment((block_h,), f32)
            m = T.alloc_fragment((block_h,), f32)
            m_prev = T.alloc_fragment((block_h,), f32)
            m_safe = T.alloc_fragment((block_h,), f32)
            alpha = T.alloc_fragment((block_h,), f32)
            l = T.alloc_fragment((block_h,), f32)
            row_sum = T.alloc_fragment((block_h,), f32)

            k_ready = T.alloc_barrier([128] * stages)
            k_free = T.alloc_barrier([256] * stages)
            p_ready = T.alloc_barrier(128)
            p_free = T.alloc_barrier(128)
            den_ready = T.alloc_barrier(128)

            n_chunks = Chunks[tok]
            tx = T.get_thread_binding()
            h0 = hb * block_h

            if tx < 128:
                T.set_max_nreg(REGS[0], 1)
                for h in T.Parallel(block_h):
                    # padded heads get a -inf sink: their rows stay finite (m_safe) and are never stored
                    sink_l[h] = T.if_then_else(h0 + h < n_heads, Sink[T.min(h0 + h, n_heads - 1)] * LOG2E, neg_inf)
                    m[h] = sink_l[h]
                    l[h] = 0.0
                T.fill(acc, 0.0)
                # Q is read by this warpgroup only (padded heads read a real row and are never stored)
                for h, j in T.Parallel(block_h, dh, prefer_async=True):
                    q_l[h, j] = Q[tok, T.min(h0 + h, n_heads - 1), j]
                    q_r[h, j] = Q[tok, T.min(h0 + h, n_heads - 1), dh + j]
                T.fence_proxy_async()
                for c in T.serial(n_chunks):
                    T.barrier_wait(k_ready[c % stages], (c // stages) % 2)
                    T.gemm(q_l, k_l[c % stages, :, :], s, transpose_B=True, clear_accum=True,
                           annotations={"wg_wait": -1})     # no wait: issued back to back with the right half
                    T.gemm(q_r, k_r[c % stages, :, :], s, transpose_B=True)
                    for h, u in T.Parallel(block_h, block_n):
                        pos = c * block_n + u
                        r_ = T.if_then_else(pos < n_cand, Idx[tok, T.min(pos, n_cand - 1)], -1)
                        s[h, u] = T.if_then_else((r_ >= 0) & (r_ < n_rows), s[h, u] * scale_log2e, neg_inf)
                    T.copy(m, m_prev)
                    T.reduce_max(s, m, dim=1, clear=False)          # m = max(m_prev, max_u s)
                    for h in T.Parallel(block_h):
                        m_safe[h] = T.if_then_else(m[h] == neg_inf, 0.0, m[h])   # only while sink = -inf
                        alpha[h] = T.exp2(m_prev[h] - m_safe[h])
                    for h, u in T.Parallel(block_h, block_n):
                        s[h, u] = T.exp2(s[h, u] - m_safe[h])
                    T.reduce_sum(s, row_sum, dim=1)
                    for h in T.Parallel(block_h):
                        l[h] = l[h] * alpha[h] + row_sum[h]
                    # consumer 1 must be done with the previous chunk's P and alpha
                    T.barrier_wait(p_free, (c % 2) ^ 1)
                    T.copy(s, p_s)
                    T.copy(alpha, alpha_s)
                    for h, j in T.Parallel(block_h, dh):
                        acc[h, j] *= alpha[h]
                    # the GEMM's proxy fence (after the P store) also covers consumer 1's wgmma read of P
                    T.gemm(p_s, k_l[c % stages, :, :], acc)
                    T.barrier_arrive(p_ready)
                    T.barrier_arrive(k_free[c % stages])
                for h in T.Parallel(block_h):
                    m_safe[h] = T.if_then_else(m[h] == neg_inf, 0.0, m[h])
                    row_sum[h] = l[h] + T.exp2(sink_l[h] - m_safe[h])
                    row_sum[h] = T.if_then_else(row_sum[h] > 0, row_sum[h], 1.0)
                T.copy(row_sum, den_s)
                T.barrier_arrive(den_ready)
                for h, j in T.Parallel(block_h, dh):
                    if h0 + h < n_heads:
                        O[tok, h0 + h, j] = T.cast(acc[h, j] / row_sum[h], bf16)

            elif tx < 256:
                T.set_max_nreg(REGS[1], 1)
                T.fill(acc_r, 0.0)
                for c in T.serial(n_chunks):
                    T.barrier_wait(p_ready, c % 2)
                    for h, j in T.Parallel(block_h, dh):
                        acc_r[h, j] *= alpha_s[h]
                    T.gemm(p_s, k_r[c % stages, :, :], acc_r)
                    T.barrier_arrive(k_free[c % stages])
                    T.barrier_arrive(p_free)
                T.barrier_wait(den_ready, 0)
                for h, j in T.Parallel(block_h, dh):
                    if h0 + h < n_heads:
                        O[tok, h0 + h, dh + j] = T.cast(acc_r[h, j] / den_s[h], bf16)

            else:
                T.set_max_nreg(REGS[2], 0)
                for c in T.serial(n_chunks):
                    T.barrier_wait(k_free[c % stages], ((c // stages) % 2) ^ 1)
                    # a masked entry (-1, >= N, past the list) reads row n_rows: out of bounds, so TileLang's bound
                    # check turns the copy into a zero-filling cp.async (src-size 0) and the tile row is 0
                    for u, j in T.Parallel(block_n, dh, prefer_async=True):
                        pos = c * block_n + u
                        r_ = T.if_then_else(pos < n_cand, Idx[tok, T.min(pos, n_cand - 1)], -1)
                        r_ = T.if_then_else((r_ >= 0) & (r_ < n_rows), r_, n_rows)
                        k_l[c % stages, u, j] = KV[r_, j]
                        k_r[c % stages, u, j] = KV[r_, dh + j]
                    T.fence_proxy_async()
                    T.barrier_arrive(k_ready[c % stages])

    return kernel


def sparse_attention_wsp_func(n_heads: int, d: int, scale: float, block_n: int = 64, stages: int = 2):
    """Design "wsp": the ws kernel made persistent. Same operands plus ``Grid [G] int32`` (only its length is used:
    G CTAs, one per SM), CTA ``bid`` walking the work items (token, head tile) bid, bid + G, ... The ring, P and
    every barrier phase run on across a CTA's items (phase = the role's running chunk count), so the producer gathers
    the next token's first chunks while the consumers finish the current one (last PV, epilogue stores, the next Q
    load) instead of each CTA starting cold. ``den_free``: consumer 0 does not overwrite the denominators before
    consumer 1 has read them."""
    import tilelang.language as T

    if d % 128 or block_n % 16 or stages < 1:
        raise ValueError(f"wsp design: needs d % 128 == 0 and block_n % 16 == 0, got d={d}, block_n={block_n}")
    num_tokens = T.dynamic("num_tokens")
    n_rows = T.dynamic("n_rows")
    n_cand = T.dynamic("n_cand")
    n_ctas = T.dynamic("n_ctas")
    block_h = BLOCK_H
    head_tiles = -(-n_heads // block_h)
    dh = d // 2
    scale_log2e = float(scale) * LOG2E
    neg_inf = -float("inf")
    bf16, f32, i32 = "bfloat16", "float32", "int32"

    @T.prim_func
    def kernel(Q: T.Tensor((num_tokens, n_heads, d), bf16), KV: T.Tensor((n_rows, d), bf16),
               Idx: T.Tensor((num_tokens, n_cand), i32), Sink: T.Tensor((n_heads,), f32),
               Chunks: T.Tensor((num_tokens,), i32), O: T.Tensor((num_tokens, n_heads, d), bf16),
               Grid: T.Tensor((n_ctas,), i32)):
        with T.Kernel(n_ctas, threads=THREADS) as bid:
            q_l = T.alloc_shared((block_h, dh), bf16)
            q_r = T.alloc_shared((block_h, dh), bf16)
            k_l = T.alloc_shared((stages, block_n, dh), bf16)
            k_r = T.alloc_shared((stages, block_n, dh), bf16)
            p_s = T.alloc_shared((block_h, block_n), bf16)
            alpha_s = T.alloc_shared((block_h,), f32)
            den_s = T.alloc_shared((block_h,), f32)

            acc = T.alloc_fragment((block_h, dh), f32)      # consumer 0: O[:, :d/2]
            # consumer 1's own fragment: TileLang lays a fragment out for the threads that use it, so one shared name
            # would leave consumer 1's loops over it empty (its threads own no element of a consumer-0 layout)
            acc_r = T.alloc_fragment((block_h, dh), f32)
            s = T.alloc_fragment((block_h, block_n), f32)
            sink_l = T.alloc_fragment((block_h,), f32)
            m = T.alloc_fragment((block_h,), f32)
            m_prev = T.alloc_fragment((block_h,), f32)
            m_safe = T.alloc_fragment((block_h,), f32)
            alpha = T.alloc_fragment((block_h,), f32)
            l = T.alloc_fragment((block_h,), f32)
            row_sum = T.alloc_fragment((block_h,), f32)
            done = T.alloc_var(i32, init=0)             # chunks this thread's role finished in earlier items

            k_ready = T.alloc_barrier([128] * stages)
            k_free = T.alloc_barrier([256] * stages)
            p_ready = T.alloc_barrier(128)
            p_free = T.alloc_barrier(128)
            den_ready = T.alloc_barrier(128)
            den_free = T.alloc_barrier(128)

            n_items = T.ceildiv(num_tokens * head_tiles - bid, n_ctas)
            tx = T.get_thread_binding()

            if tx < 128:
                T.set_max_nreg(REGS[0], 1)
                for it in T.serial(n_items):
                    tok = (bid + it * n_ctas) // head_tiles
                    h0 = (bid + it * n_ctas) % head_tiles * block_h
                    for h in T.Parallel(block_h):
                        sink_l[h] = T.if_then_else(h0 + h < n_heads, Sink[T.min(h0 + h, n_heads - 1)] * LOG2E,
                                                   neg_inf)
                        m[h] = sink_l[h]
                        l[h] = 0.0
                    T.fill(acc, 0.0)
                    # the previous item's last S GEMM has completed (synchronous), so Q can be overwritten
                    for h, j in T.Parallel(block_h, dh, prefer_async=True):
                        q_l[h, j] = Q[tok, T.min(h0 + h, n_heads - 1), j]
                        q_r[h, j] = Q[tok, T.min(h0 + h, n_heads - 1), dh + j]
                    T.fence_proxy_async()
                    for c in T.serial(Chunks[tok]):
                        g = done + c                                   # running chunk index: slot and phases
                        T.barrier_wait(k_ready[g % stages], (g // stages) % 2)
                        T.gemm(q_l, k_l[g % stages, :, :], s, transpose_B=True, clear_accum=True,
                               annotations={"wg_wait": -1})
                        T.gemm(q_r, k_r[g % stages, :, :], s, transpose_B=True)
                        for h, u in T.Parallel(block_h, block_n):
                            pos = c * block_n + u
                            r_ = T.if_then_else(pos < n_cand, Idx[tok, T.min(pos, n_cand - 1)], -1)
                            s[h, u] = T.if_then_else((r_ >= 0) & (r_ < n_rows), s[h, u] * scale_log2e, neg_inf)
                        T.copy(m, m_prev)
                        T.reduce_max(s, m, dim=1, clear=False)
                        for h in T.Parallel(block_h):
                            m_safe[h] = T.if_then_else(m[h] == neg_inf, 0.0, m[h])
                            alpha[h] = T.exp2(m_prev[h] - m_safe[h])
                        for h, u in T.Parallel(block_h, block_n):
                            s[h, u] = T.exp2(s[h, u] - m_safe[h])
                        T.reduce_sum(s, row_sum, dim=1)
                        for h in T.Parallel(block_h):
                            l[h] = l[h] * alpha[h] + row_sum[h]
                        T.barrier_wait(p_free, (g % 2) ^ 1)
                        T.copy(s, p_s)
                        T.copy(alpha, alpha_s)
                        for h, j in T.Parallel(block_h, dh):
                            acc[h, j] *= alpha[h]
                        T.gemm(p_s, k_l[g % stages, :, :], acc)
                        T.barrier_arrive(p_ready)
                        T.barrier_arrive(k_free[g % stages])
                    done = done + Chunks[tok]
                    for h in T.Parallel(block_h):
                        m_safe[h] = T.if_then_else(m[h] == neg_inf, 0.0, m[h])
                        row_sum[h] = l[h] + T.exp2(sink_l[h] - m_safe[h])
                        row_sum[h] = T.if_then_else(row_sum[h] > 0, row_sum[h], 1.0)
                    T.barrier_wait(den_free, (it % 2) ^ 1)
                    T.copy(row_sum, den_s)
                    T.barrier_arrive(den_ready)
                    for h, j in T.Parallel(block_h, dh):
                        if h0 + h < n_heads:
                            O[tok, h0 + h, j] = T.cast(acc[h, j] / row_sum[h], bf16)

            elif tx < 256:
                T.set_max_nreg(REGS[1], 1)
                for it in T.serial(n_items):
                    tok = (bid + it * n_ctas) // head_tiles
                    h0 = (bid + it * n_ctas) % head_tiles * block_h
                    T.fill(acc_r, 0.0)
                    for c in T.serial(Chunks[tok]):
                        g = done + c
                        T.barrier_wait(p_ready, g % 2)
                        for h, j in T.Parallel(block_h, dh):
                            acc_r[h, j] *= alpha_s[h]
                        T.gemm(p_s, k_r[g % stages, :, :], acc_r)
                        T.barrier_arrive(k_free[g % stages])
                        T.barrier_arrive(p_free)
                    done = done + Chunks[tok]
                    T.barrier_wait(den_ready, it % 2)
                    for h, j in T.Parallel(block_h, dh):
                        if h0 + h < n_heads:
                            O[tok, h0 + h, dh + j] = T.cast(acc_r[h, j] / den_s[h], bf16)
                    T.barrier_arrive(den_free)

            else:
                T.set_max_nreg(REGS[2], 0)
                for it in T.serial(n_items):
                    tok = (bid + it * n_ctas) // head_tiles
                    for c in T.serial(Chunks[tok]):
                        g = done + c
                        T.barrier_wait(k_free[g % stages], ((g // stages) % 2) ^ 1)
                        for u, j in T.Parallel(block_n, dh, prefer_async=True):
                            pos = c * block_n + u
                            r_ = T.if_then_else(pos < n_cand, Idx[tok, T.min(pos, n_cand - 1)], -1)
                            r_ = T.if_then_else((r_ >= 0) & (r_ < n_rows), r_, n_rows)
                            k_l[g % stages, u, j] = KV[r_, j]
                            k_r[g % stages, u, j] = KV[r_, dh + j]
                        T.fence_proxy_async()
                        T.barrier_arrive(k_ready[g % stages])
                    done = done + Chunks[tok]

    return kernel
