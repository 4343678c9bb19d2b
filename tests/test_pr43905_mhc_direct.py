"""#43905 refactor module: the CustomOp + torch.ops path and the direct path give bitwise-equal results (on a CPU
with the reference behind both), the before path really goes through the registered ops, the fake impls
describe the real outputs, and the per-forward call count follows the vLLM wiring."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dsv4lab.kernels.reference import mhc as ref
from dsv4lab.lab import results
from dsv4lab.refactors import pr43905_mhc_direct as m


def _equal(x, y) -> bool:
    xs, ys = (x if isinstance(x, tuple) else (x,)), (y if isinstance(y, tuple) else (y,))
    return len(xs) == len(ys) and all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(xs, ys))


@pytest.mark.parametrize("tokens", [1, 5])
def test_before_and_after_bitwise_equal_per_op(tokens: int) -> None:
    inp = m.make_inputs("toy", tokens, seed=tokens)
    for op, (before, after) in m.op_calls(inp).items():
        b, a = before(), after()
        assert _equal(b, a), op
        assert all(torch.isfinite(t.float()).all() for t in (b if isinstance(b, tuple) else (b,))), op


def test_both_paths_equal_the_reference_called_directly() -> None:
    inp = m.make_inputs("toy", 3, seed=1)
    a = inp.attn
    kw = dict(rms_eps=inp.rms_eps, hc_eps=inp.hc_eps, post_mult=inp.post_mult, sinkhorn_iters=inp.sinkhorn_iters)
    want = ref.mhc_pre(inp.residual, a.fn, a.scale, a.base, a.norm_weight, **kw)
    assert _equal(m.op_calls(inp)["mhc_pre"][0](), want)
    want_head = ref.hc_head(inp.residual, inp.head.fn, inp.head.scale, inp.head.base,
                            rms_eps=inp.rms_eps, hc_eps=inp.hc_eps)
    assert _equal(m.op_calls(inp)["hc_head"][0](), want_head)


def _top_level_names(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


def test_before_goes_through_the_registered_ops_and_after_does_not() -> None:
    inp = m.make_inputs("toy", 2)
    registered = {"mhc_pre": "mhc_pre", "mhc_post": "mhc_post", "mhc_fused_post_pre": "mhc_fused_post_pre",
                  "hc_head": "hc_head_fused"}
    for op, (before, after) in m.op_calls(inp).items():
        name = f"{m.NAMESPACE}::{registered[op]}"
        assert name in _top_level_names(before), op
        assert not any(n.startswith(m.NAMESPACE) for n in _top_level_names(after)), op


def test_hc_head_before_is_the_mutating_out_form() -> None:
    schema = torch.ops.dsv4lab_pr43905.hc_head_fused.default._schema
    out_arg = [a for a in schema.arguments if a.name == "out"][0]
    assert out_arg.alias_info is not None and out_arg.alias_info.is_write
    assert len(schema.returns) == 0
    for name in ("mhc_pre", "mhc_post", "mhc_fused_post_pre"):   # functional, as vLLM registered them
        s = getattr(torch.ops.dsv4lab_pr43905, name).default._schema
        assert all(a.alias_info is None for a in s.arguments), name


def test_fake_impls_match_real_outputs() -> None:
    inp = m.make_inputs("toy", 3)
    a = inp.attn
    real = {op: after() for op, (_, after) in m.op_calls(inp).items()}
    ops = torch.ops.dsv4lab_pr43905
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fk = lambda t: None if t is None else mode.from_tensor(t)   # noqa: E731
        r, f, p, c = fk(inp.residual), fk(inp.f), fk(inp.post), fk(inp.comb)
        s = (inp.rms_eps, inp.hc_eps, inp.post_mult, inp.sinkhorn_iters)
        pre = ops.mhc_pre(r, fk(a.fn), fk(a.scale), fk(a.base), fk(a.norm_weight), *s)
        post = ops.mhc_post(f, r, p, c)
        fused = ops.mhc_fused_post_pre(f, r, p, c, fk(a.fn), fk(a.scale), fk(a.base), fk(a.norm_weight), *s)
    for fake, want in ((pre, real["mhc_pre"]), ((post,), (real["mhc_post"],)), (fused, real["mhc_fused_post_pre"])):
        assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in want]


def test_calls_per_forward_follow_the_vllm_wiring() -> None:
    # hand count (dsv4-layers.md 2.6): 2 mHC calls per decoder layer, + mhc_post + hc_head
    assert sum(m.calls_per_forward("flash").values()) == 2 * 43 + 2 == 88
    assert sum(m.calls_per_forward("pro").values()) == 2 * 61 + 2 == 124
    # and the counted calls of the toy forward agree
    inp = m.make_inputs("toy", 1)
    mods = m.before_modules("cpu")
    counts = {op: 0 for op in m.OPS}
    for op in m.OPS:
        mod = getattr(mods, op)
        orig = mod._forward_method

        def counted(*a, _op=op, _orig=orig, **k):
            counts[_op] += 1
            return _orig(*a, **k)
        mod._forward_method = counted
    m.mhc_forward(inp, m.LAYERS["toy"], "before", mods)
    assert counts == m.calls_per_forward("toy")


def test_mhc_forward_before_equals_after_and_matches_unfused_reference() -> None:
    inp = m.make_inputs("toy", 2, seed=3)
    before = m.mhc_forward(inp, 3, "before")
    assert _equal(before, m.mhc_forward(inp, 3, "after"))
    # the fused wiring equals hc_post / hc_pre called one after the other (identity sublayers)
    kw = dict(rms_eps=inp.rms_eps, hc_eps=inp.hc_eps, post_mult=inp.post_mult, sinkhorn_iters=inp.sinkhorn_iters)
    r = inp.residual
    for layer in range(3):
        for params in (inp.attn, inp.ffn):
            x, post, comb = ref.mhc_pre(r, params.fn, params.scale, params.base, params.norm_weight, **kw)
            r = ref.mhc_post(x, r, post, comb)
    head = ref.hc_head(r, inp.head.fn, inp.head.scale, inp.head.base, rms_eps=inp.rms_eps, hc_eps=inp.hc_eps)
    assert _equal(before, (r, head))


def test_allocation_counts_equal_except_the_reference_head_copy() -> None:
    inp = m.make_inputs("toy", 2)
    dev = torch.device("cpu")
    for op, (before, after) in m.op_calls(inp).items():
        nb, na = (m.allocations_per_call(fn, dev)["count"] for fn in (before, after))
        # HCHeadOp allocates out; the reference hc_head has no out= form and allocates its own result too
        assert nb == na + (1 if op == "hc_head" else 0), (op, nb, na)
        assert na > 0


def test_run_cpu_quick_records() -> None:
    recs = m.run("cpu", quick=True, preset="toy")
    for r in recs:
        assert results.validate(r) is None, r
    assert all(r["value"] for r in recs if r["metric"] == "bitwise_equal")
    unavailable = [r for r in recs if r["metric"] == "unavailable"]
    assert {r["op"] for r in unavailable} == set(m.OPS) and all(r["reason"] for r in unavailable)
    deltas = [r for r in recs if r["metric"] == "host_overhead_delta"]
    assert {r["op"] for r in deltas} == set(m.OPS)
    per_fwd = {r["preset"]: r for r in recs if r["metric"] == "host_overhead_per_forward"}
    assert per_fwd["flash"]["calls"] == 88 and per_fwd["pro"]["calls"] == 124
