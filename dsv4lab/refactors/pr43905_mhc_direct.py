"""#43905: call the mHC TileLang kernels directly instead of through CustomOp modules and torch.ops.

Before (refactors.md 5.a): ``DeepseekV4DecoderLayer`` owned ``MHCPreOp`` / ``MHCPostOp`` / ``MHCFusedPostPreOp``
and the model an ``HCHeadOp``: ``nn.Module``s whose ``forward`` dispatched (vLLM ``CustomOp``) to
``forward_cuda``, which called a registered op: ``torch.ops.vllm.mhc_pre_tilelang`` etc. (functional schemas with
fake impls) and, for hc_head, the MUTATING ``hc_head_fused_kernel_tilelang(hs, fn, scale, base, out, ...)`` with
``out`` allocated by ``HCHeadOp``. After: plain Python calls of the kernel launchers; hc_head allocates and returns.

Here both paths run the same implementation (``impl``): the TileLang kernels on an SM90 GPU with tilelang, else the
fp32 references of ``dsv4lab.kernels.reference.mhc`` (on a CPU, or a GPU without tilelang):

    before:  MHCPreOp()(residual, fn, ...)  -> forward_cuda / forward_native -> torch.ops.dsv4lab_pr43905.mhc_pre(...)
             HCHeadOp()(residual, ...)      -> out = empty(T, D); torch.ops.dsv4lab_pr43905.hc_head_fused(..., out, ...)
    after:   mhc_pre(residual, fn, ...);  hc_head(residual, ...) -> out

Invariants (5.b): bitwise equal outputs, same kernels, same allocation count (one ``out`` for hc_head either way).
What can differ (5.c): host time per call (``nn.Module.__call__`` + dispatch + the dispatcher's boxing of 9-12
schema arguments incl. ``Tensor?`` and floats), visible only when the forward is not graph-replayed.

mHC calls per forward (vLLM wiring, dsv4-layers.md 2.6): layer 0 runs mhc_pre (attention) and a fused post+pre
(FFN); every later layer two fused post+pre; then one mhc_post and one hc_head: ``2 L + 2`` = 88 (Flash, L = 43)
and 124 (Pro, L = 61). Per decoder layer: 2 calls.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config import get_config

EXPERIMENT = "pr43905_mhc_direct"
TITLE = "#43905: mHC TileLang kernels called directly instead of through CustomOp modules + torch.ops"
NAMESPACE = "dsv4lab_pr43905"
OPS = ("mhc_pre", "mhc_post", "mhc_fused_post_pre", "hc_head")
LAYERS = {"toy": 4, "flash": 43, "pro": 61}
CALLS_PER_LAYER = 2


def calls_per_forward(preset: str) -> dict[str, int]:
    """mHC calls per forward step on the vLLM nvidia path (module docstring): {op: count}."""
    if preset not in LAYERS:
        raise ValueError(f"preset: expected one of {sorted(LAYERS)}, got {preset!r}")
    layers = LAYERS[preset]
    return {"mhc_pre": 1, "mhc_fused_post_pre": 2 * layers - 1, "mhc_post": 1, "hc_head": 1}


# ---- the implementation both paths call ------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def impl(op: str, device_type: str) -> tuple[str, Callable[..., Any]]:
    """(backend name, launcher) of ``op``: TileLang on a CUDA device where it can run, else the reference."""
    from ..kernels import registry

    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    if device_type == "cuda" and registry.availability(op, "tilelang")[0]:
        return "tilelang", registry.get(op, "tilelang")
    return "reference", registry.get(op, "reference")


def hc_head_into(residual: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
                 out: torch.Tensor, rms_eps: float, hc_eps: float) -> None:
    """The mutating hc_head the before path's op wraps: TileLang writes ``out`` in place; the reference has
    no out= form, so on that backend the result is copied into ``out`` (one extra copy, same values)."""
    name, fn_head = impl("hc_head", residual.device.type)
    if name == "tilelang":
        from ..kernels.tilelang.hc_head import hc_head_into as tl_into

        tl_into(residual, fn, scale, base, out, rms_eps=rms_eps, hc_eps=hc_eps)
    else:
        out.copy_(fn_head(residual, fn, scale, base, rms_eps=rms_eps, hc_eps=hc_eps))


# ---- before: torch.library ops (vLLM direct_register_custom_op) -------------------------------------------
def _op_mhc_pre(residual, fn, scale, base, norm_weight, rms_eps, hc_eps, post_mult, sinkhorn_iters):
    return impl("mhc_pre", residual.device.type)[1](residual, fn, scale, base, norm_weight, rms_eps=rms_eps,
                                                   hc_eps=hc_eps, post_mult=post_mult, sinkhorn_iters=sinkhorn_iters)


def _op_mhc_post(f, residual, post, comb):
    return impl("mhc_post", residual.device.type)[1](f, residual, post, comb)


def _op_mhc_fused(f, residual, post, comb, fn, scale, base, norm_weight, rms_eps, hc_eps, post_mult,
                  sinkhorn_iters):
    return impl("mhc_fused_post_pre", residual.device.type)[1](
        f, residual, post, comb, fn, scale, base, norm_weight, rms_eps=rms_eps, hc_eps=hc_eps,
        post_mult=post_mult, sinkhorn_iters=sinkhorn_iters)


def _op_hc_head(residual, fn, scale, base, out, rms_eps, hc_eps) -> None:
    hc_head_into(residual, fn, scale, base, out, rms_eps, hc_eps)


def _fake_pre(residual, fn, scale, base, norm_weight, *scalars):
    t, n, d = residual.shape
    return residual.new_empty(t, d), fn.new_empty(t, n), fn.new_empty(t, n, n)


def _fake_post(f, residual, post, comb):
    return torch.empty_like(residual)


def _fake_fused(f, residual, post, comb, fn, scale, base, norm_weight, *scalars):
    return (torch.empty_like(residual),) + _fake_pre(residual, fn, scale, base, norm_weight)


def _fake_none(*args) -> None:
    return None


_PRE_ARGS = "Tensor fn, Tensor scale, Tensor base, Tensor? norm_weight, float rms_eps, float hc_eps, " \
            "float post_mult, int sinkhorn_iters"
_SCHEMAS = {
    "mhc_pre": (f"(Tensor residual, {_PRE_ARGS}) -> (Tensor, Tensor, Tensor)", _op_mhc_pre, _fake_pre),
    "mhc_post": ("(Tensor f, Tensor residual, Tensor post, Tensor comb) -> Tensor", _op_mhc_post, _fake_post),
    "mhc_fused_post_pre": (f"(Tensor f, Tensor residual, Tensor post, Tensor comb, {_PRE_ARGS}) "
                           "-> (Tensor, Tensor, Tensor, Tensor)", _op_mhc_fused, _fake_fused),
    "hc_head_fused": ("(Tensor residual, Tensor fn, Tensor scale, Tensor base, Tensor(a!) out, float rms_eps, "
                      "float hc_eps) -> ()", _op_hc_head, _fake_none),
}


# ---- probes: the same schemas and glue with the kernel removed (isolates what #43905 removed) --------------
PROBE_OUTPUTS: dict[str, Any] = {}   # op -> the outputs a probe returns (set by ``probe_calls``)


def _probe(op: str) -> Callable[..., Any]:
    def body(*args: Any) -> Any:
        return PROBE_OUTPUTS[op]
    return body


def _register() -> torch.library.Library:
    previous = globals().get("_LIBRARY")
    if previous is not None:          # importlib.reload: drop the old registrations first
        previous._destroy()
    lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    for name, (schema, fn, fake) in _SCHEMAS.items():
        for op_name, body in ((name, fn), (f"{name}_probe", _probe(name))):
            lib.define(op_name + schema)
            for key in ("CPU", "CUDA"):
                lib.impl(op_name, body, key)
            torch.library.register_fake(f"{NAMESPACE}::{op_name}", fake, lib=lib)
    return lib


_LIBRARY = _register()


class CustomOpLike(torch.nn.Module):
    """vLLM's ``CustomOp`` shape: the platform decides once, at construction, which forward_* runs."""

    def __init__(self, device: str | torch.device = "cpu", probe: bool = False) -> None:
        super().__init__()
        self.probe = probe
        self._forward_method = self.forward_cuda if torch.device(device).type == "cuda" else self.forward_native

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward_method(*args, **kwargs)

    def _op(self, name: str) -> Any:
        return getattr(torch.ops.dsv4lab_pr43905, f"{name}_probe" if self.probe else name)

    def forward_native(self, *args: Any, **kwargs: Any) -> Any:
        # vLLM's forward_native is the torch reference; here the op's CPU kernel is that reference, so both
        # devices pay the same dispatch cost and the comparison isolates it
        return self.forward_cuda(*args, **kwargs)


