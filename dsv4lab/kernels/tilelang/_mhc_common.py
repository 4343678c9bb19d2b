"""Shared pieces of the TileLang mHC kernels: input contracts, compilation, launch heuristics.

The mHC kernels (``mhc_pre``, ``mhc_post``, ``mhc_fused_post_pre``, ``hc_head``) take the same arguments as
their references in ``dsv4lab.kernels.reference.mhc`` and check them here, BEFORE tilelang is imported or any
kernel is compiled or launched: wrong type/dtype -> TypeError, wrong shape/device/layout -> ValueError, each
naming the argument. TileLang is imported lazily (``compile_kernel``), so ``import dsv4lab`` never needs it.

Compilation: one kernel per (builder, static shape, flags), cached in-process (``functools.lru_cache``) and on
disk by TileLang (``~/.tilelang/cache``). The token count T and the split-K count are dynamic dimensions of
every kernel, so one compile serves all T. Without a GPU, ``compile_kernel(..., arch="sm_90a")`` still runs
nvcc and yields a cubin (the compile tests do this); the kernels cannot run on a CPU.
"""
from __future__ import annotations

import functools
import math

import torch

from dsv4lab.kernels.reference import _checks as chk
from dsv4lab.kernels.reference.mhc import check_mix_params  # noqa: F401  (the launchers' shared contract)

HC_MULT = 4            # the kernels are written for n = 4 residual streams (every DSv4 config)
ALIGN_BYTES = 16       # kernels use 16-byte vector loads / TMA; every tensor base must be 16-byte aligned
DIM_MULTIPLE = 256     # D must be a multiple of this (prenorm GEMM K-chunk 64 x 4 streams, post tile 256)
_F32 = (torch.float32,)
_BF16 = (torch.bfloat16,)
NORM_WEIGHT_DTYPES = (torch.bfloat16, torch.float32)

# Launch heuristics; the bench may override them (e.g. TUNING["tokens_per_block_max"] = 1).
TUNING = {
    "gemm_block_tokens": "auto",  # token tile of the prenorm GEMM: 64 | 128 | "auto" (gemm_block_tokens())
    "gemm_bt128_min_tokens": 4096,  # "auto": 128-token tiles for the 24-mix GEMM from this T on
    "gemm_stages": 4,             # TMA pipeline depth of the prenorm GEMM
    "gemm_min_chunks": 2,         # fewest K-chunks (64 each) a split-K block handles, so its pipeline overlaps
    "blocks_per_sm": 1,           # the GEMM runs 1 block per SM (warp-specialised, 255 registers at launch)
    "tokens_per_block_max": 16,   # epilogue: tokens per block at large T (one thread per token does Sinkhorn)
    "epilogue_blocks_per_sm": 8,  # epilogue: aim for this many blocks per SM before packing tokens
    "max_splits": 32,             # split-K bound (the first run's value; <= mhc_pre.MAX_SPLITS)
    "epilogue": "auto",           # "v2": splits reduced for all the block's tokens at once; "v1": token by token;
    "v2_max_splits": 4,           # "auto": v2 up to this many splits (large T), else v1

    "fused": "post_then_pre",     # mhc_fused_post_pre: "post_then_pre" (mhc_post kernel + mhc_pre) or "v1"
    # one-pass cluster design (_mhc_onepass): "two_pass" (the kernels above) or "one_pass" for mhc_pre,
    # mhc_fused_post_pre and hc_head; the bench times both (variant "design:<name>") and records the default
    # Designs of mhc_pre / mhc_fused_post_pre / hc_head ("design"):
    #   "two_pass":   split-K prenorm GEMM over all T, then the epilogue re-reads R (18TD bytes at large T);
    #   "one_pass":   _mhc_onepass, a cluster of CTAs holds a token tile's R in shared memory (10TD bytes, one
    #                 launch; fn re-streamed from L2 per tile); falls back to two_pass where D does not split;
    #   "l2_chunked": two_pass per chunk of ``l2_chunk_mb`` of residual, so the epilogue's re-read (and, in the
    #                 fused op, the pre half's read of the new residual) hits L2: 10TD / 20TD from HBM;
    #   "auto":       one_pass for T <= onepass_max_tokens, l2_chunked when T spans > 1 chunk, else two_pass.
    # The bench times every design (variant "design:<name>") and records which one is the default.
    #   "small_t":    (issue #6, opt-in) for T <= ``small_t_max_tokens``: an FMA split-K projection over 128-element
    #                 K slices (_mhc_overlap.small_proj) + the "v3" epilogue (Sinkhorn on warp 0 overlapped with the
    #                 collapse); mhc_pre and the pre half of the fused op only (hc_head: two_pass). Above: two_pass.
    "design": "two_pass",
    "small_t_max_tokens": 32,      # small_t: the largest T it handles (then two_pass)
    # mhc_pre epilogue (issue #6; default since the H100 run at 42be99d, see gemm_block_tokens()): True = "v3"
    # (_mhc_overlap: one CTA per token, Sinkhorn lane-parallel on warp 0 while warps 1-7 collapse) in two_pass /
    # l2_chunked; False = TUNING["epilogue"] (v1 / v2, the default before)
    "overlap_epilogue": True,
    "onepass_cluster": 8,          # CTAs per cluster (D split); 8 = the portable maximum
    "onepass_block_tokens": 0,     # tokens per cluster; 0 = auto (32 for D <= 4096, else 16)
    "onepass_max_tokens": 256,     # "auto": one_pass up to this T
    "l2_chunk_mb": 16,             # l2_chunked: residual bytes per chunk (H100 L2: 50 MB, two partitions)
}
DESIGNS = ("two_pass", "one_pass", "l2_chunked", "auto", "small_t")
ONEPASS_CHUNK = 128    # K step of the one-pass projection: D / cluster must be a multiple of it


