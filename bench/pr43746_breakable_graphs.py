"""H100 benchmark of vLLM #43746 part 2: breakable CUDA graphs vs torch.compile + piecewise graphs vs eager.

    python bench/pr43746_breakable_graphs.py --out $OUT      # records -> $OUT/pr43746_breakable_graphs.jsonl

A DSv4 decoder stack at Flash width (``dsv4lab.layers.stack``: L = 8 layers, 8 local experts top-6 + shared, bf16,
window attention over a per-sequence KV ring; ~5 GiB of weights) runs decode steps of T in {1, 8, 64, 256}
sequences in four modes (``dsv4lab.refactors.pr43746_breakable_graphs``): eager; before = each inter-attention
piece torch.compile'd (mode "default", fullgraph, token dim dynamic) and captured as its own CUDA graph, attention
as a torch.library custom op between them; after = the breakable capture of the uncompiled stack; full = one graph
with the attention captured inline (padded metadata). Per (T, mode): startup (warm-up incl. compile + capture),
graphs and breaks, equality with eager over 100 steps whose index lists, positions and launch width change
(bitwise or within tolerance, recorded which), latency per forward (CUDA events, p20/p50/p80), host issue time,
and kernels per forward (profiler, at T in {1, 64}). Targets (after <= 1.3x full, <= 0.5x eager for T <= 64; after
startup <= 20% of before's) are recorded as ``target_met`` records, never asserted.

mHC kernels: the fastest available registry backend (TileLang on the H100), falling back to the fp32 reference if
a TileLang kernel fails to build (recorded). Order: eager/after/full for every T, then ``before`` for every T, so
a slow Inductor compile is what a ``--deadline`` cuts. Records are appended as each case finishes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for pr43746_breakable_graphs.jsonl")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="*", default=None, help="default 1 8 64 256 (dry run: 1 4)")
    ap.add_argument("--modes", nargs="*", default=["eager", "after", "full", "before"])
    ap.add_argument("--steps", type=int, default=100, help="replays with changing metadata per equality check")
    ap.add_argument("--rep", type=int, default=30, help="timed forwards per (T, mode)")
    ap.add_argument("--kernel-tokens", type=int, nargs="*", default=None, help="default 1 64 (dry run: 4)")
    ap.add_argument("--mhc-backend", default="auto", help="auto | tilelang | reference")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="exercise this script on a CPU: toy width, L 2, fake graph backend, Dynamo 'eager' backend")
    ap.add_argument("--deadline", type=float, default=135.0,
                    help="seconds after start past which no case starts that needs a new compile")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    import torch

    from dsv4lab import graphs
    from dsv4lab.lab import results
    from dsv4lab.layers.stack import DecoderStack, stack_config
    from dsv4lab.refactors import pr43746_breakable_graphs as exp

    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("needs a CUDA GPU (torch.cuda.is_available() is False); try --cpu-dry-run")
        return 2
    device, preset = ("cpu", "toy") if dry else ("cuda", "flash")
    backend_factory = graphs.FakeGraphBackend if dry else graphs.CudaGraphBackend
    if dry:
        args.layers, args.experts, args.steps, args.rep, args.compile_backend = 2, 4, 3, 2, "eager"
    if args.tokens is None:
        args.tokens = [1, 4] if dry else [1, 8, 64, 256]
    if args.kernel_tokens is None:
        args.kernel_tokens = [4] if dry else [1, 64]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{exp.EXPERIMENT}.jsonl"
    print(f"{exp.TITLE}\n{'CPU dry run' if dry else torch.cuda.get_device_name()} | torch {torch.__version__} | records -> {path}")

    def sink(batch: list[dict]) -> None:
        results.append(path, batch)

    cfg = stack_config(preset, num_layers=args.layers, experts=args.experts)
    stack = DecoderStack(cfg, device=device, mhc_backend=args.mhc_backend, max_seqs=max(args.tokens + [2]))
    def smoke() -> str | None:
        """First forward (builds the mHC kernels: TileLang JIT), then a breakable capture that must replay
        bitwise like eager. None if fine, else the error."""
        try:
            step = stack.new_step(2)
            step.set([5, 300], torch.randn(2, cfg.hidden_size, device=device).to(torch.bfloat16))
            stack.forward(step)
            runner = exp.Runner("after", stack, step, graph_backend=backend_factory(), warmup=1)
            stack.reset_cache()
            ref = stack.forward(step).clone()
            stack.reset_cache()
            got = runner.run().clone()
            if not dry:
                torch.cuda.synchronize()
            if not torch.equal(got, ref):
                return f"breakable replay differs from eager (max abs {(got.float() - ref.float()).abs().max()})"
            return None
        except Exception as e:
            return f"{type(e).__name__}: {str(e)[:1500]}"

    def setup_error(msg: str) -> None:
        sink([results.record(experiment=exp.EXPERIMENT, op=exp.OP, backend=stack.mhc_backend, variant="setup",
                             preset=preset, tokens=2, dtype="bfloat16", metric="error", unit=None, value=None,
                             message=msg)])
        print(f"setup: {msg}")

    t0 = time.perf_counter()
    problem = smoke()
    if problem and stack.mhc_backend != "reference":
        setup_error(f"mHC {stack.mhc_backend} smoke test (forward + breakable capture) failed, using the "
                    f"reference: {problem}")
        stack.use_mhc_backend("reference", f"fallback: {stack.mhc_backend} smoke test failed")
        problem = smoke()
    if problem:  # measure anyway: every case records its own error
        setup_error(f"smoke test failed with mHC {stack.mhc_backend}: {problem}")
    print(f"stack: {stack.describe()} ({stack.mhc_backend_reason}); smoke test {time.perf_counter() - t0:.1f} s")

    remaining = args.deadline - (time.perf_counter() - t_start)
    records = exp.sweep(stack, preset=preset, tokens=args.tokens, modes=args.modes, steps=args.steps, rep=args.rep,
                        kernel_tokens=args.kernel_tokens, compile_backend=args.compile_backend,
                        graph_backend_factory=backend_factory, capture_warmup=1 if dry else 2,
                        deadline_s=max(remaining, 0.0), sink=sink, progress=True)
    print("\n" + "\n".join(exp.summary_lines(records)))
    errors = sum(r["metric"] == "error" for r in records)
    print(f"{len(records)} records ({errors} errors) -> {path} in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