class MHCPreOp(CustomOpLike):
    def forward_cuda(self, residual, fn, scale, base, norm_weight, rms_eps, hc_eps, post_mult, sinkhorn_iters):
        return self._op("mhc_pre")(residual, fn, scale, base, norm_weight, rms_eps, hc_eps, post_mult,
                                   sinkhorn_iters)


class MHCPostOp(CustomOpLike):
    def forward_cuda(self, f, residual, post, comb):
        return self._op("mhc_post")(f, residual, post, comb)


class MHCFusedPostPreOp(CustomOpLike):
    def forward_cuda(self, f, residual, post, comb, fn, scale, base, norm_weight, rms_eps, hc_eps, post_mult,
                     sinkhorn_iters):
        return self._op("mhc_fused_post_pre")(f, residual, post, comb, fn, scale, base, norm_weight, rms_eps,
                                              hc_eps, post_mult, sinkhorn_iters)


class HCHeadOp(CustomOpLike):
    def forward_cuda(self, residual, fn, scale, base, rms_eps, hc_eps):
        out = torch.empty(residual.shape[0], residual.shape[2], dtype=residual.dtype, device=residual.device)
        self._op("hc_head_fused")(residual, fn, scale, base, out, rms_eps, hc_eps)
        return out


# ---- inputs -----------------------------------------------------------------------------------------------
@dataclass
class MixParams:
    fn: torch.Tensor            # [24, nD] fp32 (hc_head: [4, nD])
    scale: torch.Tensor
    base: torch.Tensor
    norm_weight: torch.Tensor | None


