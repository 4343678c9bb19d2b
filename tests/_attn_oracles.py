"""Float64 oracles and input makers shared by test_compressor / test_indexer / test_attention.

Written independently of dsv4lab's references: RoPE as an explicit pair loop, pooling as a per-block,
per-candidate loop, attention as a dense masked softmax.
"""
from __future__ import annotations

import math

import torch

BF16_MANTISSA = 7      # stored mantissa bits: ulp(v) = 2^(floor(log2 |v|) - 7)


def bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """The bf16 unit in the last place at each |v| (float64), floored at the smallest normal's ulp."""
    a = v.abs().double().clamp(min=2.0 ** -126)
    return torch.exp2(torch.floor(torch.log2(a)) - BF16_MANTISSA)


def assert_within(actual: torch.Tensor, oracle: torch.Tensor, bound: torch.Tensor | float, what: str) -> None:
    err = (actual.double() - oracle.double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64)
    bad = err > bound
    if bool(bad.any()):
        i = int(torch.argmax((err - bound).flatten()))
        idx = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), err.shape))
        raise AssertionError(f"{what}: {int(bad.sum())} elements out of bound; worst at {idx}: actual "
                             f"{float(actual.double()[idx])}, oracle {float(oracle.double()[idx])}, "
                             f"err {float(err[idx]):.3g} > bound {float(bound.expand_as(err)[idx]):.3g}")


def rope64(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """GPT-J RoPE on the last 2*len(inv_freq) dims of x [T, ..., d], pair by pair, in float64."""
    y = x.double().clone()
    d, half = x.shape[-1], inv_freq.numel()
    off = d - 2 * half
    for k in range(half):
        ang = pos.double() * float(inv_freq[k])
        c, s = torch.cos(ang), torch.sin(ang)
        if inverse:
            s = -s
        shape = (x.shape[0],) + (1,) * (x.dim() - 2)
        c, s = c.view(shape), s.view(shape)
        e, o = x[..., off + 2 * k].double(), x[..., off + 2 * k + 1].double()
        y[..., off + 2 * k] = e * c - o * s
        y[..., off + 2 * k + 1] = o * c + e * s
    return y


def rmsnorm64(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    x = x.double()
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w.double()


def compress_oracle(x, wkv, wgate, ape, norm_w, ratio, inv_freq, hd, eps=1e-6) -> torch.Tensor:
    """Per-block loop: candidates listed one by one, softmax over the list, norm, RoPE at i*ratio (float64)."""
    A = x.double() @ wkv.double().T
    S = x.double() @ wgate.double().T + ape.double()[torch.arange(x.shape[0]) % ratio]
    rows = []
    for i in range(x.shape[0] // ratio):
        vals, scores = [], []
        if ratio == 4:
            for t in range(4 * i - 4, 4 * i):          # previous block, first half (absent for i = 0)
                if t >= 0:
                    vals.append(A[t, :hd])
                    scores.append(S[t, :hd])
            for t in range(4 * i, 4 * i + 4):          # own block, second half
                vals.append(A[t, hd:])
                scores.append(S[t, hd:])
        else:
            for t in range(ratio * i, ratio * (i + 1)):
                vals.append(A[t])
                scores.append(S[t])
        sc = torch.stack(scores)
        wts = torch.exp(sc - sc.max(0).values)
        pooled = (wts * torch.stack(vals)).sum(0) / wts.sum(0)
        rows.append(rmsnorm64(pooled[None], norm_w, eps))
    if not rows:
        return torch.empty(0, hd, dtype=torch.float64)
    y = torch.cat(rows)
    return rope64(y, torch.arange(y.shape[0]) * ratio, inv_freq)


def unit_rms(shape, gen: torch.Generator | None = None) -> torch.Tensor:
    """bf16 activations with unit RMS (rows of a [T, D] tensor)."""
    return torch.randn(shape, generator=gen).to(torch.bfloat16)


def weight(out_f: int, in_f: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """bf16 weights ~ N(0, 1/in_f)."""
    return (torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)).to(torch.bfloat16)


def sparse_attention_oracle64(q, kv, idx, sink, scale):
    """Sparse MQA attention with sink in float64, densely: logits over all kv rows, each row weighted by how often
    the token lists it (duplicates count twice; entries outside [0, N) count as masked), the sink appended to the
    normaliser; a token with no candidate gets 0."""
    T, H, d = q.shape
    n = kv.shape[0]
    counts = torch.zeros(T, n + 1, dtype=torch.float64)
    listed = torch.where((idx < 0) | (idx >= n), n, idx.long())
    counts.scatter_add_(1, listed, torch.ones(idx.shape, dtype=torch.float64))
    counts = counts[:, :-1]
    logits = torch.einsum("thd,nd->thn", q.double(), kv.double()) * scale
    full = torch.cat([logits, sink.double().view(1, H, 1).expand(T, H, 1)], -1)
    m = full.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(logits - m) * counts[:, None, :]
    denom = e.sum(-1, keepdim=True) + torch.exp(sink.double().view(1, H, 1) - m)
    o = torch.einsum("thn,nd->thd", e, kv.double())
    return torch.where(denom > 0, o / denom, torch.zeros_like(o))
