"""mHC parameter modules: ``MHC`` (one sublayer's pre/post mixes) and ``HCHead`` (the final collapse).

The math lives in ``dsv4lab.kernels.reference.mhc`` (dsv4-layers.md 2); these modules hold the fp32
parameters under their checkpoint names (``hc_attn_fn`` -> ``hc_attn.fn`` etc.) and call the registry op
of the chosen backend (the reference where an op has no such backend, see ``_ops``).

Initialisation (no trained weights are used): the mix logits ``m = flatten(R) @ fn.T * rho`` see a unit-RMS
input, so ``fn ~ N(0, (0.5^2)/(nD))`` gives ``m ~ N(0, 0.25)``; ``scale ~ U(0.5, 1.5)``; ``base`` puts
``pre ~ 1/n`` (sigmoid^-1(1/n) = ln(1/(n-1))), ``post ~ 1`` (base 0) and the comb logits near
``eye(n) + N(0, 0.3^2)`` (a leaning-diagonal but not symmetric mixing). Nothing saturates.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import DSv4Config
from . import _init
from ._ops import OpTable


def _check_streams(residual: torch.Tensor, n: int, d: int) -> None:
    """The module's parameters fix n and D; say so instead of letting the op complain about ``fn``."""
    if not isinstance(residual, torch.Tensor) or residual.dim() != 3 or tuple(residual.shape[1:]) != (n, d):
        got = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
        raise ValueError(f"residual: expected [T, {n}, {d}] (hc_mult, hidden_size), got {got}")


def _mhc_init(gen: torch.Generator, n: int, d: int, rows: int, n_scale: int, base: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = _init.normal(gen, (rows, n * d), 0.5 / math.sqrt(n * d))
    scale = 0.5 + torch.rand((n_scale,), generator=gen)
    return fn, scale, base + _init.normal(gen, base.shape, 0.3)


class MHC(nn.Module):
    """mHC mixes of one sublayer: ``fn [(2+n)n, nD]``, ``base [(2+n)n]``, ``scale [3]`` (fp32).

    ``pre(residual, norm_weight)`` -> (layer_input, post, comb); ``post(f, residual, post, comb)`` -> residual;
    ``fused_post_pre(f, residual, post, comb, norm_weight)`` applies the PREVIOUS sublayer's post with its
    (post, comb) and then this module's pre -> (residual, layer_input, post, comb).
    """

    def __init__(self, cfg: DSv4Config, *, seed: int = 0, backend: str = "reference") -> None:
        super().__init__()
        n, d = cfg.hc_mult, cfg.hidden_size
        base = torch.cat([torch.full((n,), math.log(1.0 / (n - 1))) if n > 1 else torch.zeros(1),
                          torch.zeros(n), torch.eye(n).flatten()])
        fn, scale, base = _mhc_init(_init.generator(seed, "mhc"), n, d, cfg.hc_mix_dim, 3, base)
        self.fn, self.scale, self.base = _init.frozen(fn), _init.frozen(scale), _init.frozen(base)
        self.hc_mult, self.hidden_size, self.backend = n, d, backend
        self.kwargs = dict(rms_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps, post_mult=cfg.hc_post_mult,
                           sinkhorn_iters=cfg.hc_sinkhorn_iters)
        self.ops = OpTable(backend, "mhc_pre", "mhc_post", "mhc_fused_post_pre")

    def pre(self, residual: torch.Tensor, norm_weight: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_streams(residual, self.hc_mult, self.hidden_size)
        return self.ops["mhc_pre"](residual, self.fn, self.scale, self.base, norm_weight, **self.kwargs)

    def post(self, f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        _check_streams(residual, self.hc_mult, self.hidden_size)
        return self.ops["mhc_post"](f, residual, post, comb)

    def fused_post_pre(self, f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                       norm_weight: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_streams(residual, self.hc_mult, self.hidden_size)
        return self.ops["mhc_fused_post_pre"](f, residual, post, comb, self.fn, self.scale, self.base, norm_weight,
                                              **self.kwargs)

    def extra_repr(self) -> str:
        return f"hc_mult={self.hc_mult}, hidden_size={self.hidden_size}, backend={self.backend!r}"


class HCHead(nn.Module):
    """Final collapse of the n streams before the LM head: ``fn [n, nD]``, ``base [n]``, ``scale [1]`` (fp32).

    ``forward(residual [T,n,D]) -> [T,D]`` (un-normalised; the caller applies the final RMSNorm).
    """

    def __init__(self, cfg: DSv4Config, *, seed: int = 0, backend: str = "reference") -> None:
        super().__init__()
        n, d = cfg.hc_mult, cfg.hidden_size
        base = torch.full((n,), math.log(1.0 / (n - 1))) if n > 1 else torch.zeros(1)
        fn, scale, base = _mhc_init(_init.generator(seed, "hc_head"), n, d, n, 1, base)
        self.fn, self.scale, self.base = _init.frozen(fn), _init.frozen(scale), _init.frozen(base)
        self.hc_mult, self.hidden_size, self.backend = n, d, backend
        self.kwargs = dict(rms_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps)
        self.ops = OpTable(backend, "hc_head")

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        _check_streams(residual, self.hc_mult, self.hidden_size)
        return self.ops["hc_head"](residual, self.fn, self.scale, self.base, **self.kwargs)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