def onepass_cluster(d: int) -> int | None:
    """CTAs per cluster for hidden size ``d``: TUNING["onepass_cluster"], halved until D / cluster is a multiple of
    ONEPASS_CHUNK; None (one_pass unavailable) below 2."""
    c = TUNING["onepass_cluster"]
    while c >= 2:
        if d % (c * ONEPASS_CHUNK) == 0:
            return c
        c //= 2
    return None


GEMM_TILES = (64, 128)   # token tiles the prenorm GEMM is built with (wgmma M = 64 per warpgroup step)


def gemm_block_tokens(tokens: int, n_mix: int) -> int:
    """Token tile of the prenorm GEMM launched over ``tokens`` tokens with ``n_mix`` rows of fn.

    TUNING["gemm_block_tokens"] 64 or 128 forces a tile; "auto" (default) is the per-T winner of the H100 design
    sweep at commit 42be99d (data/results/h100/pr43905_mhc_direct.jsonl, graph replay / CUDA events p50, v3
    epilogue both ways): 128 from ``gemm_bt128_min_tokens`` (4096) on for the 24-mix GEMM of mhc_pre and the
    fused op's pre half -- Flash mhc_pre 127.4 vs 135.4 us at T = 4096, 427.2 vs 486.0 at 16384; Pro 206.8 vs
    226.9 and 752.5 vs 846.8 -- and 64 below: at T = 1024 the 128 tile lost on Flash mhc_pre (124.0 vs 115.9 us)
    and tied elsewhere (Pro pre 121.3 both; fused 253.3 / 253.5, 227.3 / 228.9), at T <= 256 a 128-row tile is
    mostly padding. T between 1024 and 4096 was not measured. hc_head's 4-mix GEMM keeps 64 (not swept)."""
    forced = TUNING["gemm_block_tokens"]
    if forced != "auto":
        if forced not in GEMM_TILES:
            raise ValueError(f"TUNING['gemm_block_tokens']: expected one of {GEMM_TILES} or 'auto', got {forced!r}")
        return forced
    return 128 if n_mix == (2 + HC_MULT) * HC_MULT and tokens >= TUNING["gemm_bt128_min_tokens"] else 64


