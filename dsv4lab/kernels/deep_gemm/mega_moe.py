"""DeepGEMM MegaMoE: the SM100 ``fp8_fp4_mega_moe`` path (gated) and the Hopper ``fp8_mega_moe`` attempt.

MegaMoE fuses, in one persistent kernel (dsv4-layers.md 4.4): EP dispatch over NVLink, linear 1, SwiGLU with
the clamp, linear 2 and the EP combine; the output y is bf16 [T, D] of the ROUTED experts (vLLM adds the shared
expert separately). Inputs are staged in a symmetric-memory buffer (``buf.x``, ``buf.x_sf``, ``buf.topk_idx``,
``buf.topk_weights``) built over a torch.distributed process group.

- ``MegaMoESM100``: ``fp8_fp4_mega_moe`` (FP8 activations with 1x32 UE8M0 scales x FP4 weights), the path vLLM
  uses for DSv4. It needs compute capability 10.x; ``require_sm100`` raises ``MegaMoEUnavailable`` with the
  reason BEFORE DeepGEMM is touched. Weight preparation follows the facts in dsv4-layers.md 4.4
  (UE8M0 bytes -> fp32 ``byte << 23``, ``transform_sf_into_required_layout(..., (1, 32))``,
  ``transform_weights_for_mega_moe``). Not run on hardware here (no SM100 available): unverified.
- ``MegaMoESM90``: ``fp8_mega_moe`` (FP8 x FP8, 128x128 fp32 weight scales, 1x128 fp32 activation scales,
  D a multiple of 256), over a symmetric buffer from ``get_symm_buffer_for_sm90_mega_moe``. Designed for several
  GPUs; ``single_rank_group`` builds a world-size-1 group in-process so one H100 can try it. If the library
  refuses that configuration, callers record the exact error (bench/pr44367_megamoe.py).

Both take routed experts only; the ``mega_moe`` registry backend adds the shared expert in fp32 like vLLM.
"""
from __future__ import annotations

import os
import socket

import torch

from ..reference import _checks as chk
from ..reference.moe import Weights3, _check_routing, _check_shared, swiglu_expert
from .grouped_moe import HopperExperts

MULTICAST_OFF_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
SM100_RECIPE = (1, 1, 32)
SM90_RECIPE = (128, 128, 128)


class MegaMoEUnavailable(RuntimeError):
    """This MegaMoE variant cannot run here; the message says why."""


def _deep_gemm():
    import deep_gemm  # lazy: a CUDA-only extension

    return deep_gemm


def require_sm100() -> None:
    """Raise ``MegaMoEUnavailable`` unless a compute-capability-10.x GPU is visible."""
    if not torch.cuda.is_available():
        raise MegaMoEUnavailable("fp8_fp4_mega_moe needs an SM100 (Blackwell) GPU; no CUDA GPU is visible")
    major, minor = torch.cuda.get_device_capability()
    if major != 10:
        raise MegaMoEUnavailable(
            f"fp8_fp4_mega_moe needs an SM100 (Blackwell, compute capability 10.x) GPU; this one is sm_{major}{minor}. "
            "On Hopper use deep_gemm.fp8_mega_moe (FP8 x FP8, multi-GPU symmetric memory) or the grouped-GEMM path "
            "(dsv4lab.kernels.deep_gemm.grouped_moe)")


def require_sm90() -> None:
    if not torch.cuda.is_available():
        raise MegaMoEUnavailable("fp8_mega_moe needs an SM90 (Hopper) GPU; no CUDA GPU is visible")
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        raise MegaMoEUnavailable(f"fp8_mega_moe is the SM90 (Hopper) variant; this GPU is sm_{major}{minor}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_rank_group(backend: str = "nccl"):
    """A world-size-1 process group initialised in this process (multicast/NVLS off, set BEFORE init).

    Returns the default group; reuses it when torch.distributed is already initialised."""
    import torch.distributed as dist

    for key, value in MULTICAST_OFF_ENV.items():
        os.environ[key] = value
    if not dist.is_initialized():
        kw = {"device_id": torch.device("cuda", torch.cuda.current_device())} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, **kw)
    group = dist.group.WORLD
    try:  # older torch needs this before rendezvous; newer versions deprecate it
        from torch.distributed import _symmetric_memory as symm_mem

        if hasattr(symm_mem, "enable_symm_mem_for_group") and not symm_mem.is_symm_mem_enabled_for_group(group.group_name):
            symm_mem.enable_symm_mem_for_group(group.group_name)
    except Exception:  # noqa: BLE001 -- optional; the rendezvous reports the real problem
        pass
    return group


