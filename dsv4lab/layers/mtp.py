"""``MTP``: the DSv4 multi-token-prediction draft layer (dsv4-layers.md 5, vLLM after #43746).

    e, h   = mtp_input_rmsnorm(embed(next_ids), positions, prev; enorm, hnorm)   # rows at position 0 -> e = 0
    R      = round(h @ h_proj.T) + round(e @ e_proj.T)[:, None, :]            # two bf16 linears, bf16 add
    f, R, post, comb = block(R, residual=None)                                # window-only, non-hash block
    R      = mhc_post(f, R, post, comb)                                       # returned flat [T, nD]
    logits = head(mtp_shared_head_rmsnorm(hc_head(R); norm))                  # head shared with the model

``prev`` is the target model's pre-hc_head residual at the same positions; the returned ``R`` can be fed back
as ``prev`` for a further draft step (vLLM reuses the single MTP layer for every step).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import DSv4Config
from . import _init
from ._ops import OpTable
from .decoder import WIRINGS, DecoderLayer
from .mhc import HCHead


def _bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``round(x @ weight.T)`` with an fp32 accumulation (a bf16 GEMM with fp32 accumulators)."""
    return (x.float() @ weight.float().T).to(x.dtype)


class MTP(nn.Module):
    """The MTP layer of ``cfg`` (decoder index ``cfg.num_hidden_layers``): ``e_proj``, ``h_proj`` [D,D]
    (fp8-representable bf16), ``enorm``, ``hnorm``, ``norm`` (the shared-head norm) [D], its own ``block`` and
    ``hc_head``. The embedding and the LM head are the model's (passed in by the caller)."""

    def __init__(self, cfg: DSv4Config, *, seed: int = 0, backend: str = "reference",
                 fp8_weights: bool = True) -> None:
        super().__init__()
        if cfg.num_nextn_predict_layers < 1:
            raise ValueError("cfg.num_nextn_predict_layers: expected >= 1 for an MTP layer")
        d, self.layer_idx = cfg.hidden_size, cfg.num_hidden_layers
        self.cfg, self.backend = cfg, backend
        gen = _init.generator(seed, "mtp")
        self.e_proj, self.h_proj = nn.Module(), nn.Module()
        self.e_proj.weight = _init.frozen(_init.linear_weight(gen, d, d, fp8=fp8_weights))
        self.h_proj.weight = _init.frozen(_init.linear_weight(gen, d, d, fp8=fp8_weights))
        self.enorm, self.hnorm, self.norm = nn.Module(), nn.Module(), nn.Module()
        for mod in (self.enorm, self.hnorm, self.norm):
            mod.weight = _init.frozen(_init.norm_weight(gen, d))
        self.block = DecoderLayer(cfg, self.layer_idx, seed=_init.derive_seed(seed, "mtp", "block"),
                                  backend=backend, fp8_weights=fp8_weights)
        self.hc_head = HCHead(cfg, seed=_init.derive_seed(seed, "mtp", "hc_head"), backend=backend)
        self.ops = OpTable(backend, "mtp_input_rmsnorm", "mtp_shared_head_rmsnorm")

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, prev: torch.Tensor, *,
                input_ids: torch.Tensor | None = None, wiring: str = "vllm") -> torch.Tensor:
        """``embeds`` [T,D] (embedding of the NEXT tokens), ``positions`` [T], ``prev`` [T,nD] or [T,n,D]
        -> the block's residual after its final ``mhc_post``, flat [T, nD]."""
        if wiring not in WIRINGS:
            raise ValueError(f"wiring: expected one of {WIRINGS}, got {wiring!r}")
        eps = self.cfg.rms_norm_eps
        e, h = self.ops["mtp_input_rmsnorm"](embeds, positions, prev, self.enorm.weight, self.hnorm.weight, eps)
        residual = _bf16_linear(h, self.h_proj.weight) + _bf16_linear(e, self.e_proj.weight).unsqueeze(1)
        if wiring == "vllm":
            f, residual, post, comb = self.block(positions, residual, input_ids=input_ids, wiring="vllm")
            residual = self.block.hc_ffn.post(f, residual, post, comb)
        else:
            residual = self.block(positions, residual, input_ids=input_ids, wiring="unfused")
        return residual.flatten(1)

    def compute_logits(self, hidden: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        """Draft logits fp32 [T, V] from the flat MTP residual [T, nD] and the model's LM head [V, D]."""
        n, d = self.cfg.hc_mult, self.cfg.hidden_size
        h = self.hc_head(hidden.view(hidden.shape[0], n, d))
        h = self.ops["mtp_shared_head_rmsnorm"](h, self.norm.weight, self.cfg.rms_norm_eps)
        return h.float() @ head_weight.float().T

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, backend={self.backend!r}"
