"""lab.roofline: the section-7 formulas at hand-computed shapes, exact sums vs brute force, % of peak."""
import math

import pytest
import torch

from dsv4lab.config import get_config
from dsv4lab.lab import results, roofline
from dsv4lab.lab.roofline import OPS, Peaks, cost, n_compressed, n_selected, n_window, pct_of_peak


def test_every_table_row_has_a_function():
    assert {f(**_example_shape(name)).row for name, f in OPS.items()} == set(range(1, 23))


def _example_shape(name):
    small = dict(T=64, D=256, n=4, H=8, d=512, h=256, K=256, N=128, r=4, hd=512, n_I=4, d_I=128, K_I=8, L=512,
                 G=2, o_l=64, E=16, k=2, I=128, V=1000)
    import inspect

    params = inspect.signature(OPS[name]).parameters
    return {p: small[p] for p in params if p in small}


def test_exact_sums_match_brute_force():
    for T in list(range(0, 40)) + [129, 300, 1000]:
        for W in (1, 4, 128):
            assert n_window(T, W) == sum(min(W, t + 1) for t in range(T))
        for r in (4, 128):
            assert n_compressed(T, r) == sum((t + 1) // r for t in range(T))
        for K_I in (1, 3, 8):
            assert n_selected(T, K_I) == sum(min(K_I, (t + 1) // 4) for t in range(T))


def test_mhc_rows_hand_computed():
    T, D = 2, 4096
    # pre: 2*T*nD*24 = 2*2*16384*24, Sinkhorn 1300 per token, 12TD
    c = cost("mhc_pre", T=T, D=D)
    assert c.flops == 1572864 + 2600 + 98304
    # bytes: residual 2nTD + fn fp32 4*24*nD + layer input 2TD + 28 fp32 mixes per token
    assert c.bytes == 65536 + 1572864 + 16384 + 224
    post = cost("mhc_post", T=T, D=D)
    assert post.flops == 40 * T * D and post.bytes == 18 * T * D            # the table's n=4 shorthands
    fused = cost("mhc_fused_post_pre", T=T, D=D)
    assert fused.bytes == 20 * T * D + 1572864 + 224
    assert fused.flops == post.flops + c.flops                              # ~240TD
    assert cost("embedding_expand", T=T, D=D).bytes == 10 * T * D
    assert cost("hc_head", T=T, D=D).flops == 2 * T * 4 * D * 4 + 12 * T * D
    assert cost("mtp_shared_head_rmsnorm", T=T, D=D).bytes == 4 * T * D + 2 * D  # one [T, D] bf16 norm + weight
    assert cost("mtp_input_rmsnorm", T=T, D=D).bytes == 4 * T * 5 * D


def test_gemm_rows_hand_computed():
    c = cost("fp8_gemm", T=4, N=256, K=4096)
    assert c.flops == 8388608                                       # 2*4*256*4096
    assert c.bytes == 1048576 + 64 + 16384 + 512 + 2048             # NK + NK/16384 + TK + 4TK/128 + 2TN
    assert c.compute_dtype == "fp8"
    r = cost("router_gemm", T=8, N=256, K=4096)                     # Flash router gate, bf16 -> fp32
    assert r.op == "bf16_gemm_fp32_out" and r.flops == 16777216
    assert r.bytes == 2097152 + 65536 + 8192
    head = cost("lm_head", T=1, D=4096, V=129280)
    assert head.bytes == 2 * 129280 * 4096 + 2 * 4096 + 4 * 129280
    wo_a = cost("fp8_einsum_wo_a", T=3, H=64, G=8, o_l=1024)
    assert wo_a.flops == 2 * 3 * 64 * 512 * 1024 and wo_a.bytes == 64 * 512 * 1024 + 3 * 64 * 512 + 2 * 3 * 8 * 1024


def test_attention_rows_hand_computed():
    # HCA prefill, T = 256: Nw = 128*256 - 128*127/2 = 24640; Nc_128 = 128 ones + one 2 = 130
    c = cost("sparse_attention_prefill", T=256, H=64, r=128)
    assert c.flops == 4 * 64 * 512 * (24640 + 130)
    assert c.bytes == 4 * 256 * 64 * 512 + 2 * 512 * (256 + 2)
    # CSA decode, L = 8192: window 128 + min(512, 2048) selected = 640 rows of 584 B per token
    d = cost("sparse_attention_decode", T=2, L=8192, H=64, r=4, K_I=512)
    assert d.bytes == 2 * (584 * 640 + 4 * 64 * 512) and d.flops == 2 * 4 * 64 * 512 * 640
    w = cost("sparse_attention_decode", T=1, L=50, H=64, r=0)       # window-only, short context
    assert w.bytes == 584 * 50 + 4 * 64 * 512
    with pytest.raises(ValueError, match="K_I"):
        cost("sparse_attention_prefill", T=16, H=8, r=4)
    comp = cost("compressor", T=16, r=4, hd=128)                    # indexer compressor: c = 2, 132-B rows
    assert comp.flops == 6 * 2 * 16 * 128 and comp.bytes == 16 * 2 * 16 * 128 + 4 * 132
    il = cost("indexer_logits_prefill", T=16, materialize=True)     # Nc_4(16) = 4*1 + 4*2 + 4*3 + 4 = 28
    assert il.flops == 2 * 64 * 128 * 28 and il.bytes == 16 * 64 * 128 + 132 * 4 + 4 * 16 * 64 + 4 * 28
    assert cost("indexer_logits_decode", T=1, L=1024).bytes == 132 * 256


def test_moe_rows_hand_computed():
    D, I, E, k = 4096, 2048, 256, 6
    c = cost("moe_experts", T=1, D=D, I=I, E=E, k=k)
    assert c.flops == 6 * 6 * D * I
    assert c.bytes == pytest.approx(6 * 3 * D * I * (0.5 + 1 / 32) + 6 * (D + D / 32 + 2 * D) + 2 * D)
    big = cost("moe_experts", T=1000, D=D, I=I, E=E, k=k)           # all 256 experts touched
    assert big.bytes == pytest.approx(256 * 3 * D * I * (0.5 + 1 / 32) + 6000 * (D + D / 32 + 2 * D) + 2000 * D)
    mm = cost("mega_moe", T=1, D=D, I=I, E=E, k=k)
    assert mm.bytes == c.bytes and mm.comm_bytes == pytest.approx(6 * (D + D / 32 + 12) + 2 * 6 * D)
    r = cost("router", T=4, E=256, k=6)
    assert r.op == "moe_routing" and r.bytes == 4 * 4 * 256 + 12 * 4 * 6


def test_cost_dispatcher_fills_from_config_and_checks_arguments():
    cfg = get_config("flash")
    assert cost("mhc_pre", cfg=cfg, T=4) == roofline.mhc_pre(T=4, D=4096, n=4)
    assert cost("lm_head", cfg=cfg, T=1) == roofline.lm_head(T=1, D=4096, V=129280)
    with pytest.raises(ValueError, match="op: expected one of"):
        cost("softmax", T=1)
    with pytest.raises(TypeError, match="unexpected shape argument"):
        cost("rmsnorm", T=1, h=8, D=3)
    with pytest.raises(TypeError, match=r"missing shape argument\(s\) \['h'\]"):
        cost("rmsnorm", T=1)
    with pytest.raises(ValueError, match="T: expected a non-negative int"):
        cost("rmsnorm", T=-1, h=8)
    assert cost("rmsnorm", T=0, h=8).bytes == 0


PEAKS = Peaks(gpu="test", copy_bw=3.0e12, bf16_flops=800e12, fp8_flops=1600e12)


def test_pct_of_peak_memory_and_compute_bound():
    mem = cost("rmsnorm", T=1024, h=4096)                        # 16 MiB -> 5.592 us at 3 TB/s
    t_mem = mem.bytes / 3.0e12 * 1e6
    assert roofline.bound(mem, PEAKS) == "memory"
    assert pct_of_peak(2 * t_mem, mem, PEAKS) == pytest.approx(50.0)
    gemm = cost("bf16_gemm_fp32_out", T=8192, N=8192, K=8192)    # 1.1e12 FLOP -> 1374 us at 800 TFLOP/s
    t_comp = gemm.flops / 800e12 * 1e6
    assert roofline.bound(gemm, PEAKS) == "compute"
    assert pct_of_peak(4 * t_comp, gemm, PEAKS) == pytest.approx(25.0)
    fields = roofline.roofline_fields(4 * t_comp, gemm, PEAKS)
    assert fields["peak"] == "bf16_matmul" and fields["bound"] == "compute"
    no_fp8 = Peaks(gpu="test", copy_bw=3.0e12, bf16_flops=800e12, fp8_flops=None)
    big_fp8 = cost("fp8_gemm", T=8192, N=8192, K=8192)
    assert roofline.bound(big_fp8, no_fp8) == "memory"           # no fp8 peak measured: held to bandwidth only
    with pytest.raises(ValueError, match="time_us"):
        pct_of_peak(0.0, mem, PEAKS)


def _peak_record(metric, value):
    return results.record("peaks", "copy", "torch", "test", None, None, None, metric, "TB/s", value)


def test_load_peaks_from_store(tmp_path):
    assert roofline.load_peaks("h100", root=tmp_path) is None
    path = results.results_path("peaks", slug="h100", root=tmp_path)
    results.append(path, [_peak_record("peak_copy_bandwidth", 2.97), _peak_record("peak_bf16_matmul", 792.0)])
    p = roofline.load_peaks("h100", root=tmp_path)
    assert p.copy_bw == pytest.approx(2.97e12) and p.bf16_flops == pytest.approx(792e12) and p.fp8_flops is None
    assert len(p.to_records()) == 2
    bad = results.results_path("peaks", slug="h200", root=tmp_path)
    results.append(bad, [_peak_record("peak_bf16_matmul", 900.0)])
    with pytest.raises(results.ResultsError, match="peak_copy_bandwidth"):
        roofline.load_peaks("h200", root=tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_measure_peaks_needs_a_gpu():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        roofline.measure_peaks()


def test_intensity():
    c = cost("bf16_gemm_fp32_out", T=1, N=256, K=4096)
    assert c.intensity == pytest.approx(c.flops / c.bytes)
    assert math.isinf(cost("rmsnorm", T=0, h=8).intensity)
