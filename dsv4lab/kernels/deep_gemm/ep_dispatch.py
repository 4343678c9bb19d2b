"""Expert parallelism without MegaMoE: all-to-all dispatch -> local experts -> all-to-all combine.

What MegaMoE does inside one kernel, done with two ``torch.distributed.all_to_all_single`` exchanges around the
local grouped GEMMs (the fallback on Hopper, and the unfused baseline of the fused kernel):

    slot (t, j) of rank r goes to rank  dst = ids[t, j] // experts_per_rank  as local expert  ids[t, j] % epr
    send:    slots sorted by dst (stable, so each destination gets them in token order); counts exchanged first
    compute: every received row through its local expert (one output row per received row)
    return:  the same exchange backwards; rows come back in the sorted order and are put back into slot order
    combine: y[t] = sum_j w[t, j] * out[t, j] in fp32, j in slot order (weights never leave the source rank)

The index math (``plan_dispatch``, ``unsort``) is pure torch and device-agnostic; ``dispatch`` / ``return_rows``
need an initialised process group (gloo on CPU in the tests, NCCL on GPUs). fp8 and bf16 payloads travel as
uint8 views of their bytes (gloo's all_to_all rejects float8, bfloat16 and int16).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..reference import _checks as chk

ExpertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DispatchPlan:
    """Where this rank's slots go: ``order`` = flattened slot indices sorted by destination rank (stable);
    ``send_counts[r]`` slots go to rank r; ``recv_counts[r]`` rows arrive from rank r (after the count exchange)."""

    order: torch.Tensor          # int64 [T*k]
    dest: torch.Tensor           # int64 [T*k] destination rank of each slot (slot order)
    local_ids: torch.Tensor      # int64 [T*k] local expert id on the destination (slot order)
    send_counts: list[int]
    recv_counts: list[int] | None = None


def plan_dispatch(ids: torch.Tensor, experts_per_rank: int, world_size: int) -> DispatchPlan:
    """Destination rank and local expert of every slot of ``ids [T, k]`` (global expert ids)."""
    chk.tensor("ids", ids, chk.INT_DTYPES, dim=2)
    chk.positive_int("experts_per_rank", experts_per_rank)
    chk.positive_int("world_size", world_size)
    flat = ids.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= experts_per_rank * world_size):
        raise ValueError(f"ids: expected expert ids in [0, {experts_per_rank * world_size})")
    dest = flat // experts_per_rank
    order = torch.argsort(dest, stable=True)
    counts = torch.bincount(dest, minlength=world_size).tolist()
    return DispatchPlan(order, dest, flat % experts_per_rank, counts)


def unsort(rows_in_send_order: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Inverse of the send permutation: row i of the input belongs to slot ``plan.order[i]``."""
    out = torch.empty_like(rows_in_send_order)
    out[plan.order] = rows_in_send_order
    return out


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    import torch.distributed as dist

    out = torch.empty((sum(recv), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


def dispatch(x_q: torch.Tensor, x_sf: torch.Tensor, ids: torch.Tensor, experts_per_rank: int, group
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DispatchPlan]:
    """Send each slot's fp8 token row (+ scales, + local expert id) to the rank owning its expert.
    Returns (recv x_q e4m3 [R, D], recv x_sf [R, D/128], recv local ids int64 [R], plan)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    plan = plan_dispatch(ids, experts_per_rank, world)
    k = ids.shape[1]
    tokens = plan.order // k
    send = torch.tensor(plan.send_counts, dtype=torch.int64, device=x_q.device)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    plan.recv_counts = recv.tolist()
    rx = _exchange(x_q.view(torch.uint8)[tokens], plan.send_counts, plan.recv_counts, group)
    rsf = _exchange(x_sf[tokens], plan.send_counts, plan.recv_counts, group)
    rid = _exchange(plan.local_ids[plan.order], plan.send_counts, plan.recv_counts, group)
    return rx.view(torch.float8_e4m3fn), rsf, rid, plan


def return_rows(out_recv: torch.Tensor, plan: DispatchPlan, group) -> torch.Tensor:
    """Send the expert outputs back (the reverse exchange); returns them in this rank's SLOT order [T*k, D]."""
    if plan.recv_counts is None:
        raise ValueError("plan: dispatch() has not filled recv_counts")
    # as raw bytes: the row layout is unchanged and every backend moves uint8 (gloo has no bf16/int16 here)
    back = _exchange(out_recv.contiguous().view(torch.uint8), plan.recv_counts, plan.send_counts, group)
    return unsort(back.view(out_recv.dtype), plan)


def combine_slots(slot_out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``y[t] = sum_j w[t, j] * slot_out[t*k + j]`` in fp32, j in slot order."""
    t, k = weights.shape
    rows = slot_out.reshape(t, k, -1)
    y = torch.zeros((t, rows.shape[-1]), dtype=torch.float32, device=slot_out.device)
    for j in range(k):
        y.addcmul_(rows[:, j].float(), weights[:, j:j + 1].float())
    return y


def ep_moe(x_q: torch.Tensor, x_sf: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts_per_rank: int,
           local_experts: ExpertFn, group) -> torch.Tensor:
    """Routed experts across ranks: dispatch, ``local_experts(recv_x_q, recv_x_sf, recv_local_ids) -> [R, D]``,
    return, weighted combine. Returns fp32 [T, D] (the caller adds the shared expert and rounds)."""
    rx, rsf, rid, plan = dispatch(x_q, x_sf, ids, experts_per_rank, group)
    out = local_experts(rx, rsf, rid)
    if out.shape[0] != rx.shape[0]:
        raise ValueError(f"local_experts: expected one output row per received row ({rx.shape[0]}), got {out.shape[0]}")
    return combine_slots(return_rows(out, plan, group), weights)
