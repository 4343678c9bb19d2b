"""``DSv4Attention``: one DSv4 attention layer (window / CSA / HCA by the layer's compress ratio) as an nn.Module.

The weights are frozen ``nn.Parameter``s named like the checkpoint under ``layers.N.attn.`` (``wq_a.weight``,
``compressor.ape``, ``indexer.compressor.norm.weight``, ...), so ``load_state_dict`` takes checkpoint tensors
directly. ``forward`` runs the reference ``attention_prefill`` with its cores (sparse_attention, compressor,
indexer_topk) taken from the requested registry backend where that op has one (``op_backends`` says which).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import DSv4Config
from ..kernels import registry
from ._ops import OpTable
from ..kernels.reference.attention import AttentionParams, init_attention_params, quantize_weights_fp8


class DSv4Attention(nn.Module):
    """Attention of decoder layer ``layer_idx`` (dsv4-layers.md section 3).

    ``seed``: weights from ``init_attention_params(cfg, layer_idx, seed=...)``; ``params`` overrides them.
    ``fp8_kv``: fp8 round trip of the KV nope part (window and compressed), as stored by DS-ref / vLLM.
    ``fp8_weights``: round-trip the checkpoint's fp8 weights through 128x128 fp8 blocks at construction.
    """

    def __init__(self, cfg: DSv4Config, layer_idx: int, seed: int = 0, *, backend: str = "reference",
                 fp8_kv: bool = True, fp8_weights: bool = False, params: AttentionParams | None = None,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        if not isinstance(cfg, DSv4Config):
            raise TypeError(f"cfg: expected DSv4Config, got {type(cfg).__name__}")
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.ratio = cfg.compress_ratio(layer_idx)          # validates layer_idx
        self.backend = backend
        self._fn = registry.get("attention_prefill", "reference")
        cores = ("sparse_attention", "compressor", "indexer_topk")
        table = OpTable(backend, *cores)          # reference where the op has no such backend
        self.op_backends = dict(table.backends)
        self._ops = {op: table[op] for op in cores if table.backends[op] != "reference"}
        self.fp8_kv = fp8_kv
        if params is None:
            params = init_attention_params(cfg, layer_idx, seed=seed, device=device)
        if fp8_weights:
            params = quantize_weights_fp8(params)
        for name, tensor in params.state_dict().items():
            self._add_param(name, tensor)

    def _add_param(self, dotted: str, tensor: torch.Tensor) -> None:
        *path, leaf = dotted.split(".")
        mod: nn.Module = self
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))

    @property
    def kind(self) -> str:
        return {0: "window", 4: "csa", 128: "hca"}[self.ratio]

    def params(self) -> AttentionParams:
        """The current weights as the reference's ``AttentionParams`` (views, not copies)."""
        return AttentionParams.from_state_dict({k: v.detach() for k, v in self.named_parameters()})

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x`` [T, D] bf16 (attn_norm-ed), ``positions`` [T] int64 -> [T, D] bf16."""
        return self._fn(x, positions, self.params(), self.cfg, self.layer_idx, fp8_kv=self.fp8_kv,
                        ops=self._ops or None)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, kind={self.kind}, backend={self.backend!r}, fp8_kv={self.fp8_kv}"
