"""vLLM PR #44367: inline ``_run_mega_moe`` into ``DeepseekV4MegaMoEExperts.forward`` (refactors.md 6).

Before, ``forward`` allocated ``y`` and called the private ``_run_mega_moe``, which fetched the symmetric buffer,
applied the EPLB logical -> physical map, staged the inputs (``prepare_megamoe_inputs``), ran ``finalize_weights``
and launched ``deep_gemm.fp8_fp4_mega_moe``. After, the same statements sit in ``forward``. Nothing on the GPU
changes (same kernels, order, buffers, returned tensor); the host saves one Python frame per MoE layer per eager
forward, and nothing at CUDA-graph replay (the host code does not run there).

The modules below re-implement that shape around a pluggable experts kernel ``kernel(y, buffer, T, module,
activation_clamp, fast_math)`` that reads the staged buffer:

    reference   dequantised staged x -> moe_fp4 (routed experts, fp32), any device
    deep_gemm   the Hopper grouped-GEMM path (dsv4lab.kernels.deep_gemm.grouped_moe) on the staged fp8 x, sm_90
    fixed       y <- bf16(staged x): a fixed-cost stand-in for host-overhead and CUDA-graph measurements
    probe       no work at all (with no-op staging): the cost of the code structure alone

``fp8_fp4_mega_moe`` itself needs SM100 (``dsv4lab.kernels.deep_gemm.mega_moe``); on Hopper the single-GPU
``fp8_mega_moe`` attempt and the grouped path are measured by bench/pr44367_megamoe.py.
EPLB (dsv4-layers.md 4.5): physical slot p holds logical expert p % E; position ``pos`` of the flattened top-k ids
uses replica ``pos % replica_count[id]``; the kernels map a physical id back to its weights with ``p % E``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import get_config
from ..kernels.reference.moe import moe_fp4, route
from ..quant import dequant_fp4, dequant_fp8, quant_fp4, quant_fp8

EXPERIMENT = "pr44367_megamoe"
TITLE = "#44367: inline _run_mega_moe into DeepseekV4MegaMoEExperts.forward"
OP = "moe_experts"
MOE_LAYERS = {"flash": 43, "pro": 61}    # MegaMoE experts calls per forward: one per decoder layer (MTP excluded)
Kernel = Callable[..., None]


# ---- what the module stages: the input part of DeepGEMM's symmetric buffer ------------------------------------
@dataclass
class StagingBuffer:
    x: torch.Tensor              # e4m3 [max_tokens, D]
    x_sf: torch.Tensor           # fp32 [max_tokens, D/128] (pow2)
    topk_idx: torch.Tensor       # int64 [max_tokens, k]
    topk_weights: torch.Tensor   # fp32 [max_tokens, k]


_SYMM_BUFFERS: dict[tuple, StagingBuffer] = {}


def get_symm_buffer_for_mega_moe(group: Any, device: torch.device, num_experts: int, max_tokens: int, top_k: int,
                                 hidden: int, inter: int) -> StagingBuffer:
    """Cached per (group, device, shape) like vLLM's; here plain device memory (one rank)."""
    key = (id(group), str(device), num_experts, max_tokens, top_k, hidden, inter)
    if key not in _SYMM_BUFFERS:
        _SYMM_BUFFERS[key] = StagingBuffer(
            torch.zeros((max_tokens, hidden), dtype=torch.float8_e4m3fn, device=device),
            torch.zeros((max_tokens, hidden // 128), dtype=torch.float32, device=device),
            torch.zeros((max_tokens, top_k), dtype=torch.int64, device=device),
            torch.zeros((max_tokens, top_k), dtype=torch.float32, device=device))
    return _SYMM_BUFFERS[key]


@dataclass
class EplbState:
    logical_to_physical_map: torch.Tensor     # int64 [E, max_replicas], -1 = unused
    logical_replica_count: torch.Tensor       # int64 [E]
    expert_load_view: torch.Tensor            # int64 [E_physical]
    record: bool = True


def initial_eplb_state(n_logical: int, n_redundant: int, device: torch.device | str = "cpu") -> EplbState:
    """Physical slot p holds logical expert p % n_logical (the MegaMoE loader's initial placement)."""
    n_phys = n_logical + n_redundant
    replicas = -(-n_phys // n_logical)
    l2p = torch.full((n_logical, replicas), -1, dtype=torch.int64)
    for p in range(n_phys):
        e, r = p % n_logical, p // n_logical
        l2p[e, r] = p
    count = (l2p >= 0).sum(1)
    return EplbState(l2p.to(device), count.to(device), torch.zeros(n_phys, dtype=torch.int64, device=device))


def eplb_map_to_physical_and_record(topk_ids: torch.Tensor, state: EplbState) -> torch.Tensor:
    """``physical = l2p[id, pos % replica_count[id]]`` for each flattened position; counts the load if recording."""
    flat = topk_ids.reshape(-1).long()
    pos = torch.arange(flat.numel(), device=flat.device)
    replica = pos % state.logical_replica_count[flat]
    phys = state.logical_to_physical_map[flat, replica]
    if state.record:
        state.expert_load_view.index_add_(0, phys, torch.ones_like(phys))
    return phys.reshape(topk_ids.shape)


def prepare_megamoe_inputs(h: torch.Tensor, topk_w: torch.Tensor, topk_ids: torch.Tensor, x: torch.Tensor,
                           x_sf: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> None:
    """Stage one batch: h -> e4m3 with 1x128 pow2 scales (the SM90 format), ids int64, weights fp32."""
    q, s = quant_fp8(h, 128, pow2=True)
    x.copy_(q)
    x_sf.copy_(s)
    idx.copy_(topk_ids)
    w.copy_(topk_w)


def _no_staging(*args: Any) -> None:
    return None


# ---- experts kernels (stand-ins for deep_gemm.fp8_fp4_mega_moe) ----------------------------------------------
def reference_kernel(y, buf, num_tokens, module, activation_clamp, fast_math) -> None:
    x32 = dequant_fp8(buf.x[:num_tokens], buf.x_sf[:num_tokens], 128)
    ids = buf.topk_idx[:num_tokens] % module.n_logical
    y.copy_(moe_fp4(x32, buf.topk_weights[:num_tokens], ids, *module.weights, swiglu_limit=activation_clamp))


def deep_gemm_kernel(y, buf, num_tokens, module, activation_clamp, fast_math) -> None:
    from ..kernels.deep_gemm.grouped_moe import experts_forward

    x_q, x_sf = buf.x[:num_tokens], buf.x_sf[:num_tokens]
    ids = buf.topk_idx[:num_tokens] % module.n_logical
    y.copy_(experts_forward(y, buf.topk_weights[:num_tokens], ids, module.prepared, swiglu_limit=activation_clamp,
                            x_quant=(x_q, x_sf)))


def fixed_kernel(y, buf, num_tokens, module, activation_clamp, fast_math) -> None:
    y.copy_(buf.x[:num_tokens])


def probe_kernel(y, buf, num_tokens, module, activation_clamp, fast_math) -> None:
    return None


KERNELS: dict[str, Kernel] = {"reference": reference_kernel, "deep_gemm": deep_gemm_kernel, "fixed": fixed_kernel,
                              "probe": probe_kernel}


# ---- the experts module, before and after -----------------------------------------------------------------
class _MegaMoEExpertsBase(torch.nn.Module):
    """What both versions share: weights, the cached buffer, EPLB state, one-time weight finalisation."""

    def __init__(self, weights: tuple[torch.Tensor, ...], *, top_k: int, max_num_tokens: int, kernel: str = "reference",
                 eplb: EplbState | None = None, group: Any = None):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel: expected one of {sorted(KERNELS)}, got {kernel!r}")
        self.weights = weights                       # MXFP4: w1, w1_scale, w3, w3_scale, w2, w2_scale
        self.n_logical, self.inter, half_d = weights[0].shape
        self.hidden = 2 * half_d
        self.top_k, self.max_num_tokens = top_k, max_num_tokens
        self.kernel_name, self.kernel = kernel, KERNELS[kernel]
        self.prepare_inputs = _no_staging if kernel == "probe" else prepare_megamoe_inputs
        self.eplb, self.group = eplb, group
        self.n_physical = self.n_logical if eplb is None else eplb.expert_load_view.numel()
        self.prepared = None

    def get_symm_buffer(self) -> StagingBuffer:
        return get_symm_buffer_for_mega_moe(self.group, self.weights[0].device, self.n_physical,
                                            self.max_num_tokens, self.top_k, self.hidden, self.inter)

    def finalize_weights(self) -> None:
        """Once (a no-op afterwards): the grouped path converts the MXFP4 experts to 128x128 e4m3 blocks."""
        if self.prepared is None and self.kernel_name == "deep_gemm":
            from ..kernels.deep_gemm.grouped_moe import prepare_experts

            self.prepared = prepare_experts(*self.weights)


class MegaMoEExpertsBefore(_MegaMoEExpertsBase):
    """Before #44367: ``forward`` delegates to ``_run_mega_moe``."""

    def forward(self, h: torch.Tensor, topk_w: torch.Tensor, topk_ids: torch.Tensor, *, activation_clamp: float,
                fast_math: bool = True) -> torch.Tensor:
        if h.shape[0] > self.max_num_tokens:
            raise ValueError(f"h: {h.shape[0]} tokens exceed max_num_tokens={self.max_num_tokens}")
        y = torch.empty_like(h, dtype=torch.bfloat16)
        self._run_mega_moe(h, topk_w, topk_ids, y, activation_clamp, fast_math)
        return y

    def _run_mega_moe(self, h: torch.Tensor, topk_w: torch.Tensor, topk_ids: torch.Tensor, y: torch.Tensor,
                      activation_clamp: float, fast_math: bool) -> None:
        symm = self.get_symm_buffer()
        num_tokens = h.shape[0]
        if self.eplb is not None:
            topk_ids = eplb_map_to_physical_and_record(topk_ids, self.eplb)
        self.prepare_inputs(h, topk_w, topk_ids, symm.x[:num_tokens], symm.x_sf[:num_tokens],
                            symm.topk_idx[:num_tokens], symm.topk_weights[:num_tokens])
        self.finalize_weights()
        self.kernel(y, symm, num_tokens, self, activation_clamp, fast_math)


class MegaMoEExpertsAfter(_MegaMoEExpertsBase):
    """After #44367: the same statements inlined into ``forward``."""

    def forward(self, h: torch.Tensor, topk_w: torch.Tensor, topk_ids: torch.Tensor, *, activation_clamp: float,
                fast_math: bool = True) -> torch.Tensor:
        if h.shape[0] > self.max_num_tokens:
            raise ValueError(f"h: {h.shape[0]} tokens exceed max_num_tokens={self.max_num_tokens}")
        y = torch.empty_like(h, dtype=torch.bfloat16)
        symm = self.get_symm_buffer()
        num_tokens = h.shape[0]
        if self.eplb is not None:
            topk_ids = eplb_map_to_physical_and_record(topk_ids, self.eplb)
        self.prepare_inputs(h, topk_w, topk_ids, symm.x[:num_tokens], symm.x_sf[:num_tokens],
                            symm.topk_idx[:num_tokens], symm.topk_weights[:num_tokens])
        self.finalize_weights()
        self.kernel(y, symm, num_tokens, self, activation_clamp, fast_math)
        return y


def before(module: MegaMoEExpertsBefore, h: torch.Tensor, topk_w: torch.Tensor, topk_ids: torch.Tensor,
           activation_clamp: float) -> torch.Tensor:
    return module(h, topk_w, topk_ids, activation_clamp=activation_clamp)


def after(module: MegaMoEExpertsAfter, h: torch.Tensor, topk_w: torch.Tensor, topk_ids: torch.Tensor,
          activation_clamp: float) -> torch.Tensor:
    return module(h, topk_w, topk_ids, activation_clamp=activation_clamp)


# ---- inputs and the fp64 oracle ---------------------------------------------------------------------------
@dataclass
class Case:
    preset: str
    hidden: int
    inter: int
    n_experts: int               # experts instantiated (E_local; the preset's full E unless reduced)
    top_k: int
    swiglu_limit: float
    weights: tuple[torch.Tensor, ...]
    h: torch.Tensor              # bf16 [T, D], unit RMS
    topk_w: torch.Tensor         # fp32 [T, k]
    topk_ids: torch.Tensor       # int64 [T, k]
    extra: dict = field(default_factory=dict)


def make_weights(n_experts: int, hidden: int, inter: int, *, device: str | torch.device = "cpu", seed: int = 0,
                 chunk: int = 8) -> tuple[torch.Tensor, ...]:
    """MXFP4 experts from N(0, 1/K) weights, ``chunk`` experts at a time (bounded fp32 temporaries)."""
    g = torch.Generator(device=device).manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in range(6)]
    for lo in range(0, n_experts, chunk):
        n = min(chunk, n_experts - lo)
        for i, (rows, cols) in enumerate(((inter, hidden), (inter, hidden), (hidden, inter))):
            w = torch.randn(n, rows, cols, generator=g, device=device) / math.sqrt(cols)
            q, s = quant_fp4(w)
            parts[2 * i].append(q)
            parts[2 * i + 1].append(s)
            del w
    return tuple(torch.cat(p) for p in parts)


def make_routing(hidden: int, n_experts: int, top_k: int, tokens: int, rsf: float, *, device: str | torch.device,
                 seed: int, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h bf16 [T, D] unit RMS, topk weights, ids) from a random gate ~ N(0, 1/D) and Flash-like biases ~8.08."""
    g = torch.Generator(device=device).manual_seed(seed)
    if h is None:
        h = torch.randn(tokens, hidden, generator=g, device=device).to(torch.bfloat16)
    gate = torch.randn(n_experts, hidden, generator=g, device=device) / math.sqrt(hidden)
    bias = 8.08 + 0.05 * torch.randn(n_experts, generator=g, device=device)
    w, ids = route(h.float() @ gate.T, k=top_k, routed_scaling_factor=rsf, bias=bias)
    return h, w, ids


def make_case(preset: str = "toy", tokens: int = 4, *, device: str | torch.device = "cpu", seed: int = 0,
              n_experts: int | None = None, weights: tuple[torch.Tensor, ...] | None = None) -> Case:
    cfg = get_config(preset)
    e = n_experts or cfg.n_routed_experts
    if weights is None:
        weights = make_weights(e, cfg.hidden_size, cfg.moe_intermediate_size, device=device, seed=seed)
    h, w, ids = make_routing(cfg.hidden_size, e, cfg.num_experts_per_tok, tokens, cfg.routed_scaling_factor,
                             device=device, seed=seed + 1)
    return Case(preset, cfg.hidden_size, cfg.moe_intermediate_size, e, cfg.num_experts_per_tok, cfg.swiglu_limit,
                weights, h, w, ids)


def oracle64(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w1, w1_scale, w3, w3_scale, w2, w2_scale, *,
             swiglu_limit: float, shared: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """fp64 routed (+ shared) SwiGLU-clamp experts on the dequantised MXFP4 weights (the oracle)."""
    x64 = x.double()

    def expert(a, e1, e3, e2):
        g, u = a @ e1.double().T, a @ e3.double().T
        return (torch.nn.functional.silu(g.clamp(max=swiglu_limit)) * u.clamp(-swiglu_limit, swiglu_limit)) @ e2.double().T

    y = torch.zeros_like(x64)
    for e in torch.unique(ids).tolist():
        rows, slots = torch.nonzero(ids == e, as_tuple=True)
        out = expert(x64[rows], dequant_fp4(w1[e], w1_scale[e], dtype=torch.float64),
                     dequant_fp4(w3[e], w3_scale[e], dtype=torch.float64),
                     dequant_fp4(w2[e], w2_scale[e], dtype=torch.float64))
        y.index_add_(0, rows, weights[rows, slots].double()[:, None] * out)
    if shared is not None:
        y = y + expert(x64, *shared)
    return y


def fp8_chain(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: Any, *,
              swiglu_limit: float) -> torch.Tensor:
    """The grouped path's recipe, unfused, expert by expert in torch (the "legacy chain" baseline for numerics):
    x -> e4m3 1x128 pow2; gate_up = bf16(deq(x) @ deq(w13)^T); h = SwiGLU-clamp -> e4m3 1x128 pow2;
    out = bf16(deq(h) @ deq(w2)^T); y = sum over slots (routed, then shared groups) of w * out in fp32 -> x.dtype.
    ``experts``: a ``grouped_moe.HopperExperts``."""
    x_q, x_sf = quant_fp8(x, 128, pow2=True)
    x32 = dequant_fp8(x_q, x_sf, 128)
    t = x.shape[0]
    shared = torch.arange(experts.n_routed, experts.n_groups, device=x.device).expand(t, experts.n_shared_groups)
    groups = torch.cat((ids.long(), shared), dim=1)
    slot_w = torch.cat((weights.float(), torch.ones(t, experts.n_shared_groups, device=x.device)), dim=1)
    out = torch.zeros((t, groups.shape[1], x.shape[1]), dtype=torch.float32, device=x.device)
    for g in torch.unique(groups).tolist():
        rows, slots = torch.nonzero(groups == g, as_tuple=True)
        gu = (x32[rows] @ dequant_fp8(experts.w13[g], experts.w13_sf[g], (128, 128)).T).to(torch.bfloat16).float()
        gate, up = gu.chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate.clamp(max=swiglu_limit)) * up.clamp(-swiglu_limit, swiglu_limit)
        h_q, h_sf = quant_fp8(h, 128, pow2=True)
        o = dequant_fp8(h_q, h_sf, 128) @ dequant_fp8(experts.w2[g], experts.w2_sf[g], (128, 128)).T
        out[rows, slots] = o.to(torch.bfloat16).float()
    y = torch.zeros((t, x.shape[1]), dtype=torch.float32, device=x.device)
    for j in range(groups.shape[1]):
        y.addcmul_(out[:, j], slot_w[:, j:j + 1])
    return y.to(x.dtype)


def modules_for(case: Case, kernel: str, *, n_redundant: int = 0, max_num_tokens: int | None = None,
                prepared: Any = None) -> tuple[MegaMoEExpertsBefore, MegaMoEExpertsAfter]:
    """A before and an after module over the same weights (separate, identical EPLB states). ``prepared``: experts
    already converted for the deep_gemm kernel (routed groups only), shared by both modules."""
    dev = case.weights[0].device
    mods = []
    for cls in (MegaMoEExpertsBefore, MegaMoEExpertsAfter):
        eplb = initial_eplb_state(case.n_experts, n_redundant, dev) if n_redundant else None
        mod = cls(case.weights, top_k=case.top_k, max_num_tokens=max_num_tokens or max(case.h.shape[0], 1),
                  kernel=kernel, eplb=eplb)
        mod.prepared = prepared
        mods.append(mod)
    return mods[0], mods[1]


def staged_x(case: Case) -> torch.Tensor:
    """What the kernel sees: the fp8-staged activations, dequantised (fp32)."""
    q, s = quant_fp8(case.h, 128, pow2=True)
    return dequant_fp8(q, s, 128)


# ---- records ----------------------------------------------------------------------------------------------
def _rec(**kw: Any) -> dict[str, Any]:
    from ..lab import results

    return results.record(EXPERIMENT, **kw)


def kernel_availability(kernel: str, device: str | torch.device) -> tuple[bool, str]:
    dev = torch.device(device)
    if kernel != "deep_gemm":
        return True, ""
    if dev.type != "cuda":
        return False, "the grouped DeepGEMM path needs a CUDA sm_90 GPU with deep_gemm"
    from ..kernels import registry

    return registry.availability("moe_experts", "deep_gemm")


def numerics_records(case: Case, kernel: str, *, n_redundant: int = 2) -> list[dict[str, Any]]:
    """Bitwise before == after (outputs and EPLB load counts); the after output vs the fp64 oracle, with the
    reference MoE on the same staged activations as the eager baseline."""
    from ..lab.numerics import compare

    mb, ma = modules_for(case, kernel, n_redundant=n_redundant)
    yb = before(mb, case.h, case.topk_w, case.topk_ids, case.swiglu_limit)
    ya = after(ma, case.h, case.topk_w, case.topk_ids, case.swiglu_limit)
    t = case.h.shape[0]
    common = dict(op=OP, backend=kernel, preset=case.preset, tokens=t, dtype="bfloat16", E_local=case.n_experts,
                  n_redundant=n_redundant, **case.extra)
    recs = [_rec(variant="after_vs_before", metric="bitwise_equal", unit="bool", value=bool(torch.equal(yb, ya)),
                 **common)]
    if n_redundant:
        recs.append(_rec(variant="after_vs_before", metric="eplb_load_equal", unit="bool",
                         value=bool(torch.equal(mb.eplb.expert_load_view, ma.eplb.expert_load_view)), **common))
    x32 = staged_x(case)
    ref = moe_fp4(x32, case.topk_w, case.topk_ids, *case.weights, swiglu_limit=case.swiglu_limit).to(torch.bfloat16)
    y64 = oracle64(x32, case.topk_w, case.topk_ids, *case.weights, swiglu_limit=case.swiglu_limit)
    c = compare(y64, ref, ya)
    recs += c.to_records(experiment=EXPERIMENT, variant="after", eager_variant="reference_moe_fp4",
                         oracle="fp64 on the staged fp8 activations", **common)
    return recs


def host_overhead_records(case: Case, kernel: str, device: str, n: int, rounds: int = 3, prepared: Any = None
                          ) -> tuple[list[dict], float]:
    """us/call of before and after (``rounds`` interleaved ``host_overhead`` measurements, median of each) and
    before - after; plus the delta per forward for Flash and Pro layer counts."""
    import statistics

    from ..lab import timing

    mb, ma = modules_for(case, kernel, n_redundant=0, prepared=prepared)
    args = (case.h, case.topk_w, case.topk_ids, case.swiglu_limit)
    us: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(rounds):
        us["before"].append(timing.host_overhead(lambda: before(mb, *args), n, repeats=3, device=device))
        us["after"].append(timing.host_overhead(lambda: after(ma, *args), n, repeats=3, device=device))
    common = dict(op=OP, backend=kernel, preset=case.preset, tokens=case.h.shape[0], dtype="bfloat16",
                  E_local=case.n_experts, n=n, rounds=rounds, device=str(device))
    med = {v: statistics.median(x) for v, x in us.items()}
    recs = [_rec(variant=v, metric="host_overhead", unit="us", value=med[v], samples=us[v], **common) for v in us]
    delta = med["before"] - med["after"]
    recs.append(_rec(variant="before_minus_after", metric="host_overhead_delta", unit="us", value=delta,
                     spread_before=max(us["before"]) - min(us["before"]),
                     spread_after=max(us["after"]) - min(us["after"]), **common))
    for preset, layers in MOE_LAYERS.items():
        recs.append(_rec(op="forward", backend=kernel, variant="before_minus_after", preset=preset,
                         tokens=case.h.shape[0], dtype="bfloat16", metric="host_overhead_per_forward", unit="us",
                         value=delta * layers, moe_layers=layers, device=str(device)))
    return recs, delta


def graph_replay_records(case: Case, device: str) -> list[dict[str, Any]]:
    """GPU time of one call captured in a CUDA graph (fixed-cost kernel: capturable), before vs after."""
    from ..lab import timing

    mb, ma = modules_for(case, "fixed", n_redundant=2)
    args = (case.h, case.topk_w, case.topk_ids, case.swiglu_limit)
    recs = []
    common = dict(op=OP, backend="fixed", preset=case.preset, tokens=case.h.shape[0], dtype="bfloat16",
                  E_local=case.n_experts)
    for variant, fn, mod in (("before", before, mb), ("after", after, ma)):
        t = timing.bench(lambda: fn(mod, *args), graph=True, device=device)
        recs.append(t.to_record(experiment=EXPERIMENT, variant=variant, **common))
    return recs


def unavailable_records(device: str, preset: str) -> list[dict[str, Any]]:
    """The GPU-only variants this device cannot run, each with the reason."""
    from ..kernels import registry

    recs = []
    ok, why = kernel_availability("deep_gemm", device)
    if not ok:
        recs.append(_rec(op=OP, backend="deep_gemm", variant="grouped_fp8", preset=preset, tokens=None,
                         dtype="bfloat16", metric="unavailable", unit=None, value=None, reason=why))
    ok, why = registry.availability("mega_moe", "deep_gemm")
    if not ok:
        recs.append(_rec(op="mega_moe", backend="deep_gemm", variant="fp8_fp4_mega_moe", preset=preset, tokens=None,
                         dtype="bfloat16", metric="unavailable", unit=None, value=None,
                         reason=f"{why} (fp8_fp4_mega_moe is SM100-only)"))
    recs.append(_rec(op="mega_moe", backend="deep_gemm", variant="fp8_mega_moe_sm90", preset=preset, tokens=None,
                     dtype="bfloat16", metric="unavailable", unit=None, value=None,
                     reason="Hopper fp8_mega_moe needs a symmetric-memory buffer over a process group; measured (or its "
                            "refusal recorded) by bench/pr44367_megamoe.py on one GPU, 2-GPU run in "
                            "bench/pr44367_megamoe_ep.py"))
    if torch.device(device).type != "cuda":
        recs.append(_rec(op=OP, backend="fixed", variant="before_vs_after", preset=preset, tokens=None,
                         dtype="bfloat16", metric="unavailable", unit=None, value=None,
                         reason="CUDA-graph replay timing needs a CUDA GPU"))
    return recs


def run(device: str = "cpu", quick: bool = True, preset: str = "flash") -> list[dict]:
    """Before vs after on this device. CPU: toy dimensions (the preset's experts cannot be instantiated on a
    2-core CPU; records say ``dims="toy"``), reference kernel, bitwise + oracle numerics, host overhead of the
    probe and the fixed-cost kernel. GPU: the preset's dimensions with 16 experts (quick) or all, the grouped
    DeepGEMM kernel where available, host overhead and CUDA-graph replay."""
    from ..lab import timing

    dev = str(timing.resolve_device(device))
    on_gpu = torch.device(dev).type == "cuda"
    recs = unavailable_records(dev, preset)
    dims = preset if on_gpu else "toy"
    e_local = (16 if quick else None) if on_gpu else None
    tokens = (1, 16) if quick else (1, 4, 16, 64)
    weights = make_weights(e_local or get_config(dims).n_routed_experts, get_config(dims).hidden_size,
                           get_config(dims).moe_intermediate_size, device=dev)
    kernels = ["reference"] + (["deep_gemm"] if kernel_availability("deep_gemm", dev)[0] else [])
    for t in tokens:
        case = make_case(dims, t, device=dev, seed=t, n_experts=e_local, weights=weights)
        case.extra = {"dims": dims, "requested_preset": preset}
        case.preset = preset
        for kernel in kernels:
            try:
                recs += numerics_records(case, kernel)
            except Exception as e:  # one failing kernel must not hide the others
                recs.append(_rec(op=OP, backend=kernel, variant="after_vs_before", preset=preset, tokens=t,
                                 dtype="bfloat16", metric="error", unit=None, value=None,
                                 message=f"{type(e).__name__}: {e}"[:2000]))
    case1 = make_case(dims, 1, device=dev, seed=99, n_experts=e_local, weights=weights)
    case1.preset, case1.extra = preset, {"dims": dims}
    for kernel, n in (("probe", 5000 if quick else 100000), ("fixed", 300 if quick else 5000)) + \
            ((("deep_gemm", 50 if quick else 500),) if "deep_gemm" in kernels else ()):
        try:
            recs += host_overhead_records(case1, kernel, dev, n)[0]
        except Exception as e:
            recs.append(_rec(op=OP, backend=kernel, variant="host_overhead", preset=preset, tokens=1,
                             dtype="bfloat16", metric="error", unit=None, value=None,
                             message=f"{type(e).__name__}: {e}"[:2000]))
    if on_gpu:
        try:
            recs += graph_replay_records(case1, dev)
        except Exception as e:
            recs.append(_rec(op=OP, backend="fixed", variant="graph_replay", preset=preset, tokens=1,
                             dtype="bfloat16", metric="error", unit=None, value=None,
                             message=f"{type(e).__name__}: {e}"[:2000]))
    return recs