def _check_staging(x_q: torch.Tensor, x_sf: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                   hidden: int, max_tokens: int, sf_cols: int) -> int:
    chk.tensor("x_q", x_q, (torch.float8_e4m3fn,), dim=2)
    t = x_q.shape[0]
    if x_q.shape[1] != hidden:
        raise ValueError(f"x_q: expected [T, {hidden}], got {tuple(x_q.shape)}")
    if t > max_tokens:
        raise ValueError(f"x_q: T={t} exceeds the buffer's max_num_tokens={max_tokens}")
    chk.tensor("x_sf", x_sf, None, dim=2)
    chk.shape("x_sf", x_sf, (t, sf_cols))
    chk.tensor("weights", weights, (torch.float32,), dim=2)
    chk.tensor("ids", ids, chk.INT_DTYPES, dim=2)
    chk.shape("ids", ids, tuple(weights.shape))
    if weights.shape[0] != t:
        raise ValueError(f"weights: expected {t} rows (one per token), got {weights.shape[0]}")
    return t


# ---- Hopper: fp8_mega_moe -------------------------------------------------------------------------------
class MegaMoESM90:
    """``deep_gemm.fp8_mega_moe`` over a symmetric buffer. ``experts``: THIS rank's experts in the grouped-GEMM
    format (its routed groups are used: w13 [E_rank, 2I, D] + fp32 [E_rank, 2I/128, D/128], w2 [E_rank, D, I] +
    [E_rank, D/128, I/128]); rank r owns global experts r * E_rank .. (r + 1) * E_rank - 1."""

    def __init__(self, experts: HopperExperts, group, *, max_num_tokens: int, top_k: int, swiglu_limit: float):
        require_sm90()
        if experts.hidden % 256 or experts.inter % 128:
            raise ValueError(f"experts: fp8_mega_moe needs D % 256 == 0 and I % 128 == 0, got D={experts.hidden}, "
                             f"I={experts.inter}")
        self.hidden, self.inter = experts.hidden, experts.inter
        self.n_experts = experts.n_routed * group.size()          # global expert count
        self.max_num_tokens = chk.positive_int("max_num_tokens", max_num_tokens)
        self.top_k = chk.positive_int("top_k", top_k)
        self.swiglu_limit = chk.positive_float("swiglu_limit", swiglu_limit)
        self.group = group
        dg = _deep_gemm()
        e = experts.n_routed
        self.l1, self.l2 = dg.transform_weights_for_mega_moe_sm90(
            (experts.w13[:e].contiguous(), experts.w13_sf[:e].contiguous()),
            (experts.w2[:e].contiguous(), experts.w2_sf[:e].contiguous()))
        self.buffer = dg.get_symm_buffer_for_sm90_mega_moe(group, self.n_experts, max_num_tokens, top_k, self.hidden,
                                                           self.inter)

    def __call__(self, x_q: torch.Tensor, x_sf: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                 fast_math: bool = True) -> torch.Tensor:
        """x_q e4m3 [T, D], x_sf fp32 [T, D/128], weights fp32 [T, k], ids int [T, k] (global expert ids)."""
        t = _check_staging(x_q, x_sf, weights, ids, self.hidden, self.max_num_tokens, self.hidden // 128)
        buf = self.buffer
        buf.x[:t].copy_(x_q)
        buf.x_sf[:t].copy_(x_sf)
        buf.topk_idx[:t].copy_(ids)
        buf.topk_weights[:t].copy_(weights)
        y = torch.empty((t, self.hidden), dtype=torch.bfloat16, device=x_q.device)
        _deep_gemm().fp8_mega_moe(y, self.l1, self.l2, buf, recipe=SM90_RECIPE, activation="swiglu",
                                  activation_clamp=self.swiglu_limit, fast_math=fast_math)
        return y

    def destroy(self) -> None:
        self.buffer.destroy()


# ---- Blackwell: fp8_fp4_mega_moe ------------------------------------------------------------------------
def ue8m0_bytes_to_fp32(scale: torch.Tensor) -> torch.Tensor:
    """UE8M0 bytes -> fp32 2^(b-127) by placing the byte in the fp32 exponent field (``b << 23``)."""
    return (scale.to(torch.int32) << 23).view(torch.float32)


class MegaMoESM100:
    """``deep_gemm.fp8_fp4_mega_moe`` on MXFP4 experts in the checkpoint layout (w13 = [w1; w3] rows)."""

    def __init__(self, w1, w1_scale, w3, w3_scale, w2, w2_scale, group, *, max_num_tokens: int, top_k: int,
                 swiglu_limit: float):
        require_sm100()
        self.n_experts, self.inter, half_d = w1.shape
        self.hidden = 2 * half_d
        self.max_num_tokens = chk.positive_int("max_num_tokens", max_num_tokens)
        self.top_k = chk.positive_int("top_k", top_k)
        self.swiglu_limit = chk.positive_float("swiglu_limit", swiglu_limit)
        self.group = group
        self._raw = (torch.cat((w1, w3), dim=1), torch.cat((w1_scale, w3_scale), dim=1), w2, w2_scale)
        self.l1 = self.l2 = None
        self.buffer = _deep_gemm().get_symm_buffer_for_mega_moe(group, self.n_experts, max_num_tokens, top_k,
                                                               self.hidden, self.inter)

    def finalize_weights(self) -> None:
        """Once: fp32 scales in DeepGEMM's 1x32 layout, gate/up interleave for the fused SwiGLU epilogue."""
        if self.l1 is not None:
            return
        dg = _deep_gemm()
        w13, s13, w2, s2 = self._raw
        e = self.n_experts
        sf13 = dg.transform_sf_into_required_layout(ue8m0_bytes_to_fp32(s13), 2 * self.inter, self.hidden, (1, 32), e)
        sf2 = dg.transform_sf_into_required_layout(ue8m0_bytes_to_fp32(s2), self.hidden, self.inter, (1, 32), e)
        self.l1, self.l2 = dg.transform_weights_for_mega_moe((w13.view(torch.int8), sf13), (w2.view(torch.int8), sf2))
        self._raw = None

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, fast_math: bool = True) -> torch.Tensor:
        """x bf16 [T, D] -> routed-expert output bf16 [T, D]; DeepGEMM's pre-dispatch kernel stages x as fp8 with
        1x32 UE8M0 scales in the symmetric buffer."""
        chk.tensor("x", x, (torch.bfloat16,), dim=2)
        _check_routing(x, weights, ids, self.n_experts)
        t = x.shape[0]
        if t > self.max_num_tokens:
            raise ValueError(f"x: T={t} exceeds max_num_tokens={self.max_num_tokens}")
        self.finalize_weights()
        dg, buf = _deep_gemm(), self.buffer
        dg.mega_moe_pre_dispatch(x, ids.long(), weights, buf.x, buf.x_sf, buf.topk_idx, buf.topk_weights, t, 32)
        y = torch.empty_like(x)
        dg.fp8_fp4_mega_moe(y, self.l1, self.l2, buf, recipe=SM100_RECIPE, activation="swiglu",
                            activation_clamp=self.swiglu_limit, fast_math=fast_math)
        return y