@dataclass
class Inputs:
    preset: str
    tokens: int
    residual: torch.Tensor      # [T, 4, D] bf16
    f: torch.Tensor             # [T, D] bf16, a sublayer output
    post: torch.Tensor          # [T, 4] fp32, the previous sublayer's mixes
    comb: torch.Tensor          # [T, 4, 4] fp32
    attn: MixParams
    ffn: MixParams
    head: MixParams
    rms_eps: float
    hc_eps: float
    post_mult: float
    sinkhorn_iters: int


def make_inputs(preset: str = "flash", tokens: int = 1, device: str | torch.device = "cpu", seed: int = 0) -> Inputs:
    """Realistic magnitudes (dsv4-layers.md 2): unit-RMS residual streams, fn ~ N(0, 1/nD), mixes in range."""
    if not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens: expected an int >= 0, got {tokens!r}")
    cfg = get_config(preset)
    n, d = cfg.hc_mult, cfg.hidden_size
    g = torch.Generator().manual_seed(seed)
    dev = torch.device(device)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def params(rows: int, n_scale: int, norm: bool) -> MixParams:
        w = (1.0 + 0.1 * randn(d)).to(torch.bfloat16).to(dev) if norm else None
        return MixParams(randn(rows, n * d, std=(n * d) ** -0.5).to(dev), (0.5 + randn(n_scale).abs()).to(dev),
                         (0.5 * randn(rows)).to(dev), w)

    comb = torch.softmax(randn(tokens, n, n), -1)
    return Inputs(preset=preset, tokens=tokens, residual=randn(tokens, n, d).to(torch.bfloat16).to(dev),
                  f=randn(tokens, d).to(torch.bfloat16).to(dev), post=(2 * torch.rand(tokens, n, generator=g)).to(dev),
                  comb=(comb / comb.sum(1, keepdim=True)).to(dev),
                  attn=params((2 + n) * n, 3, True), ffn=params((2 + n) * n, 3, True), head=params(n, 1, False),
                  rms_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps, post_mult=cfg.hc_post_mult,
                  sinkhorn_iters=cfg.hc_sinkhorn_iters)


