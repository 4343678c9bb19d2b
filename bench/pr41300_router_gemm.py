"""H100 benchmark of vLLM #41300: custom cuBLAS bf16 x bf16 -> fp32 op (before) vs torch.mm(out_dtype=fp32) (after).

    python bench/pr41300_router_gemm.py --out $OUT        # records -> $OUT/pr41300_router_gemm.jsonl

Steps (each case is recorded as it finishes; a failing case becomes an "error" record and the run goes on):
0. Build the cuBLAS extension once (load_inline, or nvcc directly when ninja is missing) and record the build
   time, route and whether it compiled ("startup"); then a second Python process calls build() again to show the
   cached build is reused (its time and ``compiled`` flag). Peaks: data/results/<gpu>/peaks.jsonl or measured.
1. Shapes router 256x4096 (Flash), 384x7168 (Pro), compressor 2048x4096 and 1024x4096, indexer compressor
   512x4096; M in {1, 2, 4, ..., 256, 1024, 4096, 8192, 16384}: every variant vs fp64 (max_rel, rel_rms,
   err_ratio vs before, fp32-bound ratio), bitwise before == after; before/after CUDA-graph replay time and eager
   time (L2 flushed), kernel names and counts, host cost per call for M <= 256 (lab.timing.host_overhead); a
   "target_met" record per (shape, M): after within 5 % of before in graph replay, with both kernel names.
2. Routing: top-6 flip rate vs fp64 under sqrt-softplus + bias selection, random and near-tie inputs, M = 4096.
3. Aux streams: the three compressor/indexer GEMMs on side streams + the router GEMM on the main stream, before
   vs after: profiler union span vs sum of kernel times, and the event-timed step.
4. The other variants (bf16_linear, upcast_fp32, upcast_tf32): graph and eager time, kernels at M in {1, 4096}.
A time budget (``--budget``, default 105 s from the start, build included) cuts what is left, recorded as
"unavailable", so the whole script stays under 120 s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

CORE = ["before", "after"]
OTHERS = ["bf16_linear", "upcast_fp32", "upcast_tf32"]


def _second_process_build(timeout: float) -> dict:
    code = ("import json, time; t = time.perf_counter(); from dsv4lab.kernels.cuda import cublas_gemm as c; "
            "i = c.build(); print(json.dumps({'route': i.route, 'compiled': i.compiled, 'build_s': i.seconds, "
            "'process_s': time.perf_counter() - t}))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=str(REPO), env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for pr41300_router_gemm.jsonl (and peaks.jsonl)")
    ap.add_argument("--budget", type=float, default=105.0,
                    help="seconds from the start (build included) after which remaining cases are skipped")
    ap.add_argument("--tokens", type=int, nargs="*", default=None, help="override the M list")
    ap.add_argument("--verbose-build", action="store_true")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    import torch

    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a nicety; the one-shot run must not depend on them
        def tqdm(iterable, **_):
            return iterable

    from dsv4lab.kernels.cuda import cublas_gemm
    from dsv4lab.lab import results, roofline
    from dsv4lab.refactors import pr41300_router_gemm as R

    if not torch.cuda.is_available():
        print("needs a CUDA GPU (torch.cuda.is_available() is False); the CPU path is `dsv4lab compare`")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{R.EXPERIMENT}.jsonl"
    print(f"{R.TITLE}\n{torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda} "
          f"| records -> {path}")

    def save(recs: list[dict]) -> list[dict]:
        if recs:
            results.append(path, recs)
        return recs

    def error(variant: str, tokens: int | None, e: BaseException, **extra) -> dict:
        return R._error(variant, "flash", tokens, e, **extra)

    # ---- 0. build + peaks ------------------------------------------------------------------------------
    build_info = None
    t0 = time.perf_counter()
    try:
        build_info = cublas_gemm.build(verbose=args.verbose_build)
        save([R._rec("before", "flash", None, "startup", "s", build_info.seconds, what="extension build",
                     route=build_info.route, compiled=build_info.compiled,
                     library=os.path.basename(build_info.library_path or "") or None,  # no host paths in records
                     notes=list(build_info.notes))])
        print(f"cuBLAS extension: {build_info.route}, {'compiled' if build_info.compiled else 'reused'} in "
              f"{build_info.seconds:.1f} s" + (f" ({'; '.join(build_info.notes)})" if build_info.notes else ""))
    except Exception as e:
        save([R._unavailable("before", "flash", f"extension build failed after {time.perf_counter() - t0:.1f} s: {e}")])
        print(f"cuBLAS extension UNAVAILABLE: {e}")
    if build_info is not None:
        try:
            second = _second_process_build(timeout=90)
            save([R._rec("before", "flash", None, "startup", "s", second["build_s"], what="second-process build",
                         route=second["route"], compiled=second["compiled"], process_s=second["process_s"])])
            print(f"second process: {second['route']}, compiled={second['compiled']}, build() {second['build_s']:.2f} s")
        except Exception as e:
            save([error("before", None, e, what="second-process build")])
            print(f"second-process build check failed: {e}")

    peaks = None
    try:
        peaks = roofline.stored_or_measured_peaks(out)
        print(peaks.summary(), f"({peaks.source})")
    except Exception as e:  # no % of peak then, everything else still comes
        print(f"peaks unavailable ({type(e).__name__}: {e})")
        save([error("after", None, e, what="peaks")])

    core = [v for v in CORE if R.variant_availability(v, "cuda")[0]]
    others = [v for v in OTHERS if R.variant_availability(v, "cuda")[0]]
    tokens = args.tokens or list(R.M_SWEEP)
    shapes = R.bench_shapes()
    deadline = t_start + args.budget
    skipped: list[str] = []

    def over_budget(what: str) -> bool:
        if time.perf_counter() > deadline:
            skipped.append(what)
            return True
        return False

    # ---- 1. numerics + core timing ----------------------------------------------------------------------
    all_recs: list[dict] = []
    for shape in shapes:
        preset = "pro" if shape.name.endswith("-pro") else "flash"
        for m in tqdm(tokens, desc=shape.name, leave=False):
            if over_budget(f"{shape.name} M={m} numerics+timing"):
                continue
            try:
                all_recs += save(R.numerics_records(shape, m, core + others, device="cuda", preset=preset))
            except Exception as e:
                all_recs += save([error("reference", m, e, shape=shape.name)])
            for graph in (True, False):
                all_recs += save(R.timing_records(shape, m, core, device="cuda", preset=preset, graph=graph,
                                                  kernels=graph, host=not graph and m <= 256, peaks=peaks))
            all_recs += save(_target_record(R, all_recs, shape, m, preset))

    # ---- 2. routing ---------------------------------------------------------------------------------------
    for preset, router in (("flash", shapes[0]), ("pro", shapes[-1])):
        if over_budget(f"routing {preset}"):
            continue
        try:
            all_recs += save(R.routing_records(4096, router.n, router.k, core + others, device="cuda",
                                               preset=preset))
        except Exception as e:
            all_recs += save([error("reference", 4096, e, case="routing", shape=router.name)])

    # ---- 3. aux streams ----------------------------------------------------------------------------------
    for m in (16, 1024, 8192):
        if over_budget(f"overlap M={m}"):
            continue
        all_recs += save(R.overlap_records(m, core, preset="flash"))

    # ---- 4. other variants' timing -------------------------------------------------------------------------
    for shape in shapes:
        preset = "pro" if shape.name.endswith("-pro") else "flash"
        for m in tqdm(tokens, desc=f"{shape.name} others", leave=False):
            if over_budget(f"{shape.name} M={m} other variants"):
                continue
            for graph in (True, False):
                all_recs += save(R.timing_records(shape, m, others, device="cuda", preset=preset, graph=graph,
                                                  kernels=graph and m in (1, 4096), peaks=peaks))

    if skipped:
        save([R._unavailable("after", "flash", f"time budget of {args.budget:.0f} s spent; skipped: "
                             + ", ".join(skipped))])
    _print_summary(R, all_recs, build_info, skipped, time.perf_counter() - t_start)
    return 0


def _value(recs: list[dict], **where) -> dict | None:
    hit = [r for r in recs if all(r.get(k) == v for k, v in where.items())]
    return hit[-1] if hit else None


def _target_record(R, recs: list[dict], shape, m: int, preset: str) -> list[dict]:
    """after within 5 % of before in CUDA-graph replay; the kernel names say why when not."""
    tb = _value(recs, metric="time", variant="before", shape=shape.name, tokens=m, timing_mode="cuda-graph")
    ta = _value(recs, metric="time", variant="after", shape=shape.name, tokens=m, timing_mode="cuda-graph")
    if tb is None or ta is None:
        return []
    kb = _value(recs, metric="kernels_per_call", variant="before", shape=shape.name, tokens=m)
    ka = _value(recs, metric="kernels_per_call", variant="after", shape=shape.name, tokens=m)
    ratio = ta["value"] / tb["value"]
    return [R._rec("after", preset, m, "target_met", "bool", ratio <= 1.05, ratio=ratio, target="after <= 1.05 x before",
                   shape=shape.name, before_us=tb["value"], after_us=ta["value"],
                   before_kernels=kb["names"] if kb else None, after_kernels=ka["names"] if ka else None)]


def _short(names: list[str] | None) -> str:
    if not names:
        return "-"
    return " + ".join(n if len(n) <= 48 else n[:45] + "..." for n in names)


def _print_summary(R, recs: list[dict], build_info, skipped: list[str], total_s: float) -> None:
    print("\n== time (us, p50; graph = CUDA-graph replay, eager = CUDA events incl. launch), after/before ==")
    print(f"{'shape':<26}{'M':>6}{'before g':>10}{'after g':>10}{'ratio':>7}{'before e':>10}{'after e':>10}"
          f"{'ratio':>7}  bitwise  kernels (before | after, shown when ratio > 1.05 or names differ)")
    for shape in R.bench_shapes():
        for m in sorted({r["tokens"] for r in recs if r.get("shape") == shape.name and r["tokens"] is not None}):
            row = {}
            for v in ("before", "after"):
                for mode in ("cuda-graph", "cuda-events"):
                    r = _value(recs, metric="time", variant=v, shape=shape.name, tokens=m, timing_mode=mode)
                    row[(v, mode)] = r["value"] if r else float("nan")
            bw = _value(recs, metric="bitwise_equal_before_after", shape=shape.name, tokens=m)
            kb = _value(recs, metric="kernels_per_call", variant="before", shape=shape.name, tokens=m)
            ka = _value(recs, metric="kernels_per_call", variant="after", shape=shape.name, tokens=m)
            rg = row[("after", "cuda-graph")] / row[("before", "cuda-graph")]
            re_ = row[("after", "cuda-events")] / row[("before", "cuda-events")]
            kn = ""
            if kb and ka and (rg > 1.05 or kb["names"] != ka["names"]):
                kn = f"{_short(kb['names'])} | {_short(ka['names'])}"
            print(f"{shape.name:<26}{m:>6}{row[('before', 'cuda-graph')]:>10.2f}{row[('after', 'cuda-graph')]:>10.2f}"
                  f"{rg:>7.3f}{row[('before', 'cuda-events')]:>10.2f}{row[('after', 'cuda-events')]:>10.2f}{re_:>7.3f}"
                  f"  {str(bw['value']) if bw else '-':<7}  {kn}")
    print("\n== host cost per call (us, lab.timing.host_overhead, M = 1): before | after ==")
    for shape in R.bench_shapes():
        hb = _value(recs, metric="host_overhead", variant="before", shape=shape.name, tokens=1)
        ha = _value(recs, metric="host_overhead", variant="after", shape=shape.name, tokens=1)
        if hb or ha:
            print(f"{shape.name:<26}{hb['value'] if hb else float('nan'):>8.2f} | {ha['value'] if ha else float('nan'):.2f}")
    print("\n== max relative error vs fp64 (max|y - y64| / max|y64|), largest over M ==")
    variants = ["reference", "before", "after", "bf16_linear", "upcast_fp32", "upcast_tf32"]
    print(f"{'shape':<26}" + "".join(f"{v:>13}" for v in variants))
    for shape in R.bench_shapes():
        cells = []
        for v in variants:
            vals = [r["value"] for r in recs if r["metric"] == "max_rel" and r["variant"] == v
                    and r.get("shape") == shape.name]
            cells.append(f"{max(vals):>13.2e}" if vals else f"{'-':>13}")
        print(f"{shape.name:<26}" + "".join(cells))
    print("\n== top-6 flip rate vs fp64 (sqrt-softplus + bias), M = 4096 ==")
    for preset in ("flash", "pro"):
        for case in ("random", "near_tie"):
            vals = {r["variant"]: r["value"] for r in recs if r["metric"] == "topk_flip_rate"
                    and r["preset"] == preset and r.get("case") == case}
            if vals:
                print(f"{preset:<6}{case:<10}" + "  ".join(f"{v}={x:.4f}" for v, x in vals.items()))
    print("\n== aux streams: 3 side-stream GEMMs + 1 main (overlap = sum of kernel times / union span) ==")
    for r in recs:
        if r["metric"] == "stream_overlap":
            step = _value(recs, metric="time", variant=r["variant"], tokens=r["tokens"], case="parallel_step")
            print(f"M={r['tokens']:<6}{r['variant']:<8} overlap {r['value']:.2f}  span {r['span_us']:.1f} us  "
                  f"sum {r['sum_us']:.1f} us  kernels {r['kernels']}  step {step['value'] if step else float('nan'):.1f} us")
    targets = [r for r in recs if r["metric"] == "target_met"]
    if targets:
        met = sum(bool(r["value"]) for r in targets)
        print(f"\ntarget (after <= 1.05 x before, graph replay): met at {met}/{len(targets)} (shape, M) cases")
    errors = [r for r in recs if r["metric"] == "error"]
    if errors:
        print(f"\n{len(errors)} error record(s), first: {errors[0].get('message', '')[:300]}")
    if build_info is not None:
        print(f"build: {build_info.route}, {build_info.seconds:.1f} s, compiled={build_info.compiled}")
    if skipped:
        print(f"skipped for time: {len(skipped)} case(s), first: {skipped[0]}")
    print(f"total {total_s:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
