"""mHC (manifold-constrained hyper-connections) references, dsv4-layers.md section 2.

The residual state is ``R [T, n, D]`` (n = hc_mult = 4 streams, bf16 in the model). Each sublayer owns
``fn [(2+n)n, nD]``, ``base [(2+n)n]``, ``scale [3]`` (fp32). Per token, with ``x = flatten(R)`` in fp32:

    m       = (x @ fn.T) * rsqrt(mean(x^2) + rms_eps)          # RMS factor applied AFTER the GEMM, no weight
    pre_i   = sigmoid(m[i]      * scale[0] + base[i])      + hc_eps        i < n
    post_i  = sigmoid(m[n+i]    * scale[1] + base[n+i])    * post_mult     i < n
    comb    = sinkhorn(m[2n:].view(n, n) * scale[2] + base[2n:])           comb[j, k], row-major
    y       = round(sum_i pre_i * R[i])                      -> RMSNorm(y; norm_weight) -> round
    R'[k]   = round(post[k] * f + sum_j comb[j, k] * R[j])   # mhc_post: output stream k takes COLUMN k

All math is fp32; outputs are rounded once to the residual dtype. These functions are the contract every
fused mHC kernel (TileLang, Triton) is checked against; their signatures are shared by all backends.
"""
from __future__ import annotations

import torch

from . import _checks as chk
from .norms import rmsnorm

_F32 = (torch.float32,)


def sinkhorn(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """Sinkhorn-Knopp in the exact DSv4 order (dsv4-layers.md 2.3), on the last two dims ``[..., n, n]``.

        C = softmax(logits, -1) + eps                 # the first row pass is the softmax itself
        C = C / (C.sum(-2) + eps)                     # columns
        repeat iters - 1 times:  rows, then columns   # C / (C.sum(-1) + eps);  C / (C.sum(-2) + eps)

    The last pass normalises columns, so columns sum to ``S/(S+eps) = 1 - O(eps)``; rows only approximately.
    """
    chk.tensor("logits", logits, _F32)
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits: expected [..., n, n], got shape {tuple(logits.shape)}")
    chk.positive_int("iters", iters)
    chk.positive_float("eps", eps)
    c = torch.softmax(logits, dim=-1) + eps
    c = c / (c.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(dim=-1, keepdim=True) + eps)
        c = c / (c.sum(dim=-2, keepdim=True) + eps)
    return c


def _check_residual(residual: torch.Tensor) -> tuple[int, int, int]:
    chk.tensor("residual", residual, chk.FLOAT_DTYPES, dim=3)
    return tuple(residual.shape)  # type: ignore[return-value]


def check_mix_params(fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n: int, d: int,
                     n_mix: int, n_scale: int) -> None:
    """fn [n_mix, n*D], scale [n_scale], base [n_mix], all fp32 (every mHC backend's contract)."""
    chk.tensor("fn", fn, _F32, dim=2)
    chk.shape("fn", fn, (n_mix, n * d))
    chk.tensor("scale", scale, _F32, dim=1)
    chk.shape("scale", scale, (n_scale,))
    chk.tensor("base", base, _F32, dim=1)
    chk.shape("base", base, (n_mix,))


def _check_pre(residual, fn, scale, base, norm_weight, rms_eps, hc_eps, post_mult, sinkhorn_iters) -> None:
    t, n, d = _check_residual(residual)
    check_mix_params(fn, scale, base, n, d, (2 + n) * n, 3)
    if norm_weight is not None:
        chk.tensor("norm_weight", norm_weight, chk.FLOAT_DTYPES, dim=1)
        chk.shape("norm_weight", norm_weight, (d,))
    chk.same_device(residual=residual, fn=fn, scale=scale, base=base, norm_weight=norm_weight)
    chk.positive_float("rms_eps", rms_eps)
    chk.positive_float("hc_eps", hc_eps)
    chk.positive_float("post_mult", post_mult)
    chk.positive_int("sinkhorn_iters", sinkhorn_iters)


def _check_post(f, residual, post, comb) -> None:
    t, n, d = _check_residual(residual)
    chk.tensor("f", f, (residual.dtype,), dim=2)
    chk.shape("f", f, (t, d))
    chk.tensor("post", post, _F32, dim=2)
    chk.shape("post", post, (t, n))
    chk.tensor("comb", comb, _F32, dim=3)
    chk.shape("comb", comb, (t, n, n))
    chk.same_device(f=f, residual=residual, post=post, comb=comb)


def _mix_logits(residual: torch.Tensor, fn: torch.Tensor, rms_eps: float) -> torch.Tensor:
    """``(flatten(R) @ fn.T) * rsqrt(mean(flatten(R)^2) + rms_eps)`` in fp32: [T, rows of fn]."""
    x = residual.flatten(1).float()
    rho = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + rms_eps)
    return (x @ fn.T) * rho


