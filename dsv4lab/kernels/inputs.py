"""Realistic random inputs for every registered op, shared by ``dsv4lab bench``, the notebooks and the widgets.

Magnitudes follow the house rules: activations with unit RMS, weights ~ N(0, 1/K), mixing parameters that
keep sigmoids and the Sinkhorn input away from saturation, positions with zeros (first token of each
sequence, every 128th token). ``make_inputs(op, cfg, tokens, device, seed)`` returns ``(args, kwargs)`` for the
op's reference signature (every backend takes the same).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..config import DSv4Config, get_config

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
_FACTORIES: dict[str, Callable[..., Inputs]] = {}


def factory(op: str) -> Callable[[Callable[..., Inputs]], Callable[..., Inputs]]:
    def deco(fn: Callable[..., Inputs]) -> Callable[..., Inputs]:
        _FACTORIES[op] = fn
        return fn
    return deco


def has_inputs(op: str) -> bool:
    return op in _FACTORIES


def make_inputs(op: str, cfg: DSv4Config | str = "flash", tokens: int = 64, device: str | torch.device = "cpu",
                seed: int = 0) -> Inputs:
    if op not in _FACTORIES:
        raise ValueError(f"op: no input factory for {op!r}; have {sorted(_FACTORIES)}")
    if not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens: expected a non-negative int, got {tokens!r}")
    cfg = get_config(cfg) if isinstance(cfg, str) else cfg
    g = torch.Generator(device="cpu").manual_seed(seed)
    args, kwargs = _FACTORIES[op](cfg, tokens, g)
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v
    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


# ---- building blocks ------------------------------------------------------------------------------
def activations(g: torch.Generator, *shape: int, dtype=torch.bfloat16) -> torch.Tensor:
    """Unit-RMS activations."""
    return torch.randn(*shape, generator=g).to(dtype)


def weight(g: torch.Generator, n: int, k: int, dtype=torch.bfloat16) -> torch.Tensor:
    """A linear weight [n, k] ~ N(0, 1/k)."""
    return (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)


def norm_weight(g: torch.Generator, d: int, dtype=torch.bfloat16) -> torch.Tensor:
    return (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)


def positions_with_restarts(tokens: int, every: int = 128) -> torch.Tensor:
    """Positions of packed sequences of length ``every``: 0 at the first token of each sequence."""
    return torch.arange(tokens, dtype=torch.int64) % every


def mhc_params(g: torch.Generator, n: int, d: int, n_mix: int, n_scale: int) -> tuple[torch.Tensor, ...]:
    """fn ~ N(0, 1/(nD)) so the normalised projection is O(1); scale O(1); base spread around 0."""
    fn = torch.randn(n_mix, n * d, generator=g) / (n * d) ** 0.5
    scale = 0.5 + torch.rand(n_scale, generator=g)
    base = 0.5 * torch.randn(n_mix, generator=g)
    return fn, scale, base


# ---- factories ------------------------------------------------------------------------------------
def _mhc_kwargs(cfg: DSv4Config) -> dict[str, Any]:
    return dict(rms_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps, post_mult=cfg.hc_post_mult,
                sinkhorn_iters=cfg.hc_sinkhorn_iters)


@factory("mhc_pre")
def _mhc_pre(cfg: DSv4Config, t: int, g: torch.Generator) -> Inputs:
    n, d = cfg.hc_mult, cfg.hidden_size
    fn, scale, base = mhc_params(g, n, d, cfg.hc_mix_dim, 3)
    return (activations(g, t, n, d), fn, scale, base, norm_weight(g, d)), _mhc_kwargs(cfg)


def _post_inputs(cfg: DSv4Config, t: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    from .reference.mhc import sinkhorn

    n, d = cfg.hc_mult, cfg.hidden_size
    post = 2 * torch.sigmoid(torch.randn(t, n, generator=g))
    comb = sinkhorn(torch.randn(t, n, n, generator=g), cfg.hc_sinkhorn_iters, cfg.hc_eps)
    return activations(g, t, d), activations(g, t, n, d), post, comb


@factory("mhc_post")
def _mhc_post(cfg: DSv4Config, t: int, g: torch.Generator) -> Inputs:
    return _post_inputs(cfg, t, g), {}


@factory("mhc_fused_post_pre")
def _mhc_fused(cfg: DSv4Config, t: int, g: torch.Generator) -> Inputs:
    n, d = cfg.hc_mult, cfg.hidden_size
    fn, scale, base = mhc_params(g, n, d, cfg.hc_mix_dim, 3)
    return (*_post_inputs(cfg, t, g), fn, scale, base, norm_weight(g, d)), _mhc_kwargs(cfg)


@factory("hc_head")
def _hc_head(cfg: DSv4Config, t: int, g: torch.Generator) -> Inputs:
    n, d = cfg.hc_mult, cfg.hidden_size
    fn, scale, base = mhc_params(g, n, d, n, 1)
    return (activations(g, t, n, d), fn, scale, base), dict(rms_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps)


@factory("rmsnorm")
def _rmsnorm(cfg: DSv4Config, t: int, g: torch.Generator) -> Inputs:
    d = cfg.hidden_size
    return (activations(g, t, d), norm_weight(g, d)), dict(eps=cfg.rms_norm_eps)


@factory("mtp_input_rmsnorm")
def _mtp_input(cfg: DSv4Config, t: int, g: torch.Generator) -> Inputs:
    n, d = cfg.hc_mult, cfg.hidden_size
    return ((activations(g, t, d), positions_with_restarts(t), activations(g, t, n * d),
             norm_weight(g, d), norm_weight(g, d)), dict(eps=cfg.rms_norm_eps))


@factory("mtp_shared_head_rmsnorm")
def _mtp_head(cfg: DSv4Config, t: int, g: torch.Generator) -> Inputs:
    d = cfg.hidden_size
    return (activations(g, t, d), norm_weight(g, d)), dict(eps=cfg.rms_norm_eps)


@factory("router_gemm")
def _router_gemm(cfg: DSv4Config, t: int, g: torch.Generator) -> Inputs:
    return (activations(g, t, cfg.hidden_size), weight(g, cfg.n_routed_experts, cfg.hidden_size)), {}


@factory("moe_routing")
def _moe_routing(cfg: DSv4Config, t: int, g: torch.Generator) -> Inputs:
    e = cfg.n_routed_experts
    logits = torch.randn(t, e, generator=g)
    bias = 0.1 * torch.randn(e, generator=g)
    return (logits,), dict(k=cfg.num_experts_per_tok, routed_scaling_factor=cfg.routed_scaling_factor, bias=bias)
