"""Bitwise check of DeepGEMM's Hopper MegaMoE against the unfused chain with its arithmetic (issue #10), shared by
bench/pr44367_megamoe.py (mega phase, 1 GPU) and bench/pr44367_megamoe_ep.py (2 GPUs).

Per call, for each fast_math setting asked (default True and False): a fresh fused call, then
``unfused_like_mega`` (dsv4lab/kernels/deep_gemm/mega_moe_unfused.py) on the same staged inputs with ALL experts
the ids refer to, and three facts:
- ``bitwise_equal`` of the bf16 outputs (+ ulp_max, frac_equal, ulp histogram);
- ``intermediate_rows_found``: the fraction of our e4m3 intermediate rows (post SwiGLU x weight, per-64 quantised)
  found bitwise among the fused kernel's pool rows (``buffer.l2_acts``, read right after its call): 1.0 means
  L1 + SwiGLU + weight + quantisation agree bitwise, so any output difference comes from L2 or the combine;
- the fused kernel's template arguments from DeepGEMM's JIT cache (kReuseAccumAsFinal, kFP8SwapAB, BLOCK_M/N):
  the reuse-accumulator path is not expected to be bitwise (see the module docstring).
Every step in try/except: a failure becomes an "error" row and the caller goes on.
"""
from __future__ import annotations

import os
import traceback
from pathlib import Path

import torch


def jit_cache_dirs() -> list[str]:
    return [d for d in (os.environ.get("DG_JIT_CACHE_DIR"), str(Path.home() / ".deep_gemm")) if d]


def _kernel_config(hidden: int) -> dict:
    from dsv4lab.kernels.deep_gemm.mega_moe_unfused import fused_kernel_configs

    cfgs = [c for c in fused_kernel_configs(jit_cache_dirs()) if c.get("kHidden") == str(hidden)]
    if not cfgs:
        return {"fused_config": "not found in the JIT cache"}
    keys = ("BLOCK_M", "BLOCK_N", "kNumStages", "kNumEpilogueThreads", "kFastMath", "kReuseAccumAsFinal", "kFP8SwapAB",
            "kSplitPhaseHotPath", "kNumRanks", "kNumTopk", "kActivationClamp")
    return {"fused_config": {k: cfgs[0].get(k) for k in keys}, "fused_configs_seen": len(cfgs),
            "fused_act_sf_cols": _act_sf_cols(cfgs[0]),
            "fused_reuse_accum_any": sorted({c.get("kReuseAccumAsFinal") for c in cfgs}),
            "fused_swap_ab_any": sorted({c.get("kFP8SwapAB") for c in cfgs})}


def _act_sf_cols(cfg: dict) -> int | None:
    """Intermediate columns per quantisation scale in this fused configuration (cuh:258-292: the L1 epilogue's amax
    spans one warpgroup's BLOCK_N / split_N / 2 output columns, or 64 when two warpgroups share one scale).
    unfused_like_mega assumes 64."""
    try:
        bm, bn, nwg = int(cfg["BLOCK_M"]), int(cfg["BLOCK_N"]), int(cfg["kNumEpilogueThreads"]) // 128
    except (KeyError, ValueError):
        return None
    split_n = bm == 64 and nwg > 1 and bn % nwg == 0 and bn // nwg in (64, 128)
    split_mn = bm == 128 and bn == 256 and nwg == 4
    wg_out = bn // (nwg if split_n else (2 if split_mn else 1)) // 2
    return max(wg_out, 64)


def _sf_rows_found(mega, q_sf: torch.Tensor) -> float | str:
    """Fraction of our per-64 scale rows [R, I/64] found bitwise among the fused kernel's (``buffer.l2_acts_sf``,
    MN-major [I/64, pool] per the kernel's comment cuh:1910-1915; [pool, I/64] accepted too), or why not."""
    from dsv4lab.kernels.deep_gemm.mega_moe_unfused import rows_found_in

    try:
        sf = mega.buffer.l2_acts_sf
        cols = q_sf.shape[1]
        if sf.dim() != 2 or cols not in sf.shape:
            return f"l2_acts_sf shape {tuple(sf.shape)} not [I/64, pool] or [pool, I/64]"
        sf = sf.view(torch.float32) if sf.element_size() == 4 else sf
        pool = (sf.T if sf.shape[0] == cols and sf.shape[1] != cols else sf).contiguous()
        found = rows_found_in(q_sf.contiguous().view(torch.uint8), pool.view(torch.uint8))
        return float(found.float().mean()) if found.numel() else 1.0
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"[:300]


