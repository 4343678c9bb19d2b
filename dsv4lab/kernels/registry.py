"""One registry of ops -> backends, with availability flags and a reason when a backend cannot run here.

Every backend of an op takes the same arguments as the op's reference and returns the same outputs, so the
CLI, the notebooks and the widgets can swap them freely. Implementations are imported lazily (TileLang and
DeepGEMM import slowly or not at all on a CPU machine); a backend that fails to import is reported as
unavailable with the import error, never raised at ``import dsv4lab``.

Adding an op: append one ``_reg(...)`` line per backend to the table at the bottom of this file.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable

BACKENDS = ("reference", "torch", "triton", "tilelang", "deep_gemm", "cuda")


class BackendUnavailable(RuntimeError):
    """Raised by ``get`` when a backend cannot run on this machine; the message says why."""


@dataclass(frozen=True)
class Backend:
    op: str
    name: str
    target: str                      # "module:function", imported on first use
    requires: tuple[str, ...] = ()   # capabilities, see ``capability``
    doc: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return self.op, self.name


_TABLE: dict[str, dict[str, Backend]] = {}


def register(op: str, name: str, target: str, requires: tuple[str, ...] = (), doc: str = "") -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"name: expected one of {BACKENDS}, got {name!r}")
    if ":" not in target:
        raise ValueError(f"target: expected 'module:function', got {target!r}")
    b = Backend(op, name, target, tuple(requires), doc)
    _TABLE.setdefault(op, {})[name] = b
    return b


# ---- capabilities ---------------------------------------------------------------------------------
def _have_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def capability(cap: str) -> tuple[bool, str]:
    """(ok, reason-if-not) for one capability name."""
    import torch

    if cap == "cuda":
        ok = torch.cuda.is_available()
        return ok, "" if ok else "no CUDA GPU visible to torch"
    if cap == "sm90":
        if not torch.cuda.is_available():
            return False, "no CUDA GPU visible to torch"
        major, minor = torch.cuda.get_device_capability()
        return (major, minor) >= (9, 0), "" if major >= 9 else f"needs compute capability >= 9.0, this GPU is {major}.{minor}"
    if cap == "sm100":
        if not torch.cuda.is_available():
            return False, "no CUDA GPU visible to torch"
        major, _ = torch.cuda.get_device_capability()
        return major >= 10, "" if major >= 10 else f"needs an SM100 (Blackwell) GPU, this one is sm_{major}x"
    if cap == "triton":
        if not _have_module("triton"):
            return False, "triton is not installed (pip install 'dsv4lab[triton]')"
        if torch.cuda.is_available():
            return True, ""
        importlib.import_module("dsv4lab.kernels.triton")  # chooses the interpreter when there is no GPU
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, "note: Triton interpreter on the CPU (correctness only, not speed)"
        return False, "no GPU and TRITON_INTERPRET is not 1"
    if cap in ("tilelang", "deep_gemm", "tile_kernels"):
        if not _have_module(cap):
            return False, f"{cap} is not installed (GPU extra / .gpu bundle)"
        return True, ""
    if cap == "nvcc":
        ok = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
        return ok, "" if ok else "nvcc not found (needed to build the CUDA extension)"
    raise ValueError(f"cap: unknown capability {cap!r}")


def availability(op: str, name: str) -> tuple[bool, str]:
    """Whether backend ``name`` of ``op`` can run here, and why not."""
    b = _lookup(op, name)
    notes = []
    for cap in b.requires:
        ok, why = capability(cap)
        if not ok:
            return False, why
        if why:
            notes.append(why)
    try:
        _load(b.target)
    except Exception as e:  # an import failure must not take the caller down
        return False, f"import of {b.target} failed: {type(e).__name__}: {e}"
    return True, "; ".join(notes)


@functools.lru_cache(maxsize=None)
def _load(target: str) -> Callable[..., Any]:
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)


def _lookup(op: str, name: str) -> Backend:
    if op not in _TABLE:
        raise ValueError(f"op: unknown op {op!r}; known: {sorted(_TABLE)}")
    if name not in _TABLE[op]:
        raise ValueError(f"backend: op {op!r} has no backend {name!r}; it has {sorted(_TABLE[op])}")
    return _TABLE[op][name]


def get(op: str, name: str = "reference") -> Callable[..., Any]:
    """The callable of backend ``name`` of ``op``; raises ``BackendUnavailable`` (with the reason) if it can't run."""
    ok, why = availability(op, name)
    if not ok:
        raise BackendUnavailable(f"{op}/{name} unavailable: {why}")
    return _load(_lookup(op, name).target)


