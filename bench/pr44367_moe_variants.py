"""#44367 / issue #10: MoE design variants on Hopper, one H100 shot (records -> <out>/pr44367_megamoe.jsonl).

    python bench/pr44367_moe_variants.py --out $OUT [--budget 100] [--gemv-tokens 1,4,8] [--gemm-tokens 8192]
    python bench/pr44367_moe_variants.py --out $OUT --warmup-only     # JIT-compile every variant first (fresh machine)
    python bench/pr44367_moe_variants.py --smoke-cpu                  # control flow on a CPU (toy dims, interpreter)

Also run from bench/pr44367_megamoe.py (after its gemv phase and its T=8192 case; compiled in its --warmup-only).

Phase A, decode (Flash, T in --gemv-tokens): where the time of the Triton GEMV path goes and which launch configuration
(triton/moe_gemv.GemvConfig) is fastest. All CUDA-graph replays with an L2 flush, timed interleaved
(lab.timing.bench_interleaved) so drift lands on every case alike:
  stage_*      each kernel of the chain alone: x quantisation (torch quant_fp8 vs Triton act_quant_fp8), gate/up
               (+SwiGLU-quant), down, combine
  gemv_cfg_*   the whole chain from bf16 x for each config: torchq (today's gemv_fp8_graph), tritonq (act_quant_fp8
               first), fused (x quantised inside the gate/up kernel), + fp8 MMA, split-K of gate/up, warps/stages,
               down block; masked_torchq / masked_tritonq: the DeepGEMM masked path with each x quantisation
  numerics per chain: bitwise vs gemv_cfg_torchq, ulp histogram, max |diff| / max |y| vs torchq and vs masked.
  touched-weight bandwidth (% of measured copy bandwidth; target >= 50 %); each chain also timed alone with the L2
  flushed by a read (metric time_read_flush: no dirty-line write-back in the timing). Summary lines "gemvcfg ...".
Phase B, prefill (Flash, T in --gemm-tokens): the two grouped fp8 GEMMs alone (no permute / SwiGLU / combine in the
time), cuda events + L2 flush, interleaved, each on its own layout built outside the timing:
  contig_a128        today's contiguous layout (groups padded to 128 rows; scales K-major, DeepGEMM transposes per call)
  contig_a128_sfmn   the same with the activation scales pre-transposed once (get_mn_major_tma_aligned_tensor)
  contig_a64         mk alignment 64 (set_mk_alignment_for_contiguous_layout: fewer padding rows, block_m <= 64)
  contig_psum        use_psum_layout=True (grouped_layout = per-group end rows, no m_indices)
  masked_em{192,256} the masked kernel, M_max = largest group, expected_m hint
  TFLOP/s on useful FLOPs (6 T k D I + 6 T D I S), also with the padded rows; % of measured fp8 peak (target 60 %);
  numerics: every slot's output row vs contig_a128 (bitwise / max |diff|), on the first 512 tokens.
Each case in its own try/except: a failure is a metric="error" record and the run goes on.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import pr44367_megamoe as mm  # noqa: E402

NUMERICS_TOKENS = 512


def gemv_configs() -> dict:
    """name -> (GemvConfig, x quantisation 'torch' | 'triton' | 'fused')."""
    from dsv4lab.kernels.triton.moe_gemv import GemvConfig

    f = dict(fuse_x_quant=True)
    return {
        "torchq": (GemvConfig(), "torch"),
        "tritonq": (GemvConfig(), "triton"),
        "fused": (GemvConfig(**f), "fused"),
        "fused_fp8": (GemvConfig(**f, fp8_dot=True), "fused"),
        "fused_sk2": (GemvConfig(**f, split_k=2), "fused"),
        "fused_sk4": (GemvConfig(**f, split_k=4), "fused"),
        "fused_sk8": (GemvConfig(**f, split_k=8), "fused"),
        "fused_fp8_sk4": (GemvConfig(**f, fp8_dot=True, split_k=4), "fused"),
        "fused_w8s4": (GemvConfig(**f, gate_warps=8, gate_stages=4), "fused"),
        "fused_dn32": (GemvConfig(**f, down_block_n=32), "fused"),
        "fused_dn128": (GemvConfig(**f, down_block_n=128), "fused"),
        "fused_fp8_s4_dn32": (GemvConfig(**f, fp8_dot=True, gate_stages=4, down_stages=4, down_block_n=32), "fused"),
    }


def _timed(cases: dict, graph: bool, rep: int) -> dict:
    """Interleaved timings on CUDA (a case failing alone is dropped by the caller first); cpu-clock otherwise."""
    from dsv4lab.lab import timing

    if mm.DEVICE != "cuda":
        return {k: timing.bench(fn, warmup=0, rep=1) for k, fn in cases.items()}
    try:
        return timing.bench_interleaved(cases, warmup=3, rep=rep, graph=graph)
    except Exception as e:  # noqa: BLE001  (one case that cannot be captured): each alone, failures dropped
        print(f"bench_interleaved failed ({type(e).__name__}: {e}); timing each case alone", flush=True)
        times = {}
        for k, fn in cases.items():
            try:
                times[k] = timing.bench(fn, graph=graph, warmup=3, rep=rep)
            except Exception as e2:  # noqa: BLE001
                print(f"  {k}: {type(e2).__name__}: {e2}", flush=True)
        return times


def _agreement(y, ref) -> dict:
    from dsv4lab.lab import numerics

    ulps = numerics.ulp_diff(y, ref)
    scale = float(ref.float().abs().max()) or 1.0
    return dict(bitwise=bool(torch.equal(y, ref)), ulp_max=int(ulps.max()) if ulps.numel() else 0,
                frac_equal=float((ulps == 0).float().mean()), frac_le1ulp=float((ulps <= 1).float().mean()),
                max_abs_diff_rel=float((y.float() - ref.float()).abs().max()) / scale,
                ulp_hist={str(u): int((ulps == u).sum()) for u in (0, 1, 2, 3)} | {">3": int((ulps > 3).sum())})


# ---- phase A: decode GEMV configs ----------------------------------------------------------------------------------
def gemv_config_phase(run, state, preset: str, tokens, peaks, warm_only: bool = False) -> None:
    from dsv4lab.kernels.deep_gemm import grouped_moe as gm
    from dsv4lab.kernels.triton import moe_gemv as mg
    from dsv4lab.kernels.triton.act_quant_fp8 import act_quant_fp8
    from dsv4lab.kernels.triton.moe_masked_layout import combine_rows
    from dsv4lab.lab import timing
    from dsv4lab.quant import quant_fp8

    experts, common, L = state["experts"], state["common"], mm.L
    ex_args = (experts.w13, experts.w13_sf, experts.w2, experts.w2_sf)
    configs = gemv_configs()
    for t in tokens:
        if run.left() < 8:
            run.rec("moe_experts", "triton", "gemv_cfg", preset, t, "bfloat16", "skipped", None, None,
                    reason=f"time budget: {run.left():.0f}s left", **common)
            continue
        x, _, w, ids = mm.inputs(state, t, seed=t)
        w32, ids_c = w.float().contiguous(), ids.contiguous()
        kw = dict(n_routed=experts.n_routed, swiglu_limit=L, validate_ids=False)
        n_touched = int(torch.unique(ids).numel()) + experts.n_shared_groups
        weight_bytes = n_touched * experts.bytes_per_group()

        def rec(variant, metric, unit, value, backend="triton", **extra):
            run.rec("moe_experts", backend, variant, preset, t, "bfloat16", metric, unit, value, **common, **extra)

        def chain(cfg, xq):
            if xq == "fused":
                return lambda: mg.moe_gemv_x(x, w32, ids_c, *ex_args, config=cfg, **kw)
            quant = (lambda: quant_fp8(x, 128, pow2=True)) if xq == "torch" else (lambda: act_quant_fp8(x))

            def fn():
                x_q, x_sf = quant()
                return mg.moe_gemv(x_q.contiguous(), x_sf.contiguous(), w32, ids_c, *ex_args, config=cfg, **kw)
            return fn

        cases, outs, meta = {}, {}, {}
        for name, (cfg, xq) in configs.items():
            try:
                mg.check_config(cfg, experts.hidden, experts.inter)
            except ValueError as e:   # e.g. split_k 4 on the toy dims of --smoke-cpu
                rec(f"gemv_cfg_{name}", "skipped", None, None, reason=str(e), config=cfg.as_dict())
                continue
            try:
                fn = chain(cfg, xq)
                t1 = time.perf_counter()
                outs[name] = fn()
                mm.sync()
                rec(f"gemv_cfg_{name}", "first_call_s", "s", time.perf_counter() - t1, config=cfg.as_dict(),
                    x_quant=xq, note="includes Triton JIT compilation")
                cases[name], meta[name] = fn, dict(config=cfg.as_dict(), x_quant=xq)
            except Exception as e:  # noqa: BLE001
                run.error("moe_experts", "triton", f"gemv_cfg_{name}", preset, t, e, config=cfg.as_dict(), **common)
        for name, xq in (("masked_torchq", None), ("masked_tritonq", "triton")):
            try:
                fn = (lambda xq=xq: gm.experts_forward(x, w, ids, experts, swiglu_limit=L, layout="masked",
                                                       validate_ids=False,
                                                       x_quant=act_quant_fp8(x) if xq else None))
                outs[name] = fn()
                mm.sync()
                cases[name], meta[name] = fn, dict(x_quant=xq or "torch", layout="masked")
            except Exception as e:  # noqa: BLE001
                run.error("moe_experts", "deep_gemm", f"gemv_cfg_{name}", preset, t, e, **common)
        # stages of today's chain (default config), each alone
        stages = {}
        try:
            x_q, x_sf = quant_fp8(x, 128, pow2=True)
            x_q, x_sf = x_q.contiguous(), x_sf.contiguous()
            scratch = mg.gate_up_swiglu(x_q, x_sf, ids_c, experts.w13, experts.w13_sf, experts.n_routed, L)
            out = mg.down_proj(scratch, ids_c, experts.w2, experts.w2_sf, experts.n_routed)
            fused_cfg = mg.GemvConfig(fuse_x_quant=True)
            stages = {
                "stage_xquant_torch": lambda: quant_fp8(x, 128, pow2=True),
                "stage_xquant_triton": lambda: act_quant_fp8(x),
                "stage_gate_up": lambda: mg.gate_up_swiglu(x_q, x_sf, ids_c, experts.w13, experts.w13_sf,
                                                           experts.n_routed, L),
                "stage_gate_up_fused_xq": lambda: mg.gate_up_swiglu(None, None, ids_c, experts.w13, experts.w13_sf,
                                                                    experts.n_routed, L, fused_cfg, x=x),
                "stage_down": lambda: mg.down_proj(scratch, ids_c, experts.w2, experts.w2_sf, experts.n_routed),
                "stage_combine": lambda: combine_rows(out, scratch.rows, w32, x.dtype, check_rows=False),
            }
            for fn in stages.values():
                fn()
            mm.sync()
            xq_ok = torch.equal(act_quant_fp8(x)[0].view(torch.uint8), x_q.view(torch.uint8)) and \
                torch.equal(act_quant_fp8(x)[1], x_sf)
            rec("stage_xquant_triton", "bitwise_equal", "bool", xq_ok, vs="quant_fp8 (torch)")
        except Exception as e:  # noqa: BLE001
            run.error("moe_experts", "triton", "gemv_stages", preset, t, e, **common)
            stages = {}
        if warm_only:
            continue
        # numerics of every chain vs today's gemv chain and vs the masked path
        base, masked = outs.get("torchq"), outs.get("masked_torchq")
        for name, y in outs.items():
            for ref_name, ref in (("gemv_cfg_torchq", base), ("masked_torchq", masked)):
                if ref is not None and ref is not y:
                    rec(f"gemv_cfg_{name}", "agreement", "1", None, vs=ref_name, **_agreement(y, ref), **meta[name])
        try:
            times = _timed({**cases, **stages}, graph=True, rep=30)
        except Exception as e:  # noqa: BLE001
            run.error("moe_experts", "triton", "gemv_cfg_timing", preset, t, e, **common)
            times = {}
        parts = []
        for name, tm in times.items():
            is_stage = name.startswith("stage_")
            variant = name if is_stage else f"gemv_cfg_{name}"
            backend = "deep_gemm" if name.startswith("masked") else "triton"
            rec(variant, "time", "us", tm.p50, backend=backend, p20=tm.p20, p80=tm.p80, timing_mode=tm.mode,
                **meta.get(name, {}))
            if is_stage:
                parts.append(f"{name[6:]} {tm.p50:.1f}")
                continue
            pct = 100 * weight_bytes / (tm.p50 * 1e-6) / peaks.copy_bw if peaks else None
            rec(variant, "touched_weight_bandwidth", "TB/s", weight_bytes / (tm.p50 * 1e-6) / 1e12, backend=backend,
                pct_of_copy_peak=pct, weight_bytes=weight_bytes, touched_groups=n_touched, time_us=tm.p50,
                target="decode (T<=64): >= 50% of measured copy bandwidth",
                target_met=(pct >= 50) if pct is not None else None, **meta.get(name, {}))
            parts.append(f"{name} {tm.p50:.1f} ({pct or 0:.0f}%)")
            if mm.DEVICE == "cuda":   # the memset flush leaves dirty L2 lines whose write-back lands in the timing
                try:
                    tr = timing.bench(cases[name], graph=True, warmup=3, rep=30, flush_kind="read")
                    rec(variant, "time_read_flush", "us", tr.p50, backend=backend, p20=tr.p20, p80=tr.p80,
                        timing_mode=tr.mode, note="L2 flushed by a read (clean lines)", **meta.get(name, {}))
                except Exception as e:  # noqa: BLE001
                    run.error("moe_experts", backend, variant, preset, t, e, stage="read-flush timing", **common)
        run.lines.append(f"  gemvcfg {preset} T={t} us (% BW): " + ", ".join(p for p in parts if "(" in p))
        chains = {n: tm.p50 for n, tm in times.items() if not n.startswith("stage_")}
        if chains:
            best = min(chains, key=chains.get)
            agree = _agreement(outs[best], masked) if masked is not None else {}
            run.lines.append(f"  gemvcfg {preset} T={t} BEST {best} {chains[best]:.1f} us "
                             f"({100 * weight_bytes / (chains[best] * 1e-6) / peaks.copy_bw if peaks else 0:.0f}% BW) "
                             f"vs torchq {chains.get('torchq', float('nan')):.1f} us; vs masked: max|diff|/max|y| "
                             f"{agree.get('max_abs_diff_rel', float('nan')):.2e}, <=1 ulp "
                             f"{agree.get('frac_le1ulp', float('nan')):.3f}")
        run.lines.append(f"  gemvcfg {preset} T={t} stages us: " + ", ".join(p for p in parts if "(" not in p))
        bad = [n for n in outs if n in ("tritonq", "fused") and base is not None and not torch.equal(outs[n], base)]
        if bad:
            run.lines.append(f"  gemvcfg {preset} T={t}: NOT bitwise vs torchq (expected equal): {bad}")
        run.flush()


# ---- phase B: the grouped GEMMs alone at prefill T -----------------------------------------------------------------
def _contiguous_operands(experts, x_q, x_sf, w, ids, alignment: int, limit: float):
    from dsv4lab.kernels.deep_gemm import grouped_moe as gm
    from dsv4lab.kernels.triton.swiglu_quant import swiglu_quant

    groups, _ = gm.slot_table(w, ids, experts.n_routed, experts.n_shared_groups)
    lay = gm.plan_contiguous(groups, experts.n_groups, alignment)
    a, a_sf = gm.gather_rows(x_q, x_sf, lay)
    gate_up = gm.deep_gemm_grouped(a, a_sf, experts.w13, experts.w13_sf, lay.m_indices)
    h, h_sf = swiglu_quant(gate_up, limit, lay.m_indices)
    return lay, a, a_sf, h, h_sf


def gemm_variant_phase(run, state, preset: str, t: int, peaks, warm_only: bool = False) -> None:
    from dsv4lab.kernels.deep_gemm import grouped_moe as gm
    from dsv4lab.kernels.triton import moe_masked_layout as ml
    from dsv4lab.kernels.triton.swiglu_quant import swiglu_quant
    from dsv4lab.quant import quant_fp8

    experts, common, L = state["experts"], state["common"], mm.L
    d, inter, k = state["spec"]["D"], state["spec"]["I"], state["spec"]["k"]
    if run.left() < 25:
        run.rec("moe_experts", "deep_gemm", "gemms_variants", preset, t, "bfloat16", "skipped", None, None,
                reason=f"time budget: {run.left():.0f}s left", **common)
        return
    x, _, w, ids = mm.inputs(state, t, seed=t)
    x_q, x_sf = quant_fp8(x, 128, pow2=True)
    useful = 6 * t * k * d * inter + 6 * t * d * inter * experts.n_shared_groups
    n_num = min(t, NUMERICS_TOKENS)

    def rec(variant, metric, unit, value, **extra):
        run.rec("moe_experts", "deep_gemm", f"gemms_{variant}", preset, t, "bfloat16", metric, unit, value,
                **common, **extra)

    cases, rows_computed, slot_rows, outs, opts = {}, {}, {}, {}, {}

    def add(name, fn, computed_rows, rows_of_slots, **options):
        """Run once (JIT), keep the output rows of the first n_num tokens' slots for the numerics."""
        t1 = time.perf_counter()
        out = fn()
        mm.sync()
        rec(name, "first_call_s", "s", time.perf_counter() - t1, note="includes DeepGEMM JIT", **options)
        flat = out.reshape(-1, out.shape[-1])
        outs[name] = flat[rows_of_slots[:n_num].reshape(-1).long().clamp_min(0)].clone()
        cases[name], rows_computed[name], slot_rows[name], opts[name] = fn, computed_rows, rows_of_slots, options

    dg = None
    try:
        dg = gm._deep_gemm()
    except Exception as e:  # noqa: BLE001
        run.error("moe_experts", "deep_gemm", "gemms_import", preset, t, e, **common)
    align0 = gm.mk_alignment()
    # today's contiguous layout, and the same with the activation scales pre-transposed once
    try:
        lay, a, a_sf, h, h_sf = _contiguous_operands(experts, x_q, x_sf, w, ids, align0, L)

        def contig(a_sf=a_sf, h_sf=h_sf):
            gm.deep_gemm_grouped(a, a_sf, experts.w13, experts.w13_sf, lay.m_indices)
            return gm.deep_gemm_grouped(h, h_sf, experts.w2, experts.w2_sf, lay.m_indices)
        add(f"contig_a{align0}", contig, lay.num_rows, lay.row, alignment=align0)
        if dg is not None and hasattr(dg, "get_mn_major_tma_aligned_tensor"):
            a_mn, h_mn = dg.get_mn_major_tma_aligned_tensor(a_sf), dg.get_mn_major_tma_aligned_tensor(h_sf)
            add(f"contig_a{align0}_sfmn", lambda: contig(a_mn, h_mn), lay.num_rows, lay.row, alignment=align0,
                scales="MN-major TMA-aligned, transposed once outside the timing")
    except Exception as e:  # noqa: BLE001   (a, h stay alive: the timed closures use them)
        run.error("moe_experts", "deep_gemm", "gemms_contig", preset, t, e, **common)
    # masked: M_max = largest routed group (shared slices chunked to M_max), expected_m hints
    try:
        m_max = ml.prefill_m_max(ids, experts.n_routed)
        mlay = ml.plan_masked(ids.contiguous(), experts.n_routed, experts.n_shared_groups, m_max, validate=False)
        mex = gm.masked_experts(experts, mlay.shared_chunks)
        ma, ma_sf, mrows = ml.scatter_masked(x_q.contiguous(), x_sf.contiguous(), ids.contiguous(), mlay)
        g_all = ma.shape[0]
        computed = int(mlay.masked_m.sum())
        for em in (192, 256):
            gate_up = gm.deep_gemm_masked(ma, ma_sf, mex.w13, mex.w13_sf, mlay.masked_m, em)
            mh, mh_sf = swiglu_quant(gate_up.view(g_all * m_max, -1), L, rows=mrows, group_rows=m_max)
            del gate_up

            def masked(em=em, mh=mh, mh_sf=mh_sf):
                gm.deep_gemm_masked(ma, ma_sf, mex.w13, mex.w13_sf, mlay.masked_m, em)
                return gm.deep_gemm_masked(mh.view(g_all, m_max, -1), mh_sf, mex.w2, mex.w2_sf, mlay.masked_m, em)
            add(f"masked_em{em}", masked, computed, mrows, m_max=m_max, expected_m=em,
                rows_note="rows = valid rows; DeepGEMM computes ceil(masked_m / block_m) blocks per group")
    except Exception as e:  # noqa: BLE001
        run.error("moe_experts", "deep_gemm", "gemms_masked", preset, t, e, **common)
    # riskier calls last (a CUDA fault is sticky): psum layout, then alignment 64
    if f"contig_a{align0}" in cases:
        # psum layout: grouped_layout[g] = end row of group g (groups start at block-aligned rows, as laid out here)
        ends = (lay.starts + lay.counts).to(torch.int32).contiguous()

        def psum():
            fn = dg.m_grouped_fp8_gemm_nt_contiguous
            g1 = torch.empty((a.shape[0], experts.w13.shape[1]), dtype=torch.bfloat16, device=a.device)
            fn((a, a_sf), (experts.w13, experts.w13_sf), g1, ends, use_psum_layout=True)
            out = torch.empty((h.shape[0], experts.w2.shape[1]), dtype=torch.bfloat16, device=a.device)
            fn((h, h_sf), (experts.w2, experts.w2_sf), out, ends, use_psum_layout=True)
            return out
        if dg is not None:
            try:
                add("contig_psum", psum, lay.num_rows, lay.row, alignment=align0, grouped_layout="psum ends")
            except Exception as e:  # noqa: BLE001
                run.error("moe_experts", "deep_gemm", "gemms_contig_psum", preset, t, e, **common)
    # alignment 64: fewer padding rows (each group padded to 64)
    if dg is not None and hasattr(dg, "set_mk_alignment_for_contiguous_layout"):
        try:
            try:   # DeepGEMM's own block-M / alignment choice for these mean group sizes (information only)
                theo = {m: int(dg.get_theoretical_mk_alignment_for_contiguous_layout(m)) for m in (64, 192, 256)}
                rec("contig_a64", "theoretical_mk_alignment", "rows", None, by_expected_m=theo)
            except Exception as e:  # noqa: BLE001
                run.error("moe_experts", "deep_gemm", "gemms_theoretical_alignment", preset, t, e, **common)
            dg.set_mk_alignment_for_contiguous_layout(64)
            lay64, a64, a64_sf, h64, h64_sf = _contiguous_operands(experts, x_q, x_sf, w, ids, 64, L)

            def contig64():   # the alignment is global state the kernel choice reads at each call: set it around
                dg.set_mk_alignment_for_contiguous_layout(64)
                try:
                    gm.deep_gemm_grouped(a64, a64_sf, experts.w13, experts.w13_sf, lay64.m_indices)
                    return gm.deep_gemm_grouped(h64, h64_sf, experts.w2, experts.w2_sf, lay64.m_indices)
                finally:
                    dg.set_mk_alignment_for_contiguous_layout(align0)
            add("contig_a64", contig64, lay64.num_rows, lay64.row, alignment=64)
        except Exception as e:  # noqa: BLE001
            run.error("moe_experts", "deep_gemm", "gemms_contig_a64", preset, t, e, **common)
        finally:
            dg.set_mk_alignment_for_contiguous_layout(align0)
    if warm_only or not cases:
        return
    base_name = f"contig_a{align0}"
    for name, o in outs.items():
        if name != base_name and base_name in outs:
            ref = outs[base_name]
            rec(name, "agreement", "1", None, vs=f"gemms_{base_name}", numerics_tokens=n_num,
                bitwise=bool(torch.equal(o, ref)),
                max_abs_diff_rel=float((o.float() - ref.float()).abs().max()) / (float(ref.float().abs().max()) or 1))
    try:
        times = _timed(cases, graph=False, rep=10)
    except Exception as e:  # noqa: BLE001
        run.error("moe_experts", "deep_gemm", "gemms_timing", preset, t, e, **common)
        times = {}
    parts = []
    for name, tm in times.items():
        rows = rows_computed[name]
        padded = 2 * rows * 2 * inter * d + 2 * rows * d * inter
        tflops = useful / (tm.p50 * 1e-6) / 1e12
        pct = 100 * tflops * 1e12 / peaks.fp8_flops if peaks and peaks.fp8_flops else None
        rec(name, "time", "us", tm.p50, p20=tm.p20, p80=tm.p80, timing_mode=tm.mode, rows=rows, **opts[name])
        rec(name, "tflops", "TFLOP/s", tflops, pct_of_fp8_peak=pct, flops=useful, rows=rows,
            tflops_incl_padding=padded / (tm.p50 * 1e-6) / 1e12, flops_incl_padding=padded,
            target="Flash T=8192: >= 60% of measured fp8 matmul peak" if t == 8192 else None,
            target_met=(pct >= 60) if (t == 8192 and pct is not None) else None, **opts[name])
        parts.append(f"{name} {tm.p50:.0f} us {tflops:.0f} TF/s ({pct or 0:.0f}%) rows {rows}")
    run.lines.append(f"  gemms {preset} T={t}: " + "; ".join(parts))
    run.flush()


