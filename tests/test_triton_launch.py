"""dsv4lab.kernels.triton._launch.CachedLauncher: the cached-binary launch path must give exactly what Triton's
own launch path gives, and must never reuse a binary where Triton would have specialised differently."""
import pytest
import torch

from dsv4lab.kernels.reference.norms import rmsnorm
from dsv4lab.kernels.triton import _launch, mtp_norm

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the cached launch path runs on a CUDA GPU only")


def test_no_launch_hooks_attached_by_default():
    # the cached path only runs without hooks: if this fails, every call silently takes Triton's slow path
    assert not _launch.hooks_active()


@cuda
def test_second_call_uses_the_cached_binary():
    h = torch.randn(2, 256, dtype=torch.bfloat16, device="cuda")
    w = torch.ones(256, dtype=torch.bfloat16, device="cuda")
    mtp_norm.mtp_shared_head_rmsnorm(h, w)
    n = len(mtp_norm._launch_shared_head.compiled)
    assert n >= 1
    mtp_norm.mtp_shared_head_rmsnorm(h, w)
    assert len(mtp_norm._launch_shared_head.compiled) == n


def test_cache_key_separates_what_triton_specialises_on():
    buf = torch.zeros(64, dtype=torch.bfloat16)
    aligned, misaligned = buf[:32], buf[1:33]          # 0 and 2 bytes past a 16-byte-aligned base
    assert buf.data_ptr() % 16 == 0
    assert _launch._arg_key(aligned) != _launch._arg_key(misaligned)
    assert _launch._arg_key(aligned) != _launch._arg_key(aligned.float())
    assert _launch._arg_key(4096) != _launch._arg_key(4097)             # ints: by value (== 1, % 16, i32/i64)
    assert _launch._arg_key(True) != _launch._arg_key(1)
    assert _launch._arg_key(1e-6) != _launch._arg_key(1e-5)             # floats by value (a constexpr could be one)


@cuda
@pytest.mark.parametrize("D", [4096, 7168, 100])
def test_cached_launch_matches_triton_launch_bitwise(D):
    torch.manual_seed(0)
    h = torch.randn(5, D, dtype=torch.bfloat16, device="cuda")
    w = 1 + 0.1 * torch.randn(D, dtype=torch.bfloat16, device="cuda")
    first = mtp_norm.mtp_shared_head_rmsnorm(h, w)        # compiles, fills the launcher's cache
    second = mtp_norm.mtp_shared_head_rmsnorm(h, w)       # the cached-binary path
    block, chunks, warps = mtp_norm.launch_config(D)
    plain = torch.empty_like(h)
    mtp_norm._shared_head_rmsnorm_kernel[(5,)](h, w, plain, D, 1e-6, block, chunks, False, "", "", num_warps=warps)
    assert torch.equal(first, plain) and torch.equal(second, plain)
    ref = rmsnorm(h.double(), w.double(), 1e-6).to(torch.bfloat16)
    assert (second.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()


@cuda
def test_misaligned_input_is_not_run_by_an_aligned_binary():
    D = 4096
    w = torch.ones(D, dtype=torch.bfloat16, device="cuda")
    base = torch.randn(3 * D + 8, dtype=torch.bfloat16, device="cuda")
    aligned = base[:3 * D].view(3, D)
    misaligned = base[1:3 * D + 1].view(3, D)             # contiguous, 2 bytes past a 16-byte boundary
    mtp_norm.mtp_shared_head_rmsnorm(aligned, w)
    mtp_norm.mtp_shared_head_rmsnorm(aligned, w)
    got = mtp_norm.mtp_shared_head_rmsnorm(misaligned, w)
    again = mtp_norm.mtp_shared_head_rmsnorm(misaligned, w)
    want = rmsnorm(misaligned.clone().float(), w.float(), 1e-6).to(torch.bfloat16)
    assert torch.equal(got, again)
    assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()
    # key = (device, num_warps, h, weight, out, D, ...): one binary per alignment of h at this D
    keys = [k for k in mtp_norm._launch_shared_head.compiled if k[5] == (int, D)]
    assert {k[2][1] for k in keys} >= {True, False}


@cuda
def test_cached_launch_follows_the_current_stream_and_graph_capture():
    D = 4096
    h = torch.randn(4, D, dtype=torch.bfloat16, device="cuda")
    w = torch.ones(D, dtype=torch.bfloat16, device="cuda")
    want = mtp_norm.mtp_shared_head_rmsnorm(h, w)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = mtp_norm.mtp_shared_head_rmsnorm(h, w)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mtp_norm.mtp_shared_head_rmsnorm(h, w)
    h.copy_(torch.randn_like(h))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, mtp_norm.mtp_shared_head_rmsnorm(h, w))