# ---- the two paths ----------------------------------------------------------------------------------------
@dataclass
class BeforeModules:
    """The CustomOp modules a decoder layer / the model owned before #43905."""

    mhc_pre: MHCPreOp
    mhc_post: MHCPostOp
    mhc_fused_post_pre: MHCFusedPostPreOp
    hc_head: HCHeadOp


def before_modules(device: str | torch.device, probe: bool = False) -> BeforeModules:
    return BeforeModules(MHCPreOp(device, probe), MHCPostOp(device, probe), MHCFusedPostPreOp(device, probe),
                         HCHeadOp(device, probe))


def op_calls(inp: Inputs, mods: BeforeModules | None = None) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """Zero-argument (before, after) callables per op, bound to ``inp``; before goes through ``mods``."""
    dev = inp.residual.device.type
    mods = mods or before_modules(inp.residual.device)
    a, h = inp.attn, inp.head
    s = (inp.rms_eps, inp.hc_eps, inp.post_mult, inp.sinkhorn_iters)
    kw = dict(rms_eps=inp.rms_eps, hc_eps=inp.hc_eps, post_mult=inp.post_mult, sinkhorn_iters=inp.sinkhorn_iters)
    r, f, p, c = inp.residual, inp.f, inp.post, inp.comb
    return {
        "mhc_pre": (lambda: mods.mhc_pre(r, a.fn, a.scale, a.base, a.norm_weight, *s),
                    lambda: impl("mhc_pre", dev)[1](r, a.fn, a.scale, a.base, a.norm_weight, **kw)),
        "mhc_post": (lambda: mods.mhc_post(f, r, p, c),
                     lambda: impl("mhc_post", dev)[1](f, r, p, c)),
        "mhc_fused_post_pre": (lambda: mods.mhc_fused_post_pre(f, r, p, c, a.fn, a.scale, a.base, a.norm_weight, *s),
                               lambda: impl("mhc_fused_post_pre", dev)[1](f, r, p, c, a.fn, a.scale, a.base,
                                                                          a.norm_weight, **kw)),
        "hc_head": (lambda: mods.hc_head(r, h.fn, h.scale, h.base, inp.rms_eps, inp.hc_eps),
                    lambda: impl("hc_head", dev)[1](r, h.fn, h.scale, h.base, rms_eps=inp.rms_eps, hc_eps=inp.hc_eps)),
    }


