"""TileLang (Hopper, sm_90a): sparse MQA attention with a per-head sink over per-query index lists (dsv4-layers.md 3.6).

Same contract and math as ``dsv4lab.kernels.reference.attention.sparse_attention_with_sink`` (and the Triton backend):

    l_u    = scale * q[t,h] . kv[idx[t,u]]                      (fp32 accumulate; V = K)
    p_u    = exp(l_u) / (sum_u' exp(l_u') + exp(sink[h]))
    o[t,h] = sum_u p_u kv[idx[t,u]]                             (bf16; a row with no candidate gives 0)

Design. One CTA per (token, tile of BLOCK_H = 64 heads): all 64 Flash heads of a token are one wgmma M = 64, so each
K row is gathered once per token. The CTA walks the token's index list in chunks of BLOCK_N entries:

1. gather K rows [BLOCK_N, d] by index into shared memory with cp.async (TMA cannot gather rows), software-pipelined
   ``STAGES`` deep by ``T.Pipelined`` (the gather of chunk c+1 is in flight while chunk c is multiplied);
2. S = Q @ K^T [BLOCK_H, BLOCK_N] on wgmma, Q staged once in shared memory;
3. online softmax in the log2 domain (logits pre-multiplied by scale * log2 e); the running max starts at the sink
   logit, so it is never -inf while the sink is finite; masked entries (-1 or >= N) are -inf and their K row is
   zero-filled (p = 0 and a zero row: nothing enters l or acc, whatever the kv rows hold);
4. P is rounded to bf16 and staged in shared memory, acc [BLOCK_H, d] = acc * alpha + P @ K (the same K tile: V = K).

With 256 threads (2 warpgroups) TileLang partitions both GEMMs along N: for S each warpgroup computes half of the
BLOCK_N columns (S is computed once per chunk, no duplicate QK^T), for P @ K each owns half of the d = 512 output
columns (64 x 256 fp32 = 128 registers per thread), the "split-d" layout of FlashMLA's two consumer warpgroups. Row
max / row sum cross the two warpgroups through TileLang's fragment reductions. Shared memory at d = 512, BLOCK_N = 64,
STAGES = 2: Q 64 KiB + 2 x 64 KiB of K + P 8 KiB = 200 KiB (of 227 KiB).

Epilogue: ``o = acc / (l + exp2(sink - m))`` (0 where the denominator is 0: sink -inf and no candidate), bf16.

Trim: the launcher computes, per token, the number of chunks up to the last valid entry (``chunks_per_token``); the
kernel loops only over those (at least one, so a row with no candidate still runs the epilogue and writes 0). This is
what the Triton kernel's in-kernel scan does: the causal -1 tail of early tokens' lists costs no gathers or MMAs.

Precision: q, K bf16 into wgmma with fp32 accumulation, p rounded to bf16 before P @ K (relative error <= 2^-9 per
weight), fp32 softmax statistics, one bf16 rounding of o. Same as the Triton kernel on the GPU.

Designs (``design=``, through ``sparse_attention_launch``; ``sparse_attention_with_sink`` runs DEFAULT_DESIGN, or v1
where the head dim is not a multiple of 128, which ws needs): "v1" is the kernel above; "ws" (``sparse_attention_ws.py``) is the FlashMLA-style warp-specialised kernel (a producer
warpgroup gathering into a cp.async ring, consumer 0 computing S alone + the softmax, consumer 1 the other half of
P @ K); "wsp" is ws made persistent (one CTA per SM walking (token, head tile) items, the ring and barrier
phases running on across items, so the next token's gathers overlap the current token's tail and epilogue). Same
operands, chunking, masking and precision; the bench times all of them (variant prefill-sweep-*-tilelang).

Default (H100 run at commit 42be99d, Flash, T = 8192, whole op incl. the launcher's chunk counts): ws with
block_n 64, 2 stages and trim. CSA: ws 1848 us, wsp 1904, ws without trim 1905, ws n32s4 2119, v1 2367.
HCA: ws without trim 963 us, ws 1025, ws n32s4 1019, wsp 1069, v1 1157. Trim pays on CSA (-57 us) and costs on
HCA (+62 us: at 3 chunks per list it saves almost no chunk but costs the chunk-count pass); the two sums are
within 0.2 %, and the launcher cannot tell the layer kind from its operands (the list length of HCA grows with
T), so one default: the CSA winner.

TileLang is imported lazily (``compile_kernel``): ``import dsv4lab`` never needs it. Inputs are checked before any
compile or launch. The kernel runs on CUDA only; CPU tests check an emulation of this algorithm and the sm_90a
compile (tests/test_sparse_attention_tilelang.py).
"""
# no `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations of a prim_func in the builder's
# scope (shapes are closure variables), which postponed annotations would break.
import functools
import math

