"""MegaMoE across 2 GPUs (Hopper): fp8_mega_moe vs the all-to-all + grouped-GEMM fallback (records -> <out>).

    torchrun --nproc-per-node 2 bench/pr44367_megamoe_ep.py --out $OUT [--budget 150] [--tokens 1,64,512,4096]

Needs a 2-GPU host (kind nvidia-h200-x2). Each rank owns E/2 experts of the Flash preset (D=4096, I=2048, E=256,
k=6) and routes its own tokens over all E. Per T (tokens per rank):

- ep_fallback: x -> e4m3 1x128, all_to_all_single dispatch (dsv4lab.kernels.deep_gemm.ep_dispatch), the local
  grouped DeepGEMM GEMMs + Triton SwiGLU-quant on the received rows, all_to_all back, fp32 weighted combine;
  bitwise vs this rank computing the same routed experts itself with all the weights (single-GPU grouped path).
- fp8_mega_moe: the fused kernel over a 2-rank symmetric buffer (NVLS/multicast off); numerics vs the fp64 oracle
  with the fallback as the eager baseline, time, speedup; or the exact error it raises (metric "error", stage).
- issue #10: bitwise vs ``unfused_like_mega`` (dsv4lab/kernels/deep_gemm/mega_moe_unfused.py: the unfused chain
  with the fused kernel's arithmetic, all experts on this rank): metric "bitwise_equal" vs="unfused_like_mega"
  (+ ulp_max, the fraction of this rank's intermediate rows found bitwise in the fused pool, the fused kernel's
  JIT template arguments), fast_math=True (+ False with --unfused-slow-math); bench/mega_unfused_check.py.
Records: experiment "pr44367_megamoe", backend deep_gemm, variant ep_fallback / fp8_mega_moe_sm90_ep2, field
rank; every rank appends its own (atomic appends). Multicast stays off: NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are set before the process group starts.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4lab.kernels.deep_gemm.mega_moe import MULTICAST_OFF_ENV  # noqa: E402

for _k, _v in MULTICAST_OFF_ENV.items():   # before torch.distributed starts anything
    os.environ[_k] = _v

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

EXPERIMENT = "pr44367_megamoe"
SPEC = dict(D=4096, I=2048, E=256, k=6, rsf=1.5)
L = 10.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out")
    ap.add_argument("--budget", type=float, default=150.0)
    ap.add_argument("--tokens", default="1,64,512,4096")
    ap.add_argument("--unfused-slow-math", action="store_true",
                    help="bitwise check vs unfused_like_mega also with fast_math=False (one more fused-kernel JIT "
                         "configuration per T)")
    args = ap.parse_args()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    group = dist.group.WORLD
    t0 = time.perf_counter()

    from dsv4lab.kernels.deep_gemm import ep_dispatch as ep
    from dsv4lab.kernels.deep_gemm import grouped_moe as gm
    from dsv4lab.kernels.deep_gemm.mega_moe import MegaMoESM90
    from dsv4lab.kernels.reference.moe import route
    from dsv4lab.lab import numerics, results, roofline, timing
    from dsv4lab.quant import dequant_fp8, quant_fp8
    from dsv4lab.refactors.pr44367_megamoe import make_weights, oracle64

    out = Path(args.out) / f"{EXPERIMENT}.jsonl"
    recs: list[dict] = []
    lines: list[str] = []
    d, inter, e, k = SPEC["D"], SPEC["I"], SPEC["E"], SPEC["k"]
    epr = e // world
    common = dict(world_size=world, rank=rank, E=e, E_per_rank=epr, D=d, I=inter,
                  env={key: os.environ.get(key) for key in MULTICAST_OFF_ENV})

    def rec(variant, tokens, metric, unit, value, **kw):
        recs.append(results.record(EXPERIMENT, kw.pop("op", "moe_experts"), "deep_gemm", variant, "flash", tokens,
                                   "bfloat16", metric, unit, value, **common, **kw))

    def error(variant, tokens, err, **kw):
        rec(variant, tokens, "error", None, None, message=f"{type(err).__name__}: {err}"[:3000], **kw)
        lines.append(f"rank{rank} ERROR {variant} T={tokens}: {type(err).__name__}: {str(err)[:200]}")
        traceback.print_exc()

    # same weights on every rank (same seed); each rank converts all experts (for the single-GPU check) once
    weights = make_weights(e, d, inter, device="cuda", seed=0)
    experts = gm.prepare_experts(*weights)
    local_experts = gm.HopperExperts(experts.w13[rank * epr:(rank + 1) * epr], experts.w13_sf[rank * epr:(rank + 1) * epr],
                                     experts.w2[rank * epr:(rank + 1) * epr], experts.w2_sf[rank * epr:(rank + 1) * epr],
                                     epr, 0)
    g = torch.Generator(device="cuda").manual_seed(1)
    gate = torch.randn(e, d, generator=g, device="cuda") / d ** 0.5
    bias = 8.08 + 0.05 * torch.randn(e, generator=g, device="cuda")
    tokens = [int(t) for t in args.tokens.split(",")]

    def local_fn(rx, rsf, rid):
        """Received rows through this rank's experts: weight 1, one slot each -> bf16 [R, D]."""
        n = rx.shape[0]
        if n == 0:
            return torch.empty(0, d, dtype=torch.bfloat16, device="cuda")
        dummy = torch.empty(n, d, dtype=torch.bfloat16, device="cuda")
        ones = torch.ones(n, 1, dtype=torch.float32, device="cuda")
        return gm.experts_forward(dummy, ones, rid[:, None], local_experts, swiglu_limit=L, x_quant=(rx, rsf))

    def fallback(x_q, x_sf, w, ids):
        return ep.ep_moe(x_q, x_sf, w, ids, epr, local_fn, group).to(torch.bfloat16)

    mega, stage = None, "symmetric_buffer_and_weights"
    try:
        mega = MegaMoESM90(local_experts, group, max_num_tokens=max(tokens), top_k=k, swiglu_limit=L)
    except Exception as err:  # noqa: BLE001
        error("fp8_mega_moe_sm90_ep2", None, err, stage=stage)

    for t in tokens:
        if time.perf_counter() - t0 > args.budget:
            rec("ep_fallback", t, "skipped", None, None, reason="time budget")
            continue
        gx = torch.Generator(device="cuda").manual_seed(1000 * (rank + 1) + t)
        x = torch.randn(t, d, generator=gx, device="cuda").to(torch.bfloat16)
        w, ids = route(x.float() @ gate.T, k=k, routed_scaling_factor=SPEC["rsf"], bias=bias)
        x_q, x_sf = quant_fp8(x, 128, pow2=True)
        y_single = gm.experts_forward(x, w, ids, gm.HopperExperts(experts.w13, experts.w13_sf, experts.w2,
                                                                   experts.w2_sf, e, 0), swiglu_limit=L)
        y_fb = None
        try:
            dist.barrier()
            t1 = time.perf_counter()
            y_fb = fallback(x_q, x_sf, w, ids)
            torch.cuda.synchronize()
            rec("ep_fallback", t, "first_call_s", "s", time.perf_counter() - t1)
            rec("ep_fallback", t, "bitwise_equal_single_gpu", "bool", bool(torch.equal(y_fb, y_single)))
            dist.barrier()
            tm = timing.bench(lambda: fallback(x_q, x_sf, w, ids), warmup=3, rep=20, flush_l2=False)
            cost = roofline.cost("mega_moe", T=t, D=d, I=inter, E=e, k=k)
            recs.append(tm.to_record(cost=cost, experiment=EXPERIMENT, op="moe_experts", backend="deep_gemm",
                                     variant="ep_fallback", preset="flash", tokens=t, dtype="bfloat16", **common))
            lines.append(f"rank{rank} T={t}: ep_fallback {tm.p50:.1f} us, bitwise vs 1 GPU {torch.equal(y_fb, y_single)}")
        except Exception as err:  # noqa: BLE001
            error("ep_fallback", t, err)
        if mega is None:
            continue
        stage = "first_call"
        try:
            dist.barrier()
            t1 = time.perf_counter()
            y_m = mega(x_q, x_sf, w, ids)
            torch.cuda.synchronize()
            rec("fp8_mega_moe_sm90_ep2", t, "first_call_s", "s", time.perf_counter() - t1, op="mega_moe")
            stage = "timing"
            dist.barrier()
            tm = timing.bench(lambda: mega(x_q, x_sf, w, ids), warmup=3, rep=20, flush_l2=False)
            recs.append(tm.to_record(cost=roofline.cost("mega_moe", T=t, D=d, I=inter, E=e, k=k),
                                     experiment=EXPERIMENT, op="mega_moe", backend="deep_gemm",
                                     variant="fp8_mega_moe_sm90_ep2", preset="flash", tokens=t, dtype="bfloat16",
                                     **common))
            stage = "numerics"
            y64 = oracle64(dequant_fp8(x_q, x_sf, 128), w, ids, *weights, swiglu_limit=L)
            c = numerics.compare(y64, y_fb if y_fb is not None else y_single, y_m)
            recs += c.to_records(experiment=EXPERIMENT, op="mega_moe", backend="deep_gemm",
                                 variant="fp8_mega_moe_sm90_ep2", preset="flash", tokens=t,
                                 eager_variant="ep_fallback", **common)
            lines.append(f"rank{rank} T={t}: fp8_mega_moe {tm.p50:.1f} us, rel_rms {c.rel_rms:.2e} "
                         f"(fallback {c.eager_rel_rms:.2e})")
        except Exception as err:  # noqa: BLE001
            error("fp8_mega_moe_sm90_ep2", t, err, stage=stage, op="mega_moe")
        # issue #10: bitwise vs the unfused chain with the fused kernel's arithmetic (all experts on this rank);
        # both ranks run it (the fused calls inside are collective), failures become "error" records
        import mega_unfused_check

        rows, check_lines = mega_unfused_check.check(
            mega, x_q, x_sf, w, ids, gm.HopperExperts(experts.w13, experts.w13_sf, experts.w2, experts.w2_sf, e, 0),
            swiglu_limit=L, local_experts=(rank * epr, (rank + 1) * epr), barrier=dist.barrier,
            fast_maths=(True, False) if args.unfused_slow_math else (True,))
        for r in rows:
            r = dict(r)
            head = [r.pop(key) for key in ("variant", "metric", "unit", "value")]
            rec("fp8_mega_moe_sm90_ep2", t, *head[1:], op="mega_moe", **r)
        lines.extend(f"rank{rank} T={t}:{line}" for line in check_lines)
    results.append(out, recs)
    for r in range(world):
        dist.barrier()
        if r == rank:
            print(f"rank{rank}: {len(recs)} records -> {out} ({time.perf_counter() - t0:.1f} s)")
            for line in lines:
                print(line)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