def mhc_mixes(residual: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
              rms_eps: float = 1e-6, hc_eps: float = 1e-6, post_mult: float = 2.0,
              sinkhorn_iters: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three mixes of one sublayer: ``(pre [T,n], post [T,n], comb [T,n,n])``, all fp32 (module docstring).

    ``pre`` lies in (hc_eps, 1 + hc_eps) and is NOT normalised to sum 1; ``post`` in (0, post_mult);
    ``comb`` is Sinkhorn-normalised with ``eps = hc_eps``.
    """
    _check_pre(residual, fn, scale, base, None, rms_eps, hc_eps, post_mult, sinkhorn_iters)
    t, n, _ = residual.shape
    m = _mix_logits(residual, fn, rms_eps)
    pre = torch.sigmoid(m[:, :n] * scale[0] + base[:n]) + hc_eps
    post = torch.sigmoid(m[:, n:2 * n] * scale[1] + base[n:2 * n]) * post_mult
    comb_logits = (m[:, 2 * n:] * scale[2] + base[2 * n:]).view(t, n, n)
    return pre, post, sinkhorn(comb_logits, sinkhorn_iters, hc_eps)


def _collapse(residual: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """``round(sum_i pre_i * R[i])`` with an fp32 accumulation: [T, D] in the residual dtype."""
    return (pre.unsqueeze(-1) * residual.float()).sum(dim=1).to(residual.dtype)


def mhc_pre(residual: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
            norm_weight: torch.Tensor | None, *, rms_eps: float = 1e-6, hc_eps: float = 1e-6,
            post_mult: float = 2.0, sinkhorn_iters: int = 20
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hc_pre + the fused sublayer RMSNorm (dsv4-layers.md 2.2, 2.4).

    residual [T,n,D] (bf16), fn [(2+n)n, nD] fp32, scale [3] fp32, base [(2+n)n] fp32, norm_weight [D] or None.
    Returns ``(layer_input [T,D], post [T,n] fp32, comb [T,n,n] fp32)`` where
    ``layer_input = RMSNorm(round(sum_i pre_i R[i]); norm_weight, rms_eps)`` rounded once to the residual dtype,
    or just ``round(sum_i pre_i R[i])`` when ``norm_weight`` is None (the unfused wiring normalises separately).
    """
    _check_pre(residual, fn, scale, base, norm_weight, rms_eps, hc_eps, post_mult, sinkhorn_iters)
    pre, post, comb = mhc_mixes(residual, fn, scale, base, rms_eps=rms_eps, hc_eps=hc_eps,
                                post_mult=post_mult, sinkhorn_iters=sinkhorn_iters)
    y = _collapse(residual, pre)
    if norm_weight is not None:
        y = rmsnorm(y, norm_weight, rms_eps)
    return y, post, comb


def mhc_post(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """hc_post (dsv4-layers.md 2.5): ``R'[k] = round(post[k] * f + sum_j comb[j, k] * R[j])``, fp32 math.

    f [T,D] sublayer output, residual [T,n,D] (same dtype as f), post [T,n] fp32, comb [T,n,n] fp32.
    Output stream k gathers COLUMN k of comb (``comb^T @ R``); ``comb @ R`` is the classic porting bug.
    """
    _check_post(f, residual, post, comb)
    mixed = torch.einsum("tjk,tjd->tkd", comb, residual.float())
    return (post.unsqueeze(-1) * f.float().unsqueeze(1) + mixed).to(residual.dtype)


def mhc_fused_post_pre(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                       fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
                       norm_weight: torch.Tensor | None, *, rms_eps: float = 1e-6, hc_eps: float = 1e-6,
                       post_mult: float = 2.0, sinkhorn_iters: int = 20
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hc_post of one sublayer followed by hc_pre of the next (vLLM's fused kernel, dsv4-layers.md 2.6).

    Returns ``(new_residual [T,n,D], layer_input [T,D], post [T,n], comb [T,n,n])``; the pre half reads the
    ROUNDED new residual, exactly as if ``mhc_post`` had written it to memory and ``mhc_pre`` read it back.
    """
    _check_post(f, residual, post, comb)
    _check_pre(residual, fn, scale, base, norm_weight, rms_eps, hc_eps, post_mult, sinkhorn_iters)
    new_residual = mhc_post(f, residual, post, comb)
    layer_input, new_post, new_comb = mhc_pre(new_residual, fn, scale, base, norm_weight, rms_eps=rms_eps,
                                              hc_eps=hc_eps, post_mult=post_mult, sinkhorn_iters=sinkhorn_iters)
    return new_residual, layer_input, new_post, new_comb


def hc_head(residual: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, *,
            rms_eps: float = 1e-6, hc_eps: float = 1e-6) -> torch.Tensor:
    """Final collapse before the LM head (dsv4-layers.md 2.7), fp32 math, one rounding:

        m   = (flatten(R) @ fn.T) * rsqrt(mean(flatten(R)^2) + rms_eps)      fn [n, nD], scale [1], base [n]
        pre = sigmoid(m * scale[0] + base) + hc_eps
        out = round(sum_i pre_i * R[i])                                       [T, D], residual dtype

    The final RMSNorm (``norm.weight``) is applied by the caller.
    """
    t, n, d = _check_residual(residual)
    check_mix_params(fn, scale, base, n, d, n, 1)
    chk.same_device(residual=residual, fn=fn, scale=scale, base=base)
    rms_eps = chk.positive_float("rms_eps", rms_eps)
    hc_eps = chk.positive_float("hc_eps", hc_eps)
    m = _mix_logits(residual, fn, rms_eps)
    pre = torch.sigmoid(m * scale[0] + base) + hc_eps
    return _collapse(residual, pre)
