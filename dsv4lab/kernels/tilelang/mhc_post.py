"""TileLang mhc_post for Hopper (dsv4-layers.md 2.5): a pure streaming kernel.

    R'[t, k, :] = bf16( post[t, k] * f[t, :] + sum_j comb[t, j, k] * R[t, j, :] )        fp32 math

Output stream k gathers COLUMN k of comb (``comb^T @ R``). Grid ``(T, D / BLOCK_D)``: each block loads the
20 mixes of its token into shared memory, then every thread reads f and the 4 streams of R once for its
columns and writes the 4 output streams (18TD bytes in total, roofline row 3, no re-reads). T is a dynamic
dimension: one compile per D. The sum runs as ``post*f + (((c0 r0 + c1 r1) + c2 r2) + c3 r3)`` in fp32; the
reference's einsum may sum in another order, so results agree to about 1 bf16 ulp, not bitwise.
"""
# no `from __future__ import annotations`: TileLang reads the prim_func annotations in the builder's scope.
import functools

import torch

from . import _mhc_common as common

THREADS = 128


def block_columns(d: int) -> int:
    """Columns per block: 8 bf16 (one 16-byte vector) per thread, fewer when D is small."""
    for b in (1024, 512, 256):
        if d % b == 0:
            return b
    raise ValueError(f"d: expected a multiple of 256, got {d}")


@functools.lru_cache(maxsize=None)
def post_kernel(d: int, arch: str):
    """``post_func`` compiled for ``arch``."""
    return common.compile_kernel(post_func(d), arch)


@functools.lru_cache(maxsize=None)
def post_func(d: int):
    """TileLang prim_func of mhc_post for hidden size ``d`` (n = 4). Arguments: f [T, d] bf16, residual [T, 4, d] bf16,
    post [T, 4] fp32, comb [T, 4, 4] fp32, out [T, 4, d] bf16."""
    import tilelang.language as T

    n = common.HC_MULT
    bd = block_columns(d)
    num_tokens = T.dynamic("num_tokens")

    @T.prim_func
    def mhc_post_main(f: T.Tensor((num_tokens, d), "bfloat16"),
                      residual: T.Tensor((num_tokens, n, d), "bfloat16"),
                      post: T.Tensor((num_tokens, n), "float32"),
                      comb: T.Tensor((num_tokens, n, n), "float32"),
                      out: T.Tensor((num_tokens, n, d), "bfloat16")):
        with T.Kernel(num_tokens, d // bd, threads=THREADS) as (t, col):
            mix_s = T.alloc_shared((n + 1, n), "float32")   # rows 0..3: comb[j, :]; row 4: post
            for j, k in T.Parallel(n, n):
                mix_s[j, k] = comb[t, j, k]
            for k in T.Parallel(n):
                mix_s[n, k] = post[t, k]
            r_s = T.alloc_shared((n, bd), "bfloat16")
            f_s = T.alloc_shared((bd,), "bfloat16")
            o_s = T.alloc_shared((n, bd), "bfloat16")
            T.copy(residual[t, :, col * bd:(col + 1) * bd], r_s)
            T.copy(f[t, col * bd:(col + 1) * bd], f_s)
            for k, e in T.Parallel(n, bd):
                o_s[k, e] = T.cast(
                    mix_s[n, k] * T.cast(f_s[e], "float32")
                    + (((mix_s[0, k] * T.cast(r_s[0, e], "float32") + mix_s[1, k] * T.cast(r_s[1, e], "float32"))
                        + mix_s[2, k] * T.cast(r_s[2, e], "float32")) + mix_s[3, k] * T.cast(r_s[3, e], "float32")),
                    "bfloat16")
            T.copy(o_s, out[t, :, col * bd:(col + 1) * bd])

    return mhc_post_main


def mhc_post(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """hc_post on an SM90 GPU; same contract as ``reference.mhc.mhc_post``: returns R' [T, 4, D] bf16."""
    t, n, d = common.check_post_inputs(f, residual, post, comb)
    common.check_cuda_layout(f=f, residual=residual, post=post, comb=comb)
    out = torch.empty_like(residual)
    if t == 0:
        return out
    post_kernel(d, common.device_arch(residual.device))(f, residual, post, comb, out)
    return out
