"""DSv4 attention reference (dsv4-layers.md section 3): window (SWA), CSA (ratio 4 + indexer), HCA (ratio 128).

One shared 512-d latent per token is both K and V (MQA); every query attends its last W raw tokens plus, in
compressed layers, compressed entries (HCA: all complete ones; CSA: the indexer's top-k); a learned per-head
sink logit with a zero value absorbs probability mass. Output: inverse RoPE at the query position, then a
grouped low-rank projection (``wo_a`` per head group, then ``wo_b``).

Numerics: fp32 math; every activation DSv4 stores in bf16 is rounded to bf16 where it is stored (linear
outputs, normalised q/kv, attention output, the ``wo_a`` result). Optional emulation: fp8 round trip of the KV
nope part (``fp8_kv``, on by default, as in DS-ref QAT and vLLM's fp8 cache) and of the fp8 checkpoint weights
(``quantize_weights_fp8``). Not emulated: fp8 quantisation of linear-layer inputs and of the attention output
before ``wo_a`` (vLLM), fp8 indexer Q/K.

Contents: ``AttentionParams`` (+ ``init_attention_params``, ``quantize_weights_fp8``), the sparse core
``sparse_attention_with_sink``, ``attention_output``, and the no-cache prefill ``attention_prefill``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace
from typing import ClassVar

import torch

from ...config import DSv4Config
from ...quant import fp8_roundtrip
from ...rope import apply_rope, layer_inv_freq
from ._attn_checks import (ANY_FLOAT, FLOATS, check_inv_freq, check_positions, check_prefill_positions,
                           check_tensor)
from .compressor import FP8_KV_BLOCK, compress
from .indexer import indexer_topk
from .norms import rmsnorm

_CHUNK_ELEMS = 1 << 24          # bound on the gathered [rows, candidates, d] fp32 block held at once
FP8_WEIGHT_BLOCK = (128, 128)


# ---- parameters -----------------------------------------------------------------------------------
@dataclass
class CompressorParams:
    """``wkv``, ``wgate`` [c*hd, D] bf16 (c = 2 for ratio 4), ``ape`` [r, c*hd] fp32, ``norm_weight`` [hd] bf16."""

    wkv: torch.Tensor
    wgate: torch.Tensor
    ape: torch.Tensor
    norm_weight: torch.Tensor
    NAMES: ClassVar[dict[str, str]] = {"wkv": "wkv.weight", "wgate": "wgate.weight", "ape": "ape",
                                       "norm_weight": "norm.weight"}


@dataclass
class IndexerParams:
    """``wq_b`` [n_I*d_I, q_l], ``weights_proj`` [n_I, D] (bf16), its own ratio-4 compressor (hd = d_I)."""

    wq_b: torch.Tensor
    weights_proj: torch.Tensor
    compressor: CompressorParams
    NAMES: ClassVar[dict[str, str]] = {"wq_b": "wq_b.weight", "weights_proj": "weights_proj.weight"}


@dataclass
class AttentionParams:
    """Weights of one attention layer (dsv4-layers.md 1.3), dequantised to bf16; ``attn_sink`` [H] fp32.

    ``state_dict()`` names follow the checkpoint (``wq_a.weight``, ``compressor.ape``,
    ``indexer.compressor.norm.weight``, ... under ``layers.N.attn.``).
    """

    wq_a: torch.Tensor          # [q_l, D]
    q_norm: torch.Tensor        # [q_l]
    wq_b: torch.Tensor          # [H*d, q_l]
    wkv: torch.Tensor           # [d, D]
    kv_norm: torch.Tensor       # [d]
    wo_a: torch.Tensor          # [G*o_l, H*d/G]
    wo_b: torch.Tensor          # [D, G*o_l]
    attn_sink: torch.Tensor     # [H] fp32
    compressor: CompressorParams | None = None     # ratio > 1
    indexer: IndexerParams | None = None           # ratio == 4
    NAMES: ClassVar[dict[str, str]] = {
        "wq_a": "wq_a.weight", "q_norm": "q_norm.weight", "wq_b": "wq_b.weight", "wkv": "wkv.weight",
        "kv_norm": "kv_norm.weight", "wo_a": "wo_a.weight", "wo_b": "wo_b.weight", "attn_sink": "attn_sink"}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat checkpoint-style names -> tensors (absent sub-blocks are skipped)."""
        out: dict[str, torch.Tensor] = {}

        def walk(obj: object, prefix: str) -> None:
            for f in fields(obj):
                v = getattr(obj, f.name)
                if v is None:
                    continue
                if is_dataclass(v):
                    walk(v, f"{prefix}{f.name}.")
                else:
                    out[prefix + type(obj).NAMES[f.name]] = v
        walk(self, "")
        return out

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "AttentionParams":
        """Inverse of ``state_dict``; a sub-block is built iff one of its names is present."""
        def build(klass: type, prefix: str) -> object:
            kw = {}
            for f in fields(klass):
                sub = {"compressor": CompressorParams, "indexer": IndexerParams}.get(f.name)
                if sub is not None:
                    p = f"{prefix}{f.name}."
                    kw[f.name] = build(sub, p) if any(k.startswith(p) for k in sd) else None
                else:
                    key = prefix + klass.NAMES[f.name]
                    if key not in sd:
                        raise ValueError(f"params: missing tensor {key!r}")
                    kw[f.name] = sd[key]
            return klass(**kw)
        return build(cls, "")  # type: ignore[return-value]

    def map(self, fn) -> "AttentionParams":
        """A copy with ``fn(name, tensor)`` applied to every tensor."""
        return AttentionParams.from_state_dict({k: fn(k, v) for k, v in self.state_dict().items()})


