"""A capturable DSv4 decoder stack for decode steps: the body of the CUDA-graph experiment (#43746, part 2).

Per layer (vLLM wiring, dsv4-layers.md 2.6 and 3): mHC pre (or fused post+pre) -> q/kv projections ->
**attention core (the eager break)** -> output projection -> mHC fused post+pre -> MoE; after the last layer
mHC post -> hc_head -> RMSNorm. Flash width (D 4096, 64 heads x 512, q_lora 1024, 8 o-groups x 1024, 4 streams)
with fewer layers (default 8) and local experts (default 8, top-6 + 1 shared) so it fits one H100 in bf16.

Decode step with T tokens = T sequences, one new token each. Attention per layer:

    cache[slots] = kv                                            # this step's KV into a per-sequence ring
    o[t] = MQA-with-sink(q[t], cache[idx[t, :width]])           # window of the last W = sliding_window tokens

``slots`` and ``idx`` are static device buffers of ``DecodeStep`` refilled each step; ``width`` (the longest
candidate list this step) is HOST state, read when the core runs. Eagerly or at a break that is fresh every
step; inside a full graph it would be frozen at capture, so a full graph must run with ``pad=True`` (always the
maximum width W; masked slots cost work but not correctness) -- the "uniform decode, metadata fixed" case.

Capturability (no host syncs, no data-dependent shapes) outside the break:

- MoE "dense over local experts": every token runs every local expert plus the shared one as two GEMMs,
  ``x @ [w1;w3]_all^T`` and ``(dense_w * h) @ w2_all^T``, where ``dense_w [T, E+1]`` holds the router weights
  at the top-k ids, 0 elsewhere, and 1 for the shared expert. Exact in real arithmetic (the routing weight is
  applied before w2, as in DS-ref); costs (E+1)/(k+1) times the routed FLOPs, fine for E = 8 local experts.
- mHC through the registry (TileLang on a GPU when available, the fp32 reference otherwise): both sync-free.
- Linear layers are bf16 GEMMs (fp32 accumulation). Not modelled: fp8/fp4 weights, compressed attention
  (CSA/HCA add index rows to the same core; their compressor/indexer are outside this experiment).

The forward is three *pieces* around the breaks -- ``piece_first`` (layer 0 up to its attention), ``piece_mid``
(layer i-1 after attention + layer i up to attention), ``piece_last`` -- so the torch.compile variant can
compile exactly the graph segments the breakable capture produces. Weights are passed to the pieces as dicts
of plain tensors: one compiled ``piece_mid`` serves every layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import graphs
from ..config import DSv4Config, get_config
from ..kernels import registry
from ..kernels.reference.moe import route
from ..kernels.reference.norms import rmsnorm
from ..rope import apply_rope, base_inv_freq
from . import _init
from .mhc import HCHead, MHC

MHC_OPS = ("mhc_pre", "mhc_fused_post_pre", "mhc_post", "hc_head")
BACKEND_PREFERENCE = ("tilelang", "triton", "reference")
Weights = dict[str, torch.Tensor]


def stack_config(preset: str | DSv4Config = "flash", *, num_layers: int = 8, experts: int = 8,
                 top_k: int | None = None) -> DSv4Config:
    """``preset`` at full width with ``num_layers`` window-attention layers, ``experts`` local routed experts
    (top-``top_k``, default min(preset k, experts)), no hash-routed layers."""
    cfg = get_config(preset) if isinstance(preset, str) else preset
    for name, v in (("num_layers", num_layers), ("experts", experts)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    k = min(cfg.num_experts_per_tok, experts) if top_k is None else top_k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= experts:
        raise ValueError(f"top_k: expected an int in [1, experts={experts}], got {top_k!r}")
    return cfg.replace(num_hidden_layers=num_layers, n_routed_experts=experts, num_experts_per_tok=k,
                       num_hash_layers=0, compress_ratios=(0,) * (num_layers + cfg.num_nextn_predict_layers))


# ---- mHC op selection ---------------------------------------------------------------------------
@dataclass(frozen=True)
class MhcOps:
    """The four mHC callables of one registry backend (same signatures as the references)."""

    backend: str
    pre: Callable[..., Any]
    fused_post_pre: Callable[..., Any]
    post: Callable[..., Any]
    head: Callable[..., Any]

    @classmethod
    def of(cls, backend: str) -> "MhcOps":
        return cls(backend, *(registry.get(op, backend) for op in MHC_OPS))


def pick_mhc_backend(device: torch.device | str, backend: str = "auto") -> tuple[str, str]:
    """(backend, why): ``auto`` takes the first of tilelang, triton, reference that has all four mHC ops
    available on this machine (reference on a CPU device)."""
    if backend != "auto":
        for op in MHC_OPS:
            ok, why = registry.availability(op, backend)
            if not ok:
                raise ValueError(f"mhc_backend: {op}/{backend} cannot run here: {why}")
        return backend, "requested"
    if torch.device(device).type != "cuda":
        return "reference", "CPU device"
    skipped = []
    for name in BACKEND_PREFERENCE:
        missing = [op for op in MHC_OPS if name not in registry.backends(op) or not registry.availability(op, name)[0]]
        if not missing:
            return name, "fastest available" + (f" ({'; '.join(skipped)})" if skipped else "")
        skipped.append(f"{name}: {', '.join(missing)} unavailable")
    return "reference", "; ".join(skipped)


# ---- per-step state ------------------------------------------------------------------------------
class DecodeStep:
    """Static buffers and host metadata of one decode step with ``tokens`` sequences (one token each).

    Device buffers (fixed addresses, refilled by ``set``): ``h [T, D]`` input, ``positions [T]``, ``slots [T]``
    (cache row of each new token), ``idx [T, W]`` (candidate cache rows, -1 padded), and the attention core's
    ``q [T, H, d]``, ``kv [T, d]``, ``o [T, H, d]``. Host: ``width`` (longest candidate list), ``pad``.
    Sequence b owns cache rows ``[b W, (b+1) W)``; position p lives in row ``b W + p mod W``.
    """

    def __init__(self, cfg: DSv4Config, tokens: int, device: torch.device | str = "cpu", *, pad: bool = False):
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens: expected an int >= 0, got {tokens!r}")
        T, D, H, d, W = tokens, cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
        self.tokens, self.window, self.pad = T, W, bool(pad)
        dev = torch.device(device)
        bf = torch.bfloat16
        self.h = torch.zeros(T, D, dtype=bf, device=dev)
        self.positions = torch.zeros(T, dtype=torch.int64, device=dev)
        self.slots = torch.arange(T, dtype=torch.int64, device=dev) * W
        self.idx = torch.full((T, W), -1, dtype=torch.int64, device=dev)
        self.q = torch.zeros(T, H, d, dtype=bf, device=dev)
        self.kv = torch.zeros(T, d, dtype=bf, device=dev)
        self.o = torch.zeros(T, H, d, dtype=bf, device=dev)
        self.width = 1
        self.host_positions = np.zeros(T, dtype=np.int64)

    @property
    def launch_width(self) -> int:
        """Candidate columns the core reads: all W when padded (graph-safe), else this step's ``width``."""
        return self.window if self.pad else self.width

    def set(self, positions: Sequence[int] | np.ndarray, h: torch.Tensor | None = None) -> None:
        """Refill the buffers in place for a step at ``positions`` (one per sequence) with input ``h``."""
        p = np.asarray(positions, dtype=np.int64).reshape(-1)
        if p.shape[0] != self.tokens:
            raise ValueError(f"positions: expected {self.tokens} positions (one per sequence), got {p.shape[0]}")
        if self.tokens and p.min() < 0:
            raise ValueError("positions: expected non-negative positions")
        W = self.window
        base = np.arange(self.tokens, dtype=np.int64) * W
        counts = np.minimum(p + 1, W)                                   # window max(0, p-W+1)..p
        k = np.arange(W)[None, :]
        j = (p - counts + 1)[:, None] + k                               # positions, oldest first
        idx = np.where(k < counts[:, None], base[:, None] + np.mod(j, W), -1)
        self.positions.copy_(torch.from_numpy(p))
        self.slots.copy_(torch.from_numpy(base + np.mod(p, W)))
        self.idx.copy_(torch.from_numpy(idx))
        self.width = int(counts.max()) if self.tokens else 1
        self.host_positions = p
        if h is not None:
            if tuple(h.shape) != tuple(self.h.shape):
                raise ValueError(f"h: expected shape {tuple(self.h.shape)}, got {tuple(h.shape)}")
            self.h.copy_(h)