def ops() -> list[str]:
    return sorted(_TABLE)


def backends(op: str) -> list[str]:
    if op not in _TABLE:
        raise ValueError(f"op: unknown op {op!r}; known: {sorted(_TABLE)}")
    return [n for n in BACKENDS if n in _TABLE[op]]


def available_backends(op: str) -> list[str]:
    return [n for n in backends(op) if availability(op, n)[0]]


# ---- preferred backends of the layer modules --------------------------------------------------------
# op -> fused backends, fastest measured first. The layer modules (``layers._ops``, prefill forward) asked for any
# of them run the first one available here; decode paths and benchmarks ask ``get`` for one backend explicitly.
# sparse_attention: the TileLang ws kernel beat the Triton kernel on the H100 (commit 42be99d, Flash, T = 8192,
# whole op): CSA 1848 vs 2499 us, HCA 1025 vs 1055 us (window layers not measured with TileLang).
PREFERENCE: dict[str, tuple[str, ...]] = {"sparse_attention": ("tilelang", "triton")}


def pick(op: str, requested: str) -> tuple[str, str]:
    """``(backend, why)``: ``requested`` itself, unless it is one of ``PREFERENCE[op]``; then the first of those
    available here (``requested`` if none is: ``get`` then raises with its reason)."""
    order = PREFERENCE.get(op, ())
    if requested not in order:
        return requested, "requested"
    for name in order:
        ok, why = availability(op, name)
        if ok:
            return name, "requested" if name == requested else f"preferred over {requested} (registry.PREFERENCE)"
    return requested, "requested"


def matrix() -> list[dict[str, Any]]:
    """One row per (op, backend): availability, reason and rank in ``PREFERENCE`` (1 = first; "" = not ranked).
    The ``dsv4lab env`` table."""
    rows = []
    for op in ops():
        order = PREFERENCE.get(op, ())
        for name in backends(op):
            ok, why = availability(op, name)
            rows.append({"op": op, "backend": name, "available": ok, "reason": why,
                         "preference": order.index(name) + 1 if name in order else "",
                         "target": _TABLE[op][name].target, "doc": _TABLE[op][name].doc})
    return rows


