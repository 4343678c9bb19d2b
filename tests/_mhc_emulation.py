"""Torch emulations of the TileLang mHC kernels, called exactly like the compiled kernels.

Used to exercise the launchers (split counts, views, argument order, output allocation, T = 0) and the GPU
bench's plumbing on a CPU: ``install(setattr)`` swaps every ``*_kernel`` builder for an ``Emulated`` wrapper of
the kernel's prim_func (still built by TileLang, so its declared signature is the one checked) and a torch
function doing the kernel's job in fp32. Not a reference: the references live in dsv4lab/kernels/reference.
"""
import torch

from dsv4lab.kernels.tilelang import _mhc_common as common
from dsv4lab.kernels.tilelang import hc_head as tl_head
from dsv4lab.kernels.tilelang import mhc_fused_post_pre as tl_fused
from dsv4lab.kernels.tilelang import mhc_post as tl_post
from dsv4lab.kernels.tilelang import mhc_pre as tl_pre


class Emulated:
    """A compiled kernel's stand-in: checks the arguments against ``func``'s buffers, then runs ``semantic``."""

    def __init__(self, func, semantic):
        self.func, self.semantic = func, semantic

    def __call__(self, *args):
        params = list(self.func.params)
        assert len(args) == len(params), f"{self.func}: {len(args)} args for {len(params)} params"
        bound = {}
        for p, a in zip(params, args):
            buf = self.func.buffer_map.get(p)
            if buf is None:           # a scalar parameter
                assert isinstance(a, int) and not isinstance(a, bool), f"{p.name}: expected an int, got {a!r}"
                continue
            assert isinstance(a, torch.Tensor), f"{buf.name}: expected a tensor"
            assert str(a.dtype).removeprefix("torch.") == str(buf.dtype), f"{buf.name}: dtype {a.dtype} vs {buf.dtype}"
            assert a.dim() == len(buf.shape) and a.is_contiguous(), f"{buf.name}: shape {tuple(a.shape)}"
            for dim, want in zip(a.shape, buf.shape):
                if hasattr(want, "value"):
                    assert dim == int(want.value), f"{buf.name}: shape {tuple(a.shape)} vs {list(buf.shape)}"
                else:
                    assert bound.setdefault(want.name, dim) == dim, f"{buf.name}: {want.name} = {dim} vs {bound}"
        self.semantic(*args)


def split_ranges(total: int, splits: int):
    assert total % splits == 0, (total, splits)
    step = total // splits
    return [slice(s * step, (s + 1) * step) for s in range(splits)]


def emu_gemm(x, fn, mix_part, sq_part):
    for s, ks in enumerate(split_ranges(x.shape[1], mix_part.shape[0])):
        xs = x[:, ks].float()
        mix_part[s] = xs @ fn[:, ks].T
        sq_part[s] = xs.pow(2).sum(-1)


def emu_fused_gemm(f, residual, post, comb, fn3, new_residual, mix_part, sq_part):
    from dsv4lab.kernels.reference import mhc as ref

    new_residual.copy_(ref.mhc_post(f, residual, post, comb))
    for s, ds in enumerate(split_ranges(residual.shape[2], mix_part.shape[0])):
        xs = new_residual[:, :, ds].float().flatten(1)
        mix_part[s] = xs @ fn3[:, :, ds].flatten(1).T
        sq_part[s] = xs.pow(2).sum(-1)


def emu_pre_epilogue(norm_dtype, rms_eps, hc_eps, post_mult, iters):
    from dsv4lab.kernels.reference import mhc as ref
    from dsv4lab.kernels.reference.norms import rmsnorm

    def run(mix_part, sq_part, residual, scale, base, norm_weight, layer_input, post, comb, tokens_per_block):
        assert 1 <= tokens_per_block <= tl_pre.MAX_TOKENS_PER_BLOCK
        t, n, d = residual.shape
        m = mix_part.sum(0) * torch.rsqrt(sq_part.sum(0) / (n * d) + rms_eps).unsqueeze(-1)
        pre = torch.sigmoid(m[:, :n] * scale[0] + base[:n]) + hc_eps
        post.copy_(torch.sigmoid(m[:, n:2 * n] * scale[1] + base[n:2 * n]) * post_mult)
        comb.copy_(ref.sinkhorn((m[:, 2 * n:] * scale[2] + base[2 * n:]).view(t, n, n), iters, hc_eps))
        y = (pre.unsqueeze(-1) * residual.float()).sum(1).to(torch.bfloat16)
        layer_input.copy_(y if norm_dtype is None else rmsnorm(y, norm_weight, rms_eps))
    return run


