"""Bytes and FLOPs per op (dsv4-layers.md section 7), measured peaks, and % of peak.

Conventions of the table: bytes are the minimum HBM traffic (each operand read or written once), FLOPs count a
multiply-add as 2. Every row of the table has a function below taking keyword-only shape arguments and returning
an ``OpCost``; ``cost(op, **shape)`` dispatches by name (``OPS`` lists them, ``ALIASES`` adds a few other names).
Symbols: T tokens, D hidden size, n = hc_mult, H heads, d = head_dim, G/o_l output groups/rank, W window,
r compress ratio (0 = window only), n_I/d_I/K_I indexer heads/dim/top-k, E/k/I experts/per token/width, V vocab.

Prefill sums (one causal sequence of T tokens, positions 0..T-1), computed exactly:
    Nw(T)       = sum_t min(W, t+1)
    Nc_r(T)     = sum_t floor((t+1)/r)          (~ T^2 / (2r))
    Nsel(T)     = sum_t min(K_I, floor((t+1)/4))
Decode rows take the context length L and count T independent query tokens.

% of peak (``pct_of_peak``): the roofline time is ``max(bytes / copy_bw, flops / matmul_rate)``, with the
matmul rate of the op's tensor-core dtype (bf16 or fp8; ops without a tensor-core matmul are always held
against the copy bandwidth). The larger term names the bound; ``pct = 100 * roofline_time / measured_time``,
i.e. achieved bandwidth / copy bandwidth for memory-bound ops and achieved FLOP/s / matmul rate otherwise.
Peaks are measured on the GPU (``measure_peaks``), never taken from a datasheet.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

SWA_ROW_BYTES = 584      # fp8_ds_mla cache row: 448 fp8 + 64 bf16 + 8 scale bytes (dsv4-layers.md 3.9)
INDEXER_ROW_BYTES = 132  # indexer K cache row: 128 fp8 + 4-byte fp32 scale
SINKHORN_FLOPS = 1.3e3   # per token, n = 4 and 20 iterations (dsv4-layers.md 2.3)


@dataclass(frozen=True)
class OpCost:
    """Roofline quantities of one op call. ``compute_dtype``: the tensor-core dtype ('bf16' | 'fp8') whose
    matmul rate bounds the op, None when it has no tensor-core matmul. ``comm_bytes``: NVLink traffic."""

    op: str
    row: int
    flops: float
    bytes: float
    compute_dtype: str | None = None
    comm_bytes: float = 0.0

    @property
    def intensity(self) -> float:
        """FLOP per byte of HBM traffic."""
        return self.flops / self.bytes if self.bytes else math.inf


def _pos(name: str, v: Any, allow_zero: bool = True) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name}: expected a {'non-negative' if allow_zero else 'positive'} int, got {v!r}")
    return v


def _ratio(r: Any) -> int:
    if r not in (0, 1, 4, 128):
        raise ValueError(f"r: expected a compress ratio in (0, 1, 4, 128), got {r!r}")
    return 0 if r == 1 else r


# ---- exact prefill sums -----------------------------------------------------------------------------------
def n_window(T: int, W: int = 128) -> int:
    """Nw(T) = sum_{t<T} min(W, t+1)."""
    return T * (T + 1) // 2 if T <= W else W * T - W * (W - 1) // 2


def n_compressed(T: int, r: int) -> int:
    """Nc_r(T) = sum_{m=1..T} floor(m/r) = r q(q-1)/2 + q (T - q r + 1), q = T // r."""
    q = T // r
    return r * q * (q - 1) // 2 + q * (T - q * r + 1)


def n_selected(T: int, K_I: int) -> int:
    """Nsel(T) = sum_{m=1..T} min(K_I, floor(m/4)); floor(m/4) reaches K_I at m = 4 K_I."""
    if T < 4 * K_I:
        return n_compressed(T, 4)
    return n_compressed(4 * K_I - 1, 4) + K_I * (T - 4 * K_I + 1)


# ---- one function per row of dsv4-layers.md section 7 --------------------------------------------------------
def embedding_expand(*, T: int, D: int, n: int = 4) -> OpCost:
    """Row 1: gather embedding rows + n-fold expand. FLOPs 0; bytes 2TD (read) + 2nTD (write, = 8TD for n=4)."""
    return OpCost("embedding_expand", 1, 0, 2 * T * D + 2 * n * T * D)


