"""#43891: call the attention core, the fp8 einsum and the MoE experts directly instead of through torch.ops.

vLLM registered three DSv4 calls as custom ops (refactors.md 4.a) so Dynamo would see each one as a single opaque
FX node: ``torch.ops.vllm.deepseek_v4_attention``, ``...deepseek_v4_fp8_einsum`` and
``...deepseek_v4_mega_moe_experts``, each with a mutated ``out`` argument, a fake impl, and (attention, MoE) a layer
looked up by name in the forward context. Once DSv4 stopped compiling (#43746), #43891 replaced them with plain
calls. Here both paths run the same dsv4lab implementations:

    before:  torch.ops.dsv4lab.attention_core(q, kv, idx, out, layer_name)          -> CONTEXT[name].attention_impl
             torch.ops.dsv4lab.fp8_einsum(a, a_scale, b, b_scale, out, eq, recipe)   -> fp8_einsum(eq, (a, sa), ...)
             torch.ops.dsv4lab.moe_experts(x, w, ids, out, layer_name, clamp)        -> CONTEXT[name].run_experts
    after:   layer.attention_impl(...);  fp8_einsum(...);  layer.run_experts(...)

Implementations: ``dsv4lab.kernels.reference.attention.sparse_attention_with_sink`` (attention core),
``fp8_einsum_wo_a`` (DeepGEMM on an SM90 GPU with deep_gemm, else the reference), ``dsv4lab.kernels.reference.moe.moe``
(routed + shared SwiGLU experts; the stand-in for MegaMoE, which needs SM100). Results must be bitwise equal.

What can differ: host time per call (dispatcher boxing of the schema's arguments + the context lookup), never GPU
time under graph replay (the host code does not run at replay), and whether ``torch.compile(fullgraph=True)`` can
trace the block (the registration is what made the DeepGEMM call traceable; see ``compile_outcomes``).
Op count per forward (refactors.md 4.c): attention core + fp8 einsum in each decoder layer (43 Flash, 61 Pro; the
MTP layer is not counted), plus the MoE experts per layer when MegaMoE is used (SM100 only): Flash 86 (129 with
MegaMoE), Pro 122 (183 with MegaMoE).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config import get_config
from ..kernels.reference.attn_out import EINSUM_RECIPE, quantize_wo_a, rope_cos_sin_cache
from ..rope import layer_inv_freq

EXPERIMENT = "pr43891_op_registration"
TITLE = "#43891: drop the torch.ops wrappers (attention core, fp8 einsum, MoE experts) for direct calls"
NAMESPACE = "dsv4lab"
EQUATION = "bhr,hdr->bhd"
OPS = ("attention_core", "fp8_einsum", "moe_experts")
LAYERS = {"flash": 43, "pro": 61}
OPS_PER_LAYER = {"attention_core": 1, "fp8_einsum": 1, "moe_experts": 1}   # moe_experts: MegaMoE runs only


def ops_per_forward(preset: str, mega_moe: bool = False) -> dict[str, int]:
    """Custom-op calls per forward step that #43891 removed: per decoder layer one attention core and one fp8 einsum
    (+ one MegaMoE experts call when MegaMoE is on), times the layer count (MTP layer excluded)."""
    if preset not in LAYERS:
        raise ValueError(f"preset: expected one of {sorted(LAYERS)}, got {preset!r}")
    ops = ["attention_core", "fp8_einsum"] + (["moe_experts"] if mega_moe else [])
    return {op: LAYERS[preset] * OPS_PER_LAYER[op] for op in ops}


# ---- the layers the ops find by name (vLLM: static_forward_context / get_forward_context()) ---------------
CONTEXT: dict[str, Any] = {}


@dataclass
class AttentionCore:
    """The eager-break body of one attention layer: sparse MQA with a sink, written into ``out`` [T, H, d]."""

    name: str
    sink: torch.Tensor
    scale: float

    def attention_impl(self, q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
        from ..kernels.reference.attention import sparse_attention_with_sink

        out.copy_(sparse_attention_with_sink(q, kv, idx, self.sink, self.scale))


@dataclass
class MoEExperts:
    """Routed (+ shared) SwiGLU-clamp experts of one layer, written into ``out`` [T, D]."""

    name: str
    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def run_experts(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, out: torch.Tensor,
                    activation_clamp: float) -> None:
        from ..kernels.reference.moe import moe

        out.copy_(moe(x, topk_weights, topk_ids, self.w1, self.w3, self.w2, swiglu_limit=activation_clamp,
                      shared=self.shared))


def register_layer(layer: Any) -> Any:
    CONTEXT[layer.name] = layer
    return layer


# ---- the fp8 einsum both paths call (vLLM: vllm.utils.deep_gemm.fp8_einsum) ----------------------------------
@functools.lru_cache(maxsize=None)
def einsum_backend(device_type: str) -> tuple[str, Callable[..., torch.Tensor]]:
    """(name, fn) of ``fp8_einsum_wo_a``: DeepGEMM on a CUDA device where it can run, else the reference."""
    from ..kernels import registry

    if device_type == "cuda" and registry.availability("fp8_einsum_wo_a", "deep_gemm")[0]:
        return "deep_gemm", registry.get("fp8_einsum_wo_a", "deep_gemm")
    return "reference", registry.get("fp8_einsum_wo_a", "reference")


_EINSUM_IMPL: dict[str, Callable[..., torch.Tensor]] = {}   # filled by prepare(); plain dict reads trace in Dynamo


def fp8_einsum(equation: str, a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
               out: torch.Tensor, recipe: tuple[int, int, int] = EINSUM_RECIPE) -> None:
    """``out = einsum(equation, deq(a), deq(b))`` for the one SM90 form 'bhr,hdr->bhd', recipe (1, 128, 128)."""
    if equation != EQUATION or tuple(recipe) != EINSUM_RECIPE:
        raise ValueError(f"equation/recipe: only {EQUATION!r} with recipe {EINSUM_RECIPE} is supported, "
                         f"got {equation!r}, {tuple(recipe)}")
    _EINSUM_IMPL[out.device.type](a[0], a[1], b[0], b[1], out)


def prepare(device: str | torch.device) -> str:
    """Resolve the einsum backend for ``device`` (outside any timed or traced region); returns its name."""
    dev = torch.device(device).type
    name, fn = einsum_backend(dev)
    _EINSUM_IMPL[dev] = fn
    return name


# ---- before: torch.library registration ---------------------------------------------------------------------
def _attention_op(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, out: torch.Tensor, layer_name: str) -> None:
    CONTEXT[layer_name].attention_impl(q, kv, idx, out)


def _fp8_einsum_op(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                   out: torch.Tensor, equation: str, recipe: list[int]) -> None:
    fp8_einsum(equation, (a, a_scale), (b, b_scale), out, recipe=tuple(recipe))


def _moe_op(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, out: torch.Tensor,
            layer_name: str, activation_clamp: float) -> None:
    CONTEXT[layer_name].run_experts(x, topk_weights, topk_ids, out, activation_clamp)


def _no_output(*args: Any) -> None:   # fake impl: the ops only mutate ``out``
    return None


_SCHEMAS = {
    "attention_core": ("(Tensor q, Tensor kv, Tensor idx, Tensor(a!) out, str layer_name) -> ()", _attention_op),
    "fp8_einsum": ("(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, Tensor(a!) out, str equation, "
                   "int[] recipe) -> ()", _fp8_einsum_op),
    "moe_experts": ("(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor(a!) out, str layer_name, "
                    "float activation_clamp) -> ()", _moe_op),
}


# ---- probes: each op's schema and glue without the work, to isolate what #43891 removed --------------------
def _body(*args: Any) -> None:
    """Stands for the implementation's body (the call that remains after #43891)."""