def emu_head_epilogue(rms_eps, hc_eps):
    def run(mix_part, sq_part, residual, scale, base, out, tokens_per_block):
        t, n, d = residual.shape
        m = mix_part.sum(0) * torch.rsqrt(sq_part.sum(0) / (n * d) + rms_eps).unsqueeze(-1)
        pre = torch.sigmoid(m * scale[0] + base) + hc_eps
        out.copy_((pre.unsqueeze(-1) * residual.float()).sum(1).to(torch.bfloat16))
    return run


def emu_post(f, residual, post, comb, out):
    from dsv4lab.kernels.reference import mhc as ref

    out.copy_(ref.mhc_post(f, residual, post, comb))



def layout_without_device(**tensors):
    """``check_cuda_layout`` minus the CUDA requirement."""
    for name, x in tensors.items():
        assert x is None or (x.is_contiguous() and x.data_ptr() % common.ALIGN_BYTES == 0), name
    return next(t for t in tensors.values() if t is not None).device


def install(setattr_) -> None:
    """Swap the kernel builders (and the CUDA-only helpers) for emulations, with ``setattr_(obj, name, value)``
    (pytest's ``monkeypatch.setattr``, or ``setattr`` for a whole process)."""
    setattr_(common, "check_cuda_layout", layout_without_device)
    setattr_(common, "sm_count", lambda index: 132)
    def gemm(nd, n_mix, arch, block_tokens=64, stages=tl_pre.GEMM_STAGES):   # the prim_func of the requested tile
        return Emulated(tl_pre.prenorm_gemm_func(nd, n_mix, block_tokens, stages), emu_gemm)
    setattr_(tl_pre, "prenorm_gemm_kernel", gemm)   # hc_head reaches it through mhc_pre.gemm_kernel
    setattr_(tl_pre, "pre_epilogue_kernel", lambda d, arch, nd, re, he, pm, it, design="v2": Emulated(
        tl_pre.pre_epilogue_func(d, nd, re, he, pm, it, design), emu_pre_epilogue(nd, re, he, pm, it)))
    setattr_(tl_head, "head_epilogue_kernel", lambda d, arch, re, he, design="v2": Emulated(
        tl_head.head_epilogue_func(d, re, he, design), emu_head_epilogue(re, he)))
    setattr_(tl_post, "post_kernel", lambda d, arch: Emulated(tl_post.post_func(d), emu_post))
    setattr_(tl_fused, "post_prenorm_gemm_kernel", lambda d, arch, **kw: Emulated(
        tl_fused.post_prenorm_gemm_func(d), emu_fused_gemm))
    from dsv4lab.kernels.tilelang import _mhc_overlap as overlap

    setattr_(overlap, "small_proj_kernel", lambda nd, n_mix, arch: Emulated(overlap.small_proj_func(nd, n_mix),
                                                                           emu_gemm))   # same partials contract
    install_onepass(setattr_)


