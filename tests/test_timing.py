"""lab.timing on the CPU: labelled cpu-clock timings, warm-up excluded, percentiles, aten-op counts.

No test asserts a wall-clock duration; warm-up exclusion is checked with a fake clock.
"""
import pytest
import torch

from dsv4lab.lab import results, roofline, timing
from dsv4lab.lab.timing import bench, bench_sweep, host_overhead, kernels_per_call, percentiles

FIELDS = dict(experiment="unit", op="rmsnorm", backend="reference", variant="eager", preset="toy", tokens=8,
              dtype="bfloat16")


def test_percentiles_hand_case():
    # numpy linear interpolation on 1..10: position (n-1) q = 9 q -> 2.8, 5.5, 8.2
    assert percentiles([float(v) for v in range(10, 0, -1)]) == pytest.approx((2.8, 5.5, 8.2))


def test_bench_on_cpu_is_labelled_and_ordered():
    x = torch.randn(64, 64)
    t = bench(lambda: x @ x, rep=15, warmup=2, device="cpu")
    assert t.mode == "cpu-clock" and t.device == "cpu" and t.flush_l2 is False
    assert len(t.times_us) == 15 and all(v > 0 for v in t.times_us)
    assert t.p20 <= t.p50 <= t.p80
    rec = t.to_record(**FIELDS)
    assert rec["metric"] == "time" and rec["unit"] == "us" and rec["timing_mode"] == "cpu-clock"
    assert rec["value"] == t.p50 and rec["p20"] == t.p20 and rec["p80"] == t.p80
    assert results.validate(rec) is None


def test_time_record_with_roofline_but_no_peaks_on_cpu():
    t = bench(lambda: None, rep=5, warmup=1, device="cpu")
    c = roofline.cost("rmsnorm", T=8, h=64)
    rec = t.to_record(cost=c, peaks=None, **FIELDS)
    assert rec["bytes"] == 4 * 8 * 64 and rec["flops"] == 4 * 8 * 64
    assert rec["pct_of_peak"] is None and rec["bound"] is None       # CPU: no measured GPU peak applies


def test_warmup_calls_are_not_timed(monkeypatch):
    clock = {"ns": 0}
    calls = {"n": 0}

    def fn():  # the first call plays "JIT compilation": it advances the fake clock by 1 s
        calls["n"] += 1
        clock["ns"] += 10**9 if calls["n"] == 1 else 1000

    monkeypatch.setattr(timing.time, "perf_counter_ns", lambda: clock["ns"])
    t = bench(fn, rep=7, warmup=3, device="cpu")
    assert calls["n"] == 3 + 7
    assert t.times_us == [1.0] * 7


def test_bench_sweep_warms_every_case_before_timing_any():
    log = []
    cases = {"a": lambda: log.append("a"), "b": lambda: log.append("b")}
    out = bench_sweep(cases, warmup=2, rep=3, device="cpu")
    assert set(out) == {"a", "b"}
    assert log[:4] == ["a", "a", "b", "b"]
    assert all(t.mode == "cpu-clock" for t in out.values())