def probe_calls(inp: Inputs) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """(before, after) per op with the kernel removed: before = the CustomOp module calling
    ``torch.ops.dsv4lab_pr43905.<op>_probe`` (Module call + dispatch + boxing), after = a direct call of a
    Python function with the same arguments returning the same outputs. The difference is what #43905 removed."""
    befores = {op: b for op, (b, _) in op_calls(inp, before_modules(inp.residual.device, probe=True)).items()}
    outs = {op: a() for op, (_, a) in op_calls(inp).items()}   # real outputs, computed once
    PROBE_OUTPUTS.update({"mhc_pre": outs["mhc_pre"], "mhc_post": outs["mhc_post"],
                          "mhc_fused_post_pre": outs["mhc_fused_post_pre"], "hc_head_fused": None})
    a, h = inp.attn, inp.head
    s = (inp.rms_eps, inp.hc_eps, inp.post_mult, inp.sinkhorn_iters)
    r, f, p, c = inp.residual, inp.f, inp.post, inp.comb

    def direct(op: str, *args: Any, **kwargs: Any) -> Any:   # stands for the launcher call that remains
        return outs[op]

    def head_after() -> torch.Tensor:   # after: the launcher allocates and returns out
        out = torch.empty(r.shape[0], r.shape[2], dtype=r.dtype, device=r.device)
        direct("hc_head", r, h.fn, h.scale, h.base, rms_eps=inp.rms_eps, hc_eps=inp.hc_eps)
        return out

    return {
        "mhc_pre": (befores["mhc_pre"], lambda: direct("mhc_pre", r, a.fn, a.scale, a.base, a.norm_weight, *s)),
        "mhc_post": (befores["mhc_post"], lambda: direct("mhc_post", f, r, p, c)),
        "mhc_fused_post_pre": (befores["mhc_fused_post_pre"],
                               lambda: direct("mhc_fused_post_pre", f, r, p, c, a.fn, a.scale, a.base,
                                              a.norm_weight, *s)),
        "hc_head": (befores["hc_head"], head_after),
    }


def mhc_forward(inp: Inputs, layers: int, variant: str, mods: BeforeModules | None = None) -> tuple[torch.Tensor, ...]:
    """The mHC calls of a ``layers``-layer forward in vLLM's wiring, with identity sublayers (f = layer input):
    layer 0 mhc_pre(attn) + fused(ffn); later layers fused(attn) + fused(ffn); then mhc_post and hc_head.
    ``variant`` 'before' goes through ``mods`` (CustomOp modules + torch.ops), 'after' calls the launchers."""
    if variant not in ("before", "after"):
        raise ValueError(f"variant: expected 'before' or 'after', got {variant!r}")
    dev = inp.residual.device
    a, b, h = inp.attn, inp.ffn, inp.head
    s = (inp.rms_eps, inp.hc_eps, inp.post_mult, inp.sinkhorn_iters)
    kw = dict(rms_eps=inp.rms_eps, hc_eps=inp.hc_eps, post_mult=inp.post_mult, sinkhorn_iters=inp.sinkhorn_iters)
    if variant == "before":
        mods = mods or before_modules(dev)
        pre = lambda r, m: mods.mhc_pre(r, m.fn, m.scale, m.base, m.norm_weight, *s)            # noqa: E731
        fused = lambda x, r, p, c, m: mods.mhc_fused_post_pre(x, r, p, c, m.fn, m.scale, m.base,  # noqa: E731
                                                              m.norm_weight, *s)
        post_fn = mods.mhc_post
        head = lambda r: mods.hc_head(r, h.fn, h.scale, h.base, inp.rms_eps, inp.hc_eps)          # noqa: E731
    else:
        t = dev.type
        pre = lambda r, m: impl("mhc_pre", t)[1](r, m.fn, m.scale, m.base, m.norm_weight, **kw)   # noqa: E731
        fused = lambda x, r, p, c, m: impl("mhc_fused_post_pre", t)[1](x, r, p, c, m.fn, m.scale,  # noqa: E731
                                                                       m.base, m.norm_weight, **kw)
        post_fn = impl("mhc_post", t)[1]
        head = lambda r: impl("hc_head", t)[1](r, h.fn, h.scale, h.base, rms_eps=inp.rms_eps,     # noqa: E731
                                                hc_eps=inp.hc_eps)
    residual = inp.residual
    x, post, comb = pre(residual, a)
    for layer in range(layers):
        if layer > 0:
            residual, x, post, comb = fused(x, residual, post, comb, a)
        residual, x, post, comb = fused(x, residual, post, comb, b)   # attention sublayer = identity
    residual = post_fn(x, residual, post, comb)                       # FFN sublayer = identity
    return residual, head(residual)