def chunk_tokens(d: int) -> int:
    """l2_chunked: tokens per chunk, ``l2_chunk_mb`` of residual (8 D bytes each), a multiple of the forced GEMM
    token tile, or of the smallest one under "auto" (16 MB chunks, 512 Flash / 256 Pro tokens, get 64)."""
    forced = TUNING["gemm_block_tokens"]
    tile = forced if forced != "auto" else min(GEMM_TILES)
    return max(tile, int(TUNING["l2_chunk_mb"] * 2 ** 20) // (8 * d) // tile * tile)


def design_for(tokens: int, d: int) -> str:
    """The design the launchers use for T = ``tokens``, hidden size ``d`` (see TUNING["design"])."""
    design = TUNING["design"]
    if design not in DESIGNS:
        raise ValueError(f"TUNING['design']: expected one of {DESIGNS}, got {design!r}")
    if design == "auto":
        if tokens <= TUNING["onepass_max_tokens"]:
            design = "one_pass"
        else:
            design = "l2_chunked" if tokens > chunk_tokens(d) else "two_pass"
    if design == "small_t" and tokens > TUNING["small_t_max_tokens"]:
        return "two_pass"
    if design == "one_pass" and onepass_cluster(d) is None:
        return "two_pass"
    if design == "l2_chunked" and tokens <= chunk_tokens(d):
        return "two_pass"   # one chunk: identical launches
    return design


# ---- input contract ---------------------------------------------------------------------------------------
def check_cuda_layout(**tensors: torch.Tensor | None) -> torch.device:
    """All tensors on one device, contiguous, 16-byte aligned, and that device a CUDA GPU (checked last, so
    the layout checks can be exercised on a CPU). Raises ValueError naming the argument; None is skipped."""
    chk.same_device(**tensors)
    present = {name: x for name, x in tensors.items() if x is not None}
    for name, x in present.items():
        if not x.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor, got strides {tuple(x.stride())} for shape "
                             f"{tuple(x.shape)} (call .contiguous() first)")
        if x.numel() and x.data_ptr() % ALIGN_BYTES:
            raise ValueError(f"{name}: expected a {ALIGN_BYTES}-byte aligned data pointer (TMA / vector loads), "
                             f"got address {x.data_ptr():#x} (a view at an odd offset? call .clone())")
    name, first = next(iter(present.items()))
    if first.device.type != "cuda":
        raise ValueError(f"{name}: expected a CUDA tensor (the TileLang kernel runs on an SM90 GPU), "
                         f"got device {first.device}")
    return first.device


def check_residual(residual: torch.Tensor) -> tuple[int, int, int]:
    """residual: bf16 [T, 4, D] with D a multiple of 256; returns (T, n, D)."""
    chk.tensor("residual", residual, _BF16, dim=3)
    t, n, d = residual.shape
    if n != HC_MULT:
        raise ValueError(f"residual: expected hc_mult = {HC_MULT} streams (shape [T, {HC_MULT}, D]), "
                         f"got shape {tuple(residual.shape)}")
    if d == 0 or d % DIM_MULTIPLE:
        raise ValueError(f"residual: expected D a positive multiple of {DIM_MULTIPLE}, got D = {d}")
    return t, n, d


def check_norm_weight(norm_weight: torch.Tensor | None, d: int) -> None:
    if norm_weight is None:
        return
    chk.tensor("norm_weight", norm_weight, NORM_WEIGHT_DTYPES, dim=1)
    chk.shape("norm_weight", norm_weight, (d,))


def check_pre_scalars(rms_eps, hc_eps, post_mult, sinkhorn_iters) -> tuple[float, float, float, int]:
    return (chk.positive_float("rms_eps", rms_eps), chk.positive_float("hc_eps", hc_eps),
            chk.positive_float("post_mult", post_mult), chk.positive_int("sinkhorn_iters", sinkhorn_iters))


def check_post_inputs(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor,
                      comb: torch.Tensor) -> tuple[int, int, int]:
    t, n, d = check_residual(residual)
    chk.tensor("f", f, _BF16, dim=2)
    chk.shape("f", f, (t, d))
    chk.tensor("post", post, _F32, dim=2)
    chk.shape("post", post, (t, n))
    chk.tensor("comb", comb, _F32, dim=3)
    chk.shape("comb", comb, (t, n, n))
    return t, n, d


# ---- compilation ------------------------------------------------------------------------------------------
def device_arch(device: torch.device | None = None) -> str:
    """nvcc arch of ``device`` ('sm_90a' on Hopper: wgmma/TMA need the 'a' variant); 'sm_90a' without a GPU."""
    if not torch.cuda.is_available():
        return "sm_90a"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}" + ("a" if major == 9 else "")