# ---- standalone --------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out")
    ap.add_argument("--budget", type=float, default=100.0)
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--gemv-tokens", default="1,4,8")
    ap.add_argument("--gemm-tokens", default="8192")
    ap.add_argument("--warmup-only", action="store_true")
    ap.add_argument("--smoke-cpu", action="store_true")
    args = ap.parse_args()
    if args.smoke_cpu:
        ns = argparse.Namespace()
        mm._smoke_cpu_setup(ns)
        args.preset, args.gemm_tokens = "toy", ""
    elif not torch.cuda.is_available():
        print("bench/pr44367_moe_variants.py needs a CUDA GPU (--smoke-cpu checks the control flow).")
        return 2
    os.environ.setdefault("DSV4LAB_GPU_RANGE_CHECKS", "0")
    os.environ.setdefault("DG_JIT_CACHE_DIR", str(Path(__file__).resolve().parents[1] / "build" / "deep_gemm_jit"))
    out = Path(args.out) / f"{mm.EXPERIMENT}.jsonl"
    run = mm.Run(out, args.budget)
    peaks = None if args.smoke_cpu else mm.load_or_measure_peaks(run)
    state = mm.build_preset(run, args.preset)
    run.flush()
    gemv_tokens = [int(v) for v in args.gemv_tokens.split(",") if v.strip()]
    gemm_tokens = [int(v) for v in args.gemm_tokens.split(",") if v.strip()]
    if gemv_tokens:
        gemv_config_phase(run, state, args.preset, gemv_tokens, peaks, warm_only=args.warmup_only)
        print(f"[{run.elapsed():6.1f}s] gemv configs done", flush=True)
    for t in gemm_tokens:
        gemm_variant_phase(run, state, args.preset, t, peaks, warm_only=args.warmup_only)
        print(f"[{run.elapsed():6.1f}s] gemm variants T={t} done", flush=True)
    run.flush()
    print(f"\n{mm.EXPERIMENT} (variants): {len(run.recs)} records -> {out}  ({run.elapsed():.1f} s)")
    for line in run.lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