# ---- measurements -----------------------------------------------------------------------------------------
def _rec(**kw: Any) -> dict[str, Any]:
    from ..lab import results

    return results.record(EXPERIMENT, **kw)


def _bitwise(x: Any, y: Any) -> bool:
    xs, ys = (x if isinstance(x, tuple) else (x,)), (y if isinstance(y, tuple) else (y,))
    return len(xs) == len(ys) and all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
                                      for a, b in zip(xs, ys))


def numerics_records(inp: Inputs, layers: int) -> list[dict[str, Any]]:
    """Bitwise before == after per op and for a ``layers``-layer mHC forward."""
    dev = inp.residual.device.type
    common = dict(variant="after_vs_before", preset=inp.preset, tokens=inp.tokens, dtype="bfloat16",
                  metric="bitwise_equal", unit="bool")
    recs = [_rec(op=op, backend=impl(op, dev)[0], value=_bitwise(b(), a()), **common)
            for op, (b, a) in op_calls(inp).items()]
    recs.append(_rec(op="mhc_forward", backend=impl("mhc_pre", dev)[0], layers=layers,
                     value=_bitwise(mhc_forward(inp, layers, "before"), mhc_forward(inp, layers, "after")),
                     **common))
    return recs


ALLOC_OPS = ("aten::empty", "aten::empty_strided")   # every CPU tensor allocation goes through one of these