def random_positions(tokens: int, window: int, rng: np.random.Generator) -> np.ndarray:
    """Synthetic decode metadata: a context bound c ~ U{1..2W}, positions ~ U{0..c-1}. Both the index lists
    (device) and the launch width (host) change from step to step."""
    c = int(rng.integers(1, 2 * window + 1))
    return rng.integers(0, c, size=tokens).astype(np.int64)


# ---- the attention core (the eager break) ----------------------------------------------------------
def sparse_attention_rows(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """MQA over listed rows with a per-head sink, fp32 math, [T, H, d] fp32 (rounding left to the caller).

    Same math as ``reference.attention.sparse_attention_with_sink`` (``l_u = scale q.kv[idx_u]``,
    ``p_u = exp(l_u) / (sum exp(l) + exp(sink_h))``, ``o = sum p_u kv[idx_u]``, -1 = masked) without its host
    checks, so it can be captured. Masked slots gather row 0 and get probability exactly 0.
    """
    T, H, _ = q.shape
    keys = kv[idx.clamp(min=0)].float()                                     # [T, M, d]
    logits = torch.einsum("thd,tmd->thm", q.float(), keys) * scale
    logits = logits.masked_fill((idx < 0)[:, None, :], float("-inf"))
    sink_l = sink.float().view(1, H, 1)
    m = torch.maximum(logits.amax(dim=-1, keepdim=True), sink_l)           # finite: the sink is finite
    p = torch.exp(logits - m)
    denom = p.sum(dim=-1, keepdim=True) + torch.exp(sink_l - m)
    return torch.einsum("thm,tmd->thd", p, keys) / denom


def attention_core(q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor, cache: torch.Tensor,
                   slots: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, width: int, scale: float) -> None:
    """``cache[slots] = kv``; ``out = bf16(sparse_attention_rows(q, cache, idx[:, :width], sink, scale))``.

    Writes ``cache`` and ``out`` in place (the eager-break contract); ``width`` is host state."""
    cache.index_copy_(0, slots, kv)
    out.copy_(sparse_attention_rows(q, cache, idx[:, :width], sink, scale))


# ---- the stack ------------------------------------------------------------------------------------
class DecoderStack:
    """DSv4 decoder stack of ``cfg`` (see ``stack_config``) for decode steps; weights drawn on ``device``.

    ``forward(step) -> [T, D] bf16``. ``attend`` is the eager break; ``pieces`` are the graph segments.
    ``max_seqs`` bounds T (the KV ring has ``max_seqs * W`` rows per layer).
    """

    def __init__(self, cfg: DSv4Config, *, seed: int = 0, device: torch.device | str = "cpu",
                 mhc_backend: str = "auto", max_seqs: int = 256) -> None:
        if not isinstance(cfg, DSv4Config):
            raise TypeError(f"cfg: expected DSv4Config, got {type(cfg).__name__}")
        if any(cfg.compress_ratio(i) for i in range(cfg.num_hidden_layers)):
            raise ValueError("cfg: the stack runs window attention only; build it with stack_config()")
        if isinstance(max_seqs, bool) or not isinstance(max_seqs, int) or max_seqs < 1:
            raise ValueError(f"max_seqs: expected a positive int, got {max_seqs!r}")
        self.cfg, self.seed, self.device, self.max_seqs = cfg, seed, torch.device(device), max_seqs
        self.num_layers = cfg.num_hidden_layers
        self.mhc_backend, self.mhc_backend_reason = pick_mhc_backend(self.device, mhc_backend)
        self.ops = MhcOps.of(self.mhc_backend)
        self.scale = cfg.head_dim ** -0.5
        self.mhc_kwargs = dict(rms_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps, post_mult=cfg.hc_post_mult,
                               sinkhorn_iters=cfg.hc_sinkhorn_iters)
        self.inv_freq = base_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta).to(self.device)
        self.layers = [self._layer_weights(i) for i in range(self.num_layers)]
        head = HCHead(cfg, seed=_init.derive_seed(seed, "stack", "hc_head"))
        gen = self._gen("final")
        self.final = {"head_fn": head.fn.detach().to(self.device), "head_scale": head.scale.detach().to(self.device),
                      "head_base": head.base.detach().to(self.device),
                      "norm": (1 + 0.05 * self._randn(gen, (cfg.hidden_size,))).to(torch.bfloat16)}
        rows = max_seqs * cfg.sliding_window
        self.caches = [torch.empty(rows, cfg.head_dim, dtype=torch.bfloat16, device=self.device)
                       for _ in range(self.num_layers)]
        self.reset_cache()

    # ---- weights ----------------------------------------------------------------------------------
    def _gen(self, *path: object) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(_init.derive_seed(self.seed, "stack", *path))

    def _randn(self, gen: torch.Generator, shape: tuple[int, ...], std: float = 1.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=self.device, dtype=torch.float32) * std

    def _linear(self, gen: torch.Generator, out_f: int, in_f: int) -> torch.Tensor:
        return self._randn(gen, (out_f, in_f), in_f ** -0.5).to(torch.bfloat16)

    def _layer_weights(self, i: int) -> Weights:
        c = self.cfg
        D, H, d, ql, G, ol = c.hidden_size, c.num_attention_heads, c.head_dim, c.q_lora_rank, c.o_groups, c.o_lora_rank
        E, I = c.n_routed_experts, c.moe_intermediate_size
        w: Weights = {}
        for name in ("hc_attn", "hc_ffn"):
            m = MHC(c, seed=_init.derive_seed(self.seed, "stack", i, name))
            w[f"{name}_fn"], w[f"{name}_scale"], w[f"{name}_base"] = (
                t.detach().to(self.device) for t in (m.fn, m.scale, m.base))
        g = self._gen(i, "attn")
        bf = torch.bfloat16
        w["attn_norm"] = (1 + 0.05 * self._randn(g, (D,))).to(bf)
        w["ffn_norm"] = (1 + 0.05 * self._randn(g, (D,))).to(bf)
        w["wq_a"], w["q_norm"] = self._linear(g, ql, D), (1 + 0.05 * self._randn(g, (ql,))).to(bf)
        w["wq_b"] = self._linear(g, H * d, ql)
        w["wkv"], w["kv_norm"] = self._linear(g, d, D), (1 + 0.05 * self._randn(g, (d,))).to(bf)
        w["wo_a"] = self._linear(g, G * ol, H * d // G)
        w["wo_b"] = self._linear(g, D, G * ol)
        w["sink"] = 0.5 * self._randn(g, (H,))
        g = self._gen(i, "moe")
        w["gate"] = self._linear(g, E, D)
        w["gate_bias"] = 0.1 * self._randn(g, (E,))
        # experts 0..E-1 routed, expert E shared: w13 rows [e, {w1, w3}, I], w2 columns [e, I]
        w["w13"] = self._linear(g, (E + 1) * 2 * I, D)
        w["w2"] = self._linear(g, D, (E + 1) * I)
        return w

    def use_mhc_backend(self, backend: str, reason: str = "requested") -> None:
        """Switch the mHC kernels (e.g. back to the reference when a TileLang kernel fails to build)."""
        self.mhc_backend, _ = pick_mhc_backend(self.device, backend)
        self.mhc_backend_reason = reason
        self.ops = MhcOps.of(self.mhc_backend)

    def reset_cache(self, seed: int = 1) -> None:
        """Refill every layer's KV ring with deterministic unit-RMS values (a prefilled context stand-in)."""
        for i, cache in enumerate(self.caches):
            g = self._gen("cache", seed, i)
            cache.copy_(self._randn(g, tuple(cache.shape)))

    def new_step(self, tokens: int, *, pad: bool = False) -> DecodeStep:
        if tokens > self.max_seqs:
            raise ValueError(f"tokens: at most max_seqs={self.max_seqs} sequences, got {tokens}")
        return DecodeStep(self.cfg, tokens, self.device, pad=pad)

    # ---- sublayer math -----------------------------------------------------------------------------
    def attn_in(self, x: torch.Tensor, positions: torch.Tensor, w: Weights, q_out: torch.Tensor,
                kv_out: torch.Tensor) -> None:
        """q = RoPE(RMSNorm_head(RMSNorm(x wq_a^T; q_norm) wq_b^T)) and kv = RoPE(RMSNorm(x wkv^T; kv_norm)),
        written into the static buffers (dsv4-layers.md 3.1-3.2, no fp8 KV round trip)."""
        c, eps = self.cfg, self.cfg.rms_norm_eps
        qr = rmsnorm(x @ w["wq_a"].T, w["q_norm"], eps)
        q = rmsnorm((qr @ w["wq_b"].T).view(x.shape[0], c.num_attention_heads, c.head_dim), None, eps,
                    out_dtype=torch.float32)
        q_out.copy_(apply_rope(q, positions, self.inv_freq))
        kv_out.copy_(apply_rope(rmsnorm(x @ w["wkv"].T, w["kv_norm"], eps), positions, self.inv_freq))

    def attn_out(self, o: torch.Tensor, positions: torch.Tensor, w: Weights) -> torch.Tensor:
        """Inverse RoPE (fp32), then grouped ``wo_a`` per head group and ``wo_b`` as bf16 GEMMs: [T, D] bf16."""
        c = self.cfg
        T, G = o.shape[0], c.o_groups
        r = c.num_attention_heads * c.head_dim // G
        o = apply_rope(o.float(), positions, self.inv_freq, inverse=True).to(torch.bfloat16)
        z = torch.bmm(o.view(T, G, r).transpose(0, 1), w["wo_a"].view(G, c.o_lora_rank, r).transpose(1, 2))
        return z.transpose(0, 1).reshape(T, G * c.o_lora_rank) @ w["wo_b"].T

    def moe(self, x: torch.Tensor, w: Weights) -> torch.Tensor:
        """Dense-over-local-experts MoE (module docstring): [T, D] bf16."""
        c = self.cfg
        T, E, I, lim = x.shape[0], c.n_routed_experts, c.moe_intermediate_size, c.swiglu_limit
        weights, ids = route(x.float() @ w["gate"].float().T, k=c.num_experts_per_tok,
                             routed_scaling_factor=c.routed_scaling_factor, bias=w["gate_bias"])
        dense = torch.zeros(T, E + 1, dtype=torch.float32, device=x.device).scatter_(1, ids, weights)
        dense[:, E] = 1.0
        gu = (x @ w["w13"].T).view(T, E + 1, 2, I).float()
        h = F.silu(gu[:, :, 0].clamp(max=lim)) * gu[:, :, 1].clamp(-lim, lim)
        return (h * dense.unsqueeze(-1)).to(torch.bfloat16).view(T, (E + 1) * I) @ w["w2"].T

    def _mhc(self, which: str, w: Weights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return w[f"{which}_fn"], w[f"{which}_scale"], w[f"{which}_base"]

    # ---- pieces (graph segments) -------------------------------------------------------------------
    def piece_first(self, h: torch.Tensor, positions: torch.Tensor, q_out: torch.Tensor, kv_out: torch.Tensor,
                    w: Weights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer 0 up to its attention: n stream copies of h, mHC pre (+ attn_norm), q/kv. -> (R, post, comb)."""
        T, n, D = h.shape[0], self.cfg.hc_mult, self.cfg.hidden_size
        residual = h.unsqueeze(1).expand(T, n, D).contiguous()
        x, post, comb = self.ops.pre(residual, *self._mhc("hc_attn", w), w["attn_norm"], **self.mhc_kwargs)
        self.attn_in(x, positions, w, q_out, kv_out)
        return residual, post, comb

    def _after_attention(self, o, positions, residual, post, comb, w):
        a = self.attn_out(o, positions, w)
        residual, x, post, comb = self.ops.fused_post_pre(a, residual, post, comb, *self._mhc("hc_ffn", w),
                                                          w["ffn_norm"], **self.mhc_kwargs)
        return self.moe(x, w), residual, post, comb

    def piece_mid(self, o: torch.Tensor, positions: torch.Tensor, residual: torch.Tensor, post: torch.Tensor,
                  comb: torch.Tensor, q_out: torch.Tensor, kv_out: torch.Tensor, w_prev: Weights, w_next: Weights
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer i-1 after its attention (o-proj, mHC, MoE) + layer i up to its attention. -> (R, post, comb)."""
        f, residual, post, comb = self._after_attention(o, positions, residual, post, comb, w_prev)
        residual, x, post, comb = self.ops.fused_post_pre(f, residual, post, comb, *self._mhc("hc_attn", w_next),
                                                          w_next["attn_norm"], **self.mhc_kwargs)
        self.attn_in(x, positions, w_next, q_out, kv_out)
        return residual, post, comb

    def piece_last(self, o: torch.Tensor, positions: torch.Tensor, residual: torch.Tensor, post: torch.Tensor,
                   comb: torch.Tensor, w_prev: Weights, final: Weights) -> torch.Tensor:
        """Last layer after its attention, final mHC post, hc_head, RMSNorm -> [T, D] bf16."""
        f, residual, post, comb = self._after_attention(o, positions, residual, post, comb, w_prev)
        residual = self.ops.post(f, residual, post, comb)
        y = self.ops.head(residual, final["head_fn"], final["head_scale"], final["head_base"],
                          rms_eps=self.cfg.rms_norm_eps, hc_eps=self.cfg.hc_eps)
        return rmsnorm(y, final["norm"], self.cfg.rms_norm_eps)

    # ---- the break and the forward -------------------------------------------------------------------
    @graphs.eager_break
    def attend(self, layer: int, step: DecodeStep) -> None:
        """Attention core of ``layer`` on ``step``'s buffers (reads ``step.launch_width`` when it runs)."""
        attention_core(step.q, step.kv, step.o, self.caches[layer], step.slots, step.idx,
                       self.layers[layer]["sink"], step.launch_width, self.scale)

    def forward(self, step: DecodeStep, *, pieces: tuple[Callable, Callable, Callable] | None = None,
                attend: Callable[[int, DecodeStep], None] | None = None) -> torch.Tensor:
        """One decode step: [T, D] bf16. ``pieces``/``attend`` swap in other implementations of the segments
        and of the break (the torch.compile variant); the default is the uncompiled stack."""
        if not isinstance(step, DecodeStep):
            raise TypeError(f"step: expected DecodeStep, got {type(step).__name__}")
        if step.tokens == 0:
            return step.h.new_empty(0, self.cfg.hidden_size)
        first, mid, last = pieces or (self.piece_first, self.piece_mid, self.piece_last)
        attend = attend or self.attend
        W, pos = self.layers, step.positions
        residual, post, comb = first(step.h, pos, step.q, step.kv, W[0])
        attend(0, step)
        for i in range(1, self.num_layers):
            residual, post, comb = mid(step.o, pos, residual, post, comb, step.q, step.kv, W[i - 1], W[i])
            attend(i, step)
        return last(step.o, pos, residual, post, comb, W[-1], self.final)

    __call__ = forward

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self.layers + [self.final] for t in w.values())

    def describe(self) -> dict[str, Any]:
        c = self.cfg
        return dict(layers=self.num_layers, hidden=c.hidden_size, heads=c.num_attention_heads, head_dim=c.head_dim,
                    experts=c.n_routed_experts, top_k=c.num_experts_per_tok, moe_inter=c.moe_intermediate_size,
                    window=c.sliding_window, mhc_backend=self.mhc_backend, weight_gib=self.weight_bytes() / 2**30)
