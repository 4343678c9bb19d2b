"""Expert-parallel dispatch/combine bookkeeping: hand-computed plans, and a real 2-process all-to-all over gloo
on the CPU whose result must be bitwise equal to the same expert math done locally, slot by slot."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from dsv4lab.kernels.deep_gemm import ep_dispatch as ep
from dsv4lab.kernels.reference.moe import moe, swiglu_expert
from dsv4lab.quant import dequant_fp4, dequant_fp8, quant_fp4, quant_fp8

D, I, E, K_TOP, WORLD, L = 128, 128, 8, 2, 2, 10.0
TOKENS = (5, 3)          # uneven batches per rank


def test_plan_dispatch_hand_computed():
    ids = torch.tensor([[5, 1], [2, 7]])
    plan = ep.plan_dispatch(ids, experts_per_rank=4, world_size=2)
    assert plan.dest.tolist() == [1, 0, 0, 1]
    assert plan.order.tolist() == [1, 2, 0, 3]          # rank 0's slots first, token order kept
    assert plan.send_counts == [2, 2] and plan.local_ids.tolist() == [1, 1, 2, 3]
    rows = torch.arange(4.0)[:, None] * 10              # row i of the send order = slot order[i]
    assert ep.unsort(rows, plan)[:, 0].tolist() == [20.0, 0.0, 10.0, 30.0]
    with pytest.raises(ValueError, match="ids"):
        ep.plan_dispatch(ids, experts_per_rank=3, world_size=2)


def test_combine_slots_hand_computed():
    slot_out = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    w = torch.tensor([[0.5, 2.0], [1.0, -1.0]])
    assert ep.combine_slots(slot_out, w).tolist() == [[6.5, 9.0], [-2.0, -2.0]]


def _weights():
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(E, I, D, generator=g) / math.sqrt(D)
    w3 = torch.randn(E, I, D, generator=g) / math.sqrt(D)
    w2 = torch.randn(E, D, I, generator=g) / math.sqrt(I)
    return [dequant_fp4(*quant_fp4(w)) for w in (w1, w3, w2)]     # MXFP4 values, like the checkpoint


def _inputs(rank):
    g = torch.Generator().manual_seed(100 + rank)
    t = TOKENS[rank]
    x = torch.randn(t, D, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:K_TOP] for _ in range(t)])
    w = torch.rand(t, K_TOP, generator=g) + 0.1
    return x, (w / w.sum(-1, keepdim=True)).float(), ids


def _row_expert(x32_row, e, w):
    """One row through expert e (fp32), rounded to bf16 like a GEMM output; row by row -> deterministic bits."""
    return swiglu_expert(x32_row, w[0][e], w[1][e], w[2][e], L).bfloat16()


def _worker(rank, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    w = _weights()
    x, weights, ids = _inputs(rank)
    x_q, x_sf = quant_fp8(x, 128)
    epr = E // WORLD

    def local_experts(rx, rsf, rid):
        x32 = dequant_fp8(rx, rsf, 128)
        rows = [_row_expert(x32[r:r + 1], rank * epr + int(rid[r]), w) for r in range(rx.shape[0])]
        return torch.cat(rows) if rows else torch.empty(0, D, dtype=torch.bfloat16)

    rx, _, rid, plan = ep.dispatch(x_q, x_sf, ids, epr, dist.group.WORLD)
    y = ep.ep_moe(x_q, x_sf, weights, ids, epr, local_experts, dist.group.WORLD)
    torch.save({"y": y, "recv_counts": plan.recv_counts, "send_counts": plan.send_counts,
                "recv_local_ids": rid}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_rank_gloo_all_to_all_matches_local_math(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    w = _weights()
    for rank in range(WORLD):
        x, weights, ids = _inputs(rank)
        x32 = dequant_fp8(*quant_fp8(x, 128), 128)
        # counts: what rank r sent to rank q is what q received from r
        for q in range(WORLD):
            assert res[rank]["send_counts"][q] == res[q]["recv_counts"][rank]
        slots = torch.cat([_row_expert(x32[t:t + 1], int(ids[t, j]), w)
                           for t in range(x.shape[0]) for j in range(K_TOP)])
        want = ep.combine_slots(slots, weights)
        assert torch.equal(res[rank]["y"], want)                      # bitwise: the bookkeeping moves bits only
        # and it is the MoE: the only difference to the fp32 reference is the bf16 rounding of each expert output
        # (<= 2^-9 relative per slot), so |y - ref| <= 2^-8 * sum_j w_j |out_j| with room for fp32 noise
        ref = moe(x32, weights, ids, *w, swiglu_limit=L).float()
        bound = 2.0 ** -8 * ep.combine_slots(slots.float().abs(), weights.abs())
        assert bool(((res[rank]["y"] - ref).abs() <= bound + 1e-7).all())
    # what each rank received are local expert ids of its own range
    assert all(int(r["recv_local_ids"].max()) < E // WORLD for r in res)
