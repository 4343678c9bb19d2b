"""Parameter counts per layer and per model from the checkpoint tensor shapes (dsv4-layers.md section 1.3).

``layer_params(cfg, layer)`` lists every tensor of one decoder layer with its shape and stored dtype;
``model_summary(cfg)`` totals them (embedding, head, MTP included) into total and active parameters, where
active = everything except the routed experts a token does not use (k of E are active).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import DSv4Config

BYTES = {"bf16": 2, "fp32": 4, "fp8": 1, "e8m0": 1, "fp4x2": 1, "int64": 8}


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str          # stored dtype: bf16, fp32, fp8, e8m0, fp4x2 (packed pairs), int64
    group: str          # attention, compressor, indexer, mhc, norm, router, routed_experts, shared_expert, ...
    is_param: bool = True   # tid2eid is a lookup table, not a parameter

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def params(self) -> int:
        if not self.is_param or self.dtype == "e8m0":
            return 0
        return self.numel * (2 if self.dtype == "fp4x2" else 1)

    @property
    def nbytes(self) -> int:
        return self.numel * BYTES[self.dtype]


def _fp8(name: str, out: int, inp: int, group: str) -> list[Tensor]:
    """An fp8 weight ``X.weight`` and its 128x128 UE8M0 block scales, stored as ``X.scale`` (DS-ref naming)."""
    return [Tensor(name, (out, inp), "fp8", group),
            Tensor(name.removesuffix(".weight") + ".scale", (-(-out // 128), -(-inp // 128)), "e8m0", group)]


def layer_params(cfg: DSv4Config, layer: int, mtp: bool = False) -> list[Tensor]:
    """Every tensor of decoder layer ``layer`` (``mtp=True``: the MTP block, window-only, bias-routed)."""
    D, n, d, H = cfg.hidden_size, cfg.hc_mult, cfg.head_dim, cfg.num_attention_heads
    ql, G, ol = cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank
    E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
    r = 0 if mtp else cfg.compress_ratio(layer)
    mix = cfg.hc_mix_dim
    t: list[Tensor] = [Tensor("attn_norm.weight", (D,), "bf16", "norm"), Tensor("ffn_norm.weight", (D,), "bf16", "norm")]
    for sub in ("attn", "ffn"):
        t += [Tensor(f"hc_{sub}_fn", (mix, n * D), "fp32", "mhc"), Tensor(f"hc_{sub}_base", (mix,), "fp32", "mhc"),
              Tensor(f"hc_{sub}_scale", (3,), "fp32", "mhc")]
    t += _fp8("attn.wq_a.weight", ql, D, "attention") + _fp8("attn.wkv.weight", d, D, "attention")
    t += [Tensor("attn.q_norm.weight", (ql,), "bf16", "attention"), Tensor("attn.kv_norm.weight", (d,), "bf16", "attention")]
    t += _fp8("attn.wq_b.weight", H * d, ql, "attention") + _fp8("attn.wo_a.weight", G * ol, H * d // G, "attention")
    t += _fp8("attn.wo_b.weight", D, G * ol, "attention") + [Tensor("attn.attn_sink", (H,), "fp32", "attention")]
    if r > 1:
        c = 2 if r == 4 else 1
        t += [Tensor("attn.compressor.wkv.weight", (c * d, D), "bf16", "compressor"),
              Tensor("attn.compressor.wgate.weight", (c * d, D), "bf16", "compressor"),
              Tensor("attn.compressor.ape", (r, c * d), "fp32", "compressor"),
              Tensor("attn.compressor.norm.weight", (d,), "bf16", "compressor")]
    if r == 4:
        nI, dI = cfg.index_n_heads, cfg.index_head_dim
        t += _fp8("attn.indexer.wq_b.weight", nI * dI, ql, "indexer")
        t += [Tensor("attn.indexer.weights_proj.weight", (nI, D), "bf16", "indexer"),
              Tensor("attn.indexer.compressor.wkv.weight", (2 * dI, D), "bf16", "indexer"),
              Tensor("attn.indexer.compressor.wgate.weight", (2 * dI, D), "bf16", "indexer"),
              Tensor("attn.indexer.compressor.ape", (4, 2 * dI), "fp32", "indexer"),
              Tensor("attn.indexer.compressor.norm.weight", (dI,), "bf16", "indexer")]
    t.append(Tensor("ffn.gate.weight", (E, D), "bf16", "router"))
    if not mtp and cfg.is_hash_layer(layer):
        t.append(Tensor("ffn.gate.tid2eid", (cfg.vocab_size, cfg.num_experts_per_tok), "int64", "router", is_param=False))
    else:
        t.append(Tensor("ffn.gate.bias", (E,), "fp32", "router"))
    for w, (o, i) in (("w1", (I, D)), ("w3", (I, D)), ("w2", (D, I))):
        if cfg.expert_dtype == "fp4":      # MXFP4: two e2m1 per byte, 1x32 UE8M0 scales
            t += [Tensor(f"ffn.experts.*.{w}.weight", (E, o, i // 2), "fp4x2", "routed_experts"),
                  Tensor(f"ffn.experts.*.{w}.scale", (E, o, i // 32), "e8m0", "routed_experts")]
        elif cfg.expert_dtype == "fp8":    # 128x128 block scales like the other fp8 linears
            t += [Tensor(f"ffn.experts.*.{w}.weight", (E, o, i), "fp8", "routed_experts"),
                  Tensor(f"ffn.experts.*.{w}.scale", (E, -(-o // 128), -(-i // 128)), "e8m0", "routed_experts")]
        else:
            t += [Tensor(f"ffn.experts.*.{w}.weight", (E, o, i), "bf16", "routed_experts")]
    Is = I * cfg.n_shared_experts
    for w, (o, i) in (("w1", (Is, D)), ("w3", (Is, D)), ("w2", (D, Is))):
        t += _fp8(f"ffn.shared_experts.{w}.weight", o, i, "shared_expert")
    if mtp:
        t += _fp8("e_proj.weight", D, D, "mtp") + _fp8("h_proj.weight", D, D, "mtp")
        t += [Tensor(f"{k}.weight", (D,), "bf16", "mtp") for k in ("enorm", "hnorm", "norm")]
        t += [Tensor("hc_head_fn", (n, n * D), "fp32", "mtp"), Tensor("hc_head_base", (n,), "fp32", "mtp"),
              Tensor("hc_head_scale", (1,), "fp32", "mtp")]
    return t


def top_level_params(cfg: DSv4Config) -> list[Tensor]:
    D, V, n = cfg.hidden_size, cfg.vocab_size, cfg.hc_mult
    return [Tensor("embed.weight", (V, D), "bf16", "embed"), Tensor("head.weight", (V, D), "bf16", "head"),
            Tensor("norm.weight", (D,), "bf16", "norm"), Tensor("hc_head_fn", (n, n * D), "fp32", "mhc"),
            Tensor("hc_head_base", (n,), "fp32", "mhc"), Tensor("hc_head_scale", (1,), "fp32", "mhc")]


def active_params(tensors: list[Tensor], cfg: DSv4Config) -> int:
    """Parameters one token touches: routed experts count k/E of theirs."""
    total = 0
    for x in tensors:
        if x.group == "routed_experts":
            total += x.params * cfg.num_experts_per_tok // cfg.n_routed_experts
        else:
            total += x.params
    return total


def model_summary(cfg: DSv4Config, include_mtp: bool = True) -> dict[str, float]:
    """Totals over all decoder layers, the top-level tensors and (``include_mtp``) the MTP layers.

    The published sizes (Flash 284 B total / 13 B active, Pro 1.6 T / 49 B) exclude the MTP layer.
    """
    tensors = list(top_level_params(cfg))
    for layer in range(cfg.num_hidden_layers):
        tensors += layer_params(cfg, layer)
    for m in range(cfg.num_nextn_predict_layers if include_mtp else 0):
        tensors += layer_params(cfg, cfg.num_hidden_layers + m, mtp=True)
    by_group: dict[str, int] = {}
    for x in tensors:
        by_group[x.group] = by_group.get(x.group, 0) + x.params
    return {"total_params": sum(x.params for x in tensors), "active_params": active_params(tensors, cfg),
            "checkpoint_bytes": sum(x.nbytes for x in tensors), **{f"params_{k}": v for k, v in sorted(by_group.items())}}