def check(mega, x_q: torch.Tensor, x_sf: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts, *,
          swiglu_limit: float, local_experts: tuple[int, int] | None = None, barrier=None,
          fast_maths: tuple[bool, ...] = (True, False)) -> tuple[list[dict], list[str]]:
    """``mega``: a MegaMoESM90; ``experts``: HopperExperts holding every expert the ids name (global ids).
    ``local_experts`` = (lo, hi): only slots routed to experts lo..hi-1 have their intermediate rows in THIS rank's
    pool (EP); None = all. ``barrier``: called before each fused call (EP: every rank calls it the same times).
    ``fast_maths``: the fused kernel's fast_math settings checked (False = one more JIT configuration of it).
    Returns (rows, summary lines); each row has variant, metric, unit, value and extra fields."""
    from dsv4lab.kernels.deep_gemm.mega_moe_unfused import rows_found_in, unfused_like_mega
    from dsv4lab.lab import numerics

    rows: list[dict] = []
    lines: list[str] = []
    for fast in fast_maths:
        extra = dict(vs="unfused_like_mega", fast_math=fast)
        stage = "fused_call"
        try:
            if barrier is not None:
                barrier()
            y_f = mega(x_q, x_sf, weights, ids, fast_math=fast)
            torch.cuda.synchronize()
            inter = mega.inter
            pool = mega.buffer.l2_acts.reshape(-1).view(torch.uint8)
            pool = pool[: pool.numel() // inter * inter].view(-1, inter).clone()
            stage = "unfused"
            y_u, mid = unfused_like_mega(x_q, x_sf, weights, ids, experts, swiglu_limit=swiglu_limit,
                                         fast_math=fast, return_intermediates=True)
            torch.cuda.synchronize()
            stage = "compare"
            ulps = numerics.ulp_diff(y_f, y_u)
            slot_rows = mid["layout"].row.reshape(-1)
            if local_experts is not None:
                flat_ids = ids.reshape(-1).long()
                slot_rows = slot_rows[(flat_ids >= local_experts[0]) & (flat_ids < local_experts[1])]
            found = rows_found_in(mid["q"].view(torch.uint8)[slot_rows], pool)   # fp8 gathered as bytes
            frac_found = float(found.float().mean()) if found.numel() else 1.0
            sf_found = _sf_rows_found(mega, mid["q_sf"][slot_rows])
            same = bool(torch.equal(y_f, y_u))
            stage = "config"
            cfg = _kernel_config(mega.hidden)
            ulp_max = int(ulps.max()) if ulps.numel() else 0
            rows.append(dict(variant="fp8_mega_moe_sm90", metric="bitwise_equal", unit="bool", value=same,
                             ulp_max=ulp_max, frac_equal=float((ulps == 0).float().mean()) if ulps.numel() else 1.0,
                             ulp_hist=numerics.ulp_histogram(ulps), intermediate_rows_found=frac_found,
                             intermediate_rows=int(found.numel()), intermediate_sf_rows_found=sf_found,
                             pool_shape=list(mega.buffer.l2_acts.shape), **extra, **cfg))
            rows.append(dict(variant="fp8_mega_moe_sm90", metric="intermediate_rows_found", unit="fraction",
                             value=frac_found, note="our e4m3 post-SwiGLU rows found bitwise in buffer.l2_acts",
                             **extra))
            reuse = cfg.get("fused_config", {}).get("kReuseAccumAsFinal") if isinstance(cfg.get("fused_config"),
                                                                                         dict) else None
            lines.append(f"  fused vs unfused_like_mega (fast_math={fast}): bitwise {same}, ulp_max {ulp_max}, "
                         f"intermediate rows found {frac_found:.3f} (scales {sf_found}), reuse_accum={reuse}, "
                         f"act_sf_cols={cfg.get('fused_act_sf_cols')}")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append(dict(variant="fp8_mega_moe_sm90", metric="error", unit=None, value=None, stage=stage,
                             message=f"{type(e).__name__}: {e}"[:3000], **extra))
            lines.append(f"  fused vs unfused_like_mega (fast_math={fast}): ERROR at {stage}: "
                         f"{type(e).__name__}: {str(e)[:160]}")
    return rows, lines


def smoke_cpu(x_q, x_sf, weights, ids, experts, *, swiglu_limit: float, grouped_gemm) -> tuple[list[dict], list[str]]:
    """CPU control-flow check (no fused kernel): the unfused chain with emulated GEMMs, ulps vs the grouped chain."""
    from dsv4lab.kernels.deep_gemm import grouped_moe as gm
    from dsv4lab.kernels.deep_gemm.mega_moe_unfused import unfused_like_mega
    from dsv4lab.lab import numerics
    from dsv4lab.quant import dequant_fp8

    def l1(a, a_sf, b, b_sf_rows):
        return dequant_fp8(a, a_sf, 128) @ (b.float() * b_sf_rows.repeat_interleave(128, dim=1)).T

    try:
        y_u = unfused_like_mega(x_q, x_sf, weights, ids, experts, swiglu_limit=swiglu_limit, fast_math=False,
                                l1_gemm=l1, l2_gemm=grouped_gemm, alignment=8)
        y_g = gm.experts_forward(dequant_fp8(x_q, x_sf, 128).bfloat16(), weights, ids, experts,
                                 swiglu_limit=swiglu_limit, x_quant=(x_q, x_sf), grouped_gemm=grouped_gemm,
                                 alignment=8)
        ulps = numerics.ulp_diff(y_u, y_g)
        return ([dict(variant="unfused_like_mega", metric="ulp_max", unit="ulp", value=int(ulps.max()),
                      vs="grouped_fp8 (cpu smoke: emulated GEMMs, no fused kernel)")],
                [f"  unfused_like_mega (cpu smoke) vs grouped chain: ulp_max {int(ulps.max())}"])
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return ([dict(variant="unfused_like_mega", metric="error", unit=None, value=None, stage="cpu_smoke",
                      message=f"{type(e).__name__}: {e}"[:3000])], [f"  unfused_like_mega cpu smoke ERROR: {e}"])