# ---- the table ------------------------------------------------------------------------------------
_R = "dsv4lab.kernels.reference"
_reg = register
_reg("compressor", "reference", f"{_R}.compressor:compress", doc="KV compressor: gated pooling of r-token blocks, RMSNorm, RoPE, fp8 nope (3.4)")
_reg("indexer_topk", "reference", f"{_R}.indexer:indexer_topk", doc="lightning indexer logits + top-k of ratio-4 entries (3.5)")
_reg("sparse_attention", "reference", f"{_R}.attention:sparse_attention_with_sink", doc="MQA over index lists with a per-head sink (3.6)")
_reg("attention_output", "reference", f"{_R}.attention:attention_output", doc="inverse RoPE + grouped low-rank wo_a, wo_b, bf16 (3.7)")
_reg("attention_prefill", "reference", f"{_R}.attention:attention_prefill", doc="DSv4 attention prefill: window / CSA / HCA (3.8)")
_reg("inv_rope_fp8_quant", "reference", f"{_R}.attn_out:inv_rope_fp8_quant", doc="inverse RoPE + 1x128 fp8 e4m3 quant, pow2 fp32 scales, amax floor 1e-10 (3.7)")
_reg("inv_rope_fp8_quant", "triton", "dsv4lab.kernels.triton.inv_rope_fp8_quant:inv_rope_fp8_quant", requires=("triton",), doc="fused inverse RoPE + fp8 quant, bitwise equal to the reference")
_reg("fp8_einsum_wo_a", "reference", f"{_R}.attn_out:fp8_einsum_wo_a", doc="'bhr,hdr->bhd' of fp8 operands (1x128 / 128x128 fp32 scales), dequantised fp32 einsum -> bf16")
_reg("fp8_einsum_wo_a", "deep_gemm", "dsv4lab.kernels.deep_gemm.fp8_einsum:fp8_einsum_wo_a", requires=("cuda", "sm90", "deep_gemm"), doc="DeepGEMM fp8_einsum, recipe (1,128,128), SM90 fp32 scales")
_reg("mtp_input_rmsnorm", "triton", "dsv4lab.kernels.triton.mtp_norm:fused_mtp_input_rmsnorm", requires=("triton",), doc="#43746: position-0 mask + enorm + hc_mult hnorms, one launch, grid (T, hc_mult+1); two_rounding=True gives vLLM's eager rounding")
_reg("mtp_shared_head_rmsnorm", "triton", "dsv4lab.kernels.triton.mtp_norm:mtp_shared_head_rmsnorm", requires=("triton",), doc="#43746: MTP shared-head RMSNorm, grid (T,)")
_reg("rmsnorm", "reference", f"{_R}.norms:rmsnorm", doc="RMSNorm, fp32 math, one rounding")
_reg("mhc_pre", "reference", f"{_R}.mhc:mhc_pre", doc="mHC pre: mix GEMM * rho, sigmoid/Sinkhorn mixes, collapse, fused RMSNorm (2.2-2.4)")
_reg("mhc_post", "reference", f"{_R}.mhc:mhc_post", doc="mHC post: post*f + comb^T R, one rounding (2.5)")
_reg("mhc_fused_post_pre", "reference", f"{_R}.mhc:mhc_fused_post_pre", doc="mhc_post then mhc_pre on the rounded residual (2.6)")
_reg("hc_head", "reference", f"{_R}.mhc:hc_head", doc="final collapse of the n streams before the LM head (2.7)")
_reg("moe_router_logits", "reference", f"{_R}.moe:router_logits", doc="gate GEMM, bf16 in, fp32 out (4.1)")
_reg("moe_routing", "reference", f"{_R}.moe:route", doc="sqrt-softplus scores, bias top-k or tid2eid hash, renormalise, scale (4.1)")
_reg("moe_experts", "reference", f"{_R}.moe:moe_fp4", doc="MXFP4 routed SwiGLU-clamp experts + shared expert, fp32 combine (4.2)")
_reg("mtp_input_rmsnorm", "reference", f"{_R}.mtp:mtp_input_rmsnorm", doc="MTP: position-0 mask + enorm + per-stream hnorm (5)")
_reg("mtp_shared_head_rmsnorm", "reference", f"{_R}.mtp:mtp_shared_head_rmsnorm", doc="MTP shared-head RMSNorm (5)")
_reg("router_gemm", "reference", f"{_R}.router_gemm:router_gemm", doc="bf16 x bf16 -> fp32 GEMM (router, compressor, indexer compressor) as an fp32 upcast mm, TF32 off")
_reg("router_gemm", "torch", "dsv4lab.kernels.torch.mm_fp32:router_gemm_torch", requires=("cuda",), doc="#41300 after: torch.mm(x, w.T, out_dtype=torch.float32)")
_reg("router_gemm", "cuda", "dsv4lab.kernels.cuda.cublas_gemm:router_gemm_cublas", requires=("cuda", "nvcc"), doc="#41300 before: cublasGemmEx bf16 x bf16 -> fp32 (COMPUTE_32F, DEFAULT_TENSOR_OP) as a torch op, built at first use")
_TL = "dsv4lab.kernels.tilelang"
_TL_REQ = ("cuda", "sm90", "tilelang")
_reg("mhc_pre", "tilelang", f"{_TL}.mhc_pre:mhc_pre", requires=_TL_REQ, doc="split-K prenorm GEMM (bf16x3 wgmma = fp32 accuracy) + epilogue: Sinkhorn, collapse, RMSNorm")
_reg("mhc_post", "tilelang", f"{_TL}.mhc_post:mhc_post", requires=_TL_REQ, doc="streaming post*f + comb^T R, one pass")
_reg("mhc_fused_post_pre", "tilelang", f"{_TL}.mhc_fused_post_pre:mhc_fused_post_pre", requires=_TL_REQ, doc="post in the prenorm GEMM's prologue (writes R'), then the mhc_pre epilogue")
_reg("hc_head", "tilelang", f"{_TL}.hc_head:hc_head", requires=_TL_REQ, doc="split-K prenorm GEMM (4 mixes) + sigmoid-weighted collapse; returns out")
_reg("moe_routing", "triton", "dsv4lab.kernels.triton.moe_routing:route", requires=("triton",), doc="one program per token: sqrt-softplus, bias top-k by k argmax rounds (ties -> lower id) or tid2eid hash, renormalise, scale")
_reg("moe_experts", "deep_gemm", "dsv4lab.kernels.deep_gemm.grouped_moe:moe_experts", requires=("cuda", "sm90", "deep_gemm"), doc="Hopper: MXFP4 experts converted once to 128x128 e4m3, tokens permuted into aligned per-expert groups, 2x m_grouped_fp8_gemm_nt_contiguous + Triton SwiGLU-quant, shared expert as extra groups, fp32 weighted combine")
_reg("mega_moe", "reference", f"{_R}.moe:moe_fp4", doc="what MegaMoE computes: routed MXFP4 SwiGLU-clamp experts (+ shared), fp32 combine (4.4)")
_reg("mega_moe", "deep_gemm", "dsv4lab.kernels.deep_gemm.mega_moe:mega_moe", requires=("cuda", "sm100", "deep_gemm"), doc="fp8_fp4_mega_moe on one rank (dispatch + L1 + SwiGLU + L2 + combine in one kernel), shared expert added in fp32; SM100 only, unverified here")
_reg("sparse_attention", "triton", "dsv4lab.kernels.triton.sparse_attention:sparse_attention_with_sink", requires=("triton",), doc="program per (token, head tile): gathered K rows reused across heads, tl.dot QK^T and PV, online softmax with the sink in the normaliser; split lists + combine for decode")
_reg("sparse_attention", "torch", "dsv4lab.kernels.torch.flex_attention:sparse_attention_flex", doc="peer: torch FlexAttention with a dense [T, N] mask built from idx (duplicates count once), sink via LSE")
_reg("compressor", "triton", "dsv4lab.kernels.triton.compressor:compress", requires=("triton",), doc="projections as fp32-out torch GEMMs, then one kernel: per-lane online softmax pooling over (entry, channel slice) programs, the last slice finishes the row (RMSNorm, RoPE at i*r, fp8 nope round trip)")
_reg("indexer_q_rope_quant", "reference", f"{_R}.indexer_q:indexer_q_rope_quant", doc="indexer Q RoPE, bf16 round, fp8 e4m3 with a pow2 scale per (token, head) folded into the head weights (3.5)")
_reg("indexer_q_rope_quant", "triton", "dsv4lab.kernels.triton.indexer_q:indexer_q_rope_quant", requires=("triton",), doc="one program per block of head rows, per-token cos/sin rows, no host sync; bitwise equal to the reference")
_reg("indexer_topk", "deep_gemm", "dsv4lab.kernels.deep_gemm.indexer:indexer_topk", requires=("cuda", "sm90", "deep_gemm"), doc="Triton compressor (kI) + Triton Q quant, DeepGEMM fp8_mqa_logits with causal [ks, ke), torch.topk")
_reg("sparse_attention", "tilelang", f"{_TL}.sparse_attention:sparse_attention_with_sink", requires=("tilelang", "sm90"), doc="Hopper: CTA per (token, 64 heads), K rows gathered by zero-filling cp.async (2-stage pipeline), wgmma QK^T and PV split over 2 warpgroups (256 output dims each), log2 online softmax with the sink; design ws (warp-specialised) by default; first in PREFERENCE (layers' prefill)")