def test_bench_argument_checks():
    with pytest.raises(TypeError, match="fn: expected a callable"):
        bench(42, device="cpu")
    with pytest.raises(ValueError, match="rep"):
        bench(lambda: None, rep=0, device="cpu")
    with pytest.raises(ValueError, match="graph: CUDA-graph timing needs a CUDA device"):
        bench(lambda: None, graph=True, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: CUDA requested"):
            bench(lambda: None, device="cuda")


def test_host_overhead_calls_n_per_repeat():
    calls = {"n": 0}

    def fn():
        calls["n"] += 1

    us = host_overhead(fn, n=50, warmup=4, repeats=3, device="cpu")
    assert us > 0 and calls["n"] == 4 + 3 * 50


def test_kernels_per_call_counts_top_level_aten_ops_on_cpu():
    a, b, w = torch.randn(8, 8), torch.randn(8, 8), torch.randn(8, 8)

    def three_ops():
        return a + b, a * b, torch.nn.functional.linear(a, w)   # linear calls t/matmul/mm inside: counted once

    kc = kernels_per_call(three_ops, device="cpu")
    count, names = kc
    assert kc.kind == "cpu-aten-ops"
    assert count == 3 and names == ["aten::add", "aten::mul", "aten::linear"]
    rec = kc.to_record(**FIELDS)
    assert rec["metric"] == "kernels_per_call" and rec["value"] == 3 and rec["unit"] == "aten ops"


def test_gpu_activity_filter_on_fake_profiler_events():
    # the GPU branch of kernels_per_call cannot run here; its event filter can
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    kernel = SimpleNamespace(device_type=DeviceType.CUDA, activity_type="kernel")
    memset = SimpleNamespace(device_type=DeviceType.CUDA, activity_type=None)      # torch without activity_type
    annotation = SimpleNamespace(device_type=DeviceType.CUDA, activity_type="gpu_user_annotation")
    cpu_op = SimpleNamespace(device_type=DeviceType.CPU, activity_type="cpu_op")
    assert [timing._is_gpu_activity(e) for e in (kernel, memset, annotation, cpu_op)] == [True, True, False, False]


def test_host_overhead_pairs_times_both_sides_of_every_pair():
    from dsv4lab.lab.timing import host_overhead_pairs

    counts = {"b": 0, "a": 0}

    def bump(k):
        def f():
            counts[k] += 1
        return f

    out = host_overhead_pairs({"op": (bump("b"), bump("a"))}, 7, repeats=2, device="cpu")
    assert set(out) == {"op"} and set(out["op"]) == {"before", "after"}
    assert all(v > 0 for v in out["op"].values())
    assert counts["b"] == counts["a"] == 10 + 2 * 7   # host_overhead's default warm-up of 10, then repeats x n


def test_bench_interleaved_refuses_a_cpu_device_and_empty_cases():
    with pytest.raises(ValueError, match="device"):
        timing.bench_interleaved({"a": lambda: None}, device="cpu")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="cases"):
            timing.bench_interleaved({}, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph replay needs a GPU")
def test_bench_interleaved_replays_every_case_rep_times():
    x = torch.randn(1024, 1024, device="cuda")
    counter = torch.zeros((), device="cuda")
    cases = {"matmul": lambda: x @ x.T, "count": lambda: counter.add_(1)}
    t = timing.bench_interleaved(cases, rep=20, warmup=2)
    torch.cuda.synchronize()
    # 2 warm-up calls + 1 capture-time upload replay + 20 timed replays (the capture itself runs nothing)
    assert counter.item() == 2 + 1 + 20
    assert all(v.mode == "cuda-graph" and len(v.times_us) == 20 and min(v.times_us) > 0 for v in t.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events need a GPU")
def test_bench_interleaved_eager_calls_every_case_directly():
    counter = torch.zeros((), device="cuda")
    cases = {"count": lambda: counter.add_(1), "other": lambda: counter.add_(0)}
    t = timing.bench_interleaved(cases, rep=15, warmup=3, graph=False, flush_l2=False)
    torch.cuda.synchronize()
    # eager: 3 warm-up calls + 15 timed calls, no capture and no upload replay
    assert counter.item() == 3 + 15
    assert all(v.mode == "cuda-events" and len(v.times_us) == 15 and not v.flush_l2 for v in t.values())


def test_kernel_time_refuses_a_cpu_device():
    with pytest.raises(ValueError, match="device"):
        timing.kernel_time(lambda: None, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUPTI kernel timestamps need a GPU")
@pytest.mark.parametrize("flush_l2", [True, False])
def test_kernel_time_sums_one_calls_kernels(flush_l2):
    x = torch.randn(4096, 4096, device="cuda")
    one = timing.kernel_time(lambda: x @ x, rep=10, flush_l2=flush_l2)
    two = timing.kernel_time(lambda: (x @ x, x @ x), rep=10, flush_l2=flush_l2)
    assert one.mode == "kernel-sum" and len(one.times_us) == 10 and one.p50 > 0
    # two identical GEMMs per call: twice the GPU time of one, within clock noise
    assert 1.7 < two.p50 / one.p50 < 2.3
