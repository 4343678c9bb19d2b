"""DSv4 hyper-parameters: one dataclass, three presets, and a reader for a Hugging Face ``config.json``.

Field names follow the published ``config.json`` of DeepSeek-V4-Flash / -Pro (dsv4-layers.md section 1),
so ``from_hf_config`` is a rename-free read. ``validate`` rejects combinations the layers cannot build.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

VALID_RATIOS = (0, 1, 4, 128)  # 0/1 = window only, 4 = CSA (overlap + indexer), 128 = HCA


@dataclass(frozen=True)
class YarnScaling:
    """YaRN frequency blend of the compressed layers (no magnitude scaling, dsv4-layers.md 3.3)."""

    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class QuantConfig:
    """Checkpoint quantisation: fp8 e4m3 weights with UE8M0 128x128 block scales, dynamic activations."""

    quant_method: str = "fp8"
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"
    scale_fmt: str = "ue8m0"
    weight_block_size: tuple[int, int] = (128, 128)


@dataclass(frozen=True)
class DSv4Config:
    """Every hyper-parameter of a DSv4 model (dsv4-layers.md section 1.1).

    ``compress_ratios`` has one entry per decoder layer plus one for each MTP layer.
    """

    name: str = "custom"
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    compress_ratios: tuple[int, ...] = ()
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: YarnScaling = field(default_factory=YarnScaling)
    max_position_embeddings: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    hc_post_mult: float = 2.0  # hard-coded in DSv4 (not a config.json key)
    rms_norm_eps: float = 1e-6
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    num_hash_layers: int = 3
    first_k_dense_replace: int = 0
    swiglu_limit: float = 10.0
    hidden_act: str = "silu"
    num_nextn_predict_layers: int = 1
    expert_dtype: str = "fp4"
    tie_word_embeddings: bool = False
    quantization_config: QuantConfig = field(default_factory=QuantConfig)

    def __post_init__(self) -> None:
        if not self.compress_ratios:
            object.__setattr__(self, "compress_ratios", (0,) * (self.num_hidden_layers + self.num_nextn_predict_layers))
        else:
            object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
        self.validate()

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.o_groups

    @property
    def hc_mix_dim(self) -> int:
        """Number of mHC mixes per token: n pre + n post + n*n comb (24 for n = 4)."""
        return (2 + self.hc_mult) * self.hc_mult

    def compress_ratio(self, layer: int) -> int:
        """Ratio of decoder layer ``layer`` (0 = window only); MTP layers follow the decoder layers."""
        if not 0 <= layer < len(self.compress_ratios):
            raise ValueError(f"layer: expected 0 <= layer < {len(self.compress_ratios)}, got {layer}")
        r = self.compress_ratios[layer]
        return 0 if r <= 1 else r

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers and layer < self.num_hidden_layers

    def rope_base(self, layer: int) -> float:
        return self.compress_rope_theta if self.compress_ratio(layer) > 1 else self.rope_theta

    def replace(self, **changes: Any) -> "DSv4Config":
        """A copy with some fields changed (re-validated). Changing the depth trims/extends compress_ratios."""
        if "num_hidden_layers" in changes and "compress_ratios" not in changes:
            n = changes["num_hidden_layers"]
            body = list(self.compress_ratios[: self.num_hidden_layers])
            mtp = list(self.compress_ratios[self.num_hidden_layers:])
            body = (body * (n // max(len(body), 1) + 1))[:n] if body else [0] * n
            changes["compress_ratios"] = tuple(body + mtp)
        return dataclasses.replace(self, **changes)

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(name: str, expected: str) -> None:
            raise ValueError(f"DSv4Config.{name}: expected {expected}, got {getattr(self, name)!r}")

        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                    "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "index_n_heads",
                    "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters", "n_routed_experts",
                    "num_experts_per_tok", "moe_intermediate_size"]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, "a positive int")
        if self.num_key_value_heads != 1:
            bad("num_key_value_heads", "1 (DSv4 attention is MQA over one shared latent)")
        if self.num_attention_heads % self.o_groups:
            bad("o_groups", f"a divisor of num_attention_heads={self.num_attention_heads}")
        if not 0 < self.qk_rope_head_dim < self.head_dim or self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", f"an even number in (0, head_dim={self.head_dim})")
        if self.qk_rope_head_dim > self.index_head_dim:
            bad("qk_rope_head_dim", f"<= index_head_dim={self.index_head_dim}")
        n_expected = self.num_hidden_layers + self.num_nextn_predict_layers
        if len(self.compress_ratios) != n_expected:
            bad("compress_ratios", f"{n_expected} entries (num_hidden_layers + num_nextn_predict_layers)")
        for r in self.compress_ratios:
            if r not in VALID_RATIOS:
                bad("compress_ratios", f"entries in {VALID_RATIOS}")
        if self.num_experts_per_tok > self.n_routed_experts:
            bad("num_experts_per_tok", f"<= n_routed_experts={self.n_routed_experts}")
        if self.n_shared_experts < 0:
            bad("n_shared_experts", "a non-negative int")
        if not 0 <= self.num_hash_layers <= self.num_hidden_layers:
            bad("num_hash_layers", f"in [0, num_hidden_layers={self.num_hidden_layers}]")
        if self.scoring_func != "sqrtsoftplus":
            bad("scoring_func", "'sqrtsoftplus' (the only DSv4 scoring)")
        if self.hidden_act != "silu":
            bad("hidden_act", "'silu'")
        if self.expert_dtype not in ("fp4", "fp8", "bf16"):
            bad("expert_dtype", "one of 'fp4', 'fp8', 'bf16'")
        for name in ("hc_eps", "rms_norm_eps"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                bad(name, "a positive float")
        if self.swiglu_limit <= 0:
            bad("swiglu_limit", "a positive float")
        if self.routed_scaling_factor <= 0:
            bad("routed_scaling_factor", "a positive float")
        if self.rope_theta <= 0 or self.compress_rope_theta <= 0:
            bad("rope_theta", "positive rope bases")

    # ---- I/O ----------------------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("name")
        d.pop("hc_post_mult")
        d["compress_ratios"] = list(self.compress_ratios)
        rs = d.pop("rope_scaling")
        d["rope_scaling"] = {"type": "yarn", **rs}
        q = d.pop("quantization_config")
        q["weight_block_size"] = list(q["weight_block_size"])
        d["quantization_config"] = q
        d["architectures"] = ["DeepseekV4ForCausalLM"]
        d["model_type"] = "deepseek_v4"
        return d

    @classmethod
    def from_hf_config(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], name: str | None = None) -> "DSv4Config":
        """Read a DSv4 ``config.json`` (a path to the file or its directory, or the parsed dict).

        Unknown keys are ignored (HF configs carry many); missing keys take the Flash defaults.
        """
        if isinstance(path_or_dict, Mapping):
            raw = dict(path_or_dict)
            src = name or "dict"
        elif isinstance(path_or_dict, (str, os.PathLike)):
            p = os.fspath(path_or_dict)
            if os.path.isdir(p):
                p = os.path.join(p, "config.json")
            if not os.path.isfile(p):
                raise ValueError(f"path_or_dict: no config.json at {p!r}")
            with open(p) as f:
                raw = json.load(f)
            src = name or os.path.basename(os.path.dirname(os.path.abspath(p))) or "config"
        else:
            raise TypeError(f"path_or_dict: expected a path or a mapping, got {type(path_or_dict).__name__}")
        mt = raw.get("model_type", "deepseek_v4")
        if mt != "deepseek_v4":
            raise ValueError(f"model_type: expected 'deepseek_v4', got {mt!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {k: v for k, v in raw.items() if k in names}
        if "route_scale" in raw and "routed_scaling_factor" not in raw:
            kw["routed_scaling_factor"] = raw["route_scale"]
        rs = raw.get("rope_scaling")
        if isinstance(rs, Mapping):
            kind = rs.get("type", rs.get("rope_type", "yarn"))
            if kind not in ("yarn", "deepseek_yarn"):
                raise ValueError(f"rope_scaling.type: expected 'yarn', got {kind!r}")
            kw["rope_scaling"] = YarnScaling(**{k: rs[k] for k in
                                                ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow") if k in rs})
        elif rs is not None:
            raise ValueError(f"rope_scaling: expected a mapping, got {rs!r}")
        qc = raw.get("quantization_config")
        if isinstance(qc, Mapping):
            q = {k: qc[k] for k in ("quant_method", "fmt", "activation_scheme", "scale_fmt") if k in qc}
            if "weight_block_size" in qc:
                q["weight_block_size"] = tuple(qc["weight_block_size"])
            kw["quantization_config"] = QuantConfig(**q)
        if "compress_ratios" in kw:
            kw["compress_ratios"] = tuple(kw["compress_ratios"])
        return cls(name=src, **kw)


def _flash() -> DSv4Config:
    return DSv4Config(name="flash", compress_ratios=(0, 0) + (4, 128) * 20 + (4, 0))


def _pro() -> DSv4Config:
    return DSv4Config(
        name="pro", hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
        o_groups=16, index_topk=1024, n_routed_experts=384, moe_intermediate_size=3072,
        routed_scaling_factor=2.5, compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0))


def _toy() -> DSv4Config:
    return DSv4Config(
        name="toy", vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=128,
        q_lora_rank=128, o_groups=2, o_lora_rank=128, sliding_window=32, compress_ratios=(0, 4, 128, 4, 0),
        max_position_embeddings=4096, index_n_heads=4, index_head_dim=128, index_topk=32,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, num_hash_layers=2)


PRESETS = {"toy": _toy, "flash": _flash, "pro": _pro}


def get_config(preset: str | DSv4Config = "toy", **overrides: Any) -> DSv4Config:
    """A preset by name (``toy``, ``flash``, ``pro``), optionally with fields replaced."""
    if isinstance(preset, DSv4Config):
        cfg = preset
    elif isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
        cfg = PRESETS[preset]()
    else:
        raise TypeError(f"preset: expected a preset name or DSv4Config, got {type(preset).__name__}")
    return cfg.replace(**overrides) if overrides else cfg
