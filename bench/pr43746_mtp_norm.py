"""H100 benchmark of vLLM #43746 part 1: fused Triton MTP-input RMSNorm and shared-head RMSNorm.

    python bench/pr43746_mtp_norm.py --out $OUT            # records -> $OUT/pr43746_mtp_norm.jsonl

For D in {4096 (Flash), 7168 (Pro)}, hc_mult 4, bf16, T in {1, 2, 4, ..., 256, 1024, 4096, 8192, 16384} with
positions of packed 128-token sequences (0 at every 128th token): every variant of
``dsv4lab.refactors.pr43746_mtp_norm`` (before_eager, before_compiled, before_kernel_norms, after,
after_two_rounding) gets numerics vs a float64 oracle and vs before_eager (ulp histograms, bitwise flags, masked
rows exactly zero), CUDA-graph replay time (L2 flushed) and eager time (CUDA events, launches included),
% of the measured copy bandwidth, kernels per call at T in {1, 8192}, and the compile time of before_compiled
(first call after torch._dynamo.reset(), token dim dynamic; T = 1 recompiles once). The targets
(after >= 85 % of copy bandwidth at T >= 4096; >= 3x faster than before_eager in eager mode at T <= 64; never
slower than before_compiled) are recorded as ``target_met`` records, never asserted.

Records are appended as each case finishes, so a crash keeps what was measured. Peaks: ``data/results/<gpu>/
peaks.jsonl`` if present, else measured here (and written to ``$OUT/peaks.jsonl``). Total < 120 s: a time
budget (``--budget`` for measurement, ``--deadline`` for the whole sweep) cuts the remaining cases (recorded
as 'unavailable') if anything runs long.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for pr43746_mtp_norm.jsonl (and peaks.jsonl)")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="seconds of measurement (compilation excluded), split over the two D")
    ap.add_argument("--deadline", type=float, default=95.0, help="hard cap in seconds for the whole sweep")
    ap.add_argument("--tokens", type=int, nargs="*", default=None, help="override the token list")
    ap.add_argument("--warps-sweep", type=int, nargs="*", default=[4, 8, 16, 32],
                    help="num_warps settings of the Triton norms to time against the default (graph mode, interleaved)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    import torch

    from dsv4lab.lab import results, roofline
    from dsv4lab.refactors import pr43746_mtp_norm as exp

    if not torch.cuda.is_available():
        print("needs a CUDA GPU (torch.cuda.is_available() is False); the CPU path is `dsv4lab compare`")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{exp.EXPERIMENT}.jsonl"
    print(f"{exp.TITLE}\n{torch.cuda.get_device_name()} | torch {torch.__version__} | records -> {path}")

    peaks = None
    try:
        peaks = roofline.stored_or_measured_peaks(out)
        print(peaks.summary(), f"({peaks.source})")
    except Exception as e:  # no % of peak then, but every other number still comes
        print(f"peaks unavailable ({type(e).__name__}: {e}); times are recorded without % of peak")
        results.append(path, results.record(exp.EXPERIMENT, "peaks", "torch", "measure", None, None, None,
                                            "error", None, None, message=f"{type(e).__name__}: {e}"))

    counts = {"records": 0}

    def sink(batch: list[dict]) -> None:
        if batch:
            counts["records"] += results.append(path, batch)

    rc = 0
    try:
        recs = exp.sweep("cuda", peaks=peaks, tokens=args.tokens or exp.GPU_TOKENS, budget_s=args.budget,
                         deadline_s=args.deadline, on_records=sink)
    except Exception:  # the records of finished cases are already on disk
        traceback.print_exc()
        recs, rc = results.read_records(path) if path.exists() else [], 1
    try:
        sink(warps_sweep(exp, peaks, args.warps_sweep))
    except Exception:
        traceback.print_exc()
    try:
        print("\n".join(exp.summary_lines(recs)))
    except Exception:
        traceback.print_exc()
    print(f"\n{counts['records']} records -> {path}; total {time.perf_counter() - t_start:.0f} s")
    return rc


def _forced(mtp_norm, warps, hints, kernel, args):
    with mtp_norm.forced_launch(num_warps=warps, stream_hints=hints):
        return kernel(*args, 1e-6)


def warps_sweep(exp, peaks, settings: list[int], tokens=(1, 16, 64, 128, 256, 1024, 4096, 16384)) -> list[dict]:
    """Graph replay (L2 flushed) of the Triton norms at each ``num_warps`` in ``settings`` (variant
    ``sweep:after[warps=N]``) and with the L2 streaming hints (``sweep:after[stream_hints]``), interleaved with the
    tuned default (``sweep:after``) and ``sweep:before_compiled`` in
    one ``bench_interleaved`` set per (D, op, T), so the launch policy in ``mtp_norm.TUNING`` is chosen from
    drift-free comparisons."""
    import functools

    from dsv4lab.kernels.triton import mtp_norm
    from dsv4lab.lab import timing

    kernels = {"mtp_input_rmsnorm": mtp_norm.fused_mtp_input_rmsnorm,
               "mtp_shared_head_rmsnorm": mtp_norm.mtp_shared_head_rmsnorm}
    recs: list[dict] = []
    for D, preset in exp.GPU_DIMS.items():
        for op in exp.OPS:
            for T in tokens:
                args = exp.make_inputs(op, T, D, device="cuda")
                cases = {"sweep:after": functools.partial(kernels[op], *args, 1e-6),
                         "sweep:before_compiled": functools.partial(exp.variants(op)["before_compiled"], *args, 1e-6)}
                for w in settings:
                    cases[f"sweep:after[warps={w}]"] = functools.partial(_forced, mtp_norm, w, None, kernels[op], args)
                cases["sweep:after[stream_hints]"] = functools.partial(_forced, mtp_norm, None, True, kernels[op], args)
                try:
                    times = timing.bench_interleaved(cases, rep=100 if T <= 1024 else 20, warmup=3)
                except Exception as e:  # noqa: BLE001
                    recs.append(exp._error(op, "sweep", e, preset=preset, T=T, dtype=args[0].dtype, D=D))
                    continue
                cost = exp.roofline_cost(op, T, D, exp.HC_MULT, args[0].dtype)
                block, _, default_warps = mtp_norm.launch_config(D, T)
                for v, t in times.items():
                    base = "before_compiled" if v == "sweep:before_compiled" else "after"   # backend of the variant
                    fields = {**exp._fields(op, base, preset, T, args[0].dtype, D, exp.HC_MULT), "variant": v}
                    recs.append(t.to_record(cost=cost, peaks=peaks, mode="graph", interleaved=sorted(cases),
                                            tuning={"block": block, "default_num_warps": default_warps}, **fields))
                best = min(times, key=lambda k: times[k].p50)
                print(f"warps sweep {op:24s} D={D} T={T:5d}: default {times['sweep:after'].p50:7.2f} us "
                      f"(warps {default_warps}), compiled {times['sweep:before_compiled'].p50:7.2f}, "
                      f"best {best} {times[best].p50:7.2f}")
    return recs


if __name__ == "__main__":
    sys.exit(main())