# ---- the one-pass design (dsv4lab/kernels/tilelang/_mhc_onepass.py), emulated step by step ---------------------
def split3_bf16(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 -> hi + mid + lo, each rounded to bf16 (nearest even), the residuals exact in fp32: the kernel's split."""
    hi = w.to(torch.bfloat16)
    r1 = w - hi.float()
    mid = r1.to(torch.bfloat16)
    lo = (r1 - mid.float()).to(torch.bfloat16)
    return hi, mid, lo


def onepass_partials(x: torch.Tensor, fn: torch.Tensor, d: int, cluster: int,
                     chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cluster rank r: (mixes [C, T, n_mix], sum of squares [C, T]) over rank r's columns of the 4 streams,
    as the kernel forms them: bf16 x times the three bf16 terms of fn, fp32 accumulation chunk by chunk,
    combined as hi + (mid + lo). x: [T, 4, d] bf16."""
    t, n, _ = x.shape
    dc = d // cluster
    mixes = torch.zeros(cluster, t, fn.shape[0])
    sq = torch.zeros(cluster, t)
    for r in range(cluster):
        acc = torch.zeros(3, t, fn.shape[0])
        for s in range(n):
            for c0 in range(0, dc, chunk):
                cols = slice(s * d + r * dc + c0, s * d + r * dc + c0 + chunk)
                xs = x[:, s, r * dc + c0:r * dc + c0 + chunk].float()
                for k, term in enumerate(split3_bf16(fn[:, cols])):
                    acc[k] += xs @ term.float().T      # products of two bf16 values are exact in fp32
                sq[r] += xs.pow(2).sum(-1)
        mixes[r] = acc[0] + (acc[1] + acc[2])
    return mixes, sq


def rank_order_sum(parts: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 in rank order, as every CTA of the cluster does with the exchanged slots."""
    out = parts[0].clone()
    for p in parts[1:]:
        out += p
    return out


def emu_onepass(mode: str, norm_dtype, rms_eps: float, hc_eps: float, post_mult: float, iters: int, cluster: int,
                chunk: int = 128):
    """The one-pass kernel's job with its summation structure (ranks, hi/mid/lo terms, rank-order sums, exact
    RMS of the ROUNDED collapse from per-rank partial sums of squares); positional args as the prim_func."""
    from dsv4lab.kernels.reference import mhc as ref

    def gates_and_collapse(x, fn, scale, base, norm_weight, out, post, comb):
        t, n, d = x.shape
        mparts, sparts = onepass_partials(x, fn, d, cluster, chunk)
        m, ss = rank_order_sum(mparts), rank_order_sum(sparts)
        rho = torch.rsqrt(ss / (n * d) + rms_eps).unsqueeze(-1)
        pre = torch.sigmoid(m[:, :n] * rho * scale[0] + base[:n]) + hc_eps
        if mode != "head":
            post.copy_(post_mult * torch.sigmoid(m[:, n:2 * n] * rho * scale[1] + base[n:2 * n]))
            comb.copy_(ref.sinkhorn((m[:, 2 * n:] * rho * scale[2] + base[2 * n:]).view(t, n, n), iters, hc_eps))
        y = (pre.unsqueeze(-1) * x.float()).sum(1).to(torch.bfloat16).float()
        if mode == "head" or norm_dtype is None:
            out.copy_(y.to(torch.bfloat16))
            return
        dc = d // cluster
        yss = rank_order_sum(torch.stack([y[:, r * dc:(r + 1) * dc].pow(2).sum(-1) for r in range(cluster)]))
        out.copy_((y * torch.rsqrt(yss / d + rms_eps).unsqueeze(-1) * norm_weight.float()).to(torch.bfloat16))

    if mode == "pre":
        def run(residual, fn, scale, base, norm_weight, layer_input, post, comb):
            gates_and_collapse(residual, fn, scale, base, norm_weight, layer_input, post, comb)
    elif mode == "head":
        def run(residual, fn, scale, base, out):
            gates_and_collapse(residual, fn, scale, base, None, out, None, None)
    else:
        def run(f, residual, post_in, comb_in, fn, scale, base, norm_weight, new_residual, layer_input, post, comb):
            c, p, r = comb_in.float(), post_in.float(), residual.float()
            nr = torch.stack([p[:, k, None] * f.float() + (((c[:, 0, k, None] * r[:, 0] + c[:, 1, k, None] * r[:, 1])
                                                             + c[:, 2, k, None] * r[:, 2]) + c[:, 3, k, None] * r[:, 3])
                              for k in range(residual.shape[1])], 1).to(torch.bfloat16)
            new_residual.copy_(nr)
            gates_and_collapse(nr, fn, scale, base, norm_weight, layer_input, post, comb)
    return run


def install_onepass(setattr_) -> None:
    """Swap the one-pass kernel builder for ``Emulated(onepass_func(...), emu_onepass(...))``."""
    from dsv4lab.kernels.tilelang import _mhc_onepass as onepass

    def build(mode, d, arch, norm_dtype, rms_eps, hc_eps, post_mult, iters, bt, cluster):
        return Emulated(onepass.onepass_func(mode, d, norm_dtype, rms_eps, hc_eps, post_mult, iters, bt, cluster),
                        emu_onepass(mode, norm_dtype, rms_eps, hc_eps, post_mult, iters, cluster))
    setattr_(onepass, "onepass_kernel", build)
