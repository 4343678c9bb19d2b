"""``dsv4lab env | compare | bench | report | inspect`` -- the command line over the registry and the harness."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _device(arg: str | None) -> str:
    import torch

    if arg in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if arg == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch")
    if arg not in ("cpu", "cuda"):
        raise SystemExit(f"--device: expected cpu, cuda or auto, got {arg!r}")
    return arg


def _table(rows: list[dict], cols: list[str]) -> str:
    if not rows:
        return "(no rows)"
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, width)).rstrip()
    return "\n".join([line(cols), line(["-" * w for w in width])] + [line(r) for r in cells])


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v)
    return s if len(s) <= 70 else s[:67] + "..."


def cmd_env(args: argparse.Namespace) -> int:
    import torch

    from .kernels import registry
    from .lab import results

    prov = results.provenance()
    print("machine")
    for k in ("gpu", "driver", "cuda", "torch", "triton", "tilelang", "deep_gemm", "commit"):
        print(f"  {k:10s} {prov.get(k)}")
    print(f"  {'threads':10s} {torch.get_num_threads()}")
    print(f"  {'slug':10s} {results.gpu_slug()}")
    print("\nbackends (op x backend)")
    rows = registry.matrix()
    print(_table(rows, ["op", "backend", "available", "preference", "reason"]))
    return 0


_WIDE = ("time", "max_abs", "rel_rms", "err_ratio", "bitwise_equal", "passed", "kernels_per_call", "host_overhead")


def _summary_rows(records: list[dict]) -> list[dict]:
    """One row per (op, variant, backend, T) with the key metrics as columns; other metrics as notes."""
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (r.get("experiment"), r.get("op"), r.get("variant"), r.get("backend"), r.get("tokens"))
        row = rows.setdefault(key, {"experiment": key[0], "op": key[1], "variant": key[2], "backend": key[3],
                                    "T": key[4], "note": ""})
        m = r.get("metric")
        if m == "time":
            row["time"] = f"{r['value']:.4g} {r.get('unit', '')} ({r.get('timing_mode', '?')})"
        elif m in _WIDE:
            row[m] = r.get("value")
        elif m in ("unavailable", "error"):
            row["note"] += f"{m}: {r.get('reason') or r.get('message') or r.get('value')}; "
        elif m not in ("calc_diff", "nonfinite", "ulp_max", "ulp_max_vs_oracle"):
            row["note"] += f"{m}={_fmt(r.get('value'))}; "
    return list(rows.values())


_COMPARE_COLS = ["op", "variant", "backend", "T", "time", "max_abs", "rel_rms", "err_ratio", "bitwise_equal",
                 "passed", "kernels_per_call", "host_overhead", "note"]


def cmd_compare(args: argparse.Namespace) -> int:
    from . import refactors
    from .lab import results

    device = _device(args.device)
    out_root = Path(args.out)
    print(f"dsv4lab compare on {device} ({'quick' if args.quick else 'full'}); records -> {out_root}/{results.gpu_slug()}/")
    all_rows, failures = [], 0
    for name, mod, why in refactors.load_all():
        if args.only and name not in args.only:
            continue
        if mod is None:
            all_rows.append({"experiment": name, "metric": "unavailable", "value": why})
            continue
        t0 = time.perf_counter()
        try:
            recs = mod.run(device=device, quick=args.quick, preset=args.preset)
        except Exception as e:  # one experiment failing must not hide the others
            failures += 1
            msg = f"{type(e).__name__}: {e}"
            all_rows.append({"experiment": name, "metric": "error", "value": msg})
            # stored too, so `dsv4lab report` lists the failed run next to the experiment's other records
            results.append(results.results_path(getattr(mod, "EXPERIMENT", name), root=out_root),
                           results.record(getattr(mod, "EXPERIMENT", name), "(run)", "-", "run", args.preset, None,
                                          None, "error", None, None, message=msg, device=device))
            continue
        if recs:
            results.append(results.results_path(mod.EXPERIMENT, root=out_root), recs)
        rows = _summary_rows(recs)
        all_rows.extend(rows)
        print(f"\n== {getattr(mod, 'TITLE', name)}  ({len(recs)} records, {time.perf_counter() - t0:.1f} s)")
        cols = [c for c in _COMPARE_COLS if any(r.get(c) not in (None, "") for r in rows)]
        print(_table(rows, cols))
    if args.checkpoint:
        failures += _compare_checkpoint(args, device, out_root)
    missing = [r for r in all_rows if r.get("metric") in ("unavailable", "error")]
    if missing:
        print("\n== not run")
        print(_table(missing, ["experiment", "metric", "value"]))
    return 1 if failures else 0


CHECKPOINT_OPS = ("mhc_pre", "mhc_fused_post_pre", "rmsnorm", "router_gemm", "moe_routing",
                  "hc_head", "mtp_input_rmsnorm", "mtp_shared_head_rmsnorm")


def _compare_checkpoint(args: argparse.Namespace, device: str, out_root: Path) -> int:
    """Every backend of every op the layer's real weights feed, against the reference (real weights,
    synthetic unit-RMS activations). Returns the number of ops that failed to run."""
    from . import checkpoint, sweep
    from .kernels import registry
    from .lab import results

    layer = args.layer if args.layer is not None else "0"
    lw = checkpoint.layer_inputs_from(args.checkpoint, int(layer) if layer.isdigit() else layer, experts=[])
    tokens = [1, 64] if args.quick else [1, 64, 4096]
    print(f"\n== real weights: {args.checkpoint}, layer {lw.prefix.rstrip('.') or 'top'} ({lw.cfg.name})")
    rows, failures = [], 0
    for op in CHECKPOINT_OPS:
        if op not in registry.ops():
            continue
        try:
            lw.op_inputs(op, 1)
        except ValueError as e:  # the op needs tensors another layer has (e.g. hc_head: 'top')
            rows.append({"op": op, "note": f"skipped: {e}"})
            continue
        try:
            recs = sweep.bench(op, tokens=tokens, device=device, weights=lw)
        except Exception as e:
            failures += 1
            rows.append({"op": op, "note": f"error: {type(e).__name__}: {e}"})
            continue
        results.append(results.results_path(sweep.EXPERIMENT, root=out_root), recs)
        rows.extend(_summary_rows(recs))
    print(_table(rows, [c for c in _COMPARE_COLS if any(r.get(c) not in (None, "") for r in rows)]))
    return failures


def cmd_bench(args: argparse.Namespace) -> int:
    from . import sweep
    from .lab import results

    device = _device(args.device)
    tokens = [int(t) for t in args.tokens.split(",") if t]
    recs = sweep.bench(args.op, preset=args.preset, tokens=tokens, device=device, graph=args.graph)
    path = results.results_path(sweep.EXPERIMENT, root=Path(args.out))
    if recs:
        results.append(path, recs)
    rows = _summary_rows(recs)
    print(_table(rows, [c for c in _COMPARE_COLS if any(r.get(c) not in (None, "") for r in rows)]))
    print(f"\n{len(recs)} records -> {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .lab import report

    roots = args.root or ["data/results"]
    path = report.build_report(root=roots[0] if len(roots) == 1 else roots, out=args.out)
    print(f"wrote {path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import checkpoint

    return checkpoint.main_inspect(args.path, layer=args.layer)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv4lab", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("env", help="machine, library versions and the backend matrix")
    s.set_defaults(func=cmd_env)
    s = sub.add_parser("compare", help="every refactor's before vs after numerics and timing on this device")
    s.add_argument("--device", default="auto")
    s.add_argument("--preset", default="flash", choices=["toy", "flash", "pro"])
    s.add_argument("--full", dest="quick", action="store_false", help="all shapes of the experiment design")
    s.add_argument("--only", nargs="*", help="experiment module names to run")
    s.add_argument("--out", default="out/results", help="results root (default: out/results, not data/)")
    s.add_argument("--checkpoint", help="a DSv4 checkpoint (dir or .safetensors): also run every op on its real weights")
    s.add_argument("--layer", default=None, help="with --checkpoint: layer index, 'mtp' or 'top' (default 0)")
    s.set_defaults(func=cmd_compare)
    s = sub.add_parser("bench", help="time one op (or all) through every available backend")
    s.add_argument("op")
    s.add_argument("--preset", default="flash", choices=["toy", "flash", "pro"])
    s.add_argument("--tokens", default="1,64,4096")
    s.add_argument("--device", default="auto")
    s.add_argument("--graph", action="store_true", help="time CUDA-graph replays (GPU only)")
    s.add_argument("--out", default="out/results")
    s.set_defaults(func=cmd_bench)
    s = sub.add_parser("report", help="one offline HTML page of charts from stored results")
    s.add_argument("--root", nargs="*", help="results roots (default data/results)")
    s.add_argument("--out", default="report.html")
    s.set_defaults(func=cmd_report)
    s = sub.add_parser("inspect", help="layer table of a DSv4 checkpoint directory (reads headers only)")
    s.add_argument("path")
    s.add_argument("--layer", default=None)
    s.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not __import__("torch").cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:  # bad arguments: one clear line, no traceback
        print(f"dsv4lab {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