def mhc_pre(*, T: int, D: int, n: int = 4) -> OpCost:
    """Row 2: prenorm GEMM [T,nD]x[nD,M] (M = (2+n)n = 24) + Sinkhorn + collapse + fused RMSNorm.
    FLOPs 2 T nD M + 1.3e3 T + 12 TD;  bytes 2nTD + 4 M nD + 2TD + 4 (M+n) T  (= ~10TD)."""
    M = (2 + n) * n
    return OpCost("mhc_pre", 2, 2 * T * n * D * M + SINKHORN_FLOPS * T + 12 * T * D,
                  2 * n * T * D + 4 * M * n * D + 2 * T * D + 4 * (M + n) * T)


def mhc_post(*, T: int, D: int, n: int = 4) -> OpCost:
    """Row 3: R' = post f + C^T R. FLOPs T nD (2n+2) (= 40TD); bytes 2nTD + 2TD + 2nTD (= 18TD)."""
    return OpCost("mhc_post", 3, T * n * D * (2 * n + 2), 2 * n * T * D + 2 * T * D + 2 * n * T * D)


def mhc_fused_post_pre(*, T: int, D: int, n: int = 4) -> OpCost:
    """Row 4: post of one sublayer + pre of the next in one kernel (~240TD FLOPs, ~20TD bytes).
    FLOPs = post + pre; bytes = read R and f, write R' and the next layer input, plus fn and the mixes
    (the new residual is not re-read)."""
    M = (2 + n) * n
    post, pre = mhc_post(T=T, D=D, n=n), mhc_pre(T=T, D=D, n=n)
    return OpCost("mhc_fused_post_pre", 4, post.flops + pre.flops,
                  2 * n * T * D + 2 * T * D + 2 * n * T * D + 2 * T * D + 4 * M * n * D + 4 * (M + n) * T)


def hc_head(*, T: int, D: int, n: int = 4) -> OpCost:
    """Row 5: hc_head collapse + final RMSNorm (also the MTP shared-head norm).
    FLOPs 2 T nD n + 12 TD; bytes 2nTD + 2TD."""
    return OpCost("hc_head", 5, 2 * T * n * D * n + 12 * T * D, 2 * n * T * D + 2 * T * D)


def rmsnorm(*, T: int, h: int) -> OpCost:
    """Row 6: RMSNorm of T rows of width h (q_norm+kv_norm, compressor norm, standalone norms).
    FLOPs ~4Th; bytes 4Th (bf16 in and out)."""
    return OpCost("rmsnorm", 6, 4 * T * h, 4 * T * h)


def act_quant_fp8(*, T: int, K: int, block: int = 128) -> OpCost:
    """Row 7: per-token fp8 activation quant (1 x block, UE8M0). FLOPs ~3TK; bytes 2TK + TK + 4TK/block."""
    return OpCost("act_quant_fp8", 7, 3 * T * K, 2 * T * K + T * K + 4 * T * K / block)


def fp8_gemm(*, T: int, N: int, K: int) -> OpCost:
    """Row 8: block-fp8 GEMM Y[T,N] = X[T,K] W[N,K]^T, bf16 out.
    FLOPs 2TNK; bytes NK + NK/16384 (128x128 scales) + TK + 4TK/128 + 2TN."""
    return OpCost("fp8_gemm", 8, 2 * T * N * K, N * K + N * K / 16384 + T * K + 4 * T * K / 128 + 2 * T * N, "fp8")


def bf16_gemm_fp32_out(*, T: int, N: int, K: int) -> OpCost:
    """Row 9: bf16 GEMM with fp32 output (router gate, compressor, indexer compressor, weights_proj).
    FLOPs 2TNK; bytes 2NK + 2TK + 4TN."""
    return OpCost("bf16_gemm_fp32_out", 9, 2 * T * N * K, 2 * N * K + 2 * T * K + 4 * T * N, "bf16")


def qnorm_rope_kv_insert(*, T: int, H: int, d: int = 512) -> OpCost:
    """Row 10: Q per-head norm + RoPE; KV RoPE + fp8 quant + paged insert.
    FLOPs ~10 T H d; bytes 4 T H d + 2 T d + 584 T."""
    return OpCost("qnorm_rope_kv_insert", 10, 10 * T * H * d, 4 * T * H * d + 2 * T * d + SWA_ROW_BYTES * T)


