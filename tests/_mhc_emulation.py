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
    gemm = lambda nd, n_mix, arch, **kw: Emulated(tl_pre.prenorm_gemm_func(nd, n_mix), emu_gemm)   # noqa: E731
    setattr_(tl_pre, "prenorm_gemm_kernel", gemm)   # hc_head reaches it through mhc_pre.gemm_kernel
    setattr_(tl_pre, "pre_epilogue_kernel", lambda d, arch, nd, re, he, pm, it, design="v2": Emulated(
        tl_pre.pre_epilogue_func(d, nd, re, he, pm, it, design), emu_pre_epilogue(nd, re, he, pm, it)))
    setattr_(tl_head, "head_epilogue_kernel", lambda d, arch, re, he, design="v2": Emulated(
        tl_head.head_epilogue_func(d, re, he, design), emu_head_epilogue(re, he)))
    setattr_(tl_post, "post_kernel", lambda d, arch: Emulated(tl_post.post_func(d), emu_post))
    setattr_(tl_fused, "post_prenorm_gemm_kernel", lambda d, arch, **kw: Emulated(
        tl_fused.post_prenorm_gemm_func(d), emu_fused_gemm))