def _attention_probe(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, out: torch.Tensor, layer_name: str) -> None:
    _body(CONTEXT[layer_name], q, kv, idx, out)


def _fp8_einsum_probe(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                      out: torch.Tensor, equation: str, recipe: list[int]) -> None:
    _body((a, a_scale), (b, b_scale), out, equation, tuple(recipe))


def _moe_probe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, out: torch.Tensor,
               layer_name: str, activation_clamp: float) -> None:
    _body(CONTEXT[layer_name], x, topk_weights, topk_ids, out, activation_clamp)


_PROBES = {"attention_core": _attention_probe, "fp8_einsum": _fp8_einsum_probe, "moe_experts": _moe_probe}


def _register_ops() -> torch.library.Library:
    """Define the ops like vLLM's direct_register_custom_op: schema with a mutated out, CPU and CUDA kernels, a fake."""
    previous = globals().get("_LIBRARY")
    if previous is not None:          # importlib.reload: drop the old registrations before defining again
        previous._destroy()
    lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    ops = [(name, schema, impl) for name, (schema, impl) in _SCHEMAS.items()]
    ops += [(f"{name}_probe", _SCHEMAS[name][0], probe) for name, probe in _PROBES.items()]
    for name, schema, impl in ops:
        lib.define(name + schema)
        for key in ("CPU", "CUDA"):
            lib.impl(name, impl, key)
        lib._register_fake(name, _no_output)
    return lib