def compressor(*, T: int, r: int, hd: int = 512, row_bytes: int | None = None) -> OpCost:
    """Row 11: compressor state save (+ape) and pool/softmax + RMSNorm + RoPE + quant + insert.
    c = 2 if r == 4 (overlap) else 1. FLOPs ~6 c T hd; bytes 8 c T hd (write state) + 8 c T hd (read window)
    + (T // r) compressed rows of ``row_bytes`` (584 for hd=512, 132 for the indexer's hd=128)."""
    r = _ratio(r)
    if r == 0:
        raise ValueError("r: the compressor exists only for r in (4, 128)")
    if row_bytes is None:
        row_bytes = {512: SWA_ROW_BYTES, 128: INDEXER_ROW_BYTES}.get(hd)
        if row_bytes is None:
            raise ValueError(f"row_bytes: needed for hd={hd} (known: 512 -> 584, 128 -> 132)")
    c = 2 if r == 4 else 1
    return OpCost("compressor", 11, 6 * c * T * hd, 16 * c * T * hd + (T // r) * row_bytes)


def indexer_q_rope_quant(*, T: int, n_I: int = 64, d_I: int = 128) -> OpCost:
    """Row 12: indexer Q RoPE + fp8 quant + weight fold. FLOPs ~6 T n_I d_I; bytes 3 T n_I d_I + 8 T n_I."""
    return OpCost("indexer_q_rope_quant", 12, 6 * T * n_I * d_I, 2 * T * n_I * d_I + T * n_I * d_I + 8 * T * n_I)


def indexer_logits_prefill(*, T: int, n_I: int = 64, d_I: int = 128, materialize: bool = False) -> OpCost:
    """Row 13 (prefill): weighted-ReLU MQA logits in fp8. FLOPs 2 n_I d_I Nc_4(T);
    bytes T n_I d_I + 132 T/4 + 4 T n_I (+ 4 Nc_4(T) if the logits are materialised)."""
    nc = n_compressed(T, 4)
    return OpCost("indexer_logits_prefill", 13, 2 * n_I * d_I * nc,
                  T * n_I * d_I + INDEXER_ROW_BYTES * T / 4 + 4 * T * n_I + (4 * nc if materialize else 0), "fp8")


def indexer_logits_decode(*, T: int, L: int, n_I: int = 64, d_I: int = 128) -> OpCost:
    """Row 13 (decode): T query tokens, each scanning L//4 indexer entries.
    FLOPs T 2 n_I d_I (L//4); bytes T 132 (L//4)."""
    entries = L // 4
    return OpCost("indexer_logits_decode", 13, T * 2 * n_I * d_I * entries, T * INDEXER_ROW_BYTES * entries, "fp8")


def indexer_topk(*, T: int, K_I: int) -> OpCost:
    """Row 14: top-K_I over the prefill logits. 'FLOPs' = compares ~Nc_4(T) log2 K_I;
    bytes 4 Nc_4(T) + 4 T K_I."""
    nc = n_compressed(T, 4)
    return OpCost("indexer_topk", 14, nc * math.log2(max(K_I, 1)), 4 * nc + 4 * T * K_I)


def _candidates_prefill(T: int, r: int, K_I: int | None) -> int:
    if r == 0:
        return 0
    if r == 128:
        return n_compressed(T, 128)
    if K_I is None:
        raise ValueError("K_I: needed for a CSA layer (r=4)")
    return n_selected(T, K_I)


def sparse_attention_prefill(*, T: int, H: int, r: int, d: int = 512, W: int = 128,
                             K_I: int | None = None) -> OpCost:
    """Row 15 (prefill): sparse MLA attention with sink over window + compressed candidates.
    FLOPs 4 H d (Nw(T) + Ncand(T)), Ncand = 0 (r=0), Nc_128(T) (HCA), Nsel(T) (CSA, needs K_I);
    bytes 4 T H d + 2 d (T + T//r)."""
    r = _ratio(r)
    flops = 4 * H * d * (n_window(T, W) + _candidates_prefill(T, r, K_I))
    return OpCost("sparse_attention_prefill", 15, flops, 4 * T * H * d + 2 * d * (T + (T // r if r else 0)), "bf16")


def sparse_attention_decode(*, T: int, L: int, H: int, r: int, d: int = 512, W: int = 128,
                            K_I: int | None = None) -> OpCost:
    """Row 15 (decode): T query tokens with context L, fp8 cache rows of 584 B.
    Per token: cand = 0 | L//128 | min(K_I, L//4); FLOPs 4 H d (min(W,L) + cand);
    bytes 584 (min(W,L) + cand) + 4 H d."""
    r = _ratio(r)
    if r == 4 and K_I is None:
        raise ValueError("K_I: needed for a CSA layer (r=4)")
    cand = 0 if r == 0 else (L // 128 if r == 128 else min(K_I, L // 4))
    rows = min(W, L) + cand
    return OpCost("sparse_attention_decode", 15, T * 4 * H * d * rows, T * (SWA_ROW_BYTES * rows + 4 * H * d), "bf16")


def inv_rope_fp8_quant(*, T: int, H: int, d: int = 512) -> OpCost:
    """Row 16: inverse RoPE + fp8 quant (1x128) of the attention output. FLOPs ~8 T H d;
    bytes 2 T H d + T H d + 4 T H d / 128."""
    return OpCost("inv_rope_fp8_quant", 16, 8 * T * H * d, 2 * T * H * d + T * H * d + 4 * T * H * d / 128)


def fp8_einsum_wo_a(*, T: int, H: int, G: int, o_l: int, d: int = 512) -> OpCost:
    """Row 17: grouped fp8 einsum 'bhr,hdr->bhd' (wo_a). FLOPs 2 T H d o_l;
    bytes H d o_l (fp8 weights) + T H d (fp8 acts) + 2 T G o_l (bf16 out)."""
    return OpCost("fp8_einsum_wo_a", 17, 2 * T * H * d * o_l, H * d * o_l + T * H * d + 2 * T * G * o_l, "fp8")


def moe_routing(*, T: int, E: int, k: int, hash_routing: bool = False, V: int = 129280) -> OpCost:
    """Row 18: sqrt-softplus + bias + top-k + renorm + scale (or hash lookup); EPLB map.
    FLOPs ~10 T E; bytes 4 T E + 12 T k (+ for hash layers the tid2eid rows touched: 8 k min(T, V),
    our reading of the table's '8 V k table rows touched')."""
    extra = 8 * k * min(T, V) if hash_routing else 0
    return OpCost("moe_routing", 18, 10 * T * E, 4 * T * E + 12 * T * k + extra)


def moe_experts(*, T: int, D: int, I: int, E: int, k: int, n_shared: int = 0) -> OpCost:
    """Row 19: routed experts, grouped FP8xFP4 GEMM + SwiGLU-clamp + weighted combine.
    FLOPs 6 T k D I (+ 6 T D I per shared expert); bytes: touched expert weights
    min(E, T k) 3 D I (0.5 + 1/32) + acts T k (D + D/32 + 2D) + 2TD.
    With ``n_shared`` > 0 the shared experts' fp8 weights 3 D I n_shared are added to the bytes (not in the
    table; it lists only their FLOPs)."""
    flops = 6 * T * k * D * I + 6 * T * D * I * n_shared
    nbytes = (min(E, T * k) * 3 * D * I * (0.5 + 1 / 32) + T * k * (D + D / 32 + 2 * D) + 2 * T * D
              + 3 * D * I * n_shared)
    return OpCost("moe_experts", 19, flops, nbytes, "fp8")


def mega_moe(*, T: int, D: int, I: int, E: int, k: int, n_shared: int = 0) -> OpCost:
    """Row 20: MegaMoE = row 19 + expert-parallel dispatch/combine. HBM as row 19; ``comm_bytes`` (NVLink,
    upper bound per rank) = T k (D + D/32 + 12) dispatched + 2 T k D combined."""
    base = moe_experts(T=T, D=D, I=I, E=E, k=k, n_shared=n_shared)
    return OpCost("mega_moe", 20, base.flops, base.bytes, "fp8", T * k * (D + D / 32 + 12) + 2 * T * k * D)


def lm_head(*, T: int, D: int, V: int) -> OpCost:
    """Row 21: bf16 LM head (and MTP head), fp32 logits. FLOPs 2TDV; bytes 2VD + 2TD + 4TV."""
    return OpCost("lm_head", 21, 2 * T * D * V, 2 * V * D + 2 * T * D + 4 * T * V, "bf16")


def mtp_input_rmsnorm(*, T: int, D: int, n: int = 4) -> OpCost:
    """Row 22: MTP input fused norm (position-0 mask + enorm + n hnorms). FLOPs ~4T(n+1)D; bytes 4T(n+1)D."""
    return OpCost("mtp_input_rmsnorm", 22, 4 * T * (n + 1) * D, 4 * T * (n + 1) * D)


def mtp_shared_head_rmsnorm(*, T: int, D: int) -> OpCost:
    """Row 6 as the MTP shared-head kernel runs it (after hc_head): one RMSNorm of [T, D] bf16 rows plus its
    bf16 weight. FLOPs ~4TD; bytes 4TD + 2D."""
    return OpCost("mtp_shared_head_rmsnorm", 6, 4 * T * D, 4 * T * D + 2 * D)


OPS: dict[str, Callable[..., OpCost]] = {f.__name__: f for f in (
    embedding_expand, mhc_pre, mhc_post, mhc_fused_post_pre, hc_head, rmsnorm, act_quant_fp8, fp8_gemm,
    bf16_gemm_fp32_out, qnorm_rope_kv_insert, compressor, indexer_q_rope_quant, indexer_logits_prefill,
    indexer_logits_decode, indexer_topk, sparse_attention_prefill, sparse_attention_decode, inv_rope_fp8_quant,
    fp8_einsum_wo_a, moe_routing, moe_experts, mega_moe, lm_head, mtp_input_rmsnorm, mtp_shared_head_rmsnorm)}
ALIASES = {
    "embedding": "embedding_expand",
    "router": "moe_routing",
    "router_gemm": "bf16_gemm_fp32_out",
    "compressor_gemm": "bf16_gemm_fp32_out",
    "mtp_head": "lm_head",
}

# shape symbol -> DSv4Config field, used by ``cost(op, cfg=...)`` to fill what the caller did not pass
CONFIG_FIELDS = {"D": "hidden_size", "n": "hc_mult", "H": "num_attention_heads", "d": "head_dim",
                 "G": "o_groups", "o_l": "o_lora_rank", "W": "sliding_window", "n_I": "index_n_heads",
                 "d_I": "index_head_dim", "K_I": "index_topk", "E": "n_routed_experts",
                 "k": "num_experts_per_tok", "I": "moe_intermediate_size", "V": "vocab_size"}


def cost(op: str, cfg: Any = None, **shape: Any) -> OpCost:
    """``OpCost`` of ``op`` (a name in ``OPS`` or ``ALIASES``) for the given shape.

    ``cfg`` (a ``DSv4Config``) fills the model dimensions the op takes and the caller did not pass
    (``CONFIG_FIELDS``); T and op-specific arguments (N, K, r, L, h, ...) are always explicit.
    """
    name = ALIASES.get(op, op)
    fn = OPS.get(name)
    if fn is None:
        raise ValueError(f"op: expected one of {sorted(OPS) + sorted(ALIASES)}, got {op!r}")
    params = inspect.signature(fn).parameters
    unknown = sorted(set(shape) - set(params))
    if unknown:
        raise TypeError(f"cost({op!r}): unexpected shape argument(s) {unknown}; takes {list(params)}")
    if cfg is not None:
        for sym, attr in CONFIG_FIELDS.items():
            if sym in params and sym not in shape:
                shape[sym] = getattr(cfg, attr)
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in shape]
    if missing:
        raise TypeError(f"cost({op!r}): missing shape argument(s) {missing}")
    for p, v in shape.items():
        if p not in ("materialize", "hash_routing") and v is not None:
            _pos(p, v, allow_zero=p in ("T", "L", "n_shared", "r"))
    return fn(**shape)


# ---- peaks ------------------------------------------------------------------------------------------------
@dataclass
class Peaks:
    """Measured peaks of one GPU: copy bandwidth (bytes read + written per second) and matmul rates."""

    gpu: str
    copy_bw: float              # B/s
    bf16_flops: float           # FLOP/s, dense bf16 matmul at 8192^3
    fp8_flops: float | None     # FLOP/s, torch._scaled_mm e4m3 at 8192^3 (None if it could not run)
    source: str = "measured"
    records: list[dict] | None = None

    def matmul_rate(self, compute_dtype: str | None) -> float | None:
        return {"bf16": self.bf16_flops, "fp8": self.fp8_flops}.get(compute_dtype or "")

    def summary(self) -> str:
        fp8 = "n/a" if self.fp8_flops is None else f"{self.fp8_flops / 1e12:.0f}"
        return (f"{self.gpu}: copy {self.copy_bw / 1e12:.2f} TB/s (read+write), bf16 matmul "
                f"{self.bf16_flops / 1e12:.0f} TFLOP/s, fp8 matmul {fp8} TFLOP/s")

    def to_records(self) -> list[dict]:
        if self.records is None:
            raise ValueError("Peaks.records: only peaks from measure_peaks() or load_peaks() carry records")
        return self.records


PEAK_METRICS = {"peak_copy_bandwidth": ("copy_bw", 1e12), "peak_bf16_matmul": ("bf16_flops", 1e12),
                "peak_fp8_matmul": ("fp8_flops", 1e12)}  # values stored in TB/s and TFLOP/s


def peaks_from_records(records: list[dict], source: str = "records") -> Peaks:
    """Build ``Peaks`` from peak records (the latest one per metric wins; fp8 keeps the faster variant)."""
    found: dict[str, dict] = {}
    for rec in records:
        m = rec.get("metric")
        if m not in PEAK_METRICS or not isinstance(rec.get("value"), (int, float)):
            continue
        prev = found.get(m)
        if prev is None or (rec["timestamp"], rec["value"]) > (prev["timestamp"], prev["value"]):
            found[m] = rec
    missing = [m for m in ("peak_copy_bandwidth", "peak_bf16_matmul") if m not in found]
    if missing:
        raise ValueError(f"records: no {missing} record in {source}")
    vals = {attr: found[m]["value"] * scale if m in found else None for m, (attr, scale) in PEAK_METRICS.items()}
    return Peaks(gpu=found["peak_copy_bandwidth"]["gpu"], source=source, records=list(records), **vals)


def load_peaks(slug: str | None = None, root: Any = None) -> Peaks | None:
    """Peaks from ``<root>/<slug>/peaks.jsonl`` (defaults: the results root and this machine's slug);
    None when the file does not exist (on a GPU, call ``measure_peaks()`` instead). A file without copy and
    bf16 peaks raises ``ResultsError``."""
    from . import results

    path = results.results_path("peaks", slug=slug, root=root)
    if not path.exists():
        return None
    recs = results.read_records(path)
    try:
        try:  # a repository-relative path: records must not carry this machine's absolute paths
            shown = str(Path(path).resolve().relative_to(Path(__file__).resolve().parents[2]))
        except ValueError:
            shown = str(path)
        return peaks_from_records(recs, source=shown)
    except ValueError as e:
        raise results.ResultsError(f"{path}: {e}") from None


def stored_or_measured_peaks(out: Any = None) -> Peaks:
    """This GPU's stored peaks (``load_peaks``), or measure them now and, with ``out`` (a folder), append the
    records to ``<out>/peaks.jsonl`` so they can be committed. Raises what measuring raises (no GPU, ...)."""
    peaks = load_peaks()
    if peaks is None:
        peaks = measure_peaks()
        if out is not None:
            from pathlib import Path

            from . import results
            results.append(Path(out) / "peaks.jsonl", peaks.to_records())
    return peaks


def measure_peaks(device: Any = None, *, copy_bytes: int = 2**30, matmul_n: int = 8192, rep: int = 20) -> Peaks:
    """Measure on the current GPU: device-to-device copy of ``copy_bytes`` (rate counts read + write, so
    2 x copy_bytes per call), a bf16 ``matmul_n``^3 matmul, and an fp8 e4m3 ``torch._scaled_mm`` of the same
    size (per-tensor scales, bf16 out; with and without fast accumulation, the faster is the fp8 peak).
    Rates use the median (p50) call time from ``timing.bench`` (CUDA events, L2 flushed between calls)."""
    import torch

    from . import results, timing

    if not torch.cuda.is_available():
        raise RuntimeError("measure_peaks: needs a CUDA GPU (torch.cuda.is_available() is False)")
    dev = torch.device(device or "cuda")
    recs: list[dict] = []

    def add(op: str, variant: str, dtype: str, metric: str, unit: str, rate: float, t: Any, **extra: Any) -> None:
        recs.append(results.record("peaks", op, "torch", variant, None, None, dtype, metric, unit, rate,
                                   time_us=t.p50, time_p20_us=t.p20, time_p80_us=t.p80, timing_mode=t.mode,
                                   rep=t.rep, **extra))

    src = torch.empty(copy_bytes, dtype=torch.uint8, device=dev).random_(0, 256)
    dst = torch.empty_like(src)
    t = timing.bench(lambda: dst.copy_(src), rep=rep, warmup=3, device=dev)
    add("copy", f"{copy_bytes // 2**20}MiB", "uint8", "peak_copy_bandwidth", "TB/s",
        2 * copy_bytes / (t.p50 * 1e-6) / 1e12, t, bytes=2 * copy_bytes)
    del src, dst

    n = matmul_n
    flops = 2 * n ** 3
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t = timing.bench(lambda: torch.mm(a, b), rep=rep, warmup=3, device=dev)
    add("matmul", f"{n}^3", "bfloat16", "peak_bf16_matmul", "TFLOP/s", flops / (t.p50 * 1e-6) / 1e12, t,
        flops=flops)

    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)  # b8 is [N, K]; _scaled_mm wants K x N col-major
    one = torch.ones((), device=dev, dtype=torch.float32)
    for fast in (False, True):
        variant = f"{n}^3 fast_accum={fast}"
        try:
            t = timing.bench(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one,
                                                      out_dtype=torch.bfloat16, use_fast_accum=fast),
                             rep=rep, warmup=3, device=dev)
        except Exception as e:  # record and go on: fp8 support differs between builds/GPUs
            recs.append(results.record("peaks", "scaled_mm", "torch", variant, None, None, "float8_e4m3fn",
                                       "error", None, None, message=f"{type(e).__name__}: {e}"))
            continue
        add("scaled_mm", variant, "float8_e4m3fn", "peak_fp8_matmul", "TFLOP/s", flops / (t.p50 * 1e-6) / 1e12,
            t, flops=flops, use_fast_accum=fast)
    return peaks_from_records(recs, source="measured")


def bound(op_cost: OpCost, peaks: Peaks) -> str:
    """'compute' when the roofline's compute time exceeds its memory time on these peaks, else 'memory'."""
    rate = peaks.matmul_rate(op_cost.compute_dtype)
    if rate is None or not op_cost.flops:
        return "memory"
    return "compute" if op_cost.flops / rate > op_cost.bytes / peaks.copy_bw else "memory"


def pct_of_peak(time_us: float, op_cost: OpCost, peaks: Peaks) -> float:
    """100 x roofline time / measured time (see the module docstring for which peak applies)."""
    if not time_us > 0:
        raise ValueError(f"time_us: expected a positive time, got {time_us!r}")
    rate = peaks.matmul_rate(op_cost.compute_dtype)
    t_mem = op_cost.bytes / peaks.copy_bw
    t_comp = op_cost.flops / rate if rate else 0.0
    return 100.0 * max(t_mem, t_comp) / (time_us * 1e-6)


def roofline_fields(time_us: float, op_cost: OpCost, peaks: Peaks | None) -> dict[str, Any]:
    """Fields for a timing record: bytes, flops, intensity, and with ``peaks`` the bound, the peak it is held
    against and pct_of_peak (None without peaks, e.g. on a CPU)."""
    out: dict[str, Any] = {"roofline_op": op_cost.op, "bytes": op_cost.bytes, "flops": op_cost.flops,
                           "intensity": op_cost.intensity if op_cost.bytes else None,
                           "bound": None, "pct_of_peak": None, "peak": None}
    if op_cost.comm_bytes:
        out["comm_bytes"] = op_cost.comm_bytes
    if peaks is not None:
        b = bound(op_cost, peaks)
        out["bound"] = b
        out["peak"] = "copy_bandwidth" if b == "memory" else f"{op_cost.compute_dtype}_matmul"
        out["pct_of_peak"] = pct_of_peak(time_us, op_cost, peaks)
        out["peaks_source"] = peaks.source
    return out