import torch

from ..reference import _checks as chk
from ..reference._attn_checks import ANY_FLOAT, check_tensor

LOG2E = 1.4426950408889634
BLOCK_H = 64            # heads per CTA: wgmma M
BLOCK_N = 64            # index entries (K rows) per chunk
STAGES = 2              # cp.async gather pipeline depth
THREADS = 256           # 2 warpgroups: each owns half of S's columns and half of the output dims
SMEM_LIMIT = 227 * 1024  # H100 / H200 opt-in shared memory per block
MAX_HEAD_DIM = 512
DESIGNS = ("v1", "ws", "wsp")
DEFAULT_DESIGN = "ws"    # measured fastest on CSA prefill (module docstring); v1 where d % 128 != 0
WS_BLOCK_N, WS_STAGES = 64, 2     # ws / wsp: 200 KiB of shared memory at d = 512 (the largest ring that fits)


def smem_bytes(d: int, block_h: int = BLOCK_H, block_n: int = BLOCK_N, stages: int = STAGES) -> int:
    """Shared memory of the kernel's main buffers: Q tile, ``stages`` K tiles and the bf16 P tile."""
    return 2 * (block_h * d + stages * block_n * d + block_h * block_n)


def sparse_attention_func(n_heads: int, d: int, n_cand: int, scale: float, block_h: int = BLOCK_H,
                          block_n: int = BLOCK_N, stages: int = STAGES, threads: int = THREADS):
    """The prim_func for ``n_heads`` heads of width ``d`` and index lists of length ``n_cand``; the token count and
    the kv row count are dynamic. Arguments: Q [T, H, d] bf16, KV [N, d] bf16, Idx [T, n_cand] int32, Sink [H] fp32,
    Chunks [T] int32 (chunks to walk per token, >= 1), O [T, H, d] bf16."""
    import tilelang.language as T

    num_tokens = T.dynamic("num_tokens")
    n_rows = T.dynamic("n_rows")
    head_tiles = -(-n_heads // block_h)
    scale_log2e = float(scale) * LOG2E
    neg_inf = -float("inf")
    bf16, f32, i32 = "bfloat16", "float32", "int32"

    @T.prim_func
    def kernel(Q: T.Tensor((num_tokens, n_heads, d), bf16), KV: T.Tensor((n_rows, d), bf16),
               Idx: T.Tensor((num_tokens, n_cand), i32), Sink: T.Tensor((n_heads,), f32),
               Chunks: T.Tensor((num_tokens,), i32), O: T.Tensor((num_tokens, n_heads, d), bf16)):
        with T.Kernel(num_tokens, head_tiles, threads=threads) as (tok, hb):
            q_s = T.alloc_shared((block_h, d), bf16)
            k_s = T.alloc_shared((block_n, d), bf16)
            p_s = T.alloc_shared((block_h, block_n), bf16)
            acc = T.alloc_fragment((block_h, d), f32)
            s = T.alloc_fragment((block_h, block_n), f32)
            sink_l = T.alloc_fragment((block_h,), f32)
            m = T.alloc_fragment((block_h,), f32)
            m_prev = T.alloc_fragment((block_h,), f32)
            m_safe = T.alloc_fragment((block_h,), f32)
            alpha = T.alloc_fragment((block_h,), f32)
            l = T.alloc_fragment((block_h,), f32)
            row_sum = T.alloc_fragment((block_h,), f32)

            for h, j in T.Parallel(block_h, d):
                q_s[h, j] = T.if_then_else(hb * block_h + h < n_heads, Q[tok, hb * block_h + h, j], T.cast(0, bf16))
            for h in T.Parallel(block_h):
                # padded heads get a -inf sink: their rows stay finite (m_safe) and are never stored
                sink_l[h] = T.if_then_else(hb * block_h + h < n_heads,
                                           Sink[T.min(hb * block_h + h, n_heads - 1)] * LOG2E, neg_inf)
                m[h] = sink_l[h]
                l[h] = 0.0
            T.fill(acc, 0.0)

            for c in T.Pipelined(Chunks[tok], num_stages=stages):
                # gather: a masked entry (-1, >= N, past the list) is sent to row n_rows; TileLang's bound check on
                # KV turns that into a zero-filling cp.async (src-size 0), so the tile row is 0 and no byte is read.
                # (An explicit if_then_else(valid, KV[..], 0) is not lowered to cp.async and stalls the pipeline.)
                for u, j in T.Parallel(block_n, d):
                    row = T.if_then_else(c * block_n + u < n_cand, Idx[tok, T.min(c * block_n + u, n_cand - 1)], -1)
                    k_s[u, j] = KV[T.if_then_else((row >= 0) & (row < n_rows), row, n_rows), j]
                T.gemm(q_s, k_s, s, transpose_B=True, clear_accum=True)
                for h, u in T.Parallel(block_h, block_n):
                    row = T.if_then_else(c * block_n + u < n_cand, Idx[tok, T.min(c * block_n + u, n_cand - 1)], -1)
                    s[h, u] = T.if_then_else((row >= 0) & (row < n_rows), s[h, u] * scale_log2e, neg_inf)
                T.copy(m, m_prev)
                T.reduce_max(s, m, dim=1, clear=False)          # m = max(m_prev, max_u s)
                for h in T.Parallel(block_h):
                    m_safe[h] = T.if_then_else(m[h] == neg_inf, 0.0, m[h])   # only while the sink is -inf too
                    alpha[h] = T.exp2(m_prev[h] - m_safe[h])
                for h, u in T.Parallel(block_h, block_n):
                    s[h, u] = T.exp2(s[h, u] - m_safe[h])
                T.reduce_sum(s, row_sum, dim=1)
                for h in T.Parallel(block_h):
                    l[h] = l[h] * alpha[h] + row_sum[h]
                T.copy(s, p_s)
                for h, j in T.Parallel(block_h, d):
                    acc[h, j] *= alpha[h]
                T.gemm(p_s, k_s, acc)

            for h in T.Parallel(block_h):
                m_safe[h] = T.if_then_else(m[h] == neg_inf, 0.0, m[h])
                row_sum[h] = l[h] + T.exp2(sink_l[h] - m_safe[h])
                row_sum[h] = T.if_then_else(row_sum[h] > 0, row_sum[h], 1.0)
            for h, j in T.Parallel(block_h, d):
                if hb * block_h + h < n_heads:
                    O[tok, hb * block_h + h, j] = T.cast(acc[h, j] / row_sum[h], bf16)

    return kernel


@functools.lru_cache(maxsize=None)
def sparse_attention_kernel(n_heads: int, d: int, n_cand: int, scale: float, arch: str = "sm_90a",
                            block_n: int = BLOCK_N, stages: int = STAGES, design: str = "v1"):
    """The ``design`` kernel compiled for ``arch`` (cached per static shape, scale and knobs; the ws kernel takes the
    list length as a dynamic dimension, so ``n_cand`` does not enter its compile)."""
    from ._mhc_common import compile_kernel

    if design in ("ws", "wsp"):
        return _compile_ws(n_heads, d, float(scale), arch, block_n, stages, design == "wsp")
    return compile_kernel(sparse_attention_func(n_heads, d, n_cand, scale, block_n=block_n, stages=stages), arch)


@functools.lru_cache(maxsize=None)
def _compile_ws(n_heads: int, d: int, scale: float, arch: str, block_n: int, stages: int, persistent: bool):
    from ._mhc_common import compile_kernel
    from .sparse_attention_ws import sparse_attention_ws_func, sparse_attention_wsp_func

    build = sparse_attention_wsp_func if persistent else sparse_attention_ws_func
    return compile_kernel(build(n_heads, d, scale, block_n=block_n, stages=stages), arch)


def resolve_design(d: int, design: str | None = None, block_n: int | None = None, stages: int | None = None,
                   trim: bool = True) -> dict:
    """The knobs a launch runs with (None = the design's default), checked: ValueError / TypeError name the knob."""
    if design is None:
        design = DEFAULT_DESIGN if d % 128 == 0 else "v1"
    if design not in DESIGNS:
        raise ValueError(f"design: expected one of {DESIGNS}, got {design!r}")
    ws = design in ("ws", "wsp")
    block_n = (WS_BLOCK_N if ws else BLOCK_N) if block_n is None else block_n
    stages = (WS_STAGES if ws else STAGES) if stages is None else stages
    for k, v in (("block_n", block_n), ("stages", stages)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{k}: expected a positive int, got {v!r}")
    if block_n % 16:
        raise ValueError(f"block_n: expected a multiple of 16 (wgmma N / K step), got {block_n}")
    if not isinstance(trim, bool):
        raise TypeError(f"trim: expected a bool, got {type(trim).__name__}")
    if ws and d % 128:
        raise ValueError(f"q: the {design} design needs a head dim that is a multiple of 128 (two d/2 halves), got {d}")
    need = ws_smem_bytes(d, block_n, stages) if ws else smem_bytes(d, block_n=block_n, stages=stages)
    if need > SMEM_LIMIT:
        raise ValueError(f"stages: {design} with block_n={block_n}, stages={stages} needs {need} B of shared memory "
                         f"at d={d}, over the {SMEM_LIMIT} B limit")
    return {"design": design, "block_n": block_n, "stages": stages, "trim": trim}


def ws_smem_bytes(d: int, block_n: int, stages: int) -> int:
    from .sparse_attention_ws import smem_bytes as ws_bytes

    return ws_bytes(d, block_n, stages)


def chunks_per_token(idx: torch.Tensor, n_rows: int, block_n: int = BLOCK_N) -> torch.Tensor:
    """int32 [T]: chunks of ``block_n`` entries up to each list's last valid entry (at least 1)."""
    pos = torch.arange(1, idx.shape[1] + 1, device=idx.device, dtype=torch.int32)
    valid = (idx >= 0) & (idx < n_rows)
    end = torch.where(valid, pos, 0).amax(dim=1) if idx.shape[1] else idx.new_zeros(idx.shape[0], dtype=torch.int32)
    return ((end + block_n - 1) // block_n).clamp(min=1).to(torch.int32)


def _check_args(q, kv, idx, sink, scale) -> None:
    check_tensor("q", q, dtypes=(torch.bfloat16,), ndim=3)
    T_, H, d = q.shape
    check_tensor("kv", kv, dtypes=(torch.bfloat16,), shape=(None, d))
    check_tensor("idx", idx, dtypes=(torch.int64, torch.int32), shape=(T_, None))
    check_tensor("sink", sink, dtypes=ANY_FLOAT, shape=(H,))
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise TypeError(f"scale: expected a finite python float, got {scale!r}")
    if d % 64 or not 64 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q: the TileLang backend needs a head dim that is a multiple of 64 in [64, {MAX_HEAD_DIM}], "
                         f"got {d}")
    devices = {t.device for t in (q, kv, idx, sink)}
    if len(devices) != 1:
        raise ValueError(f"q, kv, idx, sink: expected one device, got {sorted(map(str, devices))}")
    chk.index_range("idx", idx, -1, kv.shape[0], "entries (rows of kv, -1 = masked)")
    if q.device.type != "cuda":
        raise ValueError(f"q: the TileLang backend needs CUDA tensors, got {q.device}")


def sparse_attention_with_sink(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """TileLang backend of ``sparse_attention``: ``o`` [T, H, d] bf16 (see the module docstring).

    Input contract: ``q`` [T, H, d] bf16 (d a multiple of 64, <= 512), ``kv`` [N, d] bf16 (K = V), ``idx`` [T, M]
    int32/int64 (-1 = masked; duplicates count twice), ``sink`` [H] float, ``scale`` a python float; CUDA tensors
    on one device (Hopper: the kernel is compiled for sm_90a).
    """
    _check_args(q, kv, idx, sink, scale)
    return launch(q, kv, idx, sink, scale)


def sparse_attention_launch(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float,
                            *, design: str | None = None, block_n: int | None = None, stages: int | None = None,
                            trim: bool = True) -> torch.Tensor:
    """``sparse_attention_with_sink`` with explicit knobs (``resolve_design``): ``design`` "v1" | "ws" | "wsp",
    ``block_n`` index entries per chunk, ``stages`` K tiles in flight, ``trim`` (walk each list only up to its last
    valid entry; False walks every chunk of every list)."""
    _check_args(q, kv, idx, sink, scale)
    knobs = resolve_design(q.shape[-1], design, block_n, stages, trim)
    return launch(q, kv, idx, sink, scale, **knobs)


def launch(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float, *,
           design: str | None = None, block_n: int | None = None, stages: int | None = None,
           trim: bool = True) -> torch.Tensor:
    """The launch after ``_check_args``: empty cases, operand layout (int32 idx, fp32 sink, contiguous), per-token
    chunk counts, then the compiled kernel ``(Q, KV, Idx, Sink, Chunks, O)``. Split out so CPU tests can run it
    with the kernel replaced by an emulation."""
    knobs = resolve_design(q.shape[-1], design, block_n, stages, trim)
    T_, H, d = q.shape
    N, M = kv.shape[0], idx.shape[1]
    out = torch.empty(T_, H, d, dtype=torch.bfloat16, device=q.device)
    if T_ == 0 or H == 0:
        return out
    if M == 0 or N == 0:        # no candidate anywhere: every output row is 0 (sink only, zero value vector)
        return out.zero_()
    q = q.contiguous()
    kv = kv.contiguous()
    idx = idx.to(torch.int32).contiguous()
    bn = knobs["block_n"]
    if knobs["trim"]:
        chunks = chunks_per_token(idx, N, bn)
    else:
        chunks = torch.full((T_,), -(-M // bn), dtype=torch.int32, device=idx.device)
    kernel = sparse_attention_kernel(H, d, M, float(scale), block_n=bn, stages=knobs["stages"],
                                     design=knobs["design"])
    args = (q, kv, idx, sink.float().contiguous(), chunks, out)
    if knobs["design"] == "wsp":        # persistent: the length of the last operand is the CTA count
        args += (torch.empty(persistent_ctas(T_ * -(-H // BLOCK_H), q.device), dtype=torch.int32, device=q.device),)
    kernel(*args)
    return out


def persistent_ctas(work_items: int, device: torch.device) -> int:
    """CTAs of the wsp design: one per SM (1 CTA fits per SM), at most one per work item."""
    sms = 132
    if device.type == "cuda":
        from ._mhc_common import sm_count

        sms = sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(work_items, sms))
