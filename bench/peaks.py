"""Measure this GPU's peaks and check the timing harness on it (GPU script, well under 60 s).

    python bench/peaks.py --out $OUT

Writes every record (experiment "peaks") to ``<out>/peaks.jsonl``; copy it to ``data/results/<gpu-slug>/`` to
make it the denominator of "% of peak" (``roofline.load_peaks``). Steps, each recorded as an "error" record if it
fails, so one failure never loses the others:

1. ``measure_peaks()``: 1 GiB device copy (read + write), bf16 8192^3 matmul, fp8 e4m3 ``torch._scaled_mm``.
   Expected on an H100 SXM (stack.md, measured before): about 3.0 TB/s and 790 TFLOP/s.
2. ``kernels_per_call`` of three in-place elementwise ops on three distinct tensors: must read 3.
3. L2 flush visible: a 16 MiB copy (fits in the 50 MB L2) timed with and without the flush.
4. CUDA graph vs events on a launch-bound chain of 20 tiny ops, and ``host_overhead`` of one tiny op.
5. A roofline-annotated time record: bf16 GEMM with fp32 out (``torch.mm(out_dtype=)``) at 4096^3.
Exit status 1 if a check fails (after all records are written).
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dsv4lab.lab import results, roofline, timing  # noqa: E402

EXPECTED = {"copy TB/s": (3.0, 0.15), "bf16 TFLOP/s": (790.0, 0.15)}  # value, relative tolerance (H100 SXM)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out", help="folder for peaks.jsonl")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/peaks.py needs a CUDA GPU; nothing measured.")
        return 2
    out = Path(args.out) / "peaks.jsonl"
    t_start = time.perf_counter()
    recs: list[dict] = []
    lines: list[tuple[str, str, str]] = []  # (check, measured, verdict)
    failed = False

    def rec(op: str, variant: str, metric: str, unit: str | None, value, **extra) -> dict:
        r = results.record("peaks", op, "torch", variant, None, extra.pop("tokens", None),
                           extra.pop("dtype", None), metric, unit, value, **extra)
        recs.append(r)
        return r

    def step(name: str, fn) -> None:
        nonlocal failed
        try:
            fn()
        except Exception as e:
            failed = True
            rec(name, "check", "error", None, None, message=f"{type(e).__name__}: {e}")
            lines.append((name, "error", f"FAIL {type(e).__name__}: {e}"))
            traceback.print_exc()

    def expect(name: str, value: float) -> str:
        nonlocal failed
        target, tol = EXPECTED[name]
        ok = abs(value / target - 1) <= tol
        failed |= not ok
        return f"{'OK' if ok else 'WARN'} (expected ~{target:g} +-{tol:.0%} on an H100 SXM)"

    peaks_box: dict[str, roofline.Peaks] = {}

    def peaks() -> None:
        p = roofline.measure_peaks()
        peaks_box["p"] = p
        recs.extend(p.to_records())
        lines.append(("copy TB/s (read+write)", f"{p.copy_bw / 1e12:.3f}", expect("copy TB/s", p.copy_bw / 1e12)))
        lines.append(("bf16 8192^3 TFLOP/s", f"{p.bf16_flops / 1e12:.1f}", expect("bf16 TFLOP/s", p.bf16_flops / 1e12)))
        fp8 = "n/a" if p.fp8_flops is None else f"{p.fp8_flops / 1e12:.1f}"
        lines.append(("fp8 8192^3 TFLOP/s (_scaled_mm)", fp8, "info"))

    def three_kernels() -> None:
        nonlocal failed
        a, b, c = (torch.randn(1 << 20, device="cuda") for _ in range(3))

        def fn() -> None:
            a.add_(1.0)
            b.mul_(2.0)
            c.neg_()

        kc = timing.kernels_per_call(fn)
        recs.append(kc.to_record(experiment="peaks", op="three_elementwise", backend="torch", variant="check",
                                 preset=None, tokens=None, dtype="float32", expected=3))
        ok = kc.count == 3
        failed |= not ok
        lines.append(("kernels_per_call(3 elementwise ops)", str(kc.count), "OK" if ok else f"FAIL {kc.names}"))

    def l2_flush() -> None:
        src = torch.empty(16 * 2**20, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        for flush in (False, True):
            t = timing.bench(lambda: dst.copy_(src), flush_l2=flush, rep=50)
            recs.append(t.to_record(experiment="peaks", op="copy_16MiB", backend="torch", variant=f"flush={flush}",
                                    preset=None, tokens=None, dtype="uint8"))
            lines.append((f"16 MiB copy, flush_l2={flush} (us p50)", f"{t.p50:.2f}", "info"))

    def graph_vs_events() -> None:
        x = torch.zeros(1, device="cuda")

        def chain() -> None:
            for _ in range(20):
                x.add_(1.0)

        for graph in (False, True):
            t = timing.bench(chain, graph=graph, flush_l2=False, rep=50)
            recs.append(t.to_record(experiment="peaks", op="chain_20_tiny_adds", backend="torch",
                                    variant=t.mode, preset=None, tokens=None, dtype="float32"))
            lines.append((f"20 tiny adds, {t.mode} (us p50)", f"{t.p50:.2f}", "info"))
        us = timing.host_overhead(lambda: x.add_(1.0), n=1000)
        rec("tiny_add", "check", "host_overhead", "us", us, dtype="float32")
        lines.append(("host_overhead(one tiny add) us/call", f"{us:.2f}", "info"))

    def gemm_roofline() -> None:
        n = 4096
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        t = timing.bench(lambda: torch.mm(a, w.t(), out_dtype=torch.float32), rep=30)
        c = roofline.cost("bf16_gemm_fp32_out", T=n, N=n, K=n)
        r = t.to_record(cost=c, peaks=peaks_box.get("p"), experiment="peaks", op="bf16_gemm_fp32_out",
                        backend="torch", variant="mm_out_dtype", preset=None, tokens=n, dtype="bfloat16")
        recs.append(r)
        pct = "n/a" if r["pct_of_peak"] is None else f"{r['pct_of_peak']:.1f}% of {r['peak']}"
        lines.append(("bf16 GEMM fp32-out 4096^3 (us p50)", f"{t.p50:.1f}", pct))

    for name, fn in (("peaks", peaks), ("kernels_per_call", three_kernels), ("l2_flush", l2_flush),
                     ("graph_vs_events", graph_vs_events), ("gemm_roofline", gemm_roofline)):
        step(name, fn)

    results.append(out, recs)
    print(f"\n{results.provenance()['gpu']}  (slug {results.gpu_slug()}), torch {torch.__version__}")
    width = max(len(c) for c, _, _ in lines)
    for check, measured, verdict in lines:
        print(f"  {check:<{width}}  {measured:>10}  {verdict}")
    print(f"{len(recs)} records -> {out}  ({time.perf_counter() - t_start:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