_LIBRARY = _register_ops()


def _new_out(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.bfloat16, device=like.device)


# per-op variants: (before, after), same inputs, same return
def attention_before(layer: AttentionCore, q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    out = _new_out(tuple(q.shape), q)
    torch.ops.dsv4lab.attention_core(q, kv, idx, out, layer.name)
    return out


def attention_after(layer: AttentionCore, q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    out = _new_out(tuple(q.shape), q)
    layer.attention_impl(q, kv, idx, out)
    return out


def fp8_einsum_before(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    out = _new_out((a.shape[0], a.shape[1], b.shape[1]), a)
    torch.ops.dsv4lab.fp8_einsum(a, a_scale, b, b_scale, out, EQUATION, list(EINSUM_RECIPE))
    return out


def fp8_einsum_after(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    out = _new_out((a.shape[0], a.shape[1], b.shape[1]), a)
    fp8_einsum(EQUATION, (a, a_scale), (b, b_scale), out, recipe=EINSUM_RECIPE)
    return out


def moe_before(layer: MoEExperts, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
               activation_clamp: float) -> torch.Tensor:
    out = torch.empty_like(x, dtype=torch.bfloat16)
    torch.ops.dsv4lab.moe_experts(x, topk_weights, topk_ids, out, layer.name, activation_clamp)
    return out


def moe_after(layer: MoEExperts, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              activation_clamp: float) -> torch.Tensor:
    out = torch.empty_like(x, dtype=torch.bfloat16)
    layer.run_experts(x, topk_weights, topk_ids, out, activation_clamp)
    return out


# ---- the attention-output block (vLLM's o-proj tail) and the whole step ---------------------------------------
def quant_backend(device: str | torch.device) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Triton on a GPU; the reference on a CPU (the interpreter is for correctness tests, not timings)."""
    from ..kernels import registry

    return registry.get("inv_rope_fp8_quant", "triton" if torch.device(device).type == "cuda" else "reference")


def o_proj_before(o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, wo_a_q: torch.Tensor,
                  wo_a_scale: torch.Tensor, wo_b: torch.Tensor, quant: Callable[..., Any]) -> torch.Tensor:
    q, s = quant(o, positions, cos_sin_cache)
    t, g = o.shape[0], wo_a_q.shape[0]
    z = fp8_einsum_before(q.view(t, g, -1), s.view(t, g, -1), wo_a_q, wo_a_scale)
    return z.flatten(1) @ wo_b.T


def o_proj_after(o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, wo_a_q: torch.Tensor,
                 wo_a_scale: torch.Tensor, wo_b: torch.Tensor, quant: Callable[..., Any]) -> torch.Tensor:
    q, s = quant(o, positions, cos_sin_cache)
    t, g = o.shape[0], wo_a_q.shape[0]
    z = fp8_einsum_after(q.view(t, g, -1), s.view(t, g, -1), wo_a_q, wo_a_scale)
    return z.flatten(1) @ wo_b.T


@dataclass
class StepInputs:
    """One decoder layer's worth of inputs for the three ops at a given preset's geometry."""

    preset: str
    tokens: int
    attention: AttentionCore
    experts: MoEExperts
    q: torch.Tensor
    kv: torch.Tensor
    idx: torch.Tensor
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    wo_a_q: torch.Tensor
    wo_a_scale: torch.Tensor
    wo_b: torch.Tensor
    x_moe: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    activation_clamp: float
    quant: Callable[..., Any]


def make_inputs(preset: str = "toy", tokens: int = 1, device: str | torch.device = "cpu", seed: int = 0,
                window: int = 8, max_positions: int = 4096, n_experts: int | None = None,
                layer_name: str = "layers.0") -> StepInputs:
    """Random inputs at realistic scales (unit-RMS activations, weights ~ N(0, 1/K)), drawn on ``device`` from a
    seeded generator. ``n_experts``: routed experts to build (None = the preset's; Flash's 256 x 3 x 2048 x 4096
    bf16 experts are 12.9 GB, so callers that only need the attention ops pass a small count >= top-k)."""
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens: expected a positive int, got {tokens!r}")
    cfg = get_config(preset)
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    h, d, groups, o_l, dim = (cfg.num_attention_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank,
                              cfg.hidden_size)
    k, inter = cfg.num_experts_per_tok, cfg.moe_intermediate_size
    n_exp = cfg.n_routed_experts if n_experts is None else n_experts
    if not isinstance(n_exp, int) or n_exp < k:
        raise ValueError(f"n_experts: expected an int >= top-k = {k}, got {n_experts!r}")
    r = h * d // groups

    def randn(*shape: int, std: float = 1.0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=dev) * std).to(dtype)

    pos = torch.arange(window, window + tokens, device=dev)
    idx = (pos[:, None] - torch.arange(window, device=dev)[None, :]).clamp_min(0)   # the last `window` tokens
    attention = AttentionCore(f"{layer_name}.attn", randn(h, dtype=torch.float32), d ** -0.5)
    wo_a_q, wo_a_scale = quantize_wo_a(randn(groups * o_l, r, std=r ** -0.5, dtype=torch.float32), groups)
    experts = MoEExperts(f"{layer_name}.ffn.experts", randn(n_exp, inter, dim, std=dim ** -0.5),
                         randn(n_exp, inter, dim, std=dim ** -0.5), randn(n_exp, dim, inter, std=inter ** -0.5))
    ids = torch.rand(tokens, n_exp, generator=g, device=dev).argsort(dim=-1)[:, :k]   # k distinct experts per token
    return StepInputs(
        preset=preset, tokens=tokens, attention=register_layer(attention), experts=register_layer(experts),
        q=randn(tokens, h, d), kv=randn(tokens + window, d), idx=idx, positions=pos,
        cos_sin_cache=rope_cos_sin_cache(layer_inv_freq(cfg, 0).to(dev), max(max_positions, window + tokens)),
        wo_a_q=wo_a_q, wo_a_scale=wo_a_scale, wo_b=randn(dim, groups * o_l, std=(groups * o_l) ** -0.5),
        x_moe=randn(tokens, dim), topk_weights=torch.softmax(randn(tokens, k, dtype=torch.float32), -1),
        topk_ids=ids, activation_clamp=float(cfg.swiglu_limit), quant=quant_backend(dev))


def before(inp: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's op sequence through torch.ops: attention core -> o-proj (quant, fp8 einsum op, wo_b); experts."""
    o = attention_before(inp.attention, inp.q, inp.kv, inp.idx)
    attn_out = o_proj_before(o, inp.positions, inp.cos_sin_cache, inp.wo_a_q, inp.wo_a_scale, inp.wo_b, inp.quant)
    return attn_out, moe_before(inp.experts, inp.x_moe, inp.topk_weights, inp.topk_ids, inp.activation_clamp)


def after(inp: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sequence with direct calls (#43891)."""
    o = attention_after(inp.attention, inp.q, inp.kv, inp.idx)
    attn_out = o_proj_after(o, inp.positions, inp.cos_sin_cache, inp.wo_a_q, inp.wo_a_scale, inp.wo_b, inp.quant)
    return attn_out, moe_after(inp.experts, inp.x_moe, inp.topk_weights, inp.topk_ids, inp.activation_clamp)


def op_calls(inp: StepInputs) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """Zero-argument (before, after) callables per op, bound to ``inp`` (for timing and equality checks)."""
    a, sa = _einsum_operands(inp)
    return {
        "attention_core": (lambda: attention_before(inp.attention, inp.q, inp.kv, inp.idx),
                           lambda: attention_after(inp.attention, inp.q, inp.kv, inp.idx)),
        "fp8_einsum": (lambda: fp8_einsum_before(a, sa, inp.wo_a_q, inp.wo_a_scale),
                       lambda: fp8_einsum_after(a, sa, inp.wo_a_q, inp.wo_a_scale)),
        "moe_experts": (lambda: moe_before(inp.experts, inp.x_moe, inp.topk_weights, inp.topk_ids,
                                           inp.activation_clamp),
                        lambda: moe_after(inp.experts, inp.x_moe, inp.topk_weights, inp.topk_ids,
                                          inp.activation_clamp)),
    }


def probe_calls(inp: StepInputs) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """(before, after) per op with the work removed: before = torch.ops.dsv4lab.<op>_probe (dispatcher + glue +
    layer lookup), after = the direct call of the body. Their difference is exactly what #43891 removed."""
    a, sa = _einsum_operands(inp)
    ops = torch.ops.dsv4lab
    t, h, d = inp.q.shape
    o, z, y = _new_out((t, h, d), a), _new_out((t, a.shape[1], inp.wo_a_q.shape[1]), a), torch.empty_like(inp.x_moe)
    att, exp, clamp = inp.attention, inp.experts, inp.activation_clamp
    return {
        "attention_core": (lambda: ops.attention_core_probe(inp.q, inp.kv, inp.idx, o, att.name),
                           lambda: _body(att, inp.q, inp.kv, inp.idx, o)),
        "fp8_einsum": (lambda: ops.fp8_einsum_probe(a, sa, inp.wo_a_q, inp.wo_a_scale, z, EQUATION,
                                                    list(EINSUM_RECIPE)),
                       lambda: _body((a, sa), (inp.wo_a_q, inp.wo_a_scale), z, EQUATION, EINSUM_RECIPE)),
        "moe_experts": (lambda: ops.moe_experts_probe(inp.x_moe, inp.topk_weights, inp.topk_ids, y, exp.name, clamp),
                        lambda: _body(exp, inp.x_moe, inp.topk_weights, inp.topk_ids, y, clamp)),
    }


def _einsum_operands(inp: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
    t, g = inp.tokens, inp.wo_a_q.shape[0]
    a, sa = inp.quant(inp.q, inp.positions, inp.cos_sin_cache)
    return a.view(t, g, -1), sa.view(t, g, -1)


# ---- torch.compile(fullgraph=True): what the registration bought ----------------------------------------------
def o_proj_after_opaque(o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, wo_a_q: torch.Tensor,
                        wo_a_scale: torch.Tensor, wo_b: torch.Tensor, quant: Callable[..., Any]) -> torch.Tensor:
    """``o_proj_after`` with the einsum behind an opaque call (what a C-extension einsum is to Dynamo)."""
    q, s = quant(o, positions, cos_sin_cache)
    t, g = o.shape[0], wo_a_q.shape[0]
    z = _OPAQUE["fp8_einsum_after"](q.view(t, g, -1), s.view(t, g, -1), wo_a_q, wo_a_scale)
    return z.flatten(1) @ wo_b.T


# calls Dynamo does not trace into (the CPU stand-in for DeepGEMM's pybind function); filled by compile_outcomes,
# because torch.compiler.disable imports torch._dynamo, which imports triton -- too early for the CPU interpreter
_OPAQUE: dict[str, Callable[..., Any]] = {}


def _first_lines(err: object) -> str:
    """The headline of a Dynamo error plus its 'Explanation' / 'debug context' lines (which call broke, and why)."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    keep = lines[:1] + [ln for ln in lines[1:] if ln.startswith(("Explanation", "Developer debug context"))]
    return " | ".join(keep)[:600]


def compile_outcome(fn: Callable[..., Any], args: tuple, backend: str = "aot_eager") -> dict[str, Any]:
    """Try ``torch.compile(fn, fullgraph=True)`` on ``args``; then ``torch._dynamo.explain`` for graph breaks.

    Returns {compiled: bool, error: str|None, graphs, graph_breaks, break_reasons, bitwise_equal (to eager),
    compile_backend}.
    """
    import torch._dynamo as dynamo

    out: dict[str, Any] = {"compiled": False, "error": None, "graphs": None, "graph_breaks": None,
                           "break_reasons": [], "bitwise_equal": None, "compile_backend": backend}
    dynamo.reset()
    try:
        got = torch.compile(fn, fullgraph=True, backend=backend)(*args)
        out["compiled"] = True
        out["bitwise_equal"] = bool(torch.equal(got, fn(*args)))
    except Exception as e:  # the failure is the measurement
        out["error"] = f"{type(e).__name__}: {_first_lines(e)}"
    dynamo.reset()
    if out["compiled"]:           # fullgraph succeeded: one graph, no break
        out["graphs"], out["graph_breaks"] = 1, 0
        return out
    try:
        ex = dynamo.explain(fn)(*args)
        out["graphs"], out["graph_breaks"] = ex.graph_count, ex.graph_break_count
        out["break_reasons"] = [_first_lines(getattr(b, "reason", b)) for b in ex.break_reasons][:5]
    except Exception as e:
        out["break_reasons"] = [f"explain failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"]
    dynamo.reset()
    return out


def compile_outcomes(inp: StepInputs, backend: str = "aot_eager") -> dict[str, dict[str, Any]]:
    """fullgraph compile of the attention-output block, before vs after (+ the opaque after on CPU).

    The quant uses the reference (plain torch) in every variant so the only difference is how the einsum is
    reached. On a GPU the after path reaches DeepGEMM's pybind call; on a CPU it reaches the reference einsum
    (plain torch), which Dynamo CAN trace, so the opaque stand-in shows what the C-extension call does.
    """
    from ..kernels import registry

    _OPAQUE.setdefault("fp8_einsum_after", torch.compiler.disable(fp8_einsum_after, recursive=True))
    quant_ref = registry.get("inv_rope_fp8_quant", "reference")
    o = inp.q  # any [T, H, d] bf16 attention output will do
    args = (o, inp.positions, inp.cos_sin_cache, inp.wo_a_q, inp.wo_a_scale, inp.wo_b, quant_ref)
    variants = {"before": o_proj_before, "after": o_proj_after}
    if inp.q.device.type == "cpu":
        variants["after_opaque_standin"] = o_proj_after_opaque
    return {name: compile_outcome(fn, args, backend) for name, fn in variants.items()}


# ---- run ---------------------------------------------------------------------------------------------------
def _rec(**kw: Any) -> dict[str, Any]:
    from ..lab import results

    return results.record(EXPERIMENT, **kw)


def _backend_name(op: str, device: str) -> str:
    """The implementation behind ``op`` on ``device``."""
    return einsum_backend(torch.device(device).type)[0] if op == "fp8_einsum" else "reference"


def numerics_records(inp: StepInputs, device: str) -> list[dict[str, Any]]:
    """Bitwise before == after per op and for the whole step."""
    common = dict(variant="after_vs_before", preset=inp.preset, tokens=inp.tokens, dtype="bfloat16",
                  metric="bitwise_equal", unit="bool")
    recs = [_rec(op=op, backend=_backend_name(op, device), value=bool(torch.equal(b(), a())), **common)
            for op, (b, a) in op_calls(inp).items()]
    (ab, mb), (aa, ma) = before(inp), after(inp)
    recs.append(_rec(op="layer_step", backend="mixed", value=bool(torch.equal(ab, aa) and torch.equal(mb, ma)),
                     **common))
    return recs


def host_overhead_records(inp: StepInputs, device: str, n: int, repeats: int, probes: bool = True
                          ) -> tuple[list[dict], dict[str, float]]:
    """us/call before and after per op and their difference. ``probes=True``: the work-free probes (backend
    "probe"; the registration cost alone, robust to noise); else the full ops on ``inp`` (tiny inputs)."""
    from ..lab import timing

    measured = timing.host_overhead_pairs(probe_calls(inp) if probes else op_calls(inp), n, repeats=repeats,
                                          device=device)
    recs, delta = [], {}
    for op, us in measured.items():
        backend = "probe" if probes else _backend_name(op, device)
        common = dict(op=op, backend=backend, preset=inp.preset, tokens=inp.tokens, dtype="bfloat16")
        for variant in ("before", "after"):
            recs.append(_rec(variant=variant, metric="host_overhead", unit="us", value=us[variant], n=n,
                             repeats=repeats, **common))
        delta[op] = us["before"] - us["after"]
        recs.append(_rec(variant="before_minus_after", metric="host_overhead_delta", unit="us", value=delta[op],
                         **common))
    return recs, delta


def per_forward_records(delta: dict[str, float], source: str, tokens: int) -> list[dict[str, Any]]:
    """Per-call deltas x op calls per forward (``ops_per_forward``) for Flash and Pro, with and without MegaMoE."""
    recs = []
    for preset in LAYERS:
        for mega in (False, True):
            counts = ops_per_forward(preset, mega)
            recs.append(_rec(op="forward", backend=source, variant="before_minus_after", preset=preset,
                             tokens=tokens, dtype="bfloat16", metric="host_overhead_per_forward", unit="us",
                             value=sum(c * delta[op] for op, c in counts.items()), op_counts=counts,
                             mega_moe=mega, calls=sum(counts.values())))
    return recs


def graph_replay_records(inp: StepInputs, device: str, rep: int = 200) -> list[dict[str, Any]]:
    """GPU time of the o-proj block captured in a CUDA graph, before vs after (expected equal), + bitwise check.

    ``lab.timing.bench_interleaved``: both graphs replayed alternately (before, after, before, ...), each replay
    with a cold L2, so slow drift of the GPU (clocks, temperature) lands on both variants alike."""
    from ..lab import timing

    args = (inp.q, inp.positions, inp.cos_sin_cache, inp.wo_a_q, inp.wo_a_scale, inp.wo_b, inp.quant)
    backend = _backend_name("fp8_einsum", device)
    common = dict(op="o_proj_block", backend=backend, preset=inp.preset, tokens=inp.tokens, dtype="bfloat16")
    timings = timing.bench_interleaved({"before": lambda: o_proj_before(*args), "after": lambda: o_proj_after(*args)},
                                       rep=rep, device=device)
    recs = [t.to_record(experiment=EXPERIMENT, variant=variant, interleaved=True, **common)
            for variant, t in timings.items()]
    recs.append(_rec(variant="after_vs_before", metric="bitwise_equal", unit="bool",
                     value=bool(torch.equal(o_proj_before(*args), o_proj_after(*args))), **common))
    return recs


def compile_records(inp: StepInputs, device: str) -> list[dict[str, Any]]:
    """``compile_outcomes`` as records: metric compile_fullgraph (value: compiled or not) + error, graph breaks."""
    backend = _backend_name("fp8_einsum", device)
    return [_rec(op="o_proj_block", backend=backend, variant=variant, preset=inp.preset, tokens=inp.tokens,
                 dtype="bfloat16", metric="compile_fullgraph", unit="bool", value=res["compiled"],
                 **{k: v for k, v in res.items() if k != "compiled"})
            for variant, res in compile_outcomes(inp).items()]


def run(device: str = "cpu", quick: bool = True, preset: str = "flash") -> list[dict]:
    """Before vs after on ``device``: bitwise equality (toy shapes, T=1), host overhead per call from the probes and
    per forward (Flash and Pro op counts), and -- on a GPU, or with quick=False -- the full ops' host overhead,
    graph-replay GPU time of the o-proj block at ``preset`` shapes (GPU only) and the fullgraph compile outcome."""
    from ..lab import timing

    dev = str(timing.resolve_device(device))
    on_gpu = torch.device(dev).type == "cuda"
    prepare(dev)
    inp = make_inputs("toy", tokens=1, device=dev)
    recs = numerics_records(inp, dev)
    over, delta = host_overhead_records(inp, dev, n=1000 if quick else 5000, repeats=5 if quick else 7)
    recs += over + per_forward_records(delta, "probe", inp.tokens)
    if on_gpu or not quick:
        over, delta = host_overhead_records(inp, dev, n=20 if quick else 200, repeats=3 if quick else 5,
                                            probes=False)
        recs += over + per_forward_records(delta, "full_ops", inp.tokens)
    if on_gpu:
        big = make_inputs(preset, tokens=1 if quick else 64, device=dev, n_experts=get_config(preset).num_experts_per_tok)
        recs += graph_replay_records(big, dev)
    else:
        recs.append(_rec(op="o_proj_block", backend="reference", variant="before_vs_after", preset=preset,
                         tokens=None, dtype="bfloat16", metric="unavailable", unit=None, value=None,
                         reason="CUDA-graph replay timing needs a CUDA GPU"))
    if not quick:
        recs += compile_records(inp, dev)
    return recs
