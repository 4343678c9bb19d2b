"""``DecoderLayer``: attention + MoE sublayers joined by mHC, in vLLM's fused wiring or the unfused one.

Mathematically every layer is (dsv4-layers.md 2.6; DS-ref ``Block.forward``, vLLM CPU unfused path)::

    x, post, comb = hc_pre(R; hc_attn);  x = attn_norm(x);  f = attn(x);      R = hc_post(f, R, post, comb)
    x, post, comb = hc_pre(R; hc_ffn);   x = ffn_norm(x);   f = ffn(x, ids);  R = hc_post(f, R, post, comb)

``wiring="unfused"`` runs exactly that: ``forward(positions, R) -> R``.

``wiring="vllm"`` fuses each hc_post with the next hc_pre and the sublayer norm into the pre, and hands the
state ``(f, residual, post, comb)`` from layer to layer: the first layer (``residual=None``, ``hidden`` = the
n embedding copies) runs a standalone ``mhc_pre``; a later layer starts with ``mhc_fused_post_pre`` (the
previous layer's FFN post + this layer's attention pre); inside the layer the attention post is fused with the
FFN pre. The caller (the model, or the MTP layer) applies the last ``mhc_post``.
``forward(positions, f_prev_or_R, residual, post, comb) -> (f, residual, post, comb)``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import DSv4Config
from ..kernels import registry
from . import _init
from ._ops import OpTable
from .attention import DSv4Attention
from .mhc import MHC
from .moe import MoE

WIRINGS = ("vllm", "unfused")
State = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class DecoderLayer(nn.Module):
    """Decoder layer ``layer_idx`` of ``cfg`` (an index ``>= num_hidden_layers`` is an MTP block: its compress
    ratio comes from the MTP entry of ``compress_ratios`` and it is never hash-routed).

    ``fp8_weights``: the checkpoint's fp8 linears (attention projections, shared expert) hold fp8-representable
    values (128x128 UE8M0 blocks), as in the published checkpoints; routed experts are always MXFP4.
    """

    def __init__(self, cfg: DSv4Config, layer_idx: int, *, seed: int = 0, backend: str = "reference",
                 fp8_weights: bool = True) -> None:
        super().__init__()
        self.cfg, self.layer_idx, self.backend = cfg, layer_idx, backend
        gen = _init.generator(seed, "layer", layer_idx, "norms")
        self.attn_norm = nn.Module()
        self.attn_norm.weight = _init.frozen(_init.norm_weight(gen, cfg.hidden_size))
        self.ffn_norm = nn.Module()
        self.ffn_norm.weight = _init.frozen(_init.norm_weight(gen, cfg.hidden_size))
        self.hc_attn = MHC(cfg, seed=_init.derive_seed(seed, "layer", layer_idx, "hc_attn"), backend=backend)
        self.hc_ffn = MHC(cfg, seed=_init.derive_seed(seed, "layer", layer_idx, "hc_ffn"), backend=backend)
        attn_backend = backend if backend in registry.backends("attention_prefill") else "reference"
        self.attn = DSv4Attention(cfg, layer_idx, seed=_init.derive_seed(seed, "layer", layer_idx, "attn"),
                                  backend=attn_backend, fp8_weights=fp8_weights)
        self.ffn = MoE(cfg, layer_idx, seed=_init.derive_seed(seed, "layer", layer_idx, "ffn"), backend=backend,
                       shared_fp8=fp8_weights)
        self.ops = OpTable(backend, "rmsnorm")

    # ---- vLLM wiring ----------------------------------------------------------------------------
    def forward_vllm(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None = None,
                     post: torch.Tensor | None = None, comb: torch.Tensor | None = None, *,
                     input_ids: torch.Tensor | None = None) -> State:
        """First layer: ``hidden`` = residual [T,n,D], ``residual/post/comb`` None. Later layers: ``hidden`` =
        previous FFN output f [T,D] with the previous ``(residual, post, comb)``. Returns the state after this
        layer's FFN, ``(f [T,D], residual [T,n,D], post [T,n], comb [T,n,n])`` (its hc_post still pending)."""
        if residual is None:
            if post is not None or comb is not None:
                raise ValueError("post/comb: must be None when residual is None (first layer)")
            residual = hidden
            x, post, comb = self.hc_attn.pre(residual, self.attn_norm.weight)
        else:
            if post is None or comb is None:
                raise ValueError("post/comb: required together with residual")
            residual, x, post, comb = self.hc_attn.fused_post_pre(hidden, residual, post, comb,
                                                                  self.attn_norm.weight)
        f = self.attn(x, positions)
        residual, x, post, comb = self.hc_ffn.fused_post_pre(f, residual, post, comb, self.ffn_norm.weight)
        return self.ffn(x, input_ids), residual, post, comb

    # ---- unfused wiring -------------------------------------------------------------------------
    def forward_unfused(self, positions: torch.Tensor, residual: torch.Tensor, *,
                        input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``R [T,n,D] -> R [T,n,D]``: hc_pre -> norm -> sublayer -> hc_post, twice."""
        eps = self.cfg.rms_norm_eps
        x, post, comb = self.hc_attn.pre(residual, None)
        f = self.attn(self.ops["rmsnorm"](x, self.attn_norm.weight, eps), positions)
        residual = self.hc_attn.post(f, residual, post, comb)
        x, post, comb = self.hc_ffn.pre(residual, None)
        f = self.ffn(self.ops["rmsnorm"](x, self.ffn_norm.weight, eps), input_ids)
        return self.hc_ffn.post(f, residual, post, comb)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None = None,
                post: torch.Tensor | None = None, comb: torch.Tensor | None = None, *,
                input_ids: torch.Tensor | None = None, wiring: str = "vllm") -> State | torch.Tensor:
        """``wiring="vllm"``: see ``forward_vllm`` (returns the 4-tuple state); ``"unfused"``: ``hidden`` is the
        residual [T,n,D] (``residual/post/comb`` must be None) and the new residual is returned."""
        if wiring == "vllm":
            return self.forward_vllm(positions, hidden, residual, post, comb, input_ids=input_ids)
        if wiring == "unfused":
            if residual is not None or post is not None or comb is not None:
                raise ValueError("residual/post/comb: the unfused wiring carries only the residual (pass it as hidden)")
            return self.forward_unfused(positions, hidden, input_ids=input_ids)
        raise ValueError(f"wiring: expected one of {WIRINGS}, got {wiring!r}")

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, backend={self.backend!r}"