def param_specs(cfg: DSv4Config, layer: int) -> dict[str, tuple[tuple[int, ...], torch.dtype, str]]:
    """Checkpoint name -> (shape, stored dtype, init kind) of the attention of decoder layer ``layer``."""
    D, H, d, ql = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
    G, ol = cfg.o_groups, cfg.o_lora_rank
    bf, f32 = torch.bfloat16, torch.float32
    r = cfg.compress_ratio(layer)
    s = {"wq_a.weight": ((ql, D), bf, "linear"), "q_norm.weight": ((ql,), bf, "norm"),
         "wq_b.weight": ((H * d, ql), bf, "linear"), "wkv.weight": ((d, D), bf, "linear"),
         "kv_norm.weight": ((d,), bf, "norm"), "wo_a.weight": ((G * ol, H * d // G), bf, "linear"),
         "wo_b.weight": ((D, G * ol), bf, "linear"), "attn_sink": ((H,), f32, "sink")}

    def comp(prefix: str, ratio: int, hd: int) -> None:
        c = 2 if ratio == 4 else 1
        s.update({f"{prefix}wkv.weight": ((c * hd, D), bf, "linear"), f"{prefix}wgate.weight": ((c * hd, D), bf, "linear"),
                  f"{prefix}ape": ((ratio, c * hd), f32, "ape"), f"{prefix}norm.weight": ((hd,), bf, "norm")})
    if r:
        comp("compressor.", r, d)
    if r == 4:
        nI, dI = cfg.index_n_heads, cfg.index_head_dim
        s.update({"indexer.wq_b.weight": ((nI * dI, ql), bf, "linear"),
                  "indexer.weights_proj.weight": ((nI, D), bf, "linear")})
        comp("indexer.compressor.", 4, dI)
    return s


def init_attention_params(cfg: DSv4Config, layer: int, *, seed: int = 0,
                          device: torch.device | str = "cpu") -> AttentionParams:
    """Deterministic random weights at realistic scales, drawn on the CPU from ``torch.Generator(seed)``.

    Linear weights ~ N(0, 1/in_features) (unit-RMS outputs for unit-RMS inputs), norm weights 1 + N(0, 0.05^2),
    ``attn_sink`` ~ N(0, 0.5^2) (comparable to the O(1) attention logits), ``ape`` ~ N(0, 0.1^2); cast to the
    stored dtype. The generator seed mixes ``seed`` and ``layer`` (two layers of one kind get different weights);
    the draw order is the ``param_specs`` order, so a (cfg, layer, seed) triple fixes the weights.
    """
    gen = torch.Generator().manual_seed((int(seed) * 100_003 + int(layer)) % (1 << 63))
    sd = {}
    for name, (shape, dtype, kind) in param_specs(cfg, layer).items():
        z = torch.randn(shape, generator=gen, dtype=torch.float32)
        if kind == "linear":
            t = z * shape[1] ** -0.5
        elif kind == "norm":
            t = 1.0 + 0.05 * z
        elif kind == "sink":
            t = 0.5 * z
        else:
            t = 0.1 * z
        sd[name] = t.to(dtype).to(device)
    return AttentionParams.from_state_dict(sd)


FP8_WEIGHTS = ("wq_a.weight", "wkv.weight", "wq_b.weight", "wo_a.weight", "wo_b.weight", "indexer.wq_b.weight")


def quantize_weights_fp8(params: AttentionParams) -> AttentionParams:
    """The checkpoint's fp8 weights (wq_a, wkv, wq_b, wo_a, wo_b, indexer.wq_b) round-tripped through fp8 e4m3
    with one UE8M0 scale per 128x128 block; the bf16 compressor / weights_proj / norms and fp32 tensors stay."""
    def q(name: str, t: torch.Tensor) -> torch.Tensor:
        if name not in FP8_WEIGHTS:
            return t
        if t.shape[0] % FP8_WEIGHT_BLOCK[0] or t.shape[1] % FP8_WEIGHT_BLOCK[1]:
            raise ValueError(f"params.{name}: shape {list(t.shape)} is not a multiple of the 128x128 fp8 block")
        return fp8_roundtrip(t, FP8_WEIGHT_BLOCK)
    return params.map(q)


def validate_params(params: AttentionParams, cfg: DSv4Config, layer: int) -> None:
    """Names, shapes and dtype class of ``params`` against ``param_specs(cfg, layer)``."""
    if not isinstance(params, AttentionParams):
        raise TypeError(f"params: expected AttentionParams, got {type(params).__name__}")
    specs, sd = param_specs(cfg, layer), params.state_dict()
    if set(sd) != set(specs):
        missing, extra = sorted(set(specs) - set(sd)), sorted(set(sd) - set(specs))
        raise ValueError(f"params: layer {layer} (ratio {cfg.compress_ratio(layer)}) expects tensors "
                         f"missing={missing} extra={extra}")
    for name, (shape, _, _) in specs.items():
        check_tensor(f"params.{name}", sd[name], dtypes=ANY_FLOAT, shape=shape)


# ---- index lists ----------------------------------------------------------------------------------
def window_indices(T: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[T, window] int64: row t = ``max(0, t-W+1), ..., t`` then -1 padding."""
    t = torch.arange(T, device=device)[:, None]
    slot = torch.arange(window, device=device)[None, :]
    start = (t - window + 1).clamp(min=0)
    return torch.where(slot <= t - start, start + slot, -1)


def causal_entry_indices(T: int, ratio: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[T, T//ratio] int64: row t lists every complete entry ``j < (t+1)//ratio`` (HCA), -1 elsewhere."""
    j = torch.arange(T // ratio, device=device)[None, :]
    n_valid = (torch.arange(T, device=device) + 1)[:, None] // ratio
    return torch.where(j < n_valid, j, -1)


# ---- sparse core ----------------------------------------------------------------------------------
def sparse_attention_with_sink(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """MQA over listed candidates with a per-head sink: ``o`` [T, H, d] bf16.

    ``q`` [T, H, d], ``kv`` [N, d] (K = V), ``idx`` [T, M] int (-1 = masked; duplicates count twice),
    ``sink`` [H]. For row t, head h: ``l_u = scale * q[t,h] . kv[idx[t,u]]`` (fp32),
    ``p_u = exp(l_u) / (sum_u' exp(l_u') + exp(sink[h]))``, ``o[t,h] = sum_u p_u kv[idx[t,u]]``.
    A row with no candidate returns 0 (the sink takes all the mass). Computed stably with the max over the
    logits and the sink subtracted.
    """
    check_tensor("q", q, ndim=3)
    T, H, d = q.shape
    check_tensor("kv", kv, shape=(None, d))
    N = kv.shape[0]
    check_tensor("idx", idx, dtypes=(torch.int64, torch.int32), shape=(T, None))
    check_tensor("sink", sink, dtypes=ANY_FLOAT, shape=(H,))
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale: expected a python float, got {type(scale).__name__}")
    if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= N):
        raise ValueError(f"idx: expected entries in [-1, {N - 1}] (rows of kv, -1 = masked), "
                         f"got range [{int(idx.min())}, {int(idx.max())}]")

    out = torch.empty(T, H, d, dtype=torch.bfloat16, device=q.device)
    kv_pad = torch.cat([kv.float(), kv.new_zeros(1, d, dtype=torch.float32)])   # row N: the masked slot
    safe = torch.where(idx < 0, N, idx.long())
    sink_l = sink.float().view(1, H, 1)
    M = idx.shape[1]
    rows = max(1, _CHUNK_ELEMS // max(1, M * d))
    for t0 in range(0, T, rows):
        t1 = min(T, t0 + rows)
        keys = kv_pad[safe[t0:t1]]                                             # [t, M, d]
        logits = torch.einsum("thd,tmd->thm", q[t0:t1].float(), keys) * scale
        logits.masked_fill_((idx[t0:t1] < 0)[:, None, :], float("-inf"))
        m = torch.cat([logits, sink_l.expand(t1 - t0, H, 1)], dim=-1).amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))            # all -inf: nothing to subtract
        p = torch.exp(logits - m)
        denom = p.sum(dim=-1, keepdim=True) + torch.exp(sink_l - m)
        o = torch.einsum("thm,tmd->thd", p, keys)
        # only a zero denominator (sink -inf, nothing listed) gives 0; NaN must propagate, not turn into 0
        out[t0:t1] = torch.where(denom == 0, torch.zeros_like(o), o / denom).to(torch.bfloat16)
    return out


# ---- output projection ----------------------------------------------------------------------------
def attention_output(o: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, wo_a: torch.Tensor,
                     wo_b: torch.Tensor, o_groups: int) -> torch.Tensor:
    """Inverse RoPE + grouped low-rank output projection: [T, D] bf16.

    ``o`` [T, H, d]; its last ``2*len(inv_freq)`` dims are rotated by ``-pos_t * inv_freq`` (fp32, kept fp32);
    heads are split into ``o_groups`` contiguous groups (group g = heads ``[g*H/G, (g+1)*H/G)``), flattened
    to ``(H/G)*d``; ``z[t, g] = bf16(o[t, g] @ wo_a[g].T)`` with ``wo_a`` [G*o_l, H*d/G] viewed [G, o_l, H*d/G];
    ``out = bf16(z.flatten(1) @ wo_b.T)`` with ``wo_b`` [D, G*o_l].
    """
    check_tensor("o", o, ndim=3)
    T, H, d = o.shape
    check_positions(positions, T)
    check_inv_freq(inv_freq, d, "head_dim")
    if isinstance(o_groups, bool) or not isinstance(o_groups, int) or o_groups <= 0 or H % o_groups:
        raise ValueError(f"o_groups: expected a positive divisor of the head count {H}, got {o_groups!r}")
    G = o_groups
    check_tensor("wo_a", wo_a, shape=(None, H * d // G))
    if wo_a.shape[0] % G:
        raise ValueError(f"wo_a: expected G*o_l rows with G = o_groups = {G}, got {wo_a.shape[0]}")
    o_l = wo_a.shape[0] // G
    check_tensor("wo_b", wo_b, shape=(None, G * o_l))

    o32 = apply_rope(o.float(), positions, inv_freq, inverse=True)
    z = torch.einsum("tgr,gor->tgo", o32.view(T, G, H * d // G), wo_a.float().view(G, o_l, -1)).to(torch.bfloat16)
    return (z.flatten(1).float() @ wo_b.float().T).to(torch.bfloat16)


# ---- the prefill ----------------------------------------------------------------------------------
def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``bf16(x @ w.T)`` with fp32 accumulation (bf16 x bf16 products are exact in fp32)."""
    return (x.float() @ w.float().T).to(torch.bfloat16)


def query_path(x: torch.Tensor, positions: torch.Tensor, params: AttentionParams, cfg: DSv4Config,
               inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qr [T, q_l], q [T, H, d]) bf16 (3.1): ``qr = RMSNorm(x @ wq_a.T; q_norm)``, ``q = qr @ wq_b.T``,
    per-head RMS normalisation without weight, RoPE on the last dims; q normalised + rotated in fp32, one rounding."""
    eps = cfg.rms_norm_eps
    qr = rmsnorm(_linear(x, params.wq_a), params.q_norm, eps)
    q = _linear(qr, params.wq_b).view(x.shape[0], cfg.num_attention_heads, cfg.head_dim)
    q = rmsnorm(q, None, eps, out_dtype=torch.float32)
    return qr, apply_rope(q, positions, inv_freq).to(torch.bfloat16)


def kv_path(x: torch.Tensor, positions: torch.Tensor, params: AttentionParams, cfg: DSv4Config,
            inv_freq: torch.Tensor, *, fp8_kv: bool = True) -> torch.Tensor:
    """Window KV [T, d] bf16 (3.2): ``RMSNorm(x @ wkv.T; kv_norm)``, RoPE on the last dims, nope part through
    an fp8 e4m3 round trip with UE8M0 scales per 64 channels when ``fp8_kv``."""
    kv = apply_rope(rmsnorm(_linear(x, params.wkv), params.kv_norm, cfg.rms_norm_eps), positions, inv_freq)
    nope = cfg.head_dim - 2 * inv_freq.numel()
    if fp8_kv and nope:
        kv[:, :nope] = fp8_roundtrip(kv[:, :nope], FP8_KV_BLOCK)
    return kv


@dataclass
class PrefillParts:
    """Intermediates of ``attention_prefill``: candidate ``idx`` rows index ``cat([kv, entries])``."""

    qr: torch.Tensor                 # [T, q_l] bf16
    q: torch.Tensor                  # [T, H, d] bf16 (normalised, rotated)
    kv: torch.Tensor                 # [T, d] bf16 (rotated, nope fp8-rounded if fp8_kv)
    entries: torch.Tensor | None     # [T//r, d] bf16 compressed entries (r > 1)
    sel: torch.Tensor | None         # [T, *] entry ids per query (CSA: indexer top-k; HCA: all causal), -1 unused
    idx: torch.Tensor                # [T, W + *] candidates: window rows then T + entry ids, -1 masked
    o: torch.Tensor                  # [T, H, d] bf16 attention output before the inverse RoPE
    out: torch.Tensor                # [T, D] bf16


def attention_prefill_parts(x: torch.Tensor, positions: torch.Tensor, params: AttentionParams,
                            cfg: DSv4Config, layer: int, *, fp8_kv: bool = True, ops: dict | None = None) -> PrefillParts:
    """``attention_prefill`` keeping its intermediates (for tests and notebooks). ``ops`` swaps the cores
    ("sparse_attention", "compressor", "indexer_topk" -> a callable with the reference's signature)."""
    ops = ops or {}
    if not isinstance(cfg, DSv4Config):
        raise TypeError(f"cfg: expected DSv4Config, got {type(cfg).__name__}")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer: expected an int, got {type(layer).__name__}")
    r = cfg.compress_ratio(layer)
    check_tensor("x", x, shape=(None, cfg.hidden_size))
    T = x.shape[0]
    check_positions(positions, T)
    if r:
        check_prefill_positions(positions)
    validate_params(params, cfg, layer)

    inv_freq = layer_inv_freq(cfg, layer).to(x.device)
    d, eps = cfg.head_dim, cfg.rms_norm_eps
    qr, q = query_path(x, positions, params, cfg, inv_freq)
    kv = kv_path(x, positions, params, cfg, inv_freq, fp8_kv=fp8_kv)
    keys, lists = [kv], [window_indices(T, cfg.sliding_window, x.device)]
    entries = sel = None
    if r:
        c = params.compressor
        entries = ops.get("compressor", compress)(x, c.wkv, c.wgate, c.ape, c.norm_weight, r, inv_freq, head_dim=d, eps=eps,
                           fp8_nope=fp8_kv)
        if r == 4:
            ip = params.indexer
            ic = ip.compressor
            sel, _ = ops.get("indexer_topk", indexer_topk)(x, qr, positions, ip.wq_b, ip.weights_proj, ic.wkv, ic.wgate, ic.ape,
                                  ic.norm_weight, inv_freq, cfg.index_topk, eps=eps)
        else:
            sel = causal_entry_indices(T, r, x.device)
        keys.append(entries)
        lists.append(torch.where(sel >= 0, sel + T, -1))
    idx = torch.cat(lists, dim=1)
    o = ops.get("sparse_attention", sparse_attention_with_sink)(q, torch.cat(keys), idx, params.attn_sink, d ** -0.5)
    out = attention_output(o, positions, inv_freq, params.wo_a, params.wo_b, cfg.o_groups)
    return PrefillParts(qr, q, kv, entries, sel, idx, o, out)


def attention_prefill(x: torch.Tensor, positions: torch.Tensor, params: AttentionParams, cfg: DSv4Config,
                      layer: int, *, fp8_kv: bool = True, ops: dict | None = None) -> torch.Tensor:
    """DSv4 attention of decoder layer ``layer`` for a no-cache prefill (dsv4-layers.md 3.8): [T, D] bf16.

    ``x`` [T, D] (the attn_norm-ed sublayer input, bf16), ``positions`` [T] int (must be 0..T-1 in compressed
    layers; any positions in window-only layers). Candidates per query t: the window ``max(0, t-W+1)..t``
    plus, for ratio 128, every entry ``j < (t+1)//128`` and, for ratio 4, the indexer's top-``index_topk``
    entries; softmax with the per-head sink at scale ``head_dim^-0.5``; then ``attention_output``.
    ``fp8_kv``: fp8 round trip of the nope part of the window KV and of the compressed entries.
    ``ops``: optional replacements of the cores (see ``attention_prefill_parts``).
    """
    return attention_prefill_parts(x, positions, params, cfg, layer, fp8_kv=fp8_kv, ops=ops).out