_SM100_CACHE: dict[tuple, MegaMoESM100] = {}


def mega_moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
             w1: torch.Tensor, w1_scale: torch.Tensor, w3: torch.Tensor, w3_scale: torch.Tensor,
             w2: torch.Tensor, w2_scale: torch.Tensor, *, swiglu_limit: float,
             shared: Weights3 | None = None) -> torch.Tensor:
    """Registry backend ``mega_moe/deep_gemm`` (``moe_fp4``'s arguments): SM100 only, one rank. Routed experts
    through ``fp8_fp4_mega_moe``; the shared expert (if any) in fp32 and added before the bf16 rounding."""
    chk.tensor("x", x, (torch.bfloat16,), dim=2)
    _check_routing(x, weights, ids, w1.shape[0])
    _check_shared(shared, x.shape[1])
    if x.device.type != "cuda":   # the argument's fault, before the machine's (require_sm100)
        raise ValueError(f"x: the mega_moe backend needs CUDA tensors, got device {x.device}")
    require_sm100()
    key = tuple((t.data_ptr(), t._version) for t in (w1, w1_scale, w3, w3_scale, w2, w2_scale)) + (ids.shape[1],)
    if key not in _SM100_CACHE:
        _SM100_CACHE.clear()
        _SM100_CACHE[key] = MegaMoESM100(w1, w1_scale, w3, w3_scale, w2, w2_scale, single_rank_group(),
                                         max_num_tokens=max(x.shape[0], 1024), top_k=ids.shape[1],
                                         swiglu_limit=swiglu_limit)
    mod = _SM100_CACHE[key]
    if x.shape[0] > mod.max_num_tokens:
        raise ValueError(f"x: T={x.shape[0]} exceeds the cached buffer's max_num_tokens={mod.max_num_tokens}")
    y = mod(x, weights, ids)
    if shared is None:
        return y
    return (y.float() + swiglu_expert(x, *shared, swiglu_limit)).to(x.dtype)
