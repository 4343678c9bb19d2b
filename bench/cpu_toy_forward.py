"""Time the toy DSv4 Model forward (reference backend) on the CPU and store the records.

    python bench/cpu_toy_forward.py [--tokens 256] [--rep 7] [--threads N] [--out DIR]

Records (experiment "cpu_toy_forward", metric "time", value = median microseconds of ``rep`` calls after
``warmup`` calls; p20/p80 beside it) for three variants: ``vllm`` (fused mHC wiring), ``unfused`` and
``vllm+mtp`` (target forward plus one MTP draft step). On a shared box the numbers depend on the load (recorded
as ``load_avg_before/after``); with more runnable threads than cores, OpenMP spin-waits can make 2-thread runs
10x slower than ``--threads 1``. Written to ``data/results/<slug>/cpu_toy_forward.jsonl``
or ``<out>/cpu_toy_forward.jsonl``. The target is < 1 s per T=256 forward on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from dsv4lab.config import get_config
from dsv4lab.lab import results, timing
from dsv4lab.layers.model import Model

EXPERIMENT = "cpu_toy_forward"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rep", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice; 1 avoids OpenMP spin-waits on a busy box)")
    ap.add_argument("--out", type=Path, default=None, help="directory for the .jsonl (default: data/results/<slug>)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = get_config("toy")
    t0 = time.perf_counter()
    model = Model(cfg, seed=args.seed).eval()
    build_s = time.perf_counter() - t0
    ids = torch.randint(0, cfg.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(args.seed))

    cases = {
        "vllm": lambda: model(ids, wiring="vllm"),
        "unfused": lambda: model(ids, wiring="unfused"),
        "vllm+mtp": lambda: model.forward_with_draft(ids, wiring="vllm"),
    }
    recs, rows = [], []
    with torch.inference_mode():
        for variant, fn in cases.items():
            load_before = os.getloadavg()[0]
            t = timing.bench(fn, device="cpu", warmup=args.warmup, rep=args.rep)
            # the box is shared: the 1-minute load average says how contended the cores were
            recs.append(t.to_record(experiment=EXPERIMENT, op="model_forward", backend="reference", variant=variant,
                                    preset="toy", tokens=args.tokens, dtype="float32",
                                    threads=torch.get_num_threads(), build_s=round(build_s, 3),
                                    load_avg_before=load_before, load_avg_after=os.getloadavg()[0]))
            rows.append((variant, t.p20 / 1e3, t.p50 / 1e3, t.p80 / 1e3))

    path = (args.out / f"{EXPERIMENT}.jsonl") if args.out else results.results_path(EXPERIMENT)
    path.parent.mkdir(parents=True, exist_ok=True)
    results.append(path, recs)

    print(f"toy model, T={args.tokens}, {torch.get_num_threads()} threads, build {build_s:.2f} s, "
          f"warmup {args.warmup}, rep {args.rep}")
    print(f"{'variant':<10} {'p20 ms':>8} {'median ms':>10} {'p80 ms':>8}")
    for variant, p20, p50, p80 in rows:
        print(f"{variant:<10} {p20:8.1f} {p50:10.1f} {p80:8.1f}")
    print(f"wrote {len(recs)} records to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
