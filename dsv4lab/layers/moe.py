"""``MoE``: the DSv4 FFN sublayer -- sqrt-softplus router (bias or hash), MXFP4 routed experts, shared expert.

Math: ``dsv4lab.kernels.reference.moe`` (dsv4-layers.md 4). Tensors follow the checkpoint (1.3):
``gate.weight [E,D]`` bf16, ``gate.bias [E]`` fp32 (non-hash layers) or ``gate.tid2eid [V,k]`` int64 (hash
layers), routed experts stacked as packed e2m1 ``experts.w1 [E,I,D/2]`` uint8 + UE8M0 ``experts.w1_scale
[E,I,D/32]`` (same for w3; ``w2 [E,D,I/2]`` + ``[E,D,I/32]``), shared expert ``shared_experts.w1/w3 [Is,D]``,
``w2 [D,Is]`` bf16 (values fp8-representable with 128x128 blocks when ``shared_fp8``).

Initialisation: gate ~ N(0, 1/D) (router logits ~ N(0, 1)), bias ~ N(0, 0.1^2), each hash row a random set of
k distinct experts, expert weights ~ N(0, 1/K) in fp32 then quantised to MXFP4 (one expert at a time, so a
reduced-width Flash/Pro layer never holds all fp32 expert weights at once).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import DSv4Config
from ..quant import quant_fp4
from . import _init
from ._ops import OpTable


class MoE(nn.Module):
    """FFN sublayer of decoder layer ``layer_idx``: ``forward(x [T,D] bf16, input_ids [T] | None) -> [T,D] bf16``.

    Hash layers (``cfg.is_hash_layer(layer_idx)``) need ``input_ids``.
    """

    def __init__(self, cfg: DSv4Config, layer_idx: int, *, seed: int = 0, backend: str = "reference",
                 shared_fp8: bool = True) -> None:
        super().__init__()
        if cfg.expert_dtype != "fp4":
            raise ValueError(f"cfg.expert_dtype: only 'fp4' routed experts are implemented, got {cfg.expert_dtype!r}")
        e, d, i, k = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
        self.layer_idx, self.hash_layer, self.backend = layer_idx, cfg.is_hash_layer(layer_idx), backend
        self.k, self.routed_scaling_factor, self.swiglu_limit = k, cfg.routed_scaling_factor, cfg.swiglu_limit
        gen = _init.generator(seed, "moe", layer_idx)

        self.gate = nn.Module()
        self.gate.weight = _init.frozen(_init.linear_weight(gen, e, d))
        if self.hash_layer:
            table = torch.rand((cfg.vocab_size, e), generator=gen).topk(k, dim=-1).indices
            self.gate.register_buffer("tid2eid", table.to(torch.int64))
            self.gate.bias = None
        else:
            self.gate.bias = _init.frozen(_init.normal(gen, (e,), 0.1))
            self.gate.tid2eid = None

        self.experts = nn.Module()
        packed = {name: [] for name in ("w1", "w1_scale", "w3", "w3_scale", "w2", "w2_scale")}
        for _ in range(e):
            for name, (rows, cols) in (("w1", (i, d)), ("w3", (i, d)), ("w2", (d, i))):
                q, s = quant_fp4(_init.normal(gen, (rows, cols), cols ** -0.5))
                packed[name].append(q)
                packed[f"{name}_scale"].append(s)
        for name, parts in packed.items():
            self.experts.register_buffer(name, torch.stack(parts))

        self.shared_experts = None
        if cfg.n_shared_experts:
            i_s = i * cfg.n_shared_experts
            self.shared_experts = nn.Module()
            self.shared_experts.w1 = _init.frozen(_init.linear_weight(gen, i_s, d, fp8=shared_fp8))
            self.shared_experts.w3 = _init.frozen(_init.linear_weight(gen, i_s, d, fp8=shared_fp8))
            self.shared_experts.w2 = _init.frozen(_init.linear_weight(gen, d, i_s, fp8=shared_fp8))

        self.ops = OpTable(backend, "moe_router_logits", "moe_routing", "moe_experts")

    def route(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights fp32 [T,k], ids int64 [T,k])`` for the tokens ``x`` (and their ids on hash layers)."""
        if self.hash_layer and input_ids is None:
            raise ValueError(f"input_ids: layer {self.layer_idx} is hash-routed and needs the token ids")
        logits = self.ops["moe_router_logits"](x, self.gate.weight)
        if self.hash_layer:
            return self.ops["moe_routing"](logits, k=self.k, routed_scaling_factor=self.routed_scaling_factor,
                                           tid2eid=self.gate.tid2eid, input_ids=input_ids)
        return self.ops["moe_routing"](logits, k=self.k, routed_scaling_factor=self.routed_scaling_factor,
                                       bias=self.gate.bias)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        weights, ids = self.route(x, input_ids)
        ex = self.experts
        shared = None
        if self.shared_experts is not None:
            shared = (self.shared_experts.w1, self.shared_experts.w3, self.shared_experts.w2)
        return self.ops["moe_experts"](x, weights, ids, ex.w1, ex.w1_scale, ex.w3, ex.w3_scale, ex.w2, ex.w2_scale,
                                       swiglu_limit=self.swiglu_limit, shared=shared)

    def extra_repr(self) -> str:
        return (f"layer={self.layer_idx}, routing={'hash' if self.hash_layer else 'bias'}, k={self.k}, "
                f"experts={self.experts.w1.shape[0]} (fp4), shared={self.shared_experts is not None}, "
                f"backend={self.backend!r}")
