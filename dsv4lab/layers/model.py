"""``Model``: a small end-to-end DSv4 (embedding -> n stream copies -> decoder layers -> final mhc_post ->
hc_head -> RMSNorm -> LM head, fp32 logits) plus the MTP draft, for a single no-cache prefill.

Works for the toy preset and for reduced-depth/width Flash/Pro configs; weights are random but deterministic
(``seed``) at realistic scales. A full Flash/Pro does not fit a laptop: reduce ``num_hidden_layers`` (or pass
``num_layers``), ``n_routed_experts`` and ``vocab_size`` first.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import DSv4Config
from ..kernels.reference import _checks as chk
from . import _init
from ._ops import OpTable
from .attention import DSv4Attention
from .decoder import WIRINGS, DecoderLayer
from .mhc import HCHead
from .mtp import MTP


class Model(nn.Module):
    """DSv4 model of ``cfg`` (``num_layers`` overrides the depth; hash layers are capped at that depth).

    ``forward(input_ids [T], positions [T] | None) -> logits fp32 [T, V]``; ``positions`` default 0..T-1
    (one sequence; compressed attention layers require exactly that). ``wiring``: "vllm" or "unfused".
    """

    def __init__(self, cfg: DSv4Config, *, num_layers: int | None = None, seed: int = 0,
                 backend: str = "reference", mtp: bool = True, fp8_weights: bool = True) -> None:
        super().__init__()
        if not isinstance(cfg, DSv4Config):
            raise TypeError(f"cfg: expected DSv4Config, got {type(cfg).__name__}")
        if num_layers is not None:
            chk.positive_int("num_layers", num_layers)
            cfg = cfg.replace(num_hidden_layers=num_layers, num_hash_layers=min(cfg.num_hash_layers, num_layers))
        self.cfg, self.backend = cfg, backend
        v, d = cfg.vocab_size, cfg.hidden_size
        gen = _init.generator(seed, "model")
        self.embed, self.norm, self.head = nn.Module(), nn.Module(), nn.Module()
        self.embed.weight = _init.frozen(_init.normal(gen, (v, d), 1.0).to(torch.bfloat16))   # unit-RMS rows
        self.norm.weight = _init.frozen(_init.norm_weight(gen, d))
        self.head.weight = _init.frozen(_init.linear_weight(gen, v, d))
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, seed=_init.derive_seed(seed, "layers", i), backend=backend, fp8_weights=fp8_weights)
            for i in range(cfg.num_hidden_layers))
        self.hc_head = HCHead(cfg, seed=_init.derive_seed(seed, "hc_head"), backend=backend)
        self.mtp = None
        if mtp and cfg.num_nextn_predict_layers:
            self.mtp = MTP(cfg, seed=_init.derive_seed(seed, "mtp"), backend=backend, fp8_weights=fp8_weights)
        self.ops = OpTable(backend, "rmsnorm")

    # ---- inputs ---------------------------------------------------------------------------------
    def _check_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor | None,
                      name: str = "input_ids") -> torch.Tensor:
        chk.tensor(name, input_ids, chk.INT_DTYPES, dim=1)
        t = input_ids.shape[0]
        if t and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"{name}: expected token ids in [0, {self.cfg.vocab_size})")
        if positions is None:
            return torch.arange(t, device=input_ids.device)
        chk.tensor("positions", positions, chk.INT_DTYPES, dim=1)
        if positions.shape[0] != t:
            raise ValueError(f"positions: expected one position per token of {name} ({t}), got {positions.shape[0]}")
        return positions

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed.weight[input_ids]

    # ---- main model -----------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, *,
                      wiring: str = "vllm") -> torch.Tensor:
        """The residual after the last layer's final ``mhc_post``, [T, n, D] bf16 (what vLLM stashes for MTP)."""
        if wiring not in WIRINGS:
            raise ValueError(f"wiring: expected one of {WIRINGS}, got {wiring!r}")
        positions = self._check_tokens(input_ids, positions)
        t, n = input_ids.shape[0], self.cfg.hc_mult
        residual = self.embed_tokens(input_ids).unsqueeze(1).expand(t, n, self.cfg.hidden_size).contiguous()
        if t == 0:
            return residual
        if wiring == "unfused":
            for layer in self.layers:
                residual = layer(positions, residual, input_ids=input_ids, wiring="unfused")
            return residual
        f, post, comb = residual, None, None
        res: torch.Tensor | None = None
        for layer in self.layers:
            f, res, post, comb = layer(positions, f, res, post, comb, input_ids=input_ids, wiring="vllm")
        return self.layers[-1].hc_ffn.post(f, res, post, comb)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``head(RMSNorm(hc_head(R); norm))`` -> fp32 [T, V] (fp32 GEMM of the bf16 head)."""
        h = self.ops["rmsnorm"](self.hc_head(hidden), self.norm.weight, self.cfg.rms_norm_eps)
        return h.float() @ self.head.weight.float().T

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, *,
                wiring: str = "vllm") -> torch.Tensor:
        return self.compute_logits(self.hidden_states(input_ids, positions, wiring=wiring))

    # ---- MTP draft ------------------------------------------------------------------------------
    def mtp_forward(self, next_input_ids: torch.Tensor, positions: torch.Tensor, prev: torch.Tensor, *,
                    wiring: str = "vllm") -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step: ``next_input_ids`` [T] (token t+1 at row t), ``positions`` [T], ``prev`` the
        pre-hc_head residual [T, n, D] or [T, nD] -> ``(draft_logits fp32 [T, V], new_prev [T, nD])``."""
        if self.mtp is None:
            raise ValueError("mtp: this model was built with mtp=False")
        positions = self._check_tokens(next_input_ids, positions, "next_input_ids")
        hidden = self.mtp(self.embed_tokens(next_input_ids), positions, prev, input_ids=next_input_ids,
                          wiring=wiring)
        return self.mtp.compute_logits(hidden, self.head.weight), hidden

    def forward_with_draft(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, *,
                           wiring: str = "vllm") -> tuple[torch.Tensor, torch.Tensor]:
        """Target logits and one MTP draft step, as a greedy spec-decode proposer would run them: row t of the
        draft sees token t+1 (the last row takes the target's greedy next token). -> (logits, draft_logits)."""
        positions = self._check_tokens(input_ids, positions)
        hidden = self.hidden_states(input_ids, positions, wiring=wiring)
        logits = self.compute_logits(hidden)
        if input_ids.shape[0] == 0:
            return logits, logits.clone()
        next_ids = torch.cat([input_ids[1:], logits[-1:].argmax(-1).to(input_ids.dtype)])
        draft, _ = self.mtp_forward(next_ids, positions, hidden, wiring=wiring)
        return logits, draft

    def op_backends(self) -> dict[str, list[str]]:
        """op -> backends its modules actually run (a requested backend an op lacks falls back to reference)."""
        used: dict[str, set[str]] = {}
        for module in self.modules():
            table = getattr(module, "ops", None)
            pairs = list(table.backends.items()) if isinstance(table, OpTable) else []
            if isinstance(module, DSv4Attention):
                pairs.append(("attention_prefill", module.backend))
            for op, name in pairs:
                used.setdefault(op, set()).add(name)
        return {op: sorted(names) for op, names in sorted(used.items())}

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"preset={c.name!r}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, vocab={c.vocab_size}, "
                f"mtp={self.mtp is not None}, backend={self.backend!r}")