def compile_kernel(prim_func, arch: str, pass_configs: tuple = ()):
    """``tilelang.compile`` for a CUDA target (tvm_ffi execution backend: the launch uses torch's current
    stream, so the kernels can be captured in CUDA graphs). Outputs are allocated by the launchers.
    ``pass_configs``: (key, value) pairs (a tuple, so callers can cache on it)."""
    import tilelang

    if pass_configs:
        return tilelang.compile(prim_func, target={"kind": "cuda", "arch": arch}, pass_configs=dict(pass_configs))
    return tilelang.compile(prim_func, target={"kind": "cuda", "arch": arch})


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# ---- launch heuristics ------------------------------------------------------------------------------------
def split_k(tokens: int, n_chunks: int, sms: int, max_splits: int, block_tokens: int = 64) -> int:
    """Number of split-K blocks per token tile (``block_tokens`` tokens) for the prenorm GEMM: enough blocks to
    fill ``sms`` SMs, a divisor of ``n_chunks`` (every split gets the same K range), at most ``max_splits``,
    each split at least ``gemm_min_chunks`` chunks long."""
    tiles = math.ceil(tokens / block_tokens)
    want = min(max_splits, max(1, (sms * TUNING["blocks_per_sm"]) // max(tiles, 1)))
    best = 1
    for s in range(1, n_chunks + 1):
        if n_chunks % s == 0 and s <= want and n_chunks // s >= TUNING["gemm_min_chunks"]:
            best = s
    return best


def tokens_per_block(tokens: int, sms: int) -> int:
    """Epilogue tokens per block: 1 until there are ``epilogue_blocks_per_sm`` blocks per SM, then more
    (each token's Sinkhorn runs on its own thread, so packing tokens hides its latency at large T)."""
    per = tokens // max(1, sms * TUNING["epilogue_blocks_per_sm"])
    return max(1, min(TUNING["tokens_per_block_max"], per))


def comb_sinkhorn_macro(n: int, sinkhorn_iters: int, hc_eps: float):
    """T.macro ``comb_sinkhorn(mix, tx, scale, base, c, stat)``: token ``tx``'s comb matrix into ``c`` (flat,
    row-major, fp32, n x n) from its raw projections ``mix[tx, 2n:]`` (x the token's rsqrt RMS in ``stat[1]``,
    x ``scale[2]``, + ``base``): a row softmax + hc_eps (the first row pass), then Sinkhorn column, (row, column) x (iters - 1)
    passes, each dividing by (sum + hc_eps), in the reference's order (dsv4-layers.md 2.3). ``stat[0]``,
    ``stat[2]``, ``stat[3]`` are scratch. Shared by the two-pass epilogue (mhc_pre) and the one-pass kernels."""
    import tilelang.language as T

    @T.macro
    def comb_sinkhorn(mix, tx, scale, base, c, stat):
        for j in T.unroll(n):  # row softmax + eps (the first row pass)
            stat[2] = -T.infinity("float32")
            for k in T.unroll(n):
                c[j * n + k] = mix[tx, 2 * n + j * n + k] * stat[1] * scale[2] + base[2 * n + j * n + k]
                stat[2] = T.max(stat[2], c[j * n + k])
            stat[3] = 0.0
            for k in T.unroll(n):
                c[j * n + k] = T.exp(c[j * n + k] - stat[2])
                stat[3] += c[j * n + k]
            stat[3] = 1.0 / stat[3]
            for k in T.unroll(n):
                c[j * n + k] = c[j * n + k] * stat[3] + hc_eps
        # then columns, (rows, columns) x (iters - 1): passes alternate, the last is a column pass
        for p in T.serial(2 * sinkhorn_iters - 1):
            if p % 2 == 0:
                for k in T.unroll(n):
                    stat[0] = hc_eps
                    for j in T.unroll(n):
                        stat[0] += c[j * n + k]
                    stat[0] = 1.0 / stat[0]
                    for j in T.unroll(n):
                        c[j * n + k] *= stat[0]
            else:
                for j in T.unroll(n):
                    stat[0] = hc_eps
                    for k in T.unroll(n):
                        stat[0] += c[j * n + k]
                    stat[0] = 1.0 / stat[0]
                    for k in T.unroll(n):
                        c[j * n + k] *= stat[0]

    return comb_sinkhorn
