"""Small valid inputs for EVERY registered op, and the table of bad inputs each op must refuse.

``base_inputs(op, tokens, device, seed, cfg)`` returns ``(args, kwargs)`` for the op's reference signature
(every backend takes the same). It uses ``kernels.inputs.make_inputs`` where that has a factory and builds the
rest here, at the toy preset (D = 256, 4 heads, head_dim 128, 8 experts) whose shapes every kernel accepts
(D multiple of 256 for TileLang mHC, multiples of 128 for fp8 blocks). The sanitizer script, the inventory test
and the property tests all start from these inputs.

``CASES[op]`` is the declarative contract table: a list of ``Case(name, mutate, expect, arg)`` where ``mutate``
edits the base ``(args, kwargs)`` (by argument name) and ``expect`` is one of

- ``"ValueError"`` / ``"TypeError"``: raised before any work, the message naming ``arg``;
- ``"empty"``: every output has a zero-sized leading (token) axis;
- ``"nan"``: the output rows of the poisoned token are non-finite (the op propagates NaN, never hides it);
- ``"ok"``: runs and returns finite outputs (an edge case that is valid, e.g. an expert no token picked).

Only the argument names matter to a mutation, so one row runs against every backend of the op.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config import DSv4Config, get_config
from . import inputs as kin

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
PRESET = "toy"
# per-op changes to the preset where a backend needs real sizes: DeepGEMM's fp8_mqa_logits takes 32 or 64 heads
OP_OVERRIDES: dict[str, dict[str, Any]] = {"indexer_topk": {"index_n_heads": 64}}
ATTN_LAYER = 1            # toy layer 1: CSA (ratio 4 + indexer)
MAX_POS = 4096            # rows of the cos/sin cache built for inv_rope_fp8_quant


# ---- valid inputs for the ops without a kernels.inputs factory --------------------------------------------
def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inv_freq(cfg: DSv4Config) -> torch.Tensor:
    from ..rope import layer_inv_freq

    return layer_inv_freq(cfg, ATTN_LAYER)


def _attention_output(cfg: DSv4Config, t: int, g: torch.Generator) -> Inputs:
    h, d, G, o_l = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank
    o = kin.activations(g, t, h, d)
    wo_a = kin.weight(g, G * o_l, h * d // G)
    wo_b = kin.weight(g, cfg.hidden_size, G * o_l)
    return (o, kin.positions_with_restarts(t), _inv_freq(cfg), wo_a, wo_b, G), {}


def _attention_prefill(cfg: DSv4Config, t: int, g: torch.Generator) -> Inputs:
    from .reference.attention import init_attention_params

    params = init_attention_params(cfg, ATTN_LAYER, seed=int(torch.randint(0, 2**31, (1,), generator=g)))
    return (kin.activations(g, t, cfg.hidden_size), torch.arange(t), params, cfg, ATTN_LAYER), {}


def _cos_sin_cache(cfg: DSv4Config) -> torch.Tensor:
    from .reference.attn_out import rope_cos_sin_cache

    return rope_cos_sin_cache(_inv_freq(cfg), MAX_POS)


def _inv_rope_fp8_quant(cfg: DSv4Config, t: int, g: torch.Generator) -> Inputs:
    o = kin.activations(g, t, cfg.num_attention_heads, cfg.head_dim)
    return (o, kin.positions_with_restarts(t), _cos_sin_cache(cfg)), {}


def _fp8_einsum(cfg: DSv4Config, t: int, g: torch.Generator) -> Inputs:
    from .reference.attn_out import inv_rope_fp8_quant, quantize_wo_a

    h, d, G, o_l = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank
    q, s = inv_rope_fp8_quant(kin.activations(g, t, h, d), kin.positions_with_restarts(t), _cos_sin_cache(cfg))
    w, ws = quantize_wo_a(kin.weight(g, G * o_l, h * d // G, torch.float32), G)
    return (q.view(t, G, h * d // G), s.view(t, G, h * d // G // 128), w, ws), {}


def _compressor(cfg: DSv4Config, t: int, g: torch.Generator) -> Inputs:
    r, hd, D = cfg.compress_ratio(ATTN_LAYER), cfg.head_dim, cfg.hidden_size
    width = (2 if r == 4 else 1) * hd          # ratio-4 blocks overlap: two projections per entry
    ape = 0.1 * torch.randn(r, width, generator=g)
    return ((kin.activations(g, t, D), kin.weight(g, width, D), kin.weight(g, width, D), ape,
             kin.norm_weight(g, hd), r, _inv_freq(cfg)), dict(head_dim=hd, fp8_nope=True))


def _sparse_attention(cfg: DSv4Config, t: int, g: torch.Generator) -> Inputs:
    """The causal window of each token (-1 padded) over kv rows 0..T-1."""
    from .reference.attention import window_indices

    h, d = cfg.num_attention_heads, cfg.head_dim
    idx = window_indices(t, cfg.sliding_window, "cpu").to(torch.int32).contiguous()
    sink = 0.5 * torch.randn(h, generator=g)
    return (kin.activations(g, t, h, d), kin.activations(g, t, d), idx, sink, d ** -0.5), {}


def _indexer_q(cfg: DSv4Config, t: int, g: torch.Generator) -> Inputs:
    n, d = cfg.index_n_heads, cfg.index_head_dim
    w = torch.randn(t, n, generator=g) * n ** -0.5
    return (kin.activations(g, t, n, d), kin.positions_with_restarts(t), _inv_freq(cfg), w), {}


def _indexer_topk(cfg: DSv4Config, t: int, g: torch.Generator) -> Inputs:
    from .reference.norms import rmsnorm

    D, ql, n, d = cfg.hidden_size, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim
    qr = rmsnorm(kin.activations(g, t, ql), None, cfg.rms_norm_eps)
    args = (kin.activations(g, t, D), qr, torch.arange(t), kin.weight(g, n * d, ql), kin.weight(g, n, D),
            kin.weight(g, 2 * d, D), kin.weight(g, 2 * d, D), 0.1 * torch.randn(4, 2 * d, generator=g),
            kin.norm_weight(g, d), _inv_freq(cfg), cfg.index_topk)
    return args, dict(eps=cfg.rms_norm_eps)


def _router_logits(cfg: DSv4Config, t: int, g: torch.Generator) -> Inputs:
    return (kin.activations(g, t, cfg.hidden_size), kin.weight(g, cfg.n_routed_experts, cfg.hidden_size)), {}


def _moe_experts(cfg: DSv4Config, t: int, g: torch.Generator) -> Inputs:
    """MXFP4 experts ~ N(0, 1/K); top-k routing weights summing to the scaling factor."""
    from ..quant import quant_fp4

    D, E, I, k = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    w1, w3 = (torch.randn(E, I, D, generator=g) / D ** 0.5 for _ in range(2))
    w2 = torch.randn(E, D, I, generator=g) / I ** 0.5
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k)
    weights = torch.rand(t, k, generator=g) + 0.1
    weights = weights / weights.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    return ((kin.activations(g, t, D), weights.float(), ids.long(), *quant_fp4(w1), *quant_fp4(w3), *quant_fp4(w2)),
            dict(swiglu_limit=cfg.swiglu_limit))


_LOCAL: dict[str, Callable[[DSv4Config, int, torch.Generator], Inputs]] = {
    "attention_output": _attention_output, "attention_prefill": _attention_prefill,
    "inv_rope_fp8_quant": _inv_rope_fp8_quant, "fp8_einsum_wo_a": _fp8_einsum, "compressor": _compressor,
    "sparse_attention": _sparse_attention, "indexer_q_rope_quant": _indexer_q, "indexer_topk": _indexer_topk,
    "moe_router_logits": _router_logits, "moe_experts": _moe_experts, "mega_moe": _moe_experts,
}


def has_base_inputs(op: str) -> bool:
    return kin.has_inputs(op) or op in _LOCAL


def base_inputs(op: str, tokens: int = 5, device: str | torch.device = "cpu", seed: int = 0,
                cfg: DSv4Config | str = PRESET) -> Inputs:
    """Valid ``(args, kwargs)`` for ``op`` at ``tokens`` tokens (small toy shapes unless ``cfg`` says otherwise)."""
    cfg = get_config(cfg, **OP_OVERRIDES.get(op, {})) if isinstance(cfg, str) else cfg
    if kin.has_inputs(op):
        return kin.make_inputs(op, cfg, tokens, device=device, seed=seed)
    if op not in _LOCAL:
        raise ValueError(f"op: no inputs for {op!r}")
    if not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens: expected a non-negative int, got {tokens!r}")
    args, kwargs = _LOCAL[op](cfg, tokens, _g(seed))
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


# ---- bad-input table -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    mutate: Callable[[dict[str, Any]], None]   # edits the bound arguments {name: value} in place
    expect: str                                # "ValueError" | "TypeError" | "empty" | "nan" | "ok"
    arg: str | None = None                     # the argument the error message must name
    tokens: int = 5                            # base_inputs' token count for this row
    per_backend: tuple[tuple[str, str], ...] = ()   # (backend, expect) where a backend differs (e.g. layouts)

    def expected(self, backend: str) -> str:
        return dict(self.per_backend).get(backend, self.expect)


def bind(fn: Callable[..., Any], args: tuple, kwargs: dict) -> dict[str, Any]:
    """{parameter name: value} of a call, so mutations address arguments by name."""
    ba = inspect.signature(fn).bind(*args, **kwargs)
    ba.apply_defaults()
    return dict(ba.arguments)


def call(fn: Callable[..., Any], bound: dict[str, Any]) -> Any:
    """Call ``fn`` with bound arguments (positional-or-keyword by position, keyword-only by name)."""
    params = inspect.signature(fn).parameters
    pos, kw = [], {}
    for name, value in bound.items():
        if params[name].kind in (inspect.Parameter.KEYWORD_ONLY,):
            kw[name] = value
        else:
            pos.append(value)
    return fn(*pos, **kw)


# mutation helpers: each returns a function of the bound-argument dict
def set_(name: str, value_fn: Callable[[Any], Any]) -> Callable[[dict[str, Any]], None]:
    def m(b: dict[str, Any]) -> None:
        b[name] = value_fn(b[name])
    return m


def drop_dim(name: str) -> Callable[[dict[str, Any]], None]:
    """One dim fewer (the first row of the leading axis): a wrong rank."""
    return set_(name, lambda x: x[0])


def add_dim(name: str) -> Callable[[dict[str, Any]], None]:
    return set_(name, lambda x: x.unsqueeze(0))


def cast(name: str, dtype: torch.dtype) -> Callable[[dict[str, Any]], None]:
    return set_(name, lambda x: x.to(dtype))


def trim_last(name: str, n: int = 1) -> Callable[[dict[str, Any]], None]:
    """Last axis shorter by ``n``: breaks the shape relation with the other arguments."""
    return set_(name, lambda x: x[..., :-n].contiguous())


def trim_first(name: str, n: int = 1) -> Callable[[dict[str, Any]], None]:
    return set_(name, lambda x: x[:-n].contiguous())


def non_contiguous(name: str) -> Callable[[dict[str, Any]], None]:
    """Same values and shape, every stride doubled except none is 1 on the last axis (a strided view)."""
    def m(b: dict[str, Any]) -> None:
        x = b[name]
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        b[name] = wide[..., ::2]
    return m


def poison(name: str, token: int = 2, value: float = float("nan")) -> Callable[[dict[str, Any]], None]:
    """Set every value of token ``token`` (leading axis) of ``name`` to NaN/inf."""
    def m(b: dict[str, Any]) -> None:
        x = b[name].clone()
        x[token] = value
        b[name] = x
    return m


def to_list(name: str) -> Callable[[dict[str, Any]], None]:
    return set_(name, lambda x: x.tolist())


def fill(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return set_(name, lambda x: torch.full_like(x, value))


def replace(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return set_(name, lambda _x: value)


def seq(*muts: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def m(b: dict[str, Any]) -> None:
        for f in muts:
            f(b)
    return m


def T0(b: dict[str, Any]) -> None:  # noqa: N802 -- rows that only change Case.tokens (T = 0, T < ratio) mutate nothing
    return None


def _nan_row(name: str) -> Case:
    return Case(f"nan_in_{name}", poison(name), "nan")


def _inf_row(name: str) -> Case:
    return Case(f"inf_in_{name}", poison(name, value=float("inf")), "nan")


# ---- per-op rows ------------------------------------------------------------------------------------------------
_TL_CONTIG = (("tilelang", "ValueError"),)   # the TileLang launchers take contiguous, 16-byte aligned tensors only
_MHC_PRE_COMMON = [
    Case("residual_rank2", drop_dim("residual"), "ValueError", "residual"),
    Case("fn_wrong_width", trim_last("fn", 256), "ValueError", "fn"),
    Case("scale_too_short", trim_first("scale"), "ValueError", "scale"),
    Case("base_too_short", trim_first("base"), "ValueError", "base"),
    Case("residual_int", cast("residual", torch.int32), "TypeError", "residual"),
    Case("residual_list", to_list("residual"), "TypeError", "residual"),
    Case("sinkhorn_iters_zero", replace("sinkhorn_iters", 0), "ValueError", "sinkhorn_iters"),
    Case("hc_eps_negative", replace("hc_eps", -1.0), "ValueError", "hc_eps"),
    Case("rms_eps_negative", replace("rms_eps", -1.0), "ValueError", "rms_eps"),
]
_MHC_POST_COMMON = [
    Case("f_rank3", add_dim("f"), "ValueError", "f"),
    Case("f_wrong_hidden", trim_last("f", 256), "ValueError", "f"),
    Case("post_wrong_streams", trim_last("post"), "ValueError", "post"),
    Case("comb_wrong_shape", trim_last("comb"), "ValueError", "comb"),
    Case("comb_tokens_mismatch", trim_first("comb"), "ValueError", "comb"),
    Case("f_int", cast("f", torch.int32), "TypeError", "f"),
    Case("post_int", cast("post", torch.int64), "TypeError", "post"),
]

CASES: dict[str, list[Case]] = {
    "mhc_pre": _MHC_PRE_COMMON + [
        Case("norm_weight_wrong_length", trim_last("norm_weight"), "ValueError", "norm_weight"),
        Case("residual_non_contiguous", non_contiguous("residual"), "ok", "residual", per_backend=_TL_CONTIG),
        Case("zero_tokens", T0, "empty", tokens=0),
        _nan_row("residual"), _inf_row("residual"),
    ],
    "mhc_post": _MHC_POST_COMMON + [
        Case("residual_rank2", drop_dim("residual"), "ValueError", "residual"),
        Case("f_non_contiguous", non_contiguous("f"), "ok", "f", per_backend=_TL_CONTIG),
        Case("zero_tokens", T0, "empty", tokens=0),
        _nan_row("f"), _nan_row("residual"), _inf_row("f"),
    ],
    "mhc_fused_post_pre": _MHC_POST_COMMON + [
        Case("residual_rank2", drop_dim("residual"), "ValueError", "residual"),
        Case("fn_wrong_width", trim_last("fn", 256), "ValueError", "fn"),
        Case("scale_too_short", trim_first("scale"), "ValueError", "scale"),
        Case("sinkhorn_iters_zero", replace("sinkhorn_iters", 0), "ValueError", "sinkhorn_iters"),
        Case("norm_weight_wrong_length", trim_last("norm_weight"), "ValueError", "norm_weight"),
        Case("zero_tokens", T0, "empty", tokens=0),
        _nan_row("f"), _nan_row("residual"),
    ],
    "hc_head": [
        Case("residual_rank2", drop_dim("residual"), "ValueError", "residual"),
        Case("fn_wrong_width", trim_last("fn", 256), "ValueError", "fn"),
        Case("fn_wrong_rows", trim_first("fn"), "ValueError", "fn"),
        Case("scale_too_long", set_("scale", lambda s: torch.cat([s, s])), "ValueError", "scale"),
        Case("base_too_short", trim_first("base"), "ValueError", "base"),
        Case("residual_int", cast("residual", torch.int32), "TypeError", "residual"),
        Case("hc_eps_negative", replace("hc_eps", -1.0), "ValueError", "hc_eps"),
        Case("residual_non_contiguous", non_contiguous("residual"), "ok", "residual", per_backend=_TL_CONTIG),
        Case("zero_tokens", T0, "empty", tokens=0),
        _nan_row("residual"), _inf_row("residual"),
    ],
    "rmsnorm": [
        Case("weight_wrong_length", trim_last("weight"), "ValueError", "weight"),
        Case("x_int", cast("x", torch.int32), "TypeError", "x"),
        Case("eps_negative", replace("eps", -1.0), "ValueError", "eps"),
        Case("x_non_contiguous", non_contiguous("x"), "ok"),
        Case("zero_tokens", T0, "empty", tokens=0),
        _nan_row("x"), _inf_row("x"),
    ],
    "mtp_input_rmsnorm": [
        Case("embed_rank3", add_dim("embed"), "ValueError", "embed"),
        Case("prev_not_multiple_of_hidden", trim_last("prev"), "ValueError", "prev"),
        Case("positions_wrong_length", trim_first("positions"), "ValueError", "positions"),
        Case("positions_float", cast("positions", torch.float32), "TypeError", "positions"),
        Case("enorm_weight_wrong_length", trim_last("enorm_weight"), "ValueError", "enorm_weight"),
        Case("hnorm_weight_wrong_length", trim_last("hnorm_weight"), "ValueError", "hnorm_weight"),
        Case("embed_int", cast("embed", torch.int32), "TypeError", "embed"),
        Case("eps_negative", replace("eps", -1.0), "ValueError", "eps"),
        Case("embed_non_contiguous", non_contiguous("embed"), "ValueError", "embed",
             per_backend=(("reference", "ok"),)),
        Case("zero_tokens", T0, "empty", tokens=0),
        _nan_row("embed"), _nan_row("prev"),
    ],
    "mtp_shared_head_rmsnorm": [
        Case("h_rank3", add_dim("h"), "ValueError", "h"),
        Case("weight_wrong_length", trim_last("weight"), "ValueError", "weight"),
        Case("h_int", cast("h", torch.int32), "TypeError", "h"),
        Case("eps_negative", replace("eps", -1.0), "ValueError", "eps"),
        Case("h_non_contiguous", non_contiguous("h"), "ValueError", "h", per_backend=(("reference", "ok"),)),
        Case("zero_tokens", T0, "empty", tokens=0),
        _nan_row("h"), _inf_row("h"),
    ],
    "router_gemm": [
        Case("x_rank3", add_dim("x"), "ValueError", "x"),
        Case("weight_wrong_k", trim_last("weight"), "ValueError", "weight"),
        # the reference is the fp32-math oracle of any float input; the GEMM backends take bf16 only
        Case("x_fp32", cast("x", torch.float32), "TypeError", "x", per_backend=(("reference", "ok"),)),
        Case("weight_fp16", cast("weight", torch.float16), "TypeError", "weight",
             per_backend=(("reference", "ok"),)),
        Case("x_int", cast("x", torch.int32), "TypeError", "x"),
        Case("zero_tokens", T0, "empty", tokens=0),
        _nan_row("x"),
    ],
    "moe_router_logits": [
        Case("x_rank3", add_dim("x"), "ValueError", "x"),
        Case("gate_weight_wrong_k", trim_last("gate_weight"), "ValueError", "gate_weight"),
        Case("x_int", cast("x", torch.int32), "TypeError", "x"),
        Case("zero_tokens", T0, "empty", tokens=0),
        _nan_row("x"),
    ],
    "moe_routing": [
        Case("logits_rank3", add_dim("logits"), "ValueError", "logits"),
        Case("logits_int", cast("logits", torch.int32), "TypeError", "logits"),
        Case("bias_wrong_length", trim_last("bias"), "ValueError", "bias"),
        Case("k_zero", replace("k", 0), "ValueError", "k"),
        Case("k_above_experts", replace("k", 1000), "ValueError", "k"),
        Case("scaling_negative", replace("routed_scaling_factor", -1.0), "ValueError", "routed_scaling_factor"),
        Case("hash_without_input_ids",
             lambda b: b.__setitem__("tid2eid", torch.zeros(10, b["k"], dtype=torch.int64, device=b["logits"].device)),
             "ValueError", "tid2eid"),
        Case("hash_ids_out_of_range",
             seq(replace("bias", None),
                 lambda b: b.__setitem__("tid2eid", torch.zeros(10, b["k"], dtype=torch.int64,
                                                                device=b["logits"].device)),
                 lambda b: b.__setitem__("input_ids", torch.full((b["logits"].shape[0],), 10, dtype=torch.int64,
                                                                 device=b["logits"].device))),
             "ValueError", "input_ids"),
        Case("hash_expert_out_of_range",
             seq(replace("bias", None),
                 lambda b: b.__setitem__("tid2eid", torch.full((10, b["k"]), 10_000, dtype=torch.int64,
                                                               device=b["logits"].device)),
                 lambda b: b.__setitem__("input_ids", torch.zeros(b["logits"].shape[0], dtype=torch.int64,
                                                                  device=b["logits"].device))),
             "ValueError", "tid2eid"),
        Case("logits_non_contiguous", non_contiguous("logits"), "ok", "logits",
             per_backend=(("triton", "ValueError"),)),
        Case("zero_tokens", T0, "empty", tokens=0),
        _nan_row("logits"),
    ],
    "moe_experts": [
        Case("x_rank3", add_dim("x"), "ValueError", "x"),
        Case("x_hidden_mismatches_w1", trim_last("x", 128), "ValueError", "w1"),   # x fixes D; w1 is named
        Case("x_int", cast("x", torch.int32), "TypeError", "x"),
        Case("w1_float", cast("w1", torch.float32), "TypeError", "w1"),
        Case("ids_wrong_k", trim_last("ids"), "ValueError", "ids"),
        Case("weights_wrong_tokens", trim_first("weights"), "ValueError", "weights"),
        Case("ids_float", cast("ids", torch.float32), "TypeError", "ids"),
        Case("ids_out_of_range", fill("ids", 1000), "ValueError", "ids"),
        Case("ids_negative", fill("ids", -1), "ValueError", "ids"),
        Case("all_tokens_one_expert", set_("ids", lambda i: torch.stack(
            [torch.arange(i.shape[1], device=i.device)] * i.shape[0])), "ok"),  # the other experts get no rows
        Case("zero_tokens", T0, "empty", tokens=0),
        _nan_row("x"),
    ],
    "inv_rope_fp8_quant": [
        Case("o_rank2", drop_dim("o"), "ValueError", "o"),
        Case("o_head_dim_not_128_multiple", trim_last("o", 64), "ValueError", "o"),
        Case("o_int", cast("o", torch.int32), "TypeError", "o"),
        Case("positions_wrong_length", trim_first("positions"), "ValueError", "positions"),
        Case("positions_float", cast("positions", torch.float32), "TypeError", "positions"),
        Case("positions_out_of_range", fill("positions", MAX_POS), "ValueError", "positions"),
        Case("positions_negative", fill("positions", -1), "ValueError", "positions"),
        Case("cos_sin_cache_bf16", cast("cos_sin_cache", torch.bfloat16), "TypeError", "cos_sin_cache"),
        Case("zero_tokens", T0, "empty", tokens=0),
        _nan_row("o"),
    ],
    "fp8_einsum_wo_a": [
        Case("a_rank2", drop_dim("a"), "ValueError", "a"),
        Case("a_bf16", cast("a", torch.bfloat16), "TypeError", "a"),
        Case("w_wrong_r", trim_last("w", 128), "ValueError", "w"),
        Case("a_scale_wrong_shape", trim_last("a_scale"), "ValueError", "a_scale"),
        Case("w_scale_bf16", cast("w_scale", torch.bfloat16), "TypeError", "w_scale"),
        Case("zero_tokens", T0, "empty", tokens=0),
    ],
    "attention_output": [
        Case("o_rank2", drop_dim("o"), "ValueError", "o"),
        Case("positions_wrong_length", trim_first("positions"), "ValueError", "positions"),
        Case("positions_float", cast("positions", torch.float32), "TypeError", "positions"),
        Case("inv_freq_too_long", set_("inv_freq", lambda f: torch.cat([f, f, f])), "ValueError", "inv_freq"),
        Case("o_groups_not_divisor", replace("o_groups", 3), "ValueError", "o_groups"),
        Case("wo_a_wrong_width", trim_last("wo_a"), "ValueError", "wo_a"),
        Case("wo_b_wrong_width", trim_last("wo_b"), "ValueError", "wo_b"),
        Case("zero_tokens", T0, "empty", tokens=0),
        _nan_row("o"),
    ],
    "attention_prefill": [
        Case("x_rank3", add_dim("x"), "ValueError", "x"),
        Case("x_wrong_hidden", trim_last("x"), "ValueError", "x"),
        Case("positions_wrong_length", trim_first("positions"), "ValueError", "positions"),
        Case("positions_float", cast("positions", torch.float32), "TypeError", "positions"),
        Case("zero_tokens", T0, "empty", tokens=0),
        Case("nan_in_x", poison("x"), "nan", tokens=6),
    ],
    "compressor": [
        Case("x_rank3", add_dim("x"), "ValueError", "x"),
        Case("wkv_wrong_k", trim_last("wkv"), "ValueError", "wkv"),
        Case("wgate_wrong_rows", trim_first("wgate"), "ValueError", "wgate"),
        Case("ape_wrong_rows", trim_first("ape"), "ValueError", "ape"),
        Case("norm_weight_wrong_length", trim_last("norm_weight"), "ValueError", "norm_weight"),
        Case("ratio_unknown", replace("ratio", 3), "ValueError", "ratio"),
        Case("head_dim_zero", replace("head_dim", 0), "ValueError", "head_dim"),
        Case("x_int", cast("x", torch.int32), "TypeError", "x"),
        Case("tokens_below_ratio", T0, "empty", tokens=3),        # 3 < r = 4: no complete block, no entry
        Case("zero_tokens", T0, "empty", tokens=0),
        Case("nan_in_x", poison("x", token=1), "nan", tokens=8),
    ],
    "sparse_attention": [
        Case("q_rank2", drop_dim("q"), "ValueError", "q"),
        Case("kv_wrong_dim", trim_last("kv"), "ValueError", "kv"),
        Case("idx_wrong_tokens", trim_first("idx"), "ValueError", "idx"),
        Case("idx_float", cast("idx", torch.float32), "TypeError", "idx"),
        Case("idx_out_of_range", fill("idx", 10_000), "ValueError", "idx"),
        Case("idx_below_minus_one", fill("idx", -2), "ValueError", "idx"),
        Case("sink_wrong_heads", trim_last("sink"), "ValueError", "sink"),
        Case("scale_tensor", replace("scale", torch.tensor(0.1)), "TypeError", "scale"),
        Case("all_rows_masked", fill("idx", -1), "ok"),    # only the sink: output 0
        Case("zero_tokens", T0, "empty", tokens=0),
        _nan_row("q"),
    ],
    "indexer_q_rope_quant": [
        Case("q_rank2", drop_dim("q"), "ValueError", "q"),
        Case("q_fp32", cast("q", torch.float32), "TypeError", "q"),
        Case("positions_wrong_length", trim_first("positions"), "ValueError", "positions"),
        Case("positions_float", cast("positions", torch.float32), "TypeError", "positions"),
        Case("inv_freq_too_long", set_("inv_freq", lambda f: torch.cat([f, f, f])), "ValueError", "inv_freq"),
        Case("weights_wrong_heads", trim_last("weights"), "ValueError", "weights"),
        Case("zero_tokens", T0, "empty", tokens=0),
        _nan_row("q"),
    ],
    "indexer_topk": [
        Case("x_rank3", add_dim("x"), "ValueError", "x"),
        Case("qr_wrong_tokens", trim_first("qr"), "ValueError", "qr"),
        Case("positions_float", cast("positions", torch.float32), "TypeError", "positions"),
        Case("wq_b_wrong_k", trim_last("wq_b"), "ValueError", "wq_b"),
        Case("weights_proj_wrong_k", trim_last("weights_proj"), "ValueError", "weights_proj"),
        Case("topk_zero", replace("topk", 0), "ValueError", "topk"),
        Case("zero_tokens", T0, "empty", tokens=0),
    ],
}
CASES["mega_moe"] = CASES["moe_experts"]

# (op, backend, case) -> why the row does not hold yet. The inventory test marks these xfail(strict): a fix turns
# them into failures until the entry is removed. "interpreter:" entries only apply under TRITON_INTERPRET=1.
KNOWN_GAPS: dict[tuple[str, str, str], str] = {
    ("compressor", "triton", "head_dim_zero"):
        "the Triton compressor's message names wkv ('wkv: expected shape [0, 256]'), not head_dim",
    ("inv_rope_fp8_quant", "triton", "nan_in_o"):
        "interpreter: Triton's interpreter casts fp32 NaN to e4m3 0x7C (= 256); the hardware cast keeps NaN",
    ("indexer_q_rope_quant", "triton", "nan_in_q"):
        "interpreter: Triton's interpreter casts fp32 NaN to e4m3 0x7C (= 256); the hardware cast keeps NaN",
}
