"""H100 benchmark of vLLM #43891 (torch.ops wrappers -> direct calls) and the attention output path it wraps.

    python bench/pr43891_op_registration.py --out $OUT        # records -> $OUT/pr43891_op_registration.jsonl

Steps, most important first; each case is recorded as it finishes, a failing case becomes an "error" record and
the run goes on; a time budget (``--budget``, default 85 s after the peaks) cuts what is left ("unavailable"):
1. Host overhead per call, before (torch.ops.dsv4lab.*) vs after (direct): the work-free probes (n=5000) and the
   full ops on toy shapes at T=1 (attention core, DeepGEMM fp8 einsum, MoE experts); per forward with the Flash
   (43 layers) and Pro (61 layers) op counts, with and without MegaMoE. Bitwise before == after per op.
2. torch.compile(fullgraph=True, backend aot_eager) of the o-proj block: before (einsum op) vs after (direct
   DeepGEMM call); also the Triton quant launcher alone.
3. Flash and Pro geometry, T in --tokens (T >= 4096 first): Triton inverse-RoPE quant (time, % of copy BW, target
   >= 80 % at T >= 4096), DeepGEMM fp8 einsum vs torch bf16 einsum (time, TFLOP/s, % of the measured fp8 / bf16
   matmul peak, target fp8 >= 60 % of the fp8 peak at T >= 4096), errors vs fp64 on min(T, 256) rows (fp8 vs bf16;
   DeepGEMM vs the dequantised fp32 reference of the same fp8 operands). First call per shape = JIT ("startup").
4. The o-proj block (quant + einsum + bf16 wo_b) in CUDA-graph replay, before vs after (expected equal), kernels per
   call, at Flash T in {1, 4096} and Pro T=1.
Peaks: data/results/<gpu>/peaks.jsonl if present, else measured here (copy, bf16 and fp8 _scaled_mm 8192^3) and
written to <out>/peaks.jsonl.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

TOKENS = [4096, 16384, 1, 64, 1024, 256, 16, 4]          # targets (T >= 4096) first
ERROR_ROWS = 256


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for pr43891_op_registration.jsonl (and peaks.jsonl)")
    ap.add_argument("--budget", type=float, default=85.0, help="seconds for steps 1-4 (peaks are extra)")
    ap.add_argument("--tokens", type=int, nargs="*", default=None, help="override the T list of step 3")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="exercise the script's logic on a CPU with the reference backends (numbers meaningless)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    import torch
    from tqdm import tqdm

    from dsv4lab.lab import results, roofline
    from dsv4lab.refactors import pr43891_op_registration as R

    dev = "cpu" if args.cpu_dry_run else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (torch.cuda.is_available() is False); the CPU path is `dsv4lab compare`")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{R.EXPERIMENT}.jsonl"
    print(f"{R.TITLE}\n{results.provenance()['gpu']} | torch {torch.__version__} | CUDA {torch.version.cuda} "
          f"| records -> {path}")
    all_recs: list[dict] = []

    def save(recs: list[dict]) -> list[dict]:
        if recs:
            results.append(path, recs)
            all_recs.extend(recs)
        return recs

    def error(op: str, preset: str | None, tokens: int | None, e: BaseException, **extra) -> None:
        save([R._rec(op=op, backend="-", variant="error", preset=preset, tokens=tokens, dtype=None, metric="error",
                     unit=None, value=None, message=f"{type(e).__name__}: {e}"[:2000], **extra)])
        print(f"  error in {op} {preset} T={tokens}: {type(e).__name__}: {str(e)[:200]}")

    peaks = None
    try:
        if dev == "cpu":
            raise RuntimeError("CPU dry run: no peaks")
        peaks = roofline.stored_or_measured_peaks(out)
        print(peaks.summary(), f"({peaks.source})")
    except Exception as e:  # no % of peak then, everything else still comes
        error("peaks", None, None, e)

    backend = R.prepare(dev)
    print(f"fp8 einsum backend on this GPU: {backend}")
    deadline = time.perf_counter() + args.budget
    skipped: list[str] = []

    def step(what: str, fn, *a, preset: str | None = None, tokens: int | None = None) -> None:
        if time.perf_counter() > deadline:
            skipped.append(what)
            return
        try:
            save(fn(*a))
        except Exception as e:
            error(what, preset, tokens, e)

    # ---- 1. host overhead + bitwise --------------------------------------------------------------------------
    toy = R.make_inputs("toy", tokens=1, device=dev)
    step("numerics", R.numerics_records, toy, dev)

    def overhead(probes: bool) -> list[dict]:
        n = (5000 if probes else 300) if dev == "cuda" else 50
        recs, delta = R.host_overhead_records(toy, dev, n=n, repeats=7 if probes else 5, probes=probes)
        return recs + R.per_forward_records(delta, "probe" if probes else "full_ops", toy.tokens)

    step("host_overhead probes", overhead, True)
    step("host_overhead full ops", overhead, False)

    # ---- 2. compile ---------------------------------------------------------------------------------------------
    step("compile o_proj_block", R.compile_records, toy, dev)
    if dev == "cuda":
        step("compile triton quant", _compile_quant_records, R, toy)

    # ---- 3. sweep (the inverse-RoPE quant's launch config first: the sweep then runs with the best one) ----------
    if dev == "cuda":
        step("inv_rope quant tuning", _quant_tuning_records, R, peaks)
    tokens = args.tokens or TOKENS
    for preset in ("flash", "pro"):
        for t in tqdm(tokens, desc=f"{preset} sweep", leave=False):
            step(f"sweep {preset} T={t}", _sweep_records, R, preset, t, peaks, dev, preset=preset, tokens=t)

    # ---- 4. graph replay --------------------------------------------------------------------------------------------
    for preset, t in (("flash", 1), ("flash", 4096), ("pro", 1), ("pro", 4096)):
        if dev == "cuda":
            step(f"graph replay {preset} T={t}", _replay_records, R, preset, t, preset=preset, tokens=t)

    if skipped:
        save([R._rec(op="bench", backend="-", variant="skipped", preset=None, tokens=None, dtype=None,
                     metric="unavailable", unit=None, value=None,
                     reason=f"time budget of {args.budget:.0f} s spent; skipped: " + ", ".join(skipped))])
    _print_summary(all_recs, skipped, time.perf_counter() - t_start)
    return 0


# ---- step helpers -------------------------------------------------------------------------------------------------
def _inputs(preset: str, t: int, device: str, seed: int = 0):
    """o [T,H,512] bf16 (unit RMS), positions, fp32 cos/sin cache, wo_a quantised + its bf16 dequantisation."""
    import torch

    from dsv4lab.config import get_config
    from dsv4lab.kernels.reference.attn_out import quantize_wo_a, rope_cos_sin_cache
    from dsv4lab.quant import dequant_fp8
    from dsv4lab.rope import layer_inv_freq

    cfg = get_config(preset)
    h, d, g, o_l = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank
    gen = torch.Generator(device=device).manual_seed(seed)
    o = torch.randn(t, h, d, device=device, generator=gen, dtype=torch.bfloat16)
    pos = torch.randint(0, 65536, (t,), device=device, generator=gen)
    cs = rope_cos_sin_cache(layer_inv_freq(cfg, 2).to(device), 65536)
    r = h * d // g
    wo_a = torch.randn(g * o_l, r, device=device, generator=gen) * r ** -0.5
    wq, ws = quantize_wo_a(wo_a, g)
    return cfg, o, pos, cs, wq, ws, dequant_fp8(wq, ws, (128, 128), torch.bfloat16)


def _sweep_records(R, preset: str, t: int, peaks, device: str) -> list[dict]:
    import torch

    from dsv4lab.kernels import registry
    from dsv4lab.kernels.reference import attn_out as ref
    from dsv4lab.lab import numerics, roofline, timing

    gpu = device == "cuda"
    quant = registry.get("inv_rope_fp8_quant", "triton" if gpu else "reference")
    einsum_backend = "deep_gemm" if gpu else "reference"
    einsum = registry.get("fp8_einsum_wo_a", einsum_backend)
    cfg, o, pos, cs, wq, ws, w_bf16 = _inputs(preset, t, device)
    h, d, g, o_l = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank
    common = dict(experiment=R.EXPERIMENT, preset=preset, tokens=t)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    recs = []

    t0 = time.perf_counter()
    q, s = quant(o, pos, cs)
    a, sa = q.view(t, g, -1), s.view(t, g, -1)
    z = einsum(a, sa, wq, ws)
    sync()
    recs.append(R._rec(op="wo_a_einsum", backend=einsum_backend, variant="first_call", preset=preset, tokens=t,
                       dtype="float8_e4m3fn", metric="startup", unit="s", value=time.perf_counter() - t0,
                       what="first quant + fp8 einsum call at this shape (Triton/DeepGEMM JIT if not cached)"))

    # inverse-RoPE quant: memory bound, % of the copy bandwidth
    tq = timing.bench(lambda: quant(o, pos, cs), graph=gpu, device=device)
    rq = tq.to_record(cost=roofline.cost("inv_rope_fp8_quant", T=t, H=h, d=d), peaks=peaks, op="inv_rope_fp8_quant",
                      backend="triton" if gpu else "reference", variant="after", dtype="bfloat16", **common)
    from dsv4lab.kernels.triton import inv_rope_fp8_quant as quant_kernel
    rq["tuning"] = dict(quant_kernel.TUNING)
    recs.append(rq)
    if t >= 4096 and rq.get("pct_of_peak") is not None:
        recs.append(R._rec(op="inv_rope_fp8_quant", backend=rq["backend"], variant="after", preset=preset, tokens=t,
                           dtype="bfloat16", metric="target_met", unit="bool", value=rq["pct_of_peak"] >= 80.0,
                           target=">= 80 % of measured copy bandwidth at T >= 4096", pct_of_peak=rq["pct_of_peak"]))

    # fp8 einsum vs the bf16 einsum (DS-ref: bf16 activations x dequantised wo_a, exact in bf16)
    x_bf16 = ref.inv_rope(o, pos, cs).to(torch.bfloat16).view(t, g, -1)
    ce = roofline.cost("fp8_einsum_wo_a", T=t, H=h, G=g, o_l=o_l, d=d)
    cb = roofline.OpCost("wo_a_einsum_bf16", 17, ce.flops, 2 * h * d * o_l + 2 * t * h * d + 2 * t * g * o_l, "bf16")
    pct = {}
    for backend, fn, cost, dtype in ((einsum_backend, lambda: einsum(a, sa, wq, ws), ce, "float8_e4m3fn"),
                                     ("torch", lambda: torch.einsum("bhr,hdr->bhd", x_bf16, w_bf16), cb, "bfloat16")):
        tm = timing.bench(fn, graph=gpu, device=device)
        rate = cost.flops / (tm.p50 * 1e-6)
        peak = None if peaks is None else peaks.matmul_rate(cost.compute_dtype)
        pct[backend] = None if not peak else 100 * rate / peak
        recs.append(tm.to_record(cost=cost, peaks=peaks, op="wo_a_einsum", backend=backend, variant=backend,
                                 dtype=dtype, tflops=rate / 1e12, pct_of_matmul_peak=pct[backend], **common))
    recs.append(R._rec(op="wo_a_einsum", backend=einsum_backend, variant=f"{einsum_backend}_vs_bf16", preset=preset,
                       tokens=t, dtype="float8_e4m3fn", metric="speedup", unit="x",
                       value=recs[-1]["value"] / recs[-2]["value"]))
    if t >= 4096 and pct[einsum_backend] is not None:
        recs.append(R._rec(op="wo_a_einsum", backend=einsum_backend, variant=einsum_backend, preset=preset, tokens=t,
                           dtype="float8_e4m3fn", metric="target_met", unit="bool", value=pct[einsum_backend] >= 60.0,
                           target=">= 60 % of the measured fp8 matmul peak at T >= 4096",
                           pct_of_peak=pct[einsum_backend]))

    # errors on the first rows (rows are independent): fp64 oracle of the same inputs and weight values
    rows = min(t, ERROR_ROWS)
    x64 = ref.inv_rope(o[:rows], pos[:rows], cs, dtype=torch.float64).view(rows, g, -1)
    oracle = ref.wo_a_einsum_oracle(x64, w_bf16)
    fields = dict(experiment=R.EXPERIMENT, op="wo_a_einsum", backend=einsum_backend, preset=preset, tokens=t,
                  error_rows=rows)
    bf16 = torch.einsum("bhr,hdr->bhd", x_bf16[:rows], w_bf16)
    recs += numerics.compare(oracle, bf16, z[:rows]).to_records(
        variant="fp8_vs_bf16", note="eager = bf16 einsum; fp8 activations are expected to be ~2^4 x less accurate",
        **fields)
    z_ref = ref.fp8_einsum_wo_a(a[:rows], sa[:rows], wq, ws)
    recs += numerics.compare(oracle, z_ref, z[:rows]).to_records(
        variant=f"{einsum_backend}_vs_fp8_reference", note="eager = dequantised fp32 einsum of the same fp8 operands",
        **fields)
    return recs


QUANT_CONFIGS = [(1024, 2), (2048, 2), (2048, 4), (4096, 2), (4096, 4), (4096, 8), (8192, 4)]   # (tile_elements, num_warps)


def _quant_tuning_records(R, peaks) -> list[dict]:
    """Time the Triton inverse-RoPE quant under each ``QUANT_CONFIGS`` entry at Flash/Pro T in {4096, 16384}
    (graph replay, L2 flushed; variant ``tile<E>-w<W>``), then keep the config with the best worst-case % of the
    copy bandwidth in ``TUNING`` for the rest of the run (record ``tuning_chosen``)."""
    from dsv4lab.kernels.triton import inv_rope_fp8_quant as K
    from dsv4lab.lab import roofline, timing

    default = dict(K.TUNING)
    recs, worst = [], {}
    for preset in ("flash", "pro"):
        for t in (4096, 16384):
            cfg, o, pos, cs, *_ = _inputs(preset, t, "cuda")
            cost = roofline.cost("inv_rope_fp8_quant", T=t, H=cfg.num_attention_heads, d=cfg.head_dim)
            for tile, warps in QUANT_CONFIGS:
                K.TUNING.update(tile_elements=tile, num_warps=warps)
                tm = timing.bench(lambda: K.inv_rope_fp8_quant(o, pos, cs), graph=True, rep=50)
                r = tm.to_record(cost=cost, peaks=peaks, experiment=R.EXPERIMENT, op="inv_rope_fp8_quant",
                                 backend="triton", variant=f"tile{tile}-w{warps}", preset=preset, tokens=t,
                                 dtype="bfloat16", tuning=dict(K.TUNING))
                recs.append(r)
                pct = r.get("pct_of_peak") or 0.0
                worst[(tile, warps)] = min(worst.get((tile, warps), 1e9), pct)
            del o
    best = max(worst, key=worst.get)
    K.TUNING.update(tile_elements=best[0], num_warps=best[1])
    # the same best config with a read-only L2 flush: how much of the gap is write-back of the memset flush's lines
    for preset in ("flash", "pro"):
        cfg, o, pos, cs, *_ = _inputs(preset, 4096, "cuda")
        cost = roofline.cost("inv_rope_fp8_quant", T=4096, H=cfg.num_attention_heads, d=cfg.head_dim)
        tm = timing.bench(lambda: K.inv_rope_fp8_quant(o, pos, cs), graph=True, rep=50, flush_kind="read")
        recs.append(tm.to_record(cost=cost, peaks=peaks, experiment=R.EXPERIMENT, op="inv_rope_fp8_quant",
                                 backend="triton", variant=f"tile{best[0]}-w{best[1]}-readflush", preset=preset,
                                 tokens=4096, dtype="bfloat16", tuning=dict(K.TUNING), flush_kind="read"))
        print(f"inv_rope quant {preset} T=4096 with a read-only L2 flush: {tm.p50:.1f} us "
              f"({recs[-1].get('pct_of_peak') or 0:.1f} % of copy BW)")
    recs.append(R._rec(op="inv_rope_fp8_quant", backend="triton", variant="tuning_chosen", preset=None, tokens=None,
                       dtype="bfloat16", metric="tuning_chosen", unit=None, value=f"tile{best[0]}-w{best[1]}",
                       previous_default=default, worst_pct_by_config={f"tile{k[0]}-w{k[1]}": v
                                                                      for k, v in worst.items()}))
    print("inv_rope quant: worst-case % of copy BW per config:", {f"tile{k[0]}-w{k[1]}": round(v, 1)
                                                                   for k, v in worst.items()}, "-> chosen", best)
    return recs


def _replay_records(R, preset: str, t: int) -> list[dict]:
    from dsv4lab.lab import timing

    inp = R.make_inputs(preset, tokens=t, device="cuda", n_experts=8)   # experts unused here: keep them small
    recs = R.graph_replay_records(inp, "cuda")
    args = (inp.q, inp.positions, inp.cos_sin_cache, inp.wo_a_q, inp.wo_a_scale, inp.wo_b, inp.quant)
    for variant, fn in (("before", R.o_proj_before), ("after", R.o_proj_after)):
        kc = timing.kernels_per_call(lambda: fn(*args))
        recs.append(kc.to_record(experiment=R.EXPERIMENT, op="o_proj_block", backend=R._backend_name("fp8_einsum", "cuda"),
                                 variant=variant, preset=preset, tokens=t, dtype="bfloat16"))
    tb = next(r for r in recs if r["metric"] == "time" and r["variant"] == "before")
    ta = next(r for r in recs if r["metric"] == "time" and r["variant"] == "after")
    ratio = ta["value"] / tb["value"]
    recs.append(R._rec(op="o_proj_block", backend=tb["backend"], variant="after_vs_before", preset=preset, tokens=t,
                       dtype="bfloat16", metric="target_met", unit="bool", value=abs(ratio - 1) <= 0.03,
                       ratio=ratio, target="graph-replay time unchanged (within 3 %)"))
    return recs


def _compile_quant_records(R, inp) -> list[dict]:
    """Can Dynamo trace the Triton launcher (user-defined Triton kernel support) with fullgraph=True?"""
    import torch

    from dsv4lab.kernels.triton.inv_rope_fp8_quant import inv_rope_fp8_quant

    def quant_bytes(o, pos, cs):
        q, s = inv_rope_fp8_quant(o, pos, cs)
        return torch.cat([q.view(torch.uint8).float().flatten(), s.flatten()])

    res = R.compile_outcome(quant_bytes, (inp.q, inp.positions, inp.cos_sin_cache))
    return [R._rec(op="inv_rope_fp8_quant", backend="triton", variant="direct", preset=inp.preset, tokens=inp.tokens,
                   dtype="bfloat16", metric="compile_fullgraph", unit="bool", value=res["compiled"],
                   **{k: v for k, v in res.items() if k != "compiled"})]


# ---- summary ----------------------------------------------------------------------------------------------------
def _get(recs: list[dict], **where) -> dict | None:
    hit = [r for r in recs if all(r.get(k) == v for k, v in where.items())]
    return hit[-1] if hit else None


def _fmt(r: dict | None, key: str = "value", spec: str = ".2f") -> str:
    if r is None or r.get(key) is None:
        return "-"
    return format(r[key], spec)


def _print_summary(recs: list[dict], skipped: list[str], total_s: float) -> None:
    print("\n== host overhead, us per call (toy shapes, T=1) ==")
    print(f"{'op':<16}{'probe before':>13}{'after':>8}{'delta':>8}   {'full before':>12}{'after':>9}{'delta':>9}")
    for op in ("attention_core", "fp8_einsum", "moe_experts"):
        cells = []
        for backend in ("probe", None):
            sel = dict(op=op, metric="host_overhead") if backend is None else dict(op=op, backend=backend,
                                                                                  metric="host_overhead")
            rows = [r for r in recs if all(r.get(k) == v for k, v in sel.items())
                    and (backend is not None or r["backend"] != "probe")]
            b = next((r for r in rows if r["variant"] == "before"), None)
            a = next((r for r in rows if r["variant"] == "after"), None)
            d = None if b is None or a is None else {"value": b["value"] - a["value"]}
            cells.append((b, a, d))
        (pb, pa, pd), (fb, fa, fd) = cells
        print(f"{op:<16}{_fmt(pb):>13}{_fmt(pa):>8}{_fmt(pd):>8}   {_fmt(fb):>12}{_fmt(fa):>9}{_fmt(fd):>9}")
    print("per forward (before - after, us):", "  ".join(
        f"{r['preset']}{'+MegaMoE' if r['mega_moe'] else ''}[{r['backend']}, {r['calls']} calls]={r['value']:.0f}"
        for r in recs if r["metric"] == "host_overhead_per_forward"))
    for r in recs:
        if r["metric"] == "bitwise_equal" and r["variant"] == "after_vs_before" and not r["value"]:
            print(f"  NOT bitwise equal: {r['op']} {r['preset']} T={r['tokens']}")
    print("\n== torch.compile(fullgraph=True) ==")
    for r in recs:
        if r["metric"] == "compile_fullgraph":
            print(f"{r['op']:<20}{r['variant']:<22}compiled={r['value']}  breaks={r.get('graph_breaks')}  "
                  f"{(r.get('error') or '')[:120]}")
    print("\n== sweep: quant (Triton) / fp8 einsum (DeepGEMM) / bf16 einsum (torch), us p50 in graph replay ==")
    print(f"{'preset':<7}{'T':>6}{'quant':>9}{'%BW':>6}{'fp8':>9}{'%fp8pk':>7}{'bf16':>9}{'%bf16pk':>8}{'speedup':>8}"
          f"{'rel_rms fp8':>12}{'bf16':>9}{'kernel/ref err_ratio':>21}{'bitwise':>8}")
    for preset in ("flash", "pro"):
        ts = sorted({r["tokens"] for r in recs if r["preset"] == preset and r["op"] == "wo_a_einsum"})
        for t in ts:
            q = _get(recs, op="inv_rope_fp8_quant", preset=preset, tokens=t, metric="time")
            e = next((r for r in recs if r["op"] == "wo_a_einsum" and r["preset"] == preset and r["tokens"] == t
                      and r["metric"] == "time" and r["backend"] != "torch"), None)
            b = _get(recs, op="wo_a_einsum", backend="torch", preset=preset, tokens=t, metric="time")
            sp = _get(recs, op="wo_a_einsum", preset=preset, tokens=t, metric="speedup")
            rr = _get(recs, op="wo_a_einsum", variant="fp8_vs_bf16", preset=preset, tokens=t, metric="rel_rms")
            vs_ref = [r for r in recs if r["op"] == "wo_a_einsum" and r["preset"] == preset and r["tokens"] == t
                      and r["variant"].endswith("_vs_fp8_reference")]
            er = next((r for r in vs_ref if r["metric"] == "err_ratio"), None)
            bw = next((r for r in vs_ref if r["metric"] == "bitwise_equal"), None)
            print(f"{preset:<7}{t:>6}{_fmt(q, spec='.1f'):>9}{_fmt(q, 'pct_of_peak', '.0f'):>6}{_fmt(e, spec='.1f'):>9}"
                  f"{_fmt(e, 'pct_of_matmul_peak', '.0f'):>7}{_fmt(b, spec='.1f'):>9}"
                  f"{_fmt(b, 'pct_of_matmul_peak', '.0f'):>8}{_fmt(sp):>8}{_fmt(rr, spec='.2e'):>12}"
                  f"{_fmt(rr, 'eager', '.2e'):>9}{_fmt(er, spec='.3f'):>21}{str(bw['value']) if bw else '-':>8}")
    targets = [r for r in recs if r["metric"] == "target_met"]
    for r in targets:
        extra = r.get("pct_of_peak", r.get("ratio"))
        print(f"target {r['op']:<18}{r['preset']:<6}T={r['tokens']:<6}{'MET' if r['value'] else 'not met'}"
              f"  ({r['target']}; {extra:.3g})")
    print("\n== o-proj block in CUDA-graph replay (us p50) ==")
    for preset, t in (("flash", 1), ("flash", 4096), ("pro", 1), ("pro", 4096)):
        b = _get(recs, op="o_proj_block", variant="before", preset=preset, tokens=t, metric="time")
        a = _get(recs, op="o_proj_block", variant="after", preset=preset, tokens=t, metric="time")
        kb = _get(recs, op="o_proj_block", variant="before", preset=preset, tokens=t, metric="kernels_per_call")
        ka = _get(recs, op="o_proj_block", variant="after", preset=preset, tokens=t, metric="kernels_per_call")
        print(f"{preset:<6}T={t:<6}before {_fmt(b)}  after {_fmt(a)}  kernels {_fmt(kb, spec='d')} / {_fmt(ka, spec='d')}")
    errors = [r for r in recs if r["metric"] == "error"]
    if errors:
        print(f"\n{len(errors)} error record(s), first: {errors[0].get('message', '')[:300]}")
    if skipped:
        print(f"skipped for time: {len(skipped)} case(s), first: {skipped[0]}")
    print(f"total {total_s:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
