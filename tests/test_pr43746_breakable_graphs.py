"""#43746 part 2: the capturable decoder stack (dsv4lab.layers.stack) and the four graph modes, on the CPU.

Sublayers are checked against the attention / MoE references (fp32 math); the modes against eager on the
FakeGraphBackend, which replays recorded aten ops and rejects host syncs, so "capturable" and "equal to eager
across replays with changing metadata" are both real checks here. GPU timings live in the bench script.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dsv4lab import graphs as G
from dsv4lab.kernels.reference.attention import attention_output, kv_path, query_path, sparse_attention_with_sink
from dsv4lab.kernels.reference.mhc import mhc_fused_post_pre, mhc_post
from dsv4lab.kernels.reference.moe import moe, route
from dsv4lab.lab import results
from dsv4lab.lab.numerics import ulp_diff
from dsv4lab.layers.stack import (DecodeStep, DecoderStack, attention_core, random_positions, sparse_attention_rows,
                                  stack_config)
from dsv4lab.refactors import pr43746_breakable_graphs as exp

BF16_ULP = 2.0 ** -8   # relative spacing of bf16 at the top of a binade (8 significant bits)


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def stack():
    return DecoderStack(stack_config("toy", num_layers=2, experts=4), max_seqs=8)


# ---- configuration and metadata ------------------------------------------------------------------------
def test_stack_config_is_window_only_with_local_experts():
    cfg = stack_config("flash", num_layers=8, experts=8)
    assert (cfg.num_hidden_layers, cfg.n_routed_experts, cfg.num_experts_per_tok) == (8, 8, 6)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.hc_mult) == (4096, 64, 512, 4)
    assert all(cfg.compress_ratio(i) == 0 for i in range(8)) and cfg.num_hash_layers == 0
    with pytest.raises(ValueError, match="num_layers"):
        stack_config("toy", num_layers=0)
    with pytest.raises(ValueError, match="top_k"):
        stack_config("toy", experts=4, top_k=5)


def test_decode_step_index_lists_by_hand():
    cfg = stack_config("toy", num_layers=1)          # window W = 32
    W = cfg.sliding_window
    step = DecodeStep(cfg, 3)
    step.set([0, 5, W + 2])
    # sequence b owns rows [bW, (b+1)W); position p lives in row bW + p mod W
    assert step.slots.tolist() == [0, W + 5, 2 * W + 2]
    assert step.idx[0].tolist() == [0] + [-1] * (W - 1)
    assert step.idx[1].tolist() == [W + j for j in range(6)] + [-1] * (W - 6)
    # p = W+2 sees positions 3..W+2: rows 3..W-1 then the wrapped 0, 1, 2
    assert step.idx[2].tolist() == [2 * W + j for j in list(range(3, W)) + [0, 1, 2]]
    assert step.width == W and step.launch_width == W
    step.set([0, 1, 2])
    assert step.width == 3 and step.launch_width == 3
    step.pad = True
    assert step.launch_width == W
    assert step.positions.tolist() == [0, 1, 2]


def test_decode_step_rejects_bad_input():
    cfg = stack_config("toy", num_layers=1)
    with pytest.raises(ValueError, match="tokens"):
        DecodeStep(cfg, -1)
    step = DecodeStep(cfg, 2)
    with pytest.raises(ValueError, match="positions"):
        step.set([1, 2, 3])
    with pytest.raises(ValueError, match="positions"):
        step.set([-1, 2])
    with pytest.raises(ValueError, match="h:"):
        step.set([1, 2], torch.zeros(3, cfg.hidden_size, dtype=torch.bfloat16))


def test_random_positions_vary_the_launch_width():
    rng = np.random.default_rng(0)
    widths = {int(min(random_positions(4, 32, rng).max() + 1, 32)) for _ in range(50)}
    assert len(widths) > 5 and max(widths) == 32


# ---- sublayers vs references ------------------------------------------------------------------------
def test_attention_core_matches_reference_and_writes_the_cache():
    g = torch.Generator().manual_seed(0)
    T, H, d, rows, M = 5, 4, 64, 40, 12
    q = torch.randn(T, H, d, generator=g).to(torch.bfloat16)
    cache = torch.randn(rows, d, generator=g).to(torch.bfloat16)
    kv = torch.randn(T, d, generator=g).to(torch.bfloat16)
    slots = torch.tensor([3, 10, 17, 30, 39])
    idx = torch.randint(0, rows, (T, M), generator=g)
    idx[1, 4:] = -1
    idx[2, :] = -1                                       # no candidate: the sink takes all the mass -> 0
    idx[0, 0] = 3                                        # reads the row written this step
    sink = 0.5 * torch.randn(H, generator=g)
    out = torch.full((T, H, d), float("nan"), dtype=torch.bfloat16)
    before = cache.clone()
    attention_core(q, kv, out, cache, slots, idx, sink, M, d ** -0.5)
    expected_cache = before.clone()
    expected_cache[slots] = kv
    assert torch.equal(cache, expected_cache)
    ref = sparse_attention_with_sink(q, cache, idx, sink, d ** -0.5)
    # both fp32 math rounded once to bf16: only the fp32 summation order differs -> at most 1 ulp
    assert int(ulp_diff(out, ref).abs().max()) <= 1
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    # a narrower width reads a prefix of the lists
    narrow = sparse_attention_rows(q, cache, idx[:, :4], sink, d ** -0.5).to(torch.bfloat16)
    assert int(ulp_diff(narrow, sparse_attention_with_sink(q, cache, idx[:, :4], sink, d ** -0.5)).abs().max()) <= 1


def test_projections_match_the_attention_reference(stack):
    cfg, w = stack.cfg, stack.layers[0]
    g = torch.Generator().manual_seed(1)
    T = 6
    x = torch.randn(T, cfg.hidden_size, generator=g).to(torch.bfloat16)
    positions = torch.tensor([0, 1, 7, 31, 100, 5000])
    q = torch.empty(T, cfg.num_attention_heads, cfg.head_dim, dtype=torch.bfloat16)
    kv = torch.empty(T, cfg.head_dim, dtype=torch.bfloat16)
    stack.attn_in(x, positions, w, q, kv)
    params = SimpleNamespace(wq_a=w["wq_a"], q_norm=w["q_norm"], wq_b=w["wq_b"], wkv=w["wkv"], kv_norm=w["kv_norm"])
    _, q_ref = query_path(x, positions, params, cfg, stack.inv_freq)
    kv_ref = kv_path(x, positions, params, cfg, stack.inv_freq, fp8_kv=False)
    # bf16 GEMMs (fp32 accumulation, one rounding) vs fp32 GEMMs of the same operands: ulp-level flips in a
    # fraction of the GEMM outputs, which the norms carry through at well under one ulp of relative RMS
    assert rel_rms(q, q_ref) < BF16_ULP and rel_rms(kv, kv_ref) < BF16_ULP
    o = torch.randn(T, cfg.num_attention_heads, cfg.head_dim, generator=g).to(torch.bfloat16)
    out = stack.attn_out(o, positions, w)
    ref = attention_output(o, positions, stack.inv_freq, w["wo_a"], w["wo_b"], cfg.o_groups)
    # one extra bf16 rounding (the rotated o before wo_a; the reference keeps it fp32) + bf16 GEMM outputs
    assert out.shape == (T, cfg.hidden_size) and rel_rms(out, ref) < BF16_ULP


def test_dense_moe_matches_the_routed_reference(stack):
    cfg, w = stack.cfg, stack.layers[1]
    E, I, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, D, generator=g).to(torch.bfloat16)
    y = stack.moe(x, w)
    weights, ids = route(x.float() @ w["gate"].float().T, k=cfg.num_experts_per_tok,
                         routed_scaling_factor=cfg.routed_scaling_factor, bias=w["gate_bias"])
    w13 = w["w13"].view(E + 1, 2, I, D)
    w2 = w["w2"].view(D, E + 1, I).permute(1, 0, 2)       # [E+1, D, I]
    ref = moe(x, weights, ids, w13[:E, 0], w13[:E, 1], w2[:E], swiglu_limit=cfg.swiglu_limit,
              shared=(w13[E, 0], w13[E, 1], w2[E]))
    # the dense form rounds the gate/up GEMM output and the weighted hidden to bf16 (the reference keeps fp32):
    # two extra roundings, each <= 2^-9 relative
    assert y.shape == (9, D) and rel_rms(y, ref) < 2 * BF16_ULP
    # a token's output only depends on its top-k experts: zeroing an unselected expert changes nothing
    unused = sorted(set(range(E)) - set(ids[0].tolist()))[0]
    w_cut = dict(w, w2=w["w2"].clone())
    w_cut["w2"].view(D, E + 1, I)[:, unused] = 0
    assert torch.equal(stack.moe(x[:1], w_cut), stack.moe(x[:1], w))


def test_mhc_pieces_use_the_registry_ops(stack):
    """piece_mid = o-proj, fused post/pre, MoE, fused post/pre, projections (checked op by op)."""
    cfg, (w0, w1) = stack.cfg, stack.layers
    step = stack.new_step(3)
    step.set([4, 9, 1], torch.randn(3, cfg.hidden_size).to(torch.bfloat16))
    residual, post, comb = stack.piece_first(step.h, step.positions, step.q, step.kv, w0)
    step.o.copy_(torch.randn_like(step.o, dtype=torch.float32).to(torch.bfloat16))
    kw = stack.mhc_kwargs
    a = stack.attn_out(step.o, step.positions, w0)
    r1, x1, p1, c1 = mhc_fused_post_pre(a, residual, post, comb, w0["hc_ffn_fn"], w0["hc_ffn_scale"],
                                        w0["hc_ffn_base"], w0["ffn_norm"], **kw)
    f = stack.moe(x1, w0)
    r2, x2, p2, c2 = mhc_fused_post_pre(f, r1, p1, c1, w1["hc_attn_fn"], w1["hc_attn_scale"], w1["hc_attn_base"],
                                        w1["attn_norm"], **kw)
    q, kv = torch.empty_like(step.q), torch.empty_like(step.kv)
    stack.attn_in(x2, step.positions, w1, q, kv)
    got = stack.piece_mid(step.o, step.positions, residual, post, comb, step.q, step.kv, w0, w1)
    for a_, b_ in zip(got, (r2, p2, c2)):
        assert torch.equal(a_, b_)
    assert torch.equal(step.q, q) and torch.equal(step.kv, kv)
    y = stack.piece_last(step.o, step.positions, r2, p2, c2, w1, stack.final)
    assert y.shape == (3, cfg.hidden_size) and torch.isfinite(y.float()).all()
    assert stack.mhc_backend == "reference" and stack.ops.post is mhc_post


def test_forward_rejects_bad_input_and_handles_zero_tokens(stack):
    with pytest.raises(TypeError, match="step"):
        stack.forward(torch.zeros(2, stack.cfg.hidden_size))
    with pytest.raises(ValueError, match="max_seqs"):
        stack.new_step(stack.max_seqs + 1)
    assert stack.forward(stack.new_step(0)).shape == (0, stack.cfg.hidden_size)
    with pytest.raises(ValueError, match="window attention"):
        DecoderStack(stack.cfg.replace(compress_ratios=(4,) * 3))


# ---- modes on the fake backend ---------------------------------------------------------------------
def _fake():
    return G.FakeGraphBackend()


@pytest.mark.parametrize("mode", ["after", "full"])
def test_graph_modes_equal_eager_bitwise_over_changing_metadata(stack, mode):
    T, steps = 3, 4
    pad = mode == "full"
    ref = exp.eager_outputs(stack, T, steps, pad=pad)
    step = stack.new_step(T, pad=pad)
    step.set(*next(iter(exp.step_inputs(stack, T, 1, seed=99))))
    runner = exp.Runner(mode, stack, step, graph_backend=_fake(), warmup=1)
    L = stack.num_layers
    assert (runner.num_graphs, runner.num_breaks) == ((L + 1, L) if mode == "after" else (1, 0))
    got = exp.replay_outputs(runner, steps)
    stats = exp.equality_stats(ref, got)
    assert stats["bitwise"] and exp.verdict(stats) == ("bitwise", True)
    widths = []
    for pos, _ in exp.step_inputs(stack, T, steps):
        step.set(pos)
        widths.append(step.width)
    assert len(set(widths)) > 1, "the steps must change the host launch width"


def test_full_graph_without_padding_replays_a_stale_width(stack):
    """Why the full graph needs pad=True: the width read at capture is frozen into the graph."""
    T = 2
    step = stack.new_step(T)
    step.set([0, 0], torch.randn(T, stack.cfg.hidden_size).to(torch.bfloat16))      # width 1 at capture
    g = G.capture(stack.forward, step, backend=_fake(), breaks=False, warmup=0)
    ref_step = stack.new_step(T)
    h = torch.randn(T, stack.cfg.hidden_size).to(torch.bfloat16)
    for s in (step, ref_step):
        s.set([20, 25], h)                                                       # width 26
    stack.reset_cache()
    stale = g.replay().clone()
    stack.reset_cache()
    fresh = stack.forward(ref_step)
    assert torch.isfinite(stale.float()).all()
    assert rel_rms(stale, fresh) > 10 * exp.TOL_REL_RMS
    with pytest.raises(ValueError, match="pad=True"):
        exp.Runner("full", stack, step, graph_backend=_fake())


def test_before_mode_with_dynamo_eager_backend_equals_eager(stack):
    """The compiled pieces (Dynamo 'eager' backend: same aten ops) captured piecewise with the custom-op
    attention between them: L+1 graphs, L breaks, bitwise equal to eager over changing metadata."""
    T, steps = 3, 3
    ref = exp.eager_outputs(stack, T, steps, pad=False)
    compiled = exp.CompiledPieces(stack, backend="eager")
    step = stack.new_step(T)
    step.set(*next(iter(exp.step_inputs(stack, T, 1, seed=5))))
    runner = exp.Runner("before", stack, step, graph_backend=_fake(), compiled=compiled, warmup=1)
    assert (runner.num_graphs, runner.num_breaks) == (stack.num_layers + 1, stack.num_layers)
    assert all(s.label == "OpAttention.__call__" for s in runner.graph.steps if s.kind == "eager")
    assert exp.equality_stats(ref, exp.replay_outputs(runner, steps))["bitwise"]


def test_custom_ops_pass_opcheck_and_equal_the_direct_calls(stack):
    cfg = stack.cfg
    step = stack.new_step(2)
    step.set([3, 40], torch.randn(2, cfg.hidden_size).to(torch.bfloat16))
    step.q.copy_(torch.randn_like(step.q, dtype=torch.float32))
    step.kv.copy_(torch.randn_like(step.kv, dtype=torch.float32))
    op = exp.attention_op()
    cache = stack.caches[0].clone()
    args = (step.q, step.kv, torch.empty_like(step.o), cache, step.slots, step.idx, stack.layers[0]["sink"],
            step.width, stack.scale)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    out_op, cache_op = torch.empty_like(step.o), stack.caches[0].clone()
    op(step.q, step.kv, out_op, cache_op, *args[4:])
    out_direct, cache_direct = torch.empty_like(step.o), stack.caches[0].clone()
    attention_core(step.q, step.kv, out_direct, cache_direct, *args[4:])
    assert torch.equal(out_op, out_direct) and torch.equal(cache_op, cache_direct)

    ops = exp.opaque_mhc_ops("reference")
    w = stack.layers[0]
    residual = torch.randn(2, cfg.hc_mult, cfg.hidden_size).to(torch.bfloat16)
    mix = (w["hc_attn_fn"], w["hc_attn_scale"], w["hc_attn_base"])
    got = ops.pre(residual, *mix, w["attn_norm"], **stack.mhc_kwargs)
    want = stack.ops.pre(residual, *mix, w["attn_norm"], **stack.mhc_kwargs)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    pre_op = torch.ops.dsv4lab_graphs.mhc_pre_reference.default
    kw = stack.mhc_kwargs
    torch.library.opcheck(pre_op, (residual, *mix, w["attn_norm"], kw["rms_eps"], kw["hc_eps"], kw["post_mult"],
                                   kw["sinkhorn_iters"]), test_utils=("test_schema", "test_faketensor"))


# ---- records, verdicts, targets -------------------------------------------------------------------
def test_equality_stats_and_verdict_by_hand():
    a = [torch.tensor([1.0, 2.0, -3.0], dtype=torch.bfloat16)] * 2
    assert exp.verdict(exp.equality_stats(a, [t.clone() for t in a])) == ("bitwise", True)
    one_ulp = [a[0], torch.tensor([1.0078125, 2.0, -3.0], dtype=torch.bfloat16)]     # 1 + 2^-7 = next bf16 above 1
    s = exp.equality_stats(a, one_ulp)
    assert (s["bitwise_steps"], s["ulp_max"], s["max_abs"]) == (1, 1, 0.0078125)
    assert exp.verdict(s) == ("tolerance", True)
    wrong = [a[0], -a[1]]
    assert exp.verdict(exp.equality_stats(a, wrong)) == ("tolerance", False)
    nan = [a[0], torch.tensor([float("nan"), 2.0, -3.0], dtype=torch.bfloat16)]
    assert exp.verdict(exp.equality_stats(a, nan))[1] is False
    with pytest.raises(ValueError, match="ref/got"):
        exp.equality_stats(a, a[:1])


def test_target_records_from_hand_made_numbers():
    def rec(metric, mode, T, value):
        return results.record(experiment=exp.EXPERIMENT, op=exp.OP, backend=exp.BACKEND[mode], variant=mode,
                              preset="flash", tokens=T, dtype="bfloat16", metric=metric, unit="us", value=value,
                              **(dict(p20=value, p80=value) if metric == "time" else {}))
    recs = [rec("time", "after", 1, 120.0), rec("time", "full", 1, 100.0), rec("time", "eager", 1, 300.0),
            rec("time", "after", 256, 900.0), rec("time", "full", 256, 100.0),
            rec("startup", "after", 1, 1.0), rec("startup", "before", 1, 40.0),
            rec("startup", "after", 256, 1.0)]                 # before missing at 256: not in the sum
    out = {(r["target"], r["tokens"]): r for r in exp.target_records(recs)}
    assert out[("after_vs_full <= 1.3", 1)]["value"] is True and out[("after_vs_full <= 1.3", 1)]["ratio"] == 1.2
    assert out[("after_vs_eager <= 0.5", 1)]["value"] is True
    assert not any(T == 256 for _, T in out), "targets are for T <= 64 only"
    s = out[("startup_vs_compile <= 0.2", None)]
    assert s["ratio"] == pytest.approx(1 / 40) and s["value"] is True and s["over_tokens"] == [1]


def test_run_cpu_quick_records():
    recs = exp.run("cpu", quick=True)
    assert all(results.validate(r) is None for r in recs)
    eq = [r for r in recs if r["metric"] == "equal_to_eager"]
    assert {r["variant"] for r in eq} == {"eager", "after", "full"} and all(r["value"] for r in eq)
    assert all(r["verdict"] == "bitwise" for r in eq)
    graphs_ = {r["variant"]: (r["value"], r["breaks"]) for r in recs if r["metric"] == "graphs"}
    assert graphs_ == {"eager": (0, 0), "after": (3, 2), "full": (1, 0)}
    assert any(r["metric"] == "unavailable" and r["variant"] == "before" for r in recs)
    assert all(r.get("graph_backend") == "fake (CPU)" for r in recs if r["metric"] == "time")
    assert not any(r["metric"] == "error" for r in recs)


def test_mechanism_trace_for_the_notebook():
    tr = exp.mechanism_trace(num_layers=2, tokens=2, replays=2)
    assert tr["after"]["matches"] == [True, True] and tr["full"]["matches"] == [True, True]
    assert [r["kind"] for r in tr["after"]["timeline"]] == ["graph", "eager", "graph", "eager", "graph"]
    assert [r["kind"] for r in tr["full"]["timeline"]] == ["graph"]
    assert (tr["after"]["num_graphs"], tr["after"]["num_breaks"]) == (3, 2)
    fig = pytest.importorskip("plotly") and exp.timeline_figure(tr)
    assert len(fig.data) == 6


def test_bench_script_cpu_dry_run(tmp_path):
    """The H100 script gets one shot: run its whole flow (smoke test, sweep, records, summary) on the CPU."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "pr43746_breakable_graphs.py"
    spec = importlib.util.spec_from_file_location("bench_pr43746_breakable_graphs", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--out", str(tmp_path), "--cpu-dry-run", "--modes", "eager", "after", "full", "--tokens", "2",
            "--kernel-tokens"]
    assert bench.main(argv) == 0
    recs = results.read_records(tmp_path / f"{exp.EXPERIMENT}.jsonl")
    assert not [r for r in recs if r["metric"] == "error"]
    assert {r["variant"] for r in recs if r["metric"] == "time"} == {"eager", "after", "full"}
    assert all(r["value"] for r in recs if r["metric"] == "equal_to_eager")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["after", "full", "before"])
def test_cuda_modes_match_eager(mode):
    """Real CUDA graphs (and Inductor for 'before') on a toy stack: replays over changing metadata equal eager
    (bitwise for the modes that run eager's kernels; TOL_REL_RMS for Inductor)."""
    stack = DecoderStack(stack_config("toy", num_layers=2, experts=4), device="cuda", mhc_backend="reference",
                         max_seqs=8)
    T, steps, pad = 4, 5, mode == "full"
    ref = exp.eager_outputs(stack, T, steps, pad=pad)
    step = stack.new_step(T, pad=pad)
    step.set(*next(iter(exp.step_inputs(stack, T, 1, seed=3))))
    compiled = exp.CompiledPieces(stack) if mode == "before" else None
    runner = exp.Runner(mode, stack, step, graph_backend=G.CudaGraphBackend(), compiled=compiled)
    stats = exp.equality_stats(ref, exp.replay_outputs(runner, steps))
    kind, ok = exp.verdict(stats)
    assert ok, stats
    if mode != "before":
        assert kind == "bitwise", stats
