"""#44367 / MoE fast path on Hopper (H100 script, one shot, records -> <out>/pr44367_megamoe.jsonl).

    python bench/pr44367_megamoe.py --out $OUT [--budget 140] [--presets flash,pro] [--tokens 1,16,64,256,1024,4096,8192]
    python bench/pr44367_megamoe.py --out $OUT --warmup-only --budget 550     # first, on a fresh machine (JIT)

Phases (each case in its own try/except: a failure becomes a metric="error" record and the run goes on; records are
appended after every phase so a killed run keeps what it measured; a case that would start after ``--budget``
seconds is recorded as metric="skipped"):

1. per preset (Flash D=4096 I=2048 E=256 k=6; Pro 7168/3072/384/6): MXFP4 experts generated from N(0, 1/K) weights,
   converted ONCE to 128x128 e4m3 (inexact/flushed element counts recorded), shared expert appended as groups.
   E_local < E only if GPU memory is short (recorded on every record).
2. #44367 on the GPU (Flash, E_local experts): before vs after modules with the grouped DeepGEMM kernel -> bitwise;
   host overhead of probe / fixed-cost / DeepGEMM kernels; CUDA-graph replay (fixed-cost kernel) before vs after.
3. sweep over T: router (Triton vs reference: ids, weights ulps, time); grouped path end to end (first call = JIT,
   then cuda-events with L2 flush), the two grouped GEMMs alone (TFLOP/s, % of measured fp8 peak), SwiGLU-quant,
   HBM bytes per touched expert and achieved bandwidth over the touched experts' weights (% of measured copy
   bandwidth), the eager reference MoE (moe_fp4) and the speedup, numerics vs the fp64 oracle (lab.numerics.compare;
   for T > 1024 on the first 512 tokens). Targets recorded, not asserted: GEMMs >= 60% of the fp8 peak at T=8192
   (Flash); decode (T <= 64) >= 50% of copy bandwidth on the touched weights.
3b. layouts (same sweep, per T): contiguous_fp8 vs masked_fp8 end to end (bitwise vs each other and vs the launcher
   default grouped_fp8, which follows grouped_moe.LAYOUT_POLICY: masked at T <= 64), touched-weight bandwidth
   (TB/s, pct_of_copy_peak); T <= 64: masked_fp8_graph (CUDA-graph replay, no host sync); T in {4096, 8192}: masked
   with expected_m = mean / 64 / 128 (masked_fp8, masked_fp8_em64, masked_fp8_em128). Summary lines "layouts ...".
   After the first (decode) T of each preset: the Triton GEMV path at --gemv-tokens (default 1,4,8) with the policy
   overridden (gemv_fp8 eager, gemv_fp8_graph and masked_fp8_graph_vs_gemv replayed; bandwidth; ulps vs masked).
   Summary lines "gemv ...".
4. MegaMoE: fp8_fp4_mega_moe -> "unavailable" (SM100 only); Hopper fp8_mega_moe on a world-size-1 NCCL group
   (multicast/NVLS off): timings + numerics, or the exact error the library raises (metric "error", with stage).
   Per T also bitwise vs ``unfused_like_mega`` (issue #10; bench/mega_unfused_check.py): metric "bitwise_equal"
   vs="unfused_like_mega" for fast_math True (and False at the largest T), ulp_max, the fraction of our e4m3 intermediate rows found
   bitwise in the fused kernel's buffer.l2_acts, and the fused kernel's JIT template arguments (kReuseAccumAsFinal).
DeepGEMM JIT-compiles each new kernel configuration at first use (NVCC; --nvrtc sets DG_JIT_USE_NVRTC=1); the
first-call times are recorded so compile time never lands in a timing. A second run on a warm machine reuses the
JIT cache (~/.deep_gemm or DG_JIT_CACHE_DIR).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

EXPERIMENT = "pr44367_megamoe"
PRESETS = {"flash": dict(D=4096, I=2048, E=256, k=6, rsf=1.5), "pro": dict(D=7168, I=3072, E=384, k=6, rsf=2.5),
           "toy": dict(D=256, I=128, E=8, k=2, rsf=1.5)}      # toy: --smoke-cpu only
TOKENS = (1, 16, 64, 256, 1024, 4096, 8192)
NUMERICS_TOKENS = 512          # T > 1024: numerics on the first 512 tokens (per-token math is independent)
L = 10.0                       # swiglu_limit
DEVICE = "cuda"                # "cpu" only with --smoke-cpu (control-flow check, emulated grouped GEMM)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class Run:
    """Records, the output file, the time budget and the printed summary."""

    def __init__(self, out: Path, budget: float):
        from dsv4lab.lab import results

        self.results, self.out, self.budget, self.t0 = results, out, budget, time.perf_counter()
        self.recs: list[dict] = []
        self.pending: list[dict] = []
        self.lines: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    def rec(self, op, backend, variant, preset, tokens, dtype, metric, unit, value, **extra) -> dict:
        r = self.results.record(EXPERIMENT, op, backend, variant, preset, tokens, dtype, metric, unit, value, **extra)
        self.pending.append(r)
        return r

    def add(self, recs: list[dict]) -> None:
        self.pending.extend(recs)

    def error(self, op, backend, variant, preset, tokens, err: BaseException, **extra) -> None:
        msg = f"{type(err).__name__}: {err}"[:3000]
        self.rec(op, backend, variant, preset, tokens, None, "error", None, None, message=msg, **extra)
        self.lines.append(f"  ERROR {op}/{variant} {preset} T={tokens}: {msg[:160]}")
        traceback.print_exc()

    def flush(self) -> None:
        if self.pending:
            self.results.append(self.out, self.pending)
            self.recs.extend(self.pending)
            self.pending = []


# ---- set-up ---------------------------------------------------------------------------------------------------
def load_or_measure_peaks(run: Run):
    from dsv4lab.lab import roofline

    try:
        p = roofline.load_peaks()
        if p is not None:
            return p
    except Exception as e:  # noqa: BLE001
        print("load_peaks failed:", e)
    p = roofline.measure_peaks()
    run.add(p.to_records())
    return p


def e_local_for(spec: dict) -> int:
    """All experts if they fit: fp4 (0.53 B/param) + fp8 copy (1 B/param) + 30% slack + 10 GiB for activations."""
    per_expert = 3 * spec["D"] * spec["I"] * (0.5 + 1 / 32 + 1.0) * 1.3
    if DEVICE != "cuda":
        return spec["E"]
    free, _ = torch.cuda.mem_get_info()
    fit = int((free - 10 * 2**30) // per_expert)
    e = spec["E"]
    while e > fit and e > spec["k"]:
        e //= 2
    return max(e, spec["k"])


def build_preset(run: Run, preset: str):
    """Weights (MXFP4), shared expert (fp8-exact), gate + bias, converted experts; records conversion stats."""
    from dsv4lab.kernels.deep_gemm import grouped_moe as gm
    from dsv4lab.quant import fp8_roundtrip
    from dsv4lab.refactors.pr44367_megamoe import make_weights

    spec = PRESETS[preset]
    d, inter, e = spec["D"], spec["I"], e_local_for(spec)
    t = time.perf_counter()
    weights = make_weights(e, d, inter, device=DEVICE, seed=0)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    shared = tuple(fp8_roundtrip(torch.randn(r, c, generator=g, device=DEVICE) / c ** 0.5, (128, 128))
                   for r, c in ((inter, d), (inter, d), (d, inter)))
    gate = torch.randn(e, d, generator=g, device=DEVICE) / d ** 0.5
    bias = 8.08 + 0.05 * torch.randn(e, generator=g, device=DEVICE)
    sync()
    t_gen = time.perf_counter() - t
    t = time.perf_counter()
    experts = gm.prepare_experts(*weights, shared=shared)
    sync()
    t_conv = time.perf_counter() - t
    common = dict(E_local=e, E=spec["E"], D=d, I=inter)
    run.rec("moe_experts", "deep_gemm", "fp4_to_fp8_conversion", preset, None, "float8_e4m3fn", "setup_time", "s",
            t_conv, generate_s=t_gen, **common)
    for name, st in experts.stats.items():
        run.rec("moe_experts", "deep_gemm", "fp4_to_fp8_conversion", preset, None, "float8_e4m3fn",
                "conversion_inexact", "count", st.inexact, **st.as_dict(), **common)
    inexact = sum(s.inexact for s in experts.stats.values())
    run.lines.append(f"{preset}: E_local={e}/{spec['E']}, generate {t_gen:.1f}s, convert {t_conv:.1f}s, "
                     f"inexact fp4->fp8 elements {inexact}")
    return dict(spec=spec, e=e, weights=weights, shared=shared, gate=gate, bias=bias, experts=experts, common=common)


def routed_only(experts):
    """A view of the converted experts without the shared groups (what MegaMoE computes)."""
    from dsv4lab.kernels.deep_gemm.grouped_moe import HopperExperts

    e = experts.n_routed
    return HopperExperts(experts.w13[:e], experts.w13_sf[:e], experts.w2[:e], experts.w2_sf[:e], e, 0, experts.stats)


def inputs(state, t: int, seed: int):
    from dsv4lab.kernels.reference.moe import route

    g = torch.Generator(device=DEVICE).manual_seed(1000 + seed)
    x = torch.randn(t, state["spec"]["D"], generator=g, device=DEVICE).to(torch.bfloat16)
    logits = x.float() @ state["gate"].T
    w, ids = route(logits, k=state["spec"]["k"], routed_scaling_factor=state["spec"]["rsf"], bias=state["bias"])
    return x, logits, w, ids


# ---- phase 2: #44367 before/after on the GPU -----------------------------------------------------------------
def refactor_phase(run: Run, state, preset: str) -> None:
    from dsv4lab.refactors import pr44367_megamoe as pr

    spec = state["spec"]
    routed = routed_only(state["experts"])                               # converted once, shared by all modules
    x, _, w, ids = inputs(state, 64, seed=7)
    case = pr.Case(preset, spec["D"], spec["I"], state["e"], spec["k"], L, state["weights"], x, w, ids)
    common = dict(op="moe_experts", preset=preset, dtype="bfloat16", E_local=state["e"])
    try:
        mb, ma = pr.modules_for(case, "deep_gemm", n_redundant=2, prepared=routed)
        yb = pr.before(mb, x, w, ids, L)
        ya = pr.after(ma, x, w, ids, L)
        same = bool(torch.equal(yb, ya))
        run.rec(backend="deep_gemm", variant="after_vs_before", tokens=64, metric="bitwise_equal", unit="bool",
                value=same, eplb_load_equal=bool(torch.equal(mb.eplb.expert_load_view, ma.eplb.expert_load_view)),
                **common)
        run.lines.append(f"#44367 GPU before==after bitwise (deep_gemm kernel, T=64): {same}")
    except Exception as e:  # noqa: BLE001
        run.error("moe_experts", "deep_gemm", "after_vs_before", preset, 64, e)
    x1, _, w1, ids1 = inputs(state, 1, seed=8)
    case1 = pr.Case(preset, spec["D"], spec["I"], state["e"], spec["k"], L, state["weights"], x1, w1, ids1)
    for kernel, n in (("probe", 20000), ("fixed", 2000), ("deep_gemm", 200)):
        try:
            recs, delta = pr.host_overhead_records(case1, kernel, DEVICE, n, rounds=3,
                                                   prepared=routed if kernel == "deep_gemm" else None)
            run.add(recs)
            run.lines.append(f"#44367 host overhead {kernel:>9}: before-after = {delta * 1e3:8.1f} ns/call")
        except Exception as e:  # noqa: BLE001
            run.error("moe_experts", kernel, "host_overhead", preset, 1, e)
    try:
        recs = pr.graph_replay_records(case1, DEVICE)
        run.add(recs)
        b, a = (r["value"] for r in recs if r["metric"] == "time")
        run.lines.append(f"#44367 CUDA-graph replay (fixed kernel): before {b:.2f} us, after {a:.2f} us")
    except Exception as e:  # noqa: BLE001
        run.error("moe_experts", "fixed", "graph_replay", preset, 1, e)


# ---- phase 3: the sweep --------------------------------------------------------------------------------------
def sweep_case(run: Run, state, preset: str, t: int, peaks) -> None:
    from dsv4lab.kernels.deep_gemm import grouped_moe as gm
    from dsv4lab.kernels.reference.moe import moe_fp4, route
    from dsv4lab.kernels.triton.moe_routing import route as route_triton
    from dsv4lab.kernels.triton.swiglu_quant import swiglu_quant
    from dsv4lab.lab import numerics, roofline, timing
    from dsv4lab.quant import quant_fp8
    from dsv4lab.refactors.pr44367_megamoe import fp8_chain, oracle64

    spec, experts, common = state["spec"], state["experts"], state["common"]
    d, inter, k = spec["D"], spec["I"], spec["k"]
    x, logits, w, ids = inputs(state, t, seed=t)
    rec = lambda op, backend, variant, metric, unit, value, **kw: run.rec(  # noqa: E731
        op, backend, variant, preset, t, kw.pop("dtype", "bfloat16"), metric, unit, value, **common, **kw)
    row = {"preset": preset, "T": t}

    # router: Triton vs reference
    try:
        wt, it = route_triton(logits, k=k, routed_scaling_factor=spec["rsf"], bias=state["bias"])
        ov = numerics.topk_overlap(ids, it)
        rec("moe_routing", "triton", "vs_reference", "ids_rows_equal", "1", ov.rows_equal, dtype="float32")
        rec("moe_routing", "triton", "vs_reference", "weights_ulp_max", "ulp",
            int(numerics.ulp_diff(wt, w).max()) if t else 0, dtype="float32")
        cost = roofline.cost("moe_routing", T=t, E=state["e"], k=k)
        for backend, fn in (("reference", lambda: route(logits, k=k, routed_scaling_factor=spec["rsf"], bias=state["bias"])),
                            ("triton", lambda: route_triton(logits, k=k, routed_scaling_factor=spec["rsf"], bias=state["bias"]))):
            tm = timing.bench(fn, rep=20)
            run.add([tm.to_record(cost=cost, peaks=peaks, experiment=EXPERIMENT, op="moe_routing", backend=backend,
                                  variant=backend, preset=preset, tokens=t, dtype="float32", **common)])
            row[f"route_{backend}_us"] = tm.p50
    except Exception as e:  # noqa: BLE001
        run.error("moe_routing", "triton", "sweep", preset, t, e)

    # grouped path: first call (JIT), end to end, stages
    def ours():
        return gm.experts_forward(x, w, ids, experts, swiglu_limit=L)

    try:
        t1 = time.perf_counter()
        y = ours()
        sync()
        rec("moe_experts", "deep_gemm", "grouped_fp8", "first_call_s", "s", time.perf_counter() - t1,
            note="includes DeepGEMM/Triton JIT compilation of new configurations", layout=gm.layout_for(t))
        tm = timing.bench(ours, warmup=3, rep=20 if t <= 1024 else 10)
        cost = roofline.cost("moe_experts", T=t, D=d, I=inter, E=state["e"], k=k, n_shared=1)
        r = tm.to_record(cost=cost, peaks=peaks, experiment=EXPERIMENT, op="moe_experts", backend="deep_gemm",
                         variant="grouped_fp8", preset=preset, tokens=t, dtype="bfloat16", **common)
        run.add([r])
        row["ours_us"], row["ours_pct_roofline"] = tm.p50, r.get("pct_of_peak")

        # touched experts' weights (this format: e4m3 + fp32 block scales) and the bandwidth over them
        n_touched = int(torch.unique(ids).numel()) + experts.n_shared_groups
        weight_bytes = n_touched * experts.bytes_per_group()
        bw = weight_bytes / (tm.p50 * 1e-6)
        pct_bw = 100 * bw / peaks.copy_bw if peaks else None
        rec("moe_experts", "deep_gemm", "grouped_fp8", "hbm_bytes_per_touched_expert", "B", experts.bytes_per_group(),
            table_fp4_bytes=3 * d * inter * (0.5 + 1 / 32), touched_groups=n_touched)
        rec("moe_experts", "deep_gemm", "grouped_fp8", "touched_weight_bandwidth", "TB/s", bw / 1e12,
            pct_of_copy_peak=pct_bw, weight_bytes=weight_bytes, touched_groups=n_touched, time_us=tm.p50,
            target="decode (T<=64): >= 50% of measured copy bandwidth" if t <= 64 else None,
            target_met=(pct_bw >= 50) if (t <= 64 and pct_bw is not None) else None)
        row["touched_TBps"], row["touched_pct"] = bw / 1e12, pct_bw

        # the two grouped GEMMs alone, on this case's layout
        x_q, x_sf = quant_fp8(x, 128, pow2=True)
        groups, slot_w = gm.slot_table(w, ids, experts.n_routed, experts.n_shared_groups)
        layout = gm.plan_contiguous(groups, experts.n_groups, gm.mk_alignment())
        a, a_sf = gm.gather_rows(x_q, x_sf, layout)
        gate_up = gm.deep_gemm_grouped(a, a_sf, experts.w13, experts.w13_sf, layout.m_indices)
        h, h_sf = swiglu_quant(gate_up, L, layout.m_indices)

        def gemms():
            gm.deep_gemm_grouped(a, a_sf, experts.w13, experts.w13_sf, layout.m_indices)
            gm.deep_gemm_grouped(h, h_sf, experts.w2, experts.w2_sf, layout.m_indices)

        tg = timing.bench(gemms, warmup=3, rep=20)
        m = layout.num_rows
        useful = 6 * t * k * d * inter + 6 * t * d * inter * experts.n_shared_groups
        padded = 2 * m * 2 * inter * d + 2 * m * d * inter
        tflops = useful / (tg.p50 * 1e-6) / 1e12
        pct_fp8 = 100 * tflops * 1e12 / peaks.fp8_flops if peaks and peaks.fp8_flops else None
        rec("moe_experts", "deep_gemm", "grouped_gemms_only", "time", "us", tg.p50, p20=tg.p20, p80=tg.p80,
            timing_mode=tg.mode, rows=m, padding_rows=int((layout.m_indices < 0).sum()))
        rec("moe_experts", "deep_gemm", "grouped_gemms_only", "tflops", "TFLOP/s", tflops,
            tflops_incl_padding=padded / (tg.p50 * 1e-6) / 1e12, pct_of_fp8_peak=pct_fp8, flops=useful,
            flops_incl_padding=padded,
            target="Flash T=8192: >= 60% of measured fp8 matmul peak" if (preset == "flash" and t == 8192) else None,
            target_met=(pct_fp8 >= 60) if (preset == "flash" and t == 8192 and pct_fp8 is not None) else None)
        row["gemm_TFLOPs"], row["gemm_pct_fp8"] = tflops, pct_fp8
        ts = timing.bench(lambda: swiglu_quant(gate_up, L, layout.m_indices), warmup=3, rep=20)
        run.add([ts.to_record(cost=roofline.OpCost("swiglu_quant", 0, 6 * m * inter, m * 2 * inter * 2 + m * inter
                                                    + 4 * m * inter // 128),
                              peaks=peaks, experiment=EXPERIMENT, op="swiglu_quant", backend="triton",
                              variant="fused", preset=preset, tokens=t, dtype="bfloat16", rows=m, **common)])
        del a, a_sf, gate_up, h, h_sf
    except Exception as e:  # noqa: BLE001
        run.error("moe_experts", "deep_gemm", "grouped_fp8", preset, t, e)
        return

    layout_case(run, state, preset, t, x, w, ids, y, peaks, row)
    run.flush()

    # eager reference (moe_fp4, fp32) and numerics vs the fp64 oracle
    n_num = t if t <= 1024 else NUMERICS_TOKENS
    if run.left() < 10:
        run.rec("moe_experts", "deep_gemm", "numerics", preset, t, "bfloat16", "skipped", None, None,
                reason=f"time budget: {run.left():.0f}s left", **common)
        run.lines.append(_row_text(row))
        return
    try:
        ref_num = moe_fp4(x[:n_num], w[:n_num], ids[:n_num], *state["weights"], swiglu_limit=L, shared=state["shared"])
        y64 = oracle64(x[:n_num], w[:n_num], ids[:n_num], *state["weights"], swiglu_limit=L, shared=state["shared"])
        c = numerics.compare(y64, ref_num, y[:n_num])
        run.add(c.to_records(experiment=EXPERIMENT, op="moe_experts", backend="deep_gemm", variant="grouped_fp8",
                             preset=preset, tokens=t, numerics_tokens=n_num, eager_variant="reference_moe_fp4_fp32",
                             note="fused uses fp8 activations (x and h, 1x128); eager is fp32 throughout", **common))
        row["rel_rms"], row["ref_rel_rms"] = c.rel_rms, c.eager_rel_rms
        chain = fp8_chain(x[:n_num], w[:n_num], ids[:n_num], experts, swiglu_limit=L)
        c8 = numerics.compare(y64, chain, y[:n_num])
        run.add(c8.to_records(experiment=EXPERIMENT, op="moe_experts", backend="deep_gemm", variant="grouped_fp8",
                              preset=preset, tokens=t, numerics_tokens=n_num, eager_variant="fp8_chain_unfused",
                              note="eager = the same fp8 recipe unfused in torch: err_ratio ~1 expected", **common))
        row["ratio_vs_chain"] = c8.err_ratio
        del y64, ref_num, chain
    except Exception as e:  # noqa: BLE001
        run.error("moe_experts", "reference", "numerics", preset, t, e)
    est = 4.0 if t >= 4096 else 1.5
    if run.left() < est + 20:
        run.rec("moe_experts", "reference", "eager_moe_fp4", preset, t, "bfloat16", "skipped", None, None,
                reason=f"time budget: {run.left():.0f}s left", **common)
        return
    try:
        tr = timing.bench(lambda: moe_fp4(x, w, ids, *state["weights"], swiglu_limit=L, shared=state["shared"]),
                          warmup=1, rep=2 if t >= 4096 else 3)
        run.add([tr.to_record(experiment=EXPERIMENT, op="moe_experts", backend="reference", variant="eager_moe_fp4",
                              preset=preset, tokens=t, dtype="bfloat16", **common)])
        rec("moe_experts", "deep_gemm", "grouped_fp8", "speedup_vs_eager_reference", "x", tr.p50 / row["ours_us"],
            reference_us=tr.p50, ours_us=row["ours_us"])
        row["ref_us"], row["speedup"] = tr.p50, tr.p50 / row["ours_us"]
    except Exception as e:  # noqa: BLE001
        run.error("moe_experts", "reference", "eager_moe_fp4", preset, t, e)
    finally:
        run.lines.append(_row_text(row))


# ---- layouts: masked vs contiguous (decode path, prefill options) ---------------------------------------------
LAYOUT_OPTION_TOKENS = (4096, 8192)      # T where every layout option is recorded (prefill)


def layout_options(t: int, k: int, n_routed: int) -> dict[str, dict]:
    """experts_forward keyword sets recorded at this T: both layouts always; at prefill T also the masked kernel with
    DeepGEMM's block hint expected_m at the mean routed group, 64 and 128 (block_m 64 wastes no rows at ~192/expert)."""
    opts = {"contiguous_fp8": dict(layout="contiguous"), "masked_fp8": dict(layout="masked")}
    if t in LAYOUT_OPTION_TOKENS:
        opts["masked_fp8"]["expected_m"] = max(1, -(-t * k // n_routed))
        opts["masked_fp8_em64"] = dict(layout="masked", expected_m=64)
        opts["masked_fp8_em128"] = dict(layout="masked", expected_m=128)
    return opts


def layout_case(run: Run, state, preset: str, t: int, x, w, ids, y_default, peaks, row: dict) -> None:
    """Each layout option end to end (cuda events + L2 flush, as grouped_fp8), bitwise vs the contiguous output and
    vs the launcher default; the touched-weight bandwidth (unique routed experts + shared groups, e4m3 weights + fp32
    block scales of both GEMMs, in TB/s and % of measured copy bandwidth); at T <= 64 also the masked path replayed
    as a CUDA graph (validate_ids=False: no host sync), the number a graph-captured decode step sees."""
    from dsv4lab.kernels.deep_gemm import grouped_moe as gm
    from dsv4lab.lab import timing

    experts, common, k = state["experts"], state["common"], state["spec"]["k"]
    n_touched = int(torch.unique(ids).numel()) + experts.n_shared_groups
    weight_bytes = n_touched * experts.bytes_per_group()
    rec = lambda variant, metric, unit, value, **kw: run.rec(  # noqa: E731
        "moe_experts", "deep_gemm", variant, preset, t, "bfloat16", metric, unit, value, **common, **kw)

    def bandwidth(variant, us, **kw):
        bw = weight_bytes / (us * 1e-6)
        pct = 100 * bw / peaks.copy_bw if peaks else None
        decode = t <= 64
        rec(variant, "touched_weight_bandwidth", "TB/s", bw / 1e12, pct_of_copy_peak=pct, weight_bytes=weight_bytes,
            touched_groups=n_touched, time_us=us, target="decode (T<=64): >= 50% of measured copy bandwidth" if decode
            else None, target_met=(pct >= 50) if (decode and pct is not None) else None, **kw)
        return pct

    outs = {}
    for variant, kw in layout_options(t, k, experts.n_routed).items():
        if run.left() < 8:
            rec(variant, "skipped", None, None, reason=f"time budget: {run.left():.0f}s left")
            continue
        try:
            t1 = time.perf_counter()
            outs[variant] = gm.experts_forward(x, w, ids, experts, swiglu_limit=L, **kw)
            sync()
            rec(variant, "first_call_s", "s", time.perf_counter() - t1, options=str(kw))
            tm = timing.bench(lambda: gm.experts_forward(x, w, ids, experts, swiglu_limit=L, **kw),
                              warmup=3, rep=20 if t <= 1024 else 10)
            rec(variant, "time", "us", tm.p50, p20=tm.p20, p80=tm.p80, timing_mode=tm.mode, options=str(kw))
            pct = bandwidth(variant, tm.p50, options=str(kw))
            row[f"{variant}_us"], row[f"{variant}_pct"] = tm.p50, pct
        except Exception as e:  # noqa: BLE001
            run.error("moe_experts", "deep_gemm", variant, preset, t, e, options=str(kw), **common)
    base = outs.get("contiguous_fp8")
    for variant, y in outs.items():
        if base is not None and variant != "contiguous_fp8":
            same = bool(torch.equal(y, base))
            rec(variant, "bitwise_equal", "bool", same, vs="contiguous_fp8",
                max_abs_diff=float((y.float() - base.float()).abs().max()))
            row.setdefault("bitwise", []).append(f"{variant}:{'=' if same else '!='}")
        if y_default is not None:
            rec(variant, "bitwise_equal", "bool", bool(torch.equal(y, y_default)), vs=f"grouped_fp8 (default layout "
                f"{gm.layout_for(t)})")
    if t <= 64 and run.left() > 8 and DEVICE == "cuda":
        try:
            fn = lambda: gm.experts_forward(x, w, ids, experts, swiglu_limit=L, layout="masked",  # noqa: E731
                                            validate_ids=False)
            y_nv = fn()
            tg = timing.bench(fn, graph=True, warmup=3, rep=30)
            rec("masked_fp8_graph", "time", "us", tg.p50, p20=tg.p20, p80=tg.p80, timing_mode=tg.mode,
                options="layout=masked, validate_ids=False, CUDA-graph replay")
            row["masked_graph_us"], row["masked_graph_pct"] = tg.p50, bandwidth("masked_fp8_graph", tg.p50)
            if "masked_fp8" in outs:
                rec("masked_fp8_graph", "bitwise_equal", "bool", bool(torch.equal(y_nv, outs["masked_fp8"])),
                    vs="masked_fp8 (eager, validated)")
        except Exception as e:  # noqa: BLE001
            run.error("moe_experts", "deep_gemm", "masked_fp8_graph", preset, t, e, **common)
    del outs
    run.lines.append(_layout_text(preset, t, row))


GEMV_TOKENS = (1, 4, 8)         # decode T for the Triton GEMV path (grouped_moe.LAYOUT_POLICY['gemv_max_tokens'])


def gemv_cases(run: Run, state, preset: str, tokens, peaks) -> None:
    """The Triton GEMV decode path (triton/moe_gemv.py) with the policy overridden (gemv_max_tokens = max(tokens)), so
    the default stays untouched: gemv_fp8 (eager, validated ids) and, on CUDA, gemv_fp8_graph (CUDA-graph replay,
    validate_ids=False) next to masked_fp8_graph_vs_gemv (the masked path replayed the same way); touched-weight
    bandwidth of each; bitwise / ulp histogram of gemv vs the masked output (ulp-level differences expected: GEMM
    summation order). Each T in its own try/except."""
    from dsv4lab.kernels.deep_gemm import grouped_moe as gm
    from dsv4lab.lab import numerics, timing

    experts, common = state["experts"], state["common"]
    policy = dict(gm.LAYOUT_POLICY, gemv_max_tokens=max(tokens))
    for t in tokens:
        if run.left() < 8:
            run.rec("moe_experts", "triton", "gemv_fp8", preset, t, "bfloat16", "skipped", None, None,
                    reason=f"time budget: {run.left():.0f}s left", **common)
            continue
        rec = lambda variant, metric, unit, value, **kw: run.rec(  # noqa: E731
            "moe_experts", "triton" if variant.startswith("gemv") else "deep_gemm", variant, preset, t, "bfloat16",
            metric, unit, value, policy=str(policy), **common, **kw)
        row: dict = {}
        variant = "gemv_fp8"
        try:
            x, _, w, ids = inputs(state, t, seed=t)
            n_touched = int(torch.unique(ids).numel()) + experts.n_shared_groups
            weight_bytes = n_touched * experts.bytes_per_group()

            def bandwidth(name, us):
                pct = 100 * weight_bytes / (us * 1e-6) / peaks.copy_bw if peaks else None
                rec(name, "touched_weight_bandwidth", "TB/s", weight_bytes / (us * 1e-6) / 1e12, pct_of_copy_peak=pct,
                    weight_bytes=weight_bytes, touched_groups=n_touched, time_us=us,
                    target="decode (T<=64): >= 50% of measured copy bandwidth",
                    target_met=(pct >= 50) if pct is not None else None)
                row[name] = (us, pct)

            gemv = lambda: gm.experts_forward(x, w, ids, experts, swiglu_limit=L, policy=policy)  # noqa: E731
            t1 = time.perf_counter()
            y = gemv()
            sync()
            rec(variant, "first_call_s", "s", time.perf_counter() - t1, note="includes Triton JIT compilation",
                layout=gm.layout_for(t, policy))
            y_masked = gm.experts_forward(x, w, ids, experts, swiglu_limit=L, layout="masked", validate_ids=False)
            ulps = numerics.ulp_diff(y, y_masked)
            rec(variant, "bitwise_equal", "bool", bool(torch.equal(y, y_masked)), vs="masked_fp8",
                ulp_max=int(ulps.max()), frac_equal=float((ulps == 0).float().mean()),
                ulp_hist={str(u): int((ulps == u).sum()) for u in (0, 1, 2, 3)} | {">3": int((ulps > 3).sum())},
                max_abs_diff=float((y.float() - y_masked.float()).abs().max()),
                max_abs_y=float(y_masked.float().abs().max()))
            row["ulp_max"] = int(ulps.max())
            tm = timing.bench(gemv, warmup=3, rep=20)
            rec(variant, "time", "us", tm.p50, p20=tm.p20, p80=tm.p80, timing_mode=tm.mode)
            bandwidth(variant, tm.p50)
            if DEVICE == "cuda":
                for variant, layout in (("gemv_fp8_graph", "gemv"), ("masked_fp8_graph_vs_gemv", "masked")):
                    fn = lambda layout=layout: gm.experts_forward(x, w, ids, experts, swiglu_limit=L,  # noqa: E731
                                                                  layout=layout, validate_ids=False)
                    tg = timing.bench(fn, graph=True, warmup=3, rep=30)
                    rec(variant, "time", "us", tg.p50, p20=tg.p20, p80=tg.p80, timing_mode=tg.mode,
                        options=f"layout={layout}, validate_ids=False, CUDA-graph replay")
                    bandwidth(variant, tg.p50)
        except Exception as e:  # noqa: BLE001
            run.error("moe_experts", "triton", variant, preset, t, e, **common)
        parts = [f"{k} {v[0]:.1f} us ({v[1] or 0:.0f}% BW)" for k, v in row.items() if isinstance(v, tuple)]
        run.lines.append(f"  gemv {preset} T={t}: " + ", ".join(parts) + f"  ulp_max vs masked {row.get('ulp_max')}")
        run.flush()


def _layout_text(preset: str, t: int, r: dict) -> str:
    parts = [f"{v[:-3]} {r[v]:.1f} us ({r.get(v[:-3] + '_pct') or 0:.0f}% BW)" for v in r if v.endswith("_us")
             and (v.startswith("contiguous") or v.startswith("masked"))]
    return f"  layouts {preset} T={t}: " + ", ".join(parts) + "  " + " ".join(r.get("bitwise", []))


def _row_text(r: dict) -> str:
    def f(key, fmt):
        v = r.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) else "-"
    return (f"{r['preset']:>5} T={r['T']:>5}  ours {f('ours_us', '9.1f')} us  gemms {f('gemm_TFLOPs', '6.0f')} TFLOP/s "
            f"({f('gemm_pct_fp8', '4.0f')}% fp8)  touched {f('touched_TBps', '5.2f')} TB/s ({f('touched_pct', '4.0f')}%)  "
            f"ref {f('ref_us', '10.0f')} us  x{f('speedup', '6.1f')}  rel_rms {f('rel_rms', '.2e')} "
            f"(ref {f('ref_rel_rms', '.1e')}, err/chain {f('ratio_vs_chain', '.2f')})  route tri/ref {f('route_triton_us', '.0f')}/{f('route_reference_us', '.0f')} us")


# ---- phase 4: MegaMoE ------------------------------------------------------------------------------------------
def _record_unfused(run: Run, rows_lines: tuple[list[dict], list[str]], preset: str, t: int, common: dict) -> None:
    """Rows of bench/mega_unfused_check.py as records (metric "bitwise_equal" vs "unfused_like_mega", or "error")."""
    rows, lines = rows_lines
    for r in rows:
        r = dict(r)
        head = [r.pop(key) for key in ("variant", "metric", "unit", "value")]
        run.rec("mega_moe", "deep_gemm", head[0], preset, t, "bfloat16", *head[1:], **r, **common)
    run.lines += [f"MegaMoE SM90 (1 GPU) T={t}:{line}" for line in lines]


def mega_phase(run: Run, state, preset: str, tokens: tuple[int, ...], peaks) -> None:
    from dsv4lab.kernels.deep_gemm import grouped_moe as gm
    from dsv4lab.kernels.deep_gemm import mega_moe as mm
    from dsv4lab.lab import numerics, roofline, timing
    from dsv4lab.quant import dequant_fp8, quant_fp8
    from dsv4lab.refactors.pr44367_megamoe import oracle64

    common = dict(state["common"], world_size=1, env={k: os.environ.get(k) for k in mm.MULTICAST_OFF_ENV})
    try:
        mm.require_sm100()
    except mm.MegaMoEUnavailable as e:
        run.rec("mega_moe", "deep_gemm", "fp8_fp4_mega_moe", preset, None, "bfloat16", "unavailable", None, None,
                reason=str(e), **state["common"])
    stage = "process_group"
    try:
        group = mm.single_rank_group("nccl")
        common["env"] = {k: os.environ.get(k) for k in mm.MULTICAST_OFF_ENV}
        stage = "symmetric_buffer_and_weights"
        routed = routed_only(state["experts"])
        mod = mm.MegaMoESM90(routed, group, max_num_tokens=max(tokens), top_k=state["spec"]["k"], swiglu_limit=L)
    except Exception as e:  # noqa: BLE001
        run.error("mega_moe", "deep_gemm", "fp8_mega_moe_sm90", preset, None, e, stage=stage, **common)
        run.lines.append(f"MegaMoE SM90 (1 GPU): refused at {stage}: {type(e).__name__}: {str(e)[:200]}")
        if DEVICE == "cpu":     # smoke: the unfused_like_mega chain alone (emulated GEMMs), control flow only
            import mega_unfused_check

            x, _, w, ids = inputs(state, tokens[0], seed=tokens[0])
            x_q, x_sf = quant_fp8(x, 128, pow2=True)
            _record_unfused(run, mega_unfused_check.smoke_cpu(x_q, x_sf, w, ids, routed_only(state["experts"]),
                                                              swiglu_limit=L, grouped_gemm=gm.deep_gemm_grouped),
                            preset, tokens[0], common)
        return
    spec = state["spec"]
    for t in tokens:
        if run.left() < 15:
            run.rec("mega_moe", "deep_gemm", "fp8_mega_moe_sm90", preset, t, "bfloat16", "skipped", None, None,
                    reason="time budget", **common)
            continue
        x, _, w, ids = inputs(state, t, seed=t)
        x_q, x_sf = quant_fp8(x, 128, pow2=True)
        stage = "first_call"
        try:
            t1 = time.perf_counter()
            y = mod(x_q, x_sf, w, ids)
            sync()
            run.rec("mega_moe", "deep_gemm", "fp8_mega_moe_sm90", preset, t, "bfloat16", "first_call_s", "s",
                    time.perf_counter() - t1, **common)
            stage = "timing"
            tm = timing.bench(lambda: mod(x_q, x_sf, w, ids), warmup=3, rep=20)
            cost = roofline.cost("mega_moe", T=t, D=spec["D"], I=spec["I"], E=state["e"], k=spec["k"])
            run.add([tm.to_record(cost=cost, peaks=peaks, experiment=EXPERIMENT, op="mega_moe", backend="deep_gemm",
                                  variant="fp8_mega_moe_sm90", preset=preset, tokens=t, dtype="bfloat16", **common)])
            stage = "numerics"
            grouped = gm.experts_forward(x, w, ids, routed, swiglu_limit=L)
            tg = timing.bench(lambda: gm.experts_forward(x, w, ids, routed, swiglu_limit=L), warmup=2, rep=20)
            # the oracle sees the same staged (fp8 1x128) activations as both fp8 paths
            y64 = oracle64(dequant_fp8(x_q, x_sf, 128), w, ids, *state["weights"], swiglu_limit=L)
            c = numerics.compare(y64, grouped, y)
            run.add(c.to_records(experiment=EXPERIMENT, op="mega_moe", backend="deep_gemm", variant="fp8_mega_moe_sm90",
                                 preset=preset, tokens=t, eager_variant="grouped_fp8_routed_only", **common))
            run.rec("mega_moe", "deep_gemm", "fp8_mega_moe_sm90", preset, t, "bfloat16", "speedup_vs_grouped", "x",
                    tg.p50 / tm.p50, grouped_us=tg.p50, mega_us=tm.p50, **common)
            run.lines.append(f"MegaMoE SM90 (1 GPU) T={t}: {tm.p50:.1f} us vs grouped routed-only {tg.p50:.1f} us, "
                             f"rel_rms {c.rel_rms:.2e} (grouped {c.eager_rel_rms:.2e})")
        except Exception as e:  # noqa: BLE001
            run.error("mega_moe", "deep_gemm", "fp8_mega_moe_sm90", preset, t, e, stage=stage, **common)
            if stage == "first_call":
                run.lines.append(f"MegaMoE SM90 (1 GPU): refused at the first call: {type(e).__name__}: {str(e)[:200]}")
                break
        if run.left() > 10:     # issue #10: bitwise vs the unfused chain with the fused kernel's arithmetic
            import mega_unfused_check

            # fast_math=False (one more fused-kernel JIT configuration) at the largest T only
            fast = (True, False) if t == max(tokens) else (True,)
            _record_unfused(run, mega_unfused_check.check(mod, x_q, x_sf, w, ids, routed, swiglu_limit=L,
                                                          fast_maths=fast), preset, t, common)
    try:
        mod.destroy()
    except Exception:  # noqa: BLE001
        pass


# ---- JIT warm-up only ----------------------------------------------------------------------------------------------
def warm_up(run: Run, state, preset: str, order: list[int], args) -> None:
    """One call per case of every kernel the timed run uses (first-call times recorded), then MegaMoE's."""
    from dsv4lab.kernels.deep_gemm import grouped_moe as gm
    from dsv4lab.kernels.triton.moe_routing import route as route_triton

    spec = state["spec"]
    for t in order:
        if run.left() < 10:
            run.rec("moe_experts", "deep_gemm", "warm_up", preset, t, "bfloat16", "skipped", None, None,
                    reason=f"time budget: {run.left():.0f}s left", **state["common"])
            continue
        x, logits, w, ids = inputs(state, t, seed=t)
        try:
            t1 = time.perf_counter()
            route_triton(logits, k=spec["k"], routed_scaling_factor=spec["rsf"], bias=state["bias"])
            gm.experts_forward(x, w, ids, state["experts"], swiglu_limit=L)
            gm.experts_forward(x, w, ids, routed_only(state["experts"]), swiglu_limit=L)
            for kw in layout_options(t, spec["k"], state["e"]).values():
                gm.experts_forward(x, w, ids, state["experts"], swiglu_limit=L, **kw)
            if t <= 64:   # the GEMV decode kernels (one specialisation per preset for T <= 16)
                gm.experts_forward(x[:8], w[:8], ids[:8], state["experts"], swiglu_limit=L, layout="gemv")
            sync()
            run.rec("moe_experts", "deep_gemm", "grouped_fp8", preset, t, "bfloat16", "first_call_s", "s",
                    time.perf_counter() - t1, note="warm-up run: JIT compilation included", **state["common"])
            print(f"[{run.elapsed():6.1f}s] warm-up {preset} T={t}: {time.perf_counter() - t1:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001
            run.error("moe_experts", "deep_gemm", "warm_up", preset, t, e)
        run.flush()
    if preset == "flash" and not args.no_mega:
        mega_phase(run, state, preset, tuple(int(t) for t in args.mega_tokens.split(",")), None)
        run.flush()


# ---- main ------------------------------------------------------------------------------------------------------
def _variants():
    """bench/pr44367_moe_variants.py (imported lazily: it imports this module)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.modules.setdefault("pr44367_megamoe", sys.modules[__name__])   # run as a script: share this module's state
    import pr44367_moe_variants

    return pr44367_moe_variants


def _smoke_cpu_setup(args) -> None:
    """CPU dry run: toy dims, the grouped GEMM emulated in fp32 (dequantise, matmul, bf16), alignment 8."""
    global DEVICE
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from dsv4lab.kernels.deep_gemm import grouped_moe as gm
    from dsv4lab.quant import dequant_fp8

    def emulated(a, a_sf, b, b_sf, m_indices):
        a32 = dequant_fp8(a, a_sf, 128)
        out = torch.zeros(a.shape[0], b.shape[1])
        for g in torch.unique(m_indices[m_indices >= 0]).tolist():
            rows = m_indices == g
            out[rows] = a32[rows] @ dequant_fp8(b[g], b_sf[g], (128, 128)).T
        return out.bfloat16()

    from dsv4lab.lab import timing

    bench, host_overhead = timing.bench, timing.host_overhead     # one call each: the interpreter is slow
    timing.bench = lambda fn, **kw: bench(fn, **{**kw, "warmup": 0, "rep": 1})
    timing.host_overhead = lambda fn, n=1, **kw: host_overhead(fn, 1, **{**kw, "warmup": 0, "repeats": 1})
    def emulated_masked(a, a_sf, b, b_sf, masked_m, expected_m):
        out = torch.zeros(a.shape[0], a.shape[1], b.shape[1])
        for g in range(a.shape[0]):
            m = int(masked_m[g])
            if m:
                out[g, :m] = dequant_fp8(a[g, :m], a_sf[g, :m], 128) @ dequant_fp8(b[g], b_sf[g], (128, 128)).T
        return out.bfloat16()

    DEVICE = "cpu"
    gm.deep_gemm_masked = emulated_masked
    gm.deep_gemm_grouped = emulated
    gm.mk_alignment = lambda: 8
    args.presets, args.tokens, args.mega_tokens = "toy", "1,4", "1"
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out", help="folder for pr44367_megamoe.jsonl")
    ap.add_argument("--budget", type=float, default=140.0, help="seconds; cases that would start later are skipped")
    ap.add_argument("--presets", default="flash,pro")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--mega-tokens", default="1,64,512")
    ap.add_argument("--gemv-tokens", default=",".join(map(str, GEMV_TOKENS)),
                    help="T for the Triton GEMV decode path (policy overridden; '' = skip)")
    ap.add_argument("--variants", action="store_true",
                    help="also the design-variant phases of bench/pr44367_moe_variants.py: GEMV launch configs and "
                         "x quantisation after the gemv phase, the grouped GEMMs alone per layout at T=8192")
    ap.add_argument("--nvrtc", action="store_true", help="DeepGEMM JIT with NVRTC (faster compiles)")
    ap.add_argument("--no-mega", action="store_true")
    ap.add_argument("--warmup-only", action="store_true",
                    help="only JIT-compile every (preset, T) configuration (DeepGEMM, Triton, MegaMoE) and record the "
                         "first-call times; run this first on a fresh machine, then the timed run fits the budget")
    ap.add_argument("--smoke-cpu", action="store_true",
                    help="control-flow check on a CPU: toy dims, emulated grouped GEMM, Triton interpreter")
    args = ap.parse_args()
    if args.smoke_cpu:
        _smoke_cpu_setup(args)
    elif not torch.cuda.is_available():
        print("bench/pr44367_megamoe.py needs a CUDA GPU; nothing measured (--smoke-cpu checks the control flow).")
        return 2
    if args.nvrtc:
        os.environ["DG_JIT_USE_NVRTC"] = "1"
    # an ignored folder of the repo: kept between calls on a warm machine, so a second run skips compilation
    os.environ.setdefault("DG_JIT_CACHE_DIR", str(Path(__file__).resolve().parents[1] / "build" / "deep_gemm_jit"))
    out = Path(args.out) / f"{EXPERIMENT}.jsonl"
    run = Run(out, args.budget)
    tokens = [int(t) for t in args.tokens.split(",")]
    gemv_tokens = [int(t) for t in args.gemv_tokens.split(",") if t.strip()]
    order = sorted(tokens, key=lambda t: (t > 64 and t != 8192, t))      # decode, then 8192, then the rest
    peaks = None if args.smoke_cpu else load_or_measure_peaks(run)
    device_name = "cpu (smoke)" if args.smoke_cpu else torch.cuda.get_device_name()
    run.lines.append(f"{device_name}, peaks: {peaks.summary() if peaks else 'none'}")
    try:
        from dsv4lab.kernels.deep_gemm import grouped_moe as gm

        run.lines.append(f"DeepGEMM mk alignment for the contiguous layout: {gm.mk_alignment()}")
    except Exception as e:  # noqa: BLE001
        run.error("moe_experts", "deep_gemm", "import", None, None, e)
    run.flush()
    for i, preset in enumerate(p.strip() for p in args.presets.split(",")):
        if run.left() < 20:
            run.rec("moe_experts", "deep_gemm", "preset", preset, None, None, "skipped", None, None,
                    reason=f"time budget: {run.left():.0f}s left")
            continue
        try:
            state = build_preset(run, preset)
        except Exception as e:  # noqa: BLE001
            run.error("moe_experts", "deep_gemm", "setup", preset, None, e)
            run.flush()
            continue
        run.flush()
        if args.warmup_only:
            warm_up(run, state, preset, order, args)
            if args.variants and preset == "flash":
                _variants().gemv_config_phase(run, state, preset, gemv_tokens[:1], None, warm_only=True)
                if 8192 in tokens:
                    _variants().gemm_variant_phase(run, state, preset, 8192, None, warm_only=True)
            del state
            continue
        if i == 0:
            refactor_phase(run, state, preset)
            run.flush()
        for t in order:
            if run.left() < 10:
                run.rec("moe_experts", "deep_gemm", "grouped_fp8", preset, t, "bfloat16", "skipped", None, None,
                        reason=f"time budget: {run.left():.0f}s left", **state["common"])
                continue
            sweep_case(run, state, preset, t, peaks)
            run.flush()
            print(f"[{run.elapsed():6.1f}s] {preset} T={t} done", flush=True)
            if t == order[0] and gemv_tokens:   # the decode GEMV path, right after the first decode case
                gemv_cases(run, state, preset, gemv_tokens, peaks)
                print(f"[{run.elapsed():6.1f}s] {preset} gemv T={gemv_tokens} done", flush=True)
                if args.variants:
                    _variants().gemv_config_phase(run, state, preset, gemv_tokens, peaks)
                    print(f"[{run.elapsed():6.1f}s] {preset} gemv configs done", flush=True)
            if args.variants and t == 8192 and preset == "flash" and run.left() > 20:
                _variants().gemm_variant_phase(run, state, preset, t, peaks)
                print(f"[{run.elapsed():6.1f}s] {preset} gemm variants T={t} done", flush=True)
        if i == 0 and not args.no_mega:
            mega_phase(run, state, preset, tuple(int(t) for t in args.mega_tokens.split(",")), peaks)
            run.flush()
        del state
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    run.flush()
    print(f"\n{EXPERIMENT}: {len(run.recs)} records -> {out}  ({run.elapsed():.1f} s)")
    for line in run.lines:
        print(line)
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