def allocations_per_call(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Allocations made by one ``fn()`` call: on a GPU the caching allocator's ``allocation.all.allocated``
    delta; on a CPU the number of ``aten::empty`` / ``aten::empty_strided`` calls seen by ``torch.profiler``
    (its ``[memory]`` events miss allocations made inside a custom op's Python kernel)."""
    fn()  # warm: lazy compiles, caches
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_stats(device).get("allocation.all.allocated", 0)
        fn()
        torch.cuda.synchronize(device)
        return {"count": torch.cuda.memory_stats(device).get("allocation.all.allocated", 0) - before,
                "source": "torch.cuda.memory_stats allocation.all.allocated"}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {"count": sum(1 for e in prof.events() if e.name in ALLOC_OPS),
            "source": "torch.profiler aten::empty/empty_strided events"}


def allocation_records(inp: Inputs) -> list[dict[str, Any]]:
    dev = inp.residual.device
    recs = []
    for op, (b, a) in op_calls(inp).items():
        for variant, fn in (("before", b), ("after", a)):
            got = allocations_per_call(fn, dev)
            recs.append(_rec(op=op, backend=impl(op, dev.type)[0], variant=variant, preset=inp.preset,
                             tokens=inp.tokens, dtype="bfloat16", metric="allocations_per_call", unit="count",
                             value=got.pop("count"), **got))
    return recs


def host_overhead_records(inp: Inputs, n: int, repeats: int, probes: bool) -> tuple[list[dict], dict[str, float]]:
    """us/call before/after per op and their difference; ``probes`` isolates the wrapper cost (backend 'probe')."""
    from ..lab import timing

    dev = inp.residual.device
    measured = timing.host_overhead_pairs(probe_calls(inp) if probes else op_calls(inp), n, repeats=repeats,
                                          device=dev)
    recs, delta = [], {}
    for op, us in measured.items():
        backend = "probe" if probes else impl(op, dev.type)[0]
        common = dict(op=op, backend=backend, preset=inp.preset, tokens=inp.tokens, dtype="bfloat16")
        for variant in ("before", "after"):
            recs.append(_rec(variant=variant, metric="host_overhead", unit="us", value=us[variant], n=n,
                             repeats=repeats, **common))
        delta[op] = us["before"] - us["after"]
        recs.append(_rec(variant="before_minus_after", metric="host_overhead_delta", unit="us", value=delta[op],
                         **common))
    return recs, delta


def per_forward_records(delta: dict[str, float], source: str, tokens: int) -> list[dict[str, Any]]:
    """Per-call deltas x calls per forward (``calls_per_forward``) for Flash and Pro, and per decoder layer."""
    recs = []
    for preset in ("flash", "pro"):
        counts = calls_per_forward(preset)
        recs.append(_rec(op="forward", backend=source, variant="before_minus_after", preset=preset, tokens=tokens,
                         dtype="bfloat16", metric="host_overhead_per_forward", unit="us",
                         value=sum(c * delta[op] for op, c in counts.items()), op_counts=counts,
                         calls=sum(counts.values())))
        recs.append(_rec(op="decoder_layer", backend=source, variant="before_minus_after", preset=preset,
                         tokens=tokens, dtype="bfloat16", metric="host_overhead_per_layer", unit="us",
                         value=CALLS_PER_LAYER * delta["mhc_fused_post_pre"], calls=CALLS_PER_LAYER))
    return recs


def forward_overhead_records(inp: Inputs, layers: int, n: int, repeats: int) -> list[dict[str, Any]]:
    """Host time of a whole ``layers``-layer mHC forward, before vs after (tiny T: dominated by host work)."""
    from ..lab import timing

    dev = inp.residual.device
    mods = before_modules(dev)
    recs = []
    for variant in ("before", "after"):
        us = timing.host_overhead(lambda: mhc_forward(inp, layers, variant, mods), n, repeats=repeats, device=dev)
        recs.append(_rec(op="mhc_forward", backend=impl("mhc_pre", dev.type)[0], variant=variant,
                         preset=inp.preset, tokens=inp.tokens, dtype="bfloat16", metric="host_overhead",
                         unit="us", value=us, layers=layers, calls=2 * layers + 2, n=n, repeats=repeats))
    return recs


def graph_replay_records(inp: Inputs) -> list[dict[str, Any]]:
    """GPU time per op under CUDA-graph replay, before vs after (expected equal: the host code does not run)."""
    from ..lab import timing

    recs = []
    for op, (b, a) in op_calls(inp).items():
        for variant, fn in (("before", b), ("after", a)):
            t = timing.bench(fn, graph=True, device=inp.residual.device)
            recs.append(t.to_record(experiment=EXPERIMENT, op=op, backend=impl(op, "cuda")[0], variant=variant,
                                    preset=inp.preset, tokens=inp.tokens, dtype="bfloat16"))
    return recs


def run(device: str = "cpu", quick: bool = True, preset: str = "flash") -> list[dict]:
    """Before vs after on ``device``: bitwise equality, allocations per call, host overhead per call (probes and
    full ops), per layer / per forward, a whole mHC forward; on a GPU also CUDA-graph replay times. On a CPU
    the TileLang backend is reported unavailable (with the reason) and both paths run the reference."""
    from ..kernels import registry

    dev = torch.device(device)
    tokens = 1
    inp = make_inputs(preset, tokens, dev)
    layers = 2 if quick else LAYERS[preset]
    n, repeats = (30, 3) if quick else (200, 5)
    recs: list[dict] = []
    if dev.type != "cuda":
        for op in OPS:
            ok, why = registry.availability(op, "tilelang")
            if not ok:
                recs.append(_rec(op=op, backend="tilelang", variant="after", preset=preset, tokens=tokens,
                                 dtype="bfloat16", metric="unavailable", unit=None, value=None, reason=why))
    recs += numerics_records(inp, layers)
    recs += allocation_records(inp)
    probe_recs, delta = host_overhead_records(inp, n, repeats, probes=True)
    recs += probe_recs
    recs += per_forward_records(delta, "probe", tokens)
    if dev.type == "cuda" or not quick:   # on a 2-core CPU the full reference ops are too noisy to difference
        full_recs, _ = host_overhead_records(inp, max(5, n // 3), repeats, probes=False)
        recs += full_recs
        recs += forward_overhead_records(inp, layers, max(2, n // 10), repeats)
    if dev.type == "cuda":
        recs += graph_replay_records(inp)
    return recs
